"""Latency from a limit change to the SetChargingProfile frame at the wallbox.

    PYTHONPATH=. python bench/limit_latency.py [--wallboxes 100] [--rounds 20]

The proxy runs in this process (as in production: one trio process). The
wallboxes and the backend run in a second process (``--peers``), so that
their work does not share a core's event loop with the proxy: 100 raw
OCPP-J wallbox connections (trio-websocket) that boot and answer every
SetChargingProfile with Accepted, and a backend that accepts them.

Each round changes the EMS site limit (the limit engine's Modbus-side input)
so that every wallbox's limit changes, and takes, per wallbox, the time from
that call to the moment the wallbox process has read the SetChargingProfile
frame from its socket (CLOCK_MONOTONIC is shared by both processes). That
includes the wallbox process reading 100 frames one after another, so the
high percentiles are an upper bound for the proxy. Rounds that lower the
limit are pure decreases (they never wait); rounds that raise it are
increases (each waits for its reservation to be on disk, docs/load-management.md).

Then the fuse's sequencing on a full site: two wallboxes A and B share what
the others leave (EMS site limit = the others' 16 A + 20 A, A and B held at
10 A each by EMS charger limits). Each pair round moves 4 A from one to the
other at once (EMS: A 6 A and B 14 A, then back): the increase may leave only
once the decrease is Accepted. Per round: the decreasing wallbox's round trip
(the EMS write until the proxy has its Accepted) and the time until the
increasing wallbox has read its frame; the difference is what the proxy adds
to one charger round trip. Bounded: every wait has a timeout and the whole run
stops after ``--budget`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
import trio_websocket

ROOT = Path(__file__).resolve().parents[1]


# --- the peers process: backend + wallboxes -------------------------------------------------

async def _backend(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept(subprotocol="ocpp1.6")
    try:
        while True:
            message = json.loads(await ws.get_message())
            if message[0] == 2:
                payload: dict[str, Any] = {}
                if message[2] == "BootNotification":
                    payload = {"status": "Accepted", "currentTime": "2026-11-25T10:00:00Z", "interval": 300}
                await ws.send_message(json.dumps([3, message[1], payload]))
    except trio_websocket.ConnectionClosed:
        pass


async def _wallbox(url: str, cp_id: str, out: trio.MemorySendChannel[str]) -> None:
    async with trio_websocket.open_websocket_url(url, subprotocols=["ocpp1.6"]) as ws:
        await ws.send_message(json.dumps([2, f"boot-{cp_id}", "BootNotification",
                                          {"chargePointModel": "Bench", "chargePointVendor": "ocpp-proxy"}]))
        try:
            while True:
                text = await ws.get_message()
                seen = time.monotonic_ns()
                message = json.loads(text)
                if message[0] != 2:
                    continue
                status = {"status": "Accepted"}
                await ws.send_message(json.dumps([3, message[1], status]))
                if message[2] == "SetChargingProfile":
                    period = message[3]["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"][0]
                    out.send_nowait(f"t {cp_id} {seen} {period['limit']}")
        except trio_websocket.ConnectionClosed:
            pass


async def _stdin_lines() -> Any:
    stream = trio.lowlevel.FdStream(os.dup(0))
    buffer = b""
    while chunk := await stream.receive_some(4096):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.decode()


async def peers_main(wallboxes: int) -> None:
    send, receive = trio.open_memory_channel[str](100_000)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, _backend, "127.0.0.1", 0, None)
        print(f"backend {server.port}", flush=True)
        lines = _stdin_lines()
        first = await lines.__anext__()
        url = f"ws://127.0.0.1:{first.split()[1]}/ocpp"
        for n in range(wallboxes):
            nursery.start_soon(_wallbox, f"{url}/CP{n:03d}", f"CP{n:03d}", send)

        async def report() -> None:
            async for line in receive:  # one write per burst of frames, not per frame
                batch = [line]
                while True:
                    try:
                        batch.append(receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                sys.stdout.write("\n".join(batch) + "\n")
                sys.stdout.flush()

        nursery.start_soon(report)
        async for _ in lines:  # until the main process closes our stdin
            pass
        nursery.cancel_scope.cancel()


# --- the proxy process ------------------------------------------------------------------------

def machine() -> str:
    model = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, Python {platform.python_version()} "
            f"({platform.python_implementation()}), trio {trio.__version__}, {platform.system()} {platform.release()}")


def config_text(backend_port: int, wallboxes: int, data_dir: str) -> str:
    chargers = "".join(f'[[chargers]]\nid = "CP{n:03d}"\nmax_current = 16\n' for n in range(wallboxes))
    return (f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\n[log]\nlevel = "warning"\n'
            f'[backend]\nurl = "ws://127.0.0.1:{backend_port}/ocpp"\n[offline]\nenabled = false\n'
            f'data_dir = "{data_dir}"\n'
            f'[site]\nmax_current = {16 * wallboxes}\nramp_up_interval = 0\nhysteresis = 0\nmin_hold_time = 0\n'
            f'interval = 60\n{chargers}')


class Arrivals:
    """SetChargingProfile frames as the peers process saw them: (charger, ns, limit)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, float]] = []
        self._changed = trio.Event()

    def add(self, line: str) -> None:
        _, cp_id, ns, limit = line.split()
        self.seen.append((cp_id, int(ns), float(limit)))
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, count: int, since: int = 0, limit: float | None = None,
                   charger: str | None = None) -> list[tuple[str, int, float]]:
        while True:
            got = [a for a in self.seen[since:] if (limit is None or a[2] == limit)
                   and (charger is None or a[0] == charger)]
            if len(got) >= count:
                return got
            await self._changed.wait()


