"""Does a dead secondary backend slow the primary or the wallbox down? (issue 10)

    PYTHONPATH=. python bench/secondary_outage.py [--rate 50] [--seconds 20] [--outage 60]

The proxy runs as its own process (``ocpp-proxy run``); a wallbox, the primary
backend and two secondaries ("ems", "ha") are ``ocpp``-library / websockets
peers on asyncio loops in this process (wallbox and primary on one, the
secondaries on another), all on 127.0.0.1. The wallbox sends
CALLs at a fixed rate (Heartbeat and a 1.1 KB signed MeterValues of a running
transaction, alternating) and measures each round trip to the primary's answer.

Scenarios, one fresh proxy each:

1. primary only (no secondaries configured): the baseline;
2. primary + both secondaries up;
3. primary + both secondaries, the EMS killed for ``--outage`` seconds while
   the wallbox keeps sending: round trips are measured during the outage;
   then the EMS comes back and the bench waits until it has received every
   MeterValues sent meanwhile (with its own transactionId), and reports how
   long that took.

Prints p50 / p99 / max per scenario. Wall-clock numbers on a shared machine:
compare the scenarios of one run with each other, not with other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import websockets

from bench.procs import free_port
from proxy.demo.peers import OCMF_SAMPLE, LoopThread, SimBackend

ROOT = Path(__file__).resolve().parents[1]


def config(port: int, data: Path, backends: dict[str, SimBackend], secondaries: bool) -> str:
    text = f"""
