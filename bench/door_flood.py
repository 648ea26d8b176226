"""A legitimate wallbox's handshake while another address floods the proxy (issue 16).

    python -m bench.door_flood [--sessions 2000] [--probe-interval 0.05] [--budget 120]

Three runs, side by side, each with a fresh ``ocpp-proxy run`` (``accept_unknown``, offline
mode on) in front of the bench backend (``bench/backend.py``):

* ``quiet``: no flood, the probe alone;
* ``flood, caps on``: the default per-address caps (``per_address_pending``, ``per_address_rate``,
  ``per_address_burst``);
* ``flood, caps off``: the same flood with every cap at 0 (what the proxy did before).

The flood is a separate process bound to 127.0.0.2: 500 workers open WebSocket sessions until it
holds ``--sessions`` of them or ``--flood-seconds`` are over, keeping every one the proxy admits
open and retrying a refused attempt after 50 ms; it runs at nice 19, as an attacker's machine
would not take the proxy's cores (here all processes share them). The probe, bound to 127.0.0.1, opens a new
connection every ``--probe-interval`` seconds, sends an upgrade request and takes the time until
the 101 (which includes the proxy opening the upstream to the backend), then closes. It runs
from the flood's start until the flood is over plus one second, at most ``--budget`` seconds.

Reported: the probe's handshake p50 / p95 / max per run, how many flood sessions the proxy
admitted and refused, the machine. The target: p95 ≤ 50 ms under the flood with the caps on.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procs import HOST, ROOT, Backend, _env, free_port, wait_listening
from bench.sysinfo import load_average, machine, raise_nofile

FLOOD_SOURCE = "127.0.0.2"
#: A flood worker's pause after a refused attempt, seconds (the flood runs on the proxy's own cores here).
RETRY = 0.05
PROBE_SOURCE = "127.0.0.1"


def _request(port: int, cp_id: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /ocpp/{cp_id} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ocpp1.6\r\n\r\n"
            ).encode()


async def _upgrade(port: int, cp_id: str, source: str, timeout: float) -> tuple[int, asyncio.StreamWriter | None]:
    """(status, the open writer when admitted); status 0 when closed, reset or timed out."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, local_addr=(source, 0)), timeout)
    except (OSError, asyncio.TimeoutError):
        return 0, None
    try:
        writer.write(_request(port, cp_id))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        writer.close()
        return 0, None
    if status != 101:
        writer.close()
        return status, None
    return status, writer


# --- the flood process ----------------------------------------------------------------------------