async def _read_lines(stream: trio.abc.ReceiveStream, arrivals: Arrivals, first: trio.MemorySendChannel[str]) -> None:
    buffer = b""
    while chunk := await stream.receive_some(65536):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.decode()
            if line.startswith("t "):
                arrivals.add(line)
            elif line:
                first.send_nowait(line)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def bench_main(wallboxes: int, rounds: int, budget: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="limit-latency-") as data_dir:
        return await _bench(wallboxes, rounds, budget, data_dir)


async def _bench(wallboxes: int, rounds: int, budget: float, data_dir: str) -> dict[str, Any]:
    from proxy.ops import logs
    from proxy.config import loads
    from proxy.runtime.server import ProxyServer

    logs.configure("warning", "json")
    arrivals = Arrivals()
    first_send, first_receive = trio.open_memory_channel[str](10)
    with trio.fail_after(budget):
        async with trio.open_nursery() as nursery:
            peers = await trio.lowlevel.open_process(
                [sys.executable, str(Path(__file__).resolve()), "--peers", str(wallboxes)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
            assert peers.stdout is not None and peers.stdin is not None
            nursery.start_soon(_read_lines, peers.stdout, arrivals, first_send)
            backend_port = int((await first_receive.receive()).split()[1])
            server = ProxyServer(loads(config_text(backend_port, wallboxes, data_dir)))
            ports = await nursery.start(server.serve)
            await peers.stdin.send_all(f"proxy {ports[0]}\n".encode())
            await arrivals.wait(wallboxes, limit=16.0)  # everyone booted and has its first limit
            limiter = server.limiter
            await limiter.wait_settled()
            latencies: list[float] = []
            by_direction: dict[str, list[float]] = {"decrease": [], "increase": []}
            worst: list[float] = []
            values = [8.0, 12.0, 9.5, 14.0, 6.5, 11.0]
            previous = 16.0
            for round_ in range(rounds):
                per_charger = values[round_ % len(values)]
                since = len(arrivals.seen)
                started = time.monotonic_ns()
                limiter.engine.ems_site_limit(per_charger * wallboxes, trio.current_time())
                with trio.fail_after(30):
                    got = await arrivals.wait(wallboxes, since, per_charger)
                    await limiter.wait_settled()
                round_latencies = [(ns - started) / 1e6 for _, ns, _ in got[:wallboxes]]
                latencies += round_latencies
                by_direction["decrease" if per_charger < previous else "increase"] += round_latencies
                previous = per_charger
                worst.append(max(round_latencies))
            pair = await _pair_rounds(limiter, arrivals, wallboxes, rounds) if wallboxes >= 3 else {}
            limiter.stop()  # wallboxes leaving would free current for the others: no new limits now
            await peers.stdin.aclose()
            with trio.move_on_after(10):
                await peers.wait()
            if peers.returncode is None:
                peers.kill()
            nursery.cancel_scope.cancel()
    result: dict[str, Any] = {
        "wallboxes": wallboxes, "rounds": rounds, "samples": len(latencies), "worst": worst,
        "p50_ms": statistics.median(latencies), "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies), "round_all_sent_p50_ms": statistics.median(worst)}
    for direction, values_ in by_direction.items():
        if values_:
            result[f"{direction}_p50_ms"] = statistics.median(values_)
            result[f"{direction}_p99_ms"] = percentile(values_, 99)
    return {**result, **pair}


async def _pair_rounds(limiter: Any, arrivals: Arrivals, wallboxes: int, rounds: int) -> dict[str, Any]:
    """Decrease-then-increase on a full site (see the module docstring)."""
    engine = limiter.engine
    a, b = f"CP{wallboxes - 2:03d}", f"CP{wallboxes - 1:03d}"
    since = len(arrivals.seen)
    engine.ems_charger_limit(a, 10.0, trio.current_time())
    engine.ems_charger_limit(b, 10.0, trio.current_time())
    engine.ems_site_limit((wallboxes - 2) * 16.0 + 20.0, trio.current_time())
    with trio.fail_after(30):
        await arrivals.wait(1, since, 10.0, a)
        await arrivals.wait(1, since, 10.0, b)
        await limiter.wait_settled()
    totals: list[float] = []
    round_trips: list[float] = []
    extras: list[float] = []
    decreases: list[float] = []
    for round_ in range(rounds):
        (down, low), (up, high) = ((a, 6.0), (b, 14.0)) if round_ % 2 == 0 else ((b, 10.0), (a, 10.0))
        since = len(arrivals.seen)
        started = time.monotonic_ns()
        engine.ems_charger_limit(down, low, trio.current_time())
        engine.ems_charger_limit(up, high, trio.current_time())
        with trio.fail_after(30):
            slot = limiter.fuse.slot(down)
            while not (slot.pending is None and slot.held == round(low * 10)):
                await limiter.next_progress()
            answered = time.monotonic_ns()
            (_, raised, _), = await arrivals.wait(1, since, high, up)
            (_, lowered, _), = await arrivals.wait(1, since, low, down)
            await limiter.wait_settled()
        totals.append((raised - started) / 1e6)
        round_trips.append((answered - started) / 1e6)
        extras.append((raised - answered) / 1e6)
        decreases.append((lowered - started) / 1e6)
    return {"pair_rounds": rounds, "pair_total_p50_ms": statistics.median(totals),
            "pair_total_p99_ms": percentile(totals, 99), "pair_round_trip_p50_ms": statistics.median(round_trips),
            "pair_extra_p50_ms": statistics.median(extras), "pair_extra_p99_ms": percentile(extras, 99),
            "pair_decrease_p99_ms": percentile(decreases, 99),
            "pair_increase_before_accept": sum(1 for t, r in zip(totals, round_trips) if t < r)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wallboxes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--budget", type=float, default=180.0, help="stop after this many seconds")
    parser.add_argument("--peers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peers is not None:
        trio.run(peers_main, args.peers)
        return 0
    result = trio.run(bench_main, args.wallboxes, args.rounds, args.budget)
    print(f"machine: {machine()}")
    print(f"limit change → SetChargingProfile read by the wallbox, {result['wallboxes']} wallboxes, "
          f"{result['rounds']} rounds ({result['samples']} frames):")
    print(f"  p50 {result['p50_ms']:.2f} ms   p99 {result['p99_ms']:.2f} ms   max {result['max_ms']:.2f} ms")
    print(f"  until the last wallbox of a round has it (median over rounds): {result['round_all_sent_p50_ms']:.2f} ms")
    for direction in ("decrease", "increase"):
        if f"{direction}_p99_ms" in result:
            print(f"  {direction} rounds: p50 {result[f'{direction}_p50_ms']:.2f} ms   "
                  f"p99 {result[f'{direction}_p99_ms']:.2f} ms")
    if "pair_rounds" in result:
        print(f"decrease-then-increase on a full site, {result['pair_rounds']} rounds:")
        print(f"  decrease read by its wallbox: p99 {result['pair_decrease_p99_ms']:.2f} ms")
        print(f"  decreasing wallbox's round trip (until its Accepted is processed): "
              f"p50 {result['pair_round_trip_p50_ms']:.2f} ms")
        print(f"  increase read by its wallbox: p50 {result['pair_total_p50_ms']:.2f} ms   "
              f"p99 {result['pair_total_p99_ms']:.2f} ms")
        print(f"  after the Accepted: p50 {result['pair_extra_p50_ms']:.2f} ms   "
              f"p99 {result['pair_extra_p99_ms']:.2f} ms (target: 50 ms)")
        print(f"  increases read before the decrease was Accepted: {result['pair_increase_before_accept']}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