[server]
listen = "127.0.0.1:{port}"
ping_interval = 0
[log]
level = "warning"
format = "json"
[metrics]
listen = ""
[offline]
data_dir = "{data}"
reconnect_min = 0.2
reconnect_max = 1.0
[backend]
url = "ws://127.0.0.1:{backends['primary'].port}/ocpp"
[[chargers]]
id = "CP1"
"""
    if secondaries:
        text += 'secondaries = ["ems", "ha"]\n'
        for name in ("ems", "ha"):
            text += (f'[backends.{name}]\nurl = "ws://127.0.0.1:{backends[name].port}/ocpp"\n'
                     'queue_limit = 100000\nreplay_rate = 1000\n')
    return text


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_proxy(text: str, workdir: Path) -> Proxy:
    path = workdir / "site.toml"
    path.write_text(text)
    port = int(text.split('listen = "127.0.0.1:')[1].split('"')[0])
    log = open(workdir / "proxy.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(path)], cwd=ROOT,
                               stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return Proxy(process, port)
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("proxy did not start")


def meter(msg_id: str, tx: int) -> str:
    return json.dumps([2, msg_id, "MeterValues", {"connectorId": 1, "transactionId": tx, "meterValue": [{
        "timestamp": "2026-11-25T10:00:00Z", "sampledValue": [
            {"value": "16.0", "measurand": "Current.Import", "unit": "A"},
            {"value": OCMF_SAMPLE, "format": "SignedData", "context": "Sample.Periodic"}]}]}],
        ensure_ascii=False, separators=(",", ":"))


class Wallbox:
    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: websockets.ClientConnection | None = None
        self.seq = 0
        self.tx = 0
        self.meters_sent = 0

    async def call(self, action: str, payload: dict[str, object] | None = None, text: str | None = None) -> float:
        assert self.ws is not None
        self.seq += 1
        msg_id = f"w{self.seq}"
        text = text or json.dumps([2, msg_id, action, payload or {}], separators=(",", ":"))
        start = time.perf_counter()
        await self.ws.send(text)
        while True:
            answer = json.loads(await self.ws.recv())
            if answer[0] == 3 and answer[1] == json.loads(text)[1]:
                break
        if action == "StartTransaction":
            self.tx = answer[2]["transactionId"]
        return time.perf_counter() - start

    async def open(self) -> None:
        self.ws = await websockets.connect(self.url, subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                                           ping_interval=None, max_size=None)
        await self.call("BootNotification", {"chargePointVendor": "bench", "chargePointModel": "B"})
        await self.call("StatusNotification", {"connectorId": 1, "errorCode": "NoError", "status": "Charging"})
        await self.call("StartTransaction", {"connectorId": 1, "idTag": "BENCH", "meterStart": 0,
                                             "timestamp": "2026-11-25T10:00:00Z"})

    async def run(self, seconds: float, rate: float) -> list[float]:
        """Send at ``rate`` CALLs/s (open loop; a late answer delays the next send, never skips it)."""
        rtts: list[float] = []
        interval = 1.0 / rate
        next_send = time.perf_counter()
        end = next_send + seconds
        while next_send < end:
            delay = next_send - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(rtts) % 2:
                self.seq += 1
                self.meters_sent += 1
                rtts.append(await self.call("MeterValues", text=meter(f"w{self.seq}", self.tx)))
            else:
                rtts.append(await self.call("Heartbeat"))
            next_send += interval
        return rtts

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


def summary(name: str, rtts: list[float]) -> str:
    ms = sorted(r * 1e3 for r in rtts)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (f"{name:44s} n={len(ms):5d}  p50 {statistics.median(ms):6.2f} ms  p99 {p99:6.2f} ms  "
            f"max {ms[-1]:7.2f} ms")


def received_meters(sim: SimBackend) -> list[str]:
    recorder = sim.recorders.get("CP1")
    return [] if recorder is None else [f for f in recorder.received if '"MeterValues"' in f]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="wallbox CALLs per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement per scenario 1 and 2")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the EMS is down in scenario 3")
    args = parser.parse_args()
    peers = LoopThread()
    others = LoopThread("secondaries")  # their work must not queue behind the wallbox's in one loop
    try:
        run(peers, others, args)
    finally:
        peers.close()
        others.close()


def run(peers: LoopThread, others: LoopThread, args: argparse.Namespace) -> None:
    for scenario in ("primary only", "primary + 2 secondaries up", "primary + 2 secondaries, EMS dead"):
        sims = {"primary": SimBackend(), "ems": SimBackend(first_transaction_id=5001),
                "ha": SimBackend(first_transaction_id=7001)}
        loops = {"primary": peers, "ems": others, "ha": others}
        for name, sim in sims.items():
            loops[name].run(sim.start())
        with tempfile.TemporaryDirectory() as tmp:
            proxy = start_proxy(config(free_port(), Path(tmp) / "data", sims, scenario != "primary only"),
                                Path(tmp))
            wallbox = Wallbox(f"ws://127.0.0.1:{proxy.port}/ocpp/CP1")
            try:
                peers.run(wallbox.open())
                peers.run(wallbox.run(2.0, args.rate), timeout=60)  # warm-up
                if scenario.endswith("dead"):
                    outage(peers, others, args, sims, wallbox)
                else:
                    rtts = peers.run(wallbox.run(args.seconds, args.rate), timeout=args.seconds + 60)
                    print(summary(scenario, rtts), flush=True)
                peers.run(wallbox.close())
            finally:
                proxy.stop()
                for name, sim in sims.items():
                    loops[name].run(sim.stop())


def outage(peers: LoopThread, others: LoopThread, args: argparse.Namespace, sims: dict[str, SimBackend],
           wallbox: Wallbox) -> None:
    ems = sims["ems"]
    before = len(received_meters(ems))
    sent_before = wallbox.meters_sent
    others.run(ems.stop())
    rtts = peers.run(wallbox.run(args.outage, args.rate), timeout=args.outage + 60)
    print(summary(f"primary + 2 secondaries, EMS dead {args.outage:g} s", rtts), flush=True)
    missed = wallbox.meters_sent - sent_before
    back = SimBackend(port=ems.port, first_transaction_id=6001)
    others.run(back.start())
    sims["ems"] = back
    started = time.perf_counter()
    deadline = started + 300
    while time.perf_counter() < deadline and len(received_meters(back)) < missed:
        time.sleep(0.05)
    took = time.perf_counter() - started
    got = received_meters(back)
    own_ids = {json.loads(f)[3].get("transactionId") for f in got}
    print(f"{'EMS back: MeterValues sent while it was down':44s} {missed}; received after it came back "
          f"{len(got)} in {took:.1f} s (before the outage it had {before}); transactionIds it saw: "
          f"{sorted(i for i in own_ids if i is not None)}", flush=True)


if __name__ == "__main__":
    main()
