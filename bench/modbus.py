"""Modbus: which client to use under trio, and what virtual charge points cost.

    PYTHONPATH=. python bench/modbus.py [--polls 2000] [--wallboxes 50] [--window 20]

Part 1, client choice (issue 6: "measure and choose"). The same Heidelberg poll
(input registers 5-18 and holding register 261: two requests) against one
simulated wallbox, ``--polls`` times in a row, three ways, side by side:

* ``trio framer``: the proxy's client (:mod:`proxy.modbus.client`), pymodbus's
  framer and PDU classes over a trio socket stream;
* ``sync in thread``: pymodbus's ``ModbusTcpClient`` called through
  ``trio.to_thread.run_sync`` (the other way to keep trio's loop free);
* ``asyncio native``: pymodbus's ``AsyncModbusTcpClient`` on its own asyncio
  loop, no trio at all (the reference for pymodbus as its authors use it).

Per poll: wall time p50 / p99 and CPU time of this process (the devices run in
a second process, so they do not share this process's CPU or GIL).

Part 2, scale: ``--wallboxes`` simulated Heidelberg wallboxes (second process)
become virtual charge points of a proxy in this process, polled every second,
each with a car charging and MeterValues every 10 s, talking to a backend (in
the second process) that accepts everything. After all are charging, a
``--window`` of seconds is measured: CPU of the proxy process per poll and as a
share of one core, and memory per virtual charge point. Bounded: every wait
has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]


# --- the devices process: simulated wallboxes and a backend ------------------------------------

async def _backend(websocket: Any) -> None:
    import websockets

    answers: dict[str, Callable[[], dict[str, Any]]] = {
        "BootNotification": lambda: {"status": "Accepted", "currentTime": "2026-11-25T10:00:00Z", "interval": 300},
        "Authorize": lambda: {"idTagInfo": {"status": "Accepted"}},
        "StartTransaction": lambda: {"transactionId": 1, "idTagInfo": {"status": "Accepted"}},
        "Heartbeat": lambda: {"currentTime": "2026-11-25T10:00:00Z"},
    }
    try:
        async for text in websocket:
            frame = json.loads(text)
            if frame[0] == 2:
                await websocket.send(json.dumps([3, frame[1], answers.get(frame[2], dict)()]))
    except websockets.ConnectionClosed:
        pass


async def devices_main(count: int) -> None:
    """Start ``count`` wallboxes (cars plugged in) and a backend; print their ports; run until stdin closes."""
    import websockets

    from proxy.demo.peers import SimHeidelberg

    boxes = [SimHeidelberg() for _ in range(count)]
    ports = [await box.start() for box in boxes]
    for box in boxes:
        box.plugged = True
    server = await websockets.serve(_backend, "127.0.0.1", 0, subprotocols=["ocpp1.6"])  # type: ignore[list-item]
    print(json.dumps({"wallboxes": ports, "backend": server.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# --- part 1: client choice ----------------------------------------------------------------------

def _stats(samples: list[float], cpu: float) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_us": statistics.median(ordered) * 1e6, "p99_us": ordered[int(len(ordered) * 0.99) - 1] * 1e6,
            "cpu_us": cpu / len(samples) * 1e6}


async def _trio_framer(port: int, polls: int) -> dict[str, float]:
    from proxy.modbus.client import ModbusClient

    client = ModbusClient("127.0.0.1", port, 1, timeout=2.0)
    samples = []
    cpu = time.process_time()
    for _ in range(polls):
        start = time.perf_counter()
        await client.read("input", 5, 14)
        await client.read("holding", 261, 1)
        samples.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu
    await client.aclose()
    return _stats(samples, cpu)


async def _sync_in_thread(port: int, polls: int) -> dict[str, float]:
    from pymodbus.client import ModbusTcpClient

    client = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    client.connect()  # type: ignore[no-untyped-call]

    def poll() -> None:
        client.read_input_registers(5, count=14, device_id=1)
        client.read_holding_registers(261, count=1, device_id=1)

    samples = []
    cpu = time.process_time()
    for _ in range(polls):
        start = time.perf_counter()
        await trio.to_thread.run_sync(poll)
        samples.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu
    client.close()  # type: ignore[no-untyped-call]
    return _stats(samples, cpu)


def _asyncio_native(port: int, polls: int) -> dict[str, float]:
    from pymodbus.client import AsyncModbusTcpClient

    async def run() -> dict[str, float]:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2)
        await client.connect()
        samples = []
        cpu = time.process_time()
        for _ in range(polls):
            start = time.perf_counter()
            await client.read_input_registers(5, count=14, device_id=1)
            await client.read_holding_registers(261, count=1, device_id=1)
            samples.append(time.perf_counter() - start)
        cpu = time.process_time() - cpu
        client.close()
        return _stats(samples, cpu)

    return asyncio.run(run())


# --- part 2: virtual charge points at scale -----------------------------------------------------

def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _config(backend: int, ports: Sequence[int], data_dir: str) -> str:
    chargers = "".join(f'[[modbus_chargers]]\nid = "HD{n:03d}"\nmodbus = "127.0.0.1:{port}"\n'
                       f'fixed_id_tag = "BENCH{n:03d}"\nmeter_interval = 10\n' for n, port in enumerate(ports))
    return (f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\n[log]\nlevel = "warning"\n'
            f'[backend]\nurl = "ws://127.0.0.1:{backend}/ocpp"\n[metrics]\nlisten = ""\n'
            f'[offline]\ndata_dir = "{data_dir}"\n{chargers}')


async def _scale(backend: int, ports: Sequence[int], window: float, data_dir: str) -> dict[str, float]:
    from proxy.ops import logs
    from proxy.config import loads
    from proxy.runtime.server import ProxyServer

    import proxy.modbus.wallbox  # noqa: F401 - first-use imports are not per-charger memory
    from proxy.loadmgmt.profiles import validate

    logs.configure("warning", "json")
    validate("Heartbeat", {})  # loads the OCPP schema machinery once
    before = _rss_kib()
    server = ProxyServer(loads(_config(backend, ports, data_dir)))
    async with trio.open_nursery() as nursery:
        started = time.perf_counter()
        await nursery.start(server.serve)
        with trio.fail_after(60):
            while len(server.virtual) < len(ports) or not all(
                    v.core.tx is not None and v.core.tx.transaction_id for v in server.virtual.values()):
                await trio.sleep(0.1)
        all_charging = time.perf_counter() - started

        def polls() -> int:
            return sum(v.polls for v in server.virtual.values())

        cpu, count, wall = time.process_time(), polls(), time.perf_counter()
        await trio.sleep(window)
        cpu, count, wall = time.process_time() - cpu, polls() - count, time.perf_counter() - wall
        rss = _rss_kib() - before
        await server.stop()
        nursery.cancel_scope.cancel()
    return {"all_charging_s": all_charging, "polls": count, "cpu_per_poll_us": cpu / max(count, 1) * 1e6,
            "core_share": cpu / wall, "rss_per_charger_kib": rss / len(ports)}


# --- main -------------------------------------------------------------------------------------

@contextlib.contextmanager
def devices_process(script: str, count: int) -> Iterator[dict[str, Any]]:
    """``script --devices count`` in a second process (so devices share no CPU or GIL with the
    measured side): the ports it prints first; stopped by closing its stdin."""
    devices = subprocess.Popen([sys.executable, script, "--devices", str(count)], cwd=ROOT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert devices.stdout is not None
        yield json.loads(devices.stdout.readline())
    finally:
        if devices.stdin is not None:
            devices.stdin.close()
        devices.wait(timeout=30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=2000)
    parser.add_argument("--wallboxes", type=int, default=50)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.devices is not None:
        asyncio.run(devices_main(args.devices))
        return 0
    from bench.limit_latency import machine

    import tempfile

    with devices_process(__file__, args.wallboxes + 1) as ports:
        first, rest = ports["wallboxes"][0], ports["wallboxes"][1:]
        print(f"machine: {machine()}")
        print(f"Heidelberg poll (2 requests) × {args.polls}, devices in another process:")
        print(f"  {'client':<16} {'p50':>9} {'p99':>9} {'CPU/poll':>10}")
        results = {"trio framer": trio.run(_trio_framer, first, args.polls),
                   "sync in thread": trio.run(_sync_in_thread, first, args.polls),
                   "asyncio native": _asyncio_native(first, args.polls)}
        for name, r in results.items():
            print(f"  {name:<16} {r['p50_us']:>7.0f}µs {r['p99_us']:>7.0f}µs {r['cpu_us']:>8.0f}µs")
        with tempfile.TemporaryDirectory(prefix="ocpp-proxy-bench-") as data_dir:
            scale = trio.run(_scale, ports["backend"], rest, args.window, data_dir)
        print(f"{len(rest)} virtual charge points, polled every 1 s, cars charging, {args.window:g} s window:")
        print(f"  all booted and in a transaction after {scale['all_charging_s']:.2f} s")
        print(f"  {scale['polls']} polls, proxy CPU {scale['cpu_per_poll_us']:.0f} µs per poll "
              f"({scale['core_share'] * 100:.1f} % of one core), RSS {scale['rss_per_charger_kib']:.0f} KiB "
              f"per virtual charge point")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