async def _flood(port: int, sessions: int, concurrency: int, seconds: float) -> None:
    """From FLOOD_SOURCE, ``concurrency`` workers open sessions until ``sessions`` are held or
    ``seconds`` are over; a refused attempt is retried after RETRY seconds. Prints a JSON line then."""
    kept: list[asyncio.StreamWriter] = []
    counts = {"admitted": 0, "refused": 0}
    end = time.monotonic() + seconds
    numbers = iter(range(10**9))

    async def worker() -> None:
        while time.monotonic() < end and counts["admitted"] < sessions:
            status, writer = await _upgrade(port, f"FLOOD{next(numbers):06d}", FLOOD_SOURCE, 30.0)
            if writer is not None:
                kept.append(writer)
                counts["admitted"] += 1
            else:
                counts["refused"] += 1
                await asyncio.sleep(RETRY)

    print(json.dumps({"started": time.monotonic()}), flush=True)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    print(json.dumps({"done": time.monotonic(), **counts}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # hold until told
    for writer in kept:
        writer.close()


# --- the probe and one run ------------------------------------------------------------------------

async def _probe(port: int, interval: float, stop: asyncio.Event, budget: float) -> list[float]:
    samples: list[float] = []
    deadline = time.monotonic() + budget
    n = 0
    while not stop.is_set() and time.monotonic() < deadline:
        n += 1
        start = time.perf_counter()
        status, writer = await _upgrade(port, f"LEGIT{n % 10}", PROBE_SOURCE, 30.0)
        took = time.perf_counter() - start
        if writer is not None:
            writer.close()
        samples.append(took * 1000 if status == 101 else float("inf"))
        await asyncio.sleep(max(0.0, interval - took))
    return samples


def _start_proxy(workdir: Path, backend_port: int, caps: bool, settings: str = "") -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = workdir / "proxy.toml"
    off = settings if caps else "per_address_pending = 0\nper_address_rate = 0\nper_address_burst = 0\nper_address_handshakes = 0\n"
    config.write_text(f'[server]\nlisten = "{HOST}:{port}"\naccept_unknown = true\nping_interval = 0\n{off}'
                      f'[backend]\nurl = "ws://{HOST}:{backend_port}/ocpp"\n[metrics]\nlisten = ""\n'
                      f'[offline]\ndata_dir = "{workdir / "data"}"\n[log]\nformat = "json"\nlevel = "warning"\n')
    log = open(workdir / "proxy.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(config)],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT, env=_env())
    wait_listening(port, 30, process)
    return process, port


async def _run(name: str, backend_port: int, sessions: int, interval: float, budget: float,
               flood: bool, caps: bool, settings: str = "", flood_seconds: float = 8.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="door-flood-") as tmp:
        proxy, port = _start_proxy(Path(tmp), backend_port, caps, settings)
        try:
            stop = asyncio.Event()
            flooder = None
            counts: dict[str, Any] = {}
            if flood:
                flooder = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.door_flood", "--flood", str(port), str(sessions),
                    "--flood-seconds", str(flood_seconds),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=_env())
                assert flooder.stdout is not None and flooder.stdin is not None
                await asyncio.wait_for(flooder.stdout.readline(), 30)  # started

                async def until_done() -> None:
                    assert flooder is not None and flooder.stdout is not None
                    line = await asyncio.wait_for(flooder.stdout.readline(), budget)
                    counts.update(json.loads(line))
                    await asyncio.sleep(1.0)
                    stop.set()

                waiter = asyncio.create_task(until_done())
            else:
                asyncio.get_running_loop().call_later(5.0, stop.set)
            samples = await _probe(port, interval, stop, budget)
            if flooder is not None:
                await waiter
                assert flooder.stdin is not None
                flooder.stdin.write(b"quit\n")
                await flooder.stdin.drain()
                await asyncio.wait_for(flooder.wait(), 30)
        finally:
            proxy.terminate()
            proxy.wait(30)
    finite = sorted(s for s in samples if s != float("inf"))
    p95 = finite[max(0, int(len(finite) * 0.95) - 1)] if len(finite) == len(samples) and finite else float("inf")
    return {"run": name, "probes": len(samples), "failed": len(samples) - len(finite),
            "p50_ms": statistics.median(finite) if finite else None, "p95_ms": p95,
            "max_ms": max(samples) if samples else None,
            "flood_admitted": counts.get("admitted"), "flood_refused": counts.get("refused"),
            "flood_seconds": (counts["done"] - counts.get("started", counts["done"])) if "done" in counts else None}


def _table(results: list[dict[str, Any]]) -> str:
    def ms(value: Any) -> str:
        return "–" if value is None else ("failed" if value == float("inf") else f"{value:.1f}")

    lines = ["| run | probes | p50 ms | p95 ms | max ms | flood sessions admitted / refused |",
             "|---|---|---|---|---|---|"]
    for r in results:
        flood = "–" if r["flood_admitted"] is None else f"{r['flood_admitted']} / {r['flood_refused']}"
        lines.append(f"| {r['run']} | {r['probes']} ({r['failed']} failed) | {ms(r['p50_ms'])} | {ms(r['p95_ms'])} "
                     f"| {ms(r['max_ms'])} | {flood} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000, help="flood sessions attempted (default: %(default)s)")
    parser.add_argument("--probe-interval", type=float, default=0.05, help="seconds between probes")
    parser.add_argument("--budget", type=float, default=120.0, help="longest probe phase per run, seconds")
    parser.add_argument("--flood-seconds", type=float, default=8.0,
                        help="how long the flood keeps trying to hold --sessions sessions (default: %(default)s)")
    parser.add_argument("--flood", nargs=2, metavar=("PORT", "SESSIONS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help="also write the report (markdown) here")
    parser.add_argument("--caps", default="", help='[server] lines for the caps-on run instead of the defaults, '
                        'e.g. "per_address_handshakes = 2"')
    args = parser.parse_args(argv)
    raise_nofile()
    if args.flood:
        os.nice(19)  # the attacker's CPU is not the proxy's in real life; here they share two cores
        asyncio.run(_flood(int(args.flood[0]), int(args.flood[1]), 500, args.flood_seconds))
        return 0
    backend = Backend()
    before = load_average()
    try:
        caps_name = f"flood, caps on ({args.caps.strip() or 'defaults'})"
        settings = args.caps.replace(";", "\n") + "\n" if args.caps else ""
        results = [asyncio.run(_run(name, backend.port, args.sessions, args.probe_interval, args.budget, flood, caps,
                                    settings, args.flood_seconds))
                   for name, flood, caps in (("quiet", False, True), (caps_name, True, True),
                                             ("flood, caps off", True, False))]
    finally:
        backend.stop()
    info = machine(None)
    report = "\n".join([
        f"# Handshake under a flood: {args.sessions} sessions from {FLOOD_SOURCE}, probe from {PROBE_SOURCE}",
        "", _table(results), "",
        f"machine: {info['cpu_model']} ({info['cores']} cores, Python {info['python']}), {info['date']}, "
        f"load average before {before[0]:.2f}, after {load_average()[0]:.2f}.",
        "Target (issue 16): p95 ≤ 50 ms under the flood with the default caps."])
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
