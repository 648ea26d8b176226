"""Modbus buses: what a shared RS485 gateway costs per wallbox, side by side with one connection each.

    PYTHONPATH=. python bench/modbus_bus.py [--wallboxes 8] [--rounds 300]

``--wallboxes`` devices (unit ids 1..N) answer the Heidelberg poll (input 5-18,
holding 261: two requests) in a second process, behind one TCP port per
framing. One round reads every wallbox once; measured per round (p50, p99)
and CPU of this process per request, four ways in one run:

* ``tcp, own connection each``: N clients, N concurrent trio tasks (what Modbus
  TCP wallboxes with their own addresses get);
* ``tcp, shared client``: one client, requests one after another (a Modbus TCP
  gateway in front of N RTU devices that takes one connection);
* ``rtu-over-tcp, shared``: RTU frames with CRC through the gateway, no gap;
* ``rtu-over-tcp, 5 ms gap``: the same with the client's default silent
  interval for gateways (``frame_gap``), which is what real RS485 turnaround needs.

Loopback has no baud rate: the numbers are the proxy's own cost and the gap's;
on a real 9600-baud line each request adds about 40 ms of wire time (not shown).
Bounded: every request has a timeout, rounds are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]


async def devices_main(count: int) -> None:
    """``count`` static Heidelberg-like devices on a Modbus TCP and an RTU-over-TCP port; runs until stdin closes."""
    from pymodbus import FramerType
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    def device(unit: int) -> SimDevice:
        registers = [SimData(0, count=300, values=7, datatype=DataType.REGISTERS)]
        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        return SimDevice(unit, simdata=(bits, bits, registers, registers))

    servers: list[Any] = []  # pymodbus types its transport loosely
    for framer in (FramerType.SOCKET, FramerType.RTU):
        server = ModbusTcpServer([device(u) for u in range(1, count + 1)], address=("127.0.0.1", 0), framer=framer)
        await server.serve_forever(background=True)
        servers.append(server)
    await asyncio.sleep(0)
    ports = [s.transport.sockets[0].getsockname()[1] for s in servers]
    print(json.dumps({"tcp": ports[0], "rtu": ports[1]}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def _stats(rounds: list[float], cpu: float, requests: int) -> dict[str, float]:
    ordered = sorted(rounds)
    return {"p50_ms": statistics.median(ordered) * 1e3, "p99_ms": ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1e3,
            "cpu_us": cpu / requests * 1e6}


async def _poll(client: object, unit: int) -> None:
    from proxy.modbus.client import ModbusClient

    assert isinstance(client, ModbusClient)
    await client.read("input", 5, 14, unit)
    await client.read("holding", 261, 1, unit)


async def _own_connections(port: int, count: int, rounds: int) -> dict[str, float]:
    from proxy.modbus.client import ModbusClient

    clients = [ModbusClient("127.0.0.1", port, unit, timeout=2.0) for unit in range(1, count + 1)]
    samples = []
    cpu = time.process_time()
    for _ in range(rounds):
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for unit, client in enumerate(clients, start=1):
                nursery.start_soon(_poll, client, unit)
        samples.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu
    for client in clients:
        await client.aclose()
    return _stats(samples, cpu, rounds * count * 2)


async def _shared(port: int, count: int, rounds: int, transport: str, gap: float) -> dict[str, float]:
    from proxy.modbus.client import ModbusClient

    client = ModbusClient("127.0.0.1", port, 1, timeout=2.0, transport=transport, frame_gap=gap)
    samples = []
    cpu = time.process_time()
    for _ in range(rounds):
        start = time.perf_counter()
        for unit in range(1, count + 1):
            await _poll(client, unit)
        samples.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu
    await client.aclose()
    return _stats(samples, cpu, rounds * count * 2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wallboxes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.devices is not None:
        asyncio.run(devices_main(args.devices))
        return 0
    from bench.limit_latency import machine
    from bench.modbus import devices_process

    with devices_process(__file__, args.wallboxes) as ports:
        n, rounds = args.wallboxes, args.rounds
        print(f"machine: {machine()}")
        print(f"{n} wallboxes × Heidelberg poll (2 requests), {rounds} rounds, devices in another process:")
        print(f"  {'way':<28} {'round p50':>10} {'round p99':>10} {'CPU/request':>12}")
        results = {
            "tcp, own connection each": trio.run(_own_connections, ports["tcp"], n, rounds),
            "tcp, shared client": trio.run(_shared, ports["tcp"], n, rounds, "tcp", 0.0),
            "rtu-over-tcp, shared": trio.run(_shared, ports["rtu"], n, rounds, "rtu-over-tcp", 0.0),
            "rtu-over-tcp, 5 ms gap": trio.run(_shared, ports["rtu"], n, max(1, rounds // 10), "rtu-over-tcp",
                                               0.005),
        }
        for name, r in results.items():
            print(f"  {name:<28} {r['p50_ms']:>8.2f}ms {r['p99_ms']:>8.2f}ms {r['cpu_us']:>10.0f}µs")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
