"""The load generator: simulated wallboxes that send CALLs and time the answers (asyncio).

    python -m bench.loadgen '{"targets": [[port, path], ...]}'     # or @FILE holding that JSON

One process opens every connection it is given (at most ``concurrency``
handshakes in flight), prints one JSON line with the set-up times, then obeys
stdin lines from the runner:

* ``load {"mode": "rate"|"closed"|"saturate"|"once", "duration": s, "warmup": s, "rate": f}``:
  ``rate`` sends one CALL per wallbox every ``1/rate`` s (open loop, random
  phase, whether or not earlier CALLs are answered); ``closed`` is what a real
  wallbox does, one CALL outstanding: the next CALL ``1/rate`` s after the
  previous one was sent, or as soon as its answer is in if that is later;
  ``saturate`` sends the next CALL as soon as the answer is in (closed loop, no
  pause). CALLs alternate between a Heartbeat (``[2,"id","Heartbeat",{}]``) and
  a MeterValues of exactly 1024 bytes. Prints the round trips in µs per kind,
  measured from when each CALL was *due* (open loop: a generator that falls
  behind its schedule cannot hide the wait, no coordinated omission), and the
  generator's own lag (due → written to the socket) so a late generator shows.
* ``close``: closes every connection with 1000 and exits.

The generator is a plain asyncio protocol with hand-made framing
(:mod:`bench.wire`), so that its own cost stays far below the relay's.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

from bench import wire
from bench.sysinfo import raise_nofile

HEARTBEAT, METER_VALUES = "hb", "mv"
KINDS = (HEARTBEAT, METER_VALUES)
MV_BYTES = 1024


def heartbeat(msg_id: int) -> bytes:
    return b'[2,"%d","Heartbeat",{}]' % msg_id


def _meter_values_template() -> bytes:
    """A realistic MeterValues (phase currents, energy, a signed value) padded to 1024 bytes."""
    sampled = [
        '{"value":"%s","context":"Sample.Periodic","measurand":"Current.Import","phase":"L%d","unit":"A"}'
        % (f"{15.9 + n / 10:.1f}", n) for n in (1, 2, 3)
    ]
    sampled.append('{"value":"12345.678","measurand":"Energy.Active.Import.Register","unit":"kWh"}')
    sampled.append('{"value":"OCMF|{\\"FV\\":\\"1.0\\",\\"PAD\\":\\"%s\\"}","format":"SignedData",'
                   '"context":"Sample.Periodic"}')
    body = ('[2,"%d","MeterValues",{"connectorId":1,"transactionId":42,"meterValue":'
            '[{"timestamp":"2026-01-01T00:00:00Z","sampledValue":[' + ",".join(sampled) + "]}]}]")
    return body.encode()


_MV = _meter_values_template()


def meter_values(msg_id: int) -> bytes:
    head = _MV % (msg_id, b"")
    return _MV % (msg_id, b"x" * (MV_BYTES - len(head)))


class Wallbox(asyncio.Protocol):
    """One simulated wallbox connection."""

    def __init__(self, host: str, port: int, path: str, stats: Stats) -> None:
        self.request, self.expected_accept = wire.client_request(host, port, path)
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.reader = wire.FrameReader()
        self.opened: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.seq = 0
        self.pending: dict[bytes, tuple[float, int]] = {}
        self.saturating = False
        #: ``closed`` mode: the pause between CALLs, and when the next one is due.
        self.period = 0.0
        self.due = 0.0

    # -- asyncio protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4:]
            if not head.startswith(b"HTTP/1.1 101") or self.expected_accept not in head:
                self.opened.set_exception(ConnectionError(head.split(b"\r\n")[0].decode(errors="replace")))
                return
            self.opened.set_result(time.monotonic())
            if not data:
                return
        for opcode, payload in self.reader.feed(data):
            if opcode == wire.TEXT:
                self.answered(payload)
            elif opcode == wire.PING:
                self.write(wire.frame(wire.PONG, payload, mask=True))
            elif opcode == wire.CLOSE:
                self.write(wire.frame(wire.CLOSE, payload[:2], mask=True))
                assert self.transport is not None
                self.transport.close()

    # -- load -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_call(self, due: float | None = None) -> None:
        """Send the next CALL; ``due``: when it was scheduled (latency counts from then; lag is recorded)."""
        self.seq += 1
        kind = self.seq & 1
        text = meter_values(self.seq) if kind else heartbeat(self.seq)
        now = time.monotonic()
        if due is None:
            due = now
        else:
            self.stats.lagged(due, now)
        self.pending[b"%d" % self.seq] = (due, kind)
        self.write(wire.frame(wire.TEXT, text, mask=True))

    def answered(self, payload: bytes) -> None:
        now = time.monotonic()
        i = payload.index(b'"')
        sent = self.pending.pop(payload[i + 1:payload.index(b'"', i + 1)], None)
        if sent is None:
            self.stats.unexpected += 1
            return
        self.stats.record(sent[0], now, sent[1])
        if self.saturating and now < self.stats.end:
            self.send_call()
        elif self.period and not self.pending:
            self.send_closed(now)

    def send_closed(self, now: float) -> None:
        """``closed`` mode, an answer is in: the next CALL when it is due, or now if it was due already."""
        due = self.due
        if due >= self.stats.end:
            self.period = 0.0
        elif due <= now:  # due while its predecessor was unanswered: a real wallbox sends it now
            self.send_call(now)
            self.due = now + self.period
        else:
            asyncio.get_running_loop().call_at(due, self.fire_closed, due)

    def fire_closed(self, due: float) -> None:
        if self.period:
            self.send_call(due)
            self.due = due + self.period


class Stats:
    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.latencies: tuple[list[int], list[int]] = ([], [])
        self.unexpected = 0
        #: Every answer during the load phase, inside the window or not (for CPU per frame).
        self.total = 0
        #: The generator's own lag: µs from a CALL's due time to writing it, in the window.
        self.lag: list[int] = []

    def reset(self, start: float, end: float) -> None:
        self.start, self.end = start, end
        self.latencies = ([], [])
        self.total = 0
        self.lag = []

    def record(self, sent: float, now: float, kind: int) -> None:
        self.total += 1
        if self.start <= sent < self.end:
            self.latencies[kind].append(int((now - sent) * 1e6))

    def lagged(self, due: float, now: float) -> None:
        if self.start <= due < self.end:
            self.lag.append(int((now - due) * 1e6))


async def open_all(targets: list[tuple[int, str]], stats: Stats, concurrency: int,
                   host: str = "127.0.0.1") -> tuple[list[Wallbox], list[dict[str, Any]], list[str]]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    wallboxes: list[Wallbox] = []
    setups: list[dict[str, Any]] = []
    failures: list[str] = []

    async def one(port: int, path: str) -> None:
        async with gate:
            started = time.monotonic()
            try:
                _, wallbox = await loop.create_connection(lambda: Wallbox(host, port, path, stats), host, port)
                opened = await asyncio.wait_for(wallbox.opened, 60)
            except (TimeoutError, OSError) as exc:
                failures.append(f"{path}: {exc!r}"[:200])
                return
        wallboxes.append(wallbox)
        setups.append({"path": path, "start": started, "open": opened})

    await asyncio.gather(*(one(port, path) for port, path in targets))
    return wallboxes, setups, failures


async def run_load(wallboxes: list[Wallbox], stats: Stats, spec: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    duration, warmup = float(spec["duration"]), float(spec.get("warmup", 1.0))
    began = time.monotonic()
    stats.reset(began + warmup, began + warmup + duration)
    if spec["mode"] == "once":  # one CALL each, then wait for every answer (up to the grace period)
        for wallbox in wallboxes:
            wallbox.send_call()
    elif spec["mode"] == "closed":
        period = 1.0 / float(spec.get("rate", 1.0))
        for wallbox in wallboxes:
            wallbox.period = period
            wallbox.due = loop.time() + random.random() * period
            loop.call_at(wallbox.due, wallbox.fire_closed, wallbox.due)
    elif spec["mode"] == "saturate":
        for wallbox in wallboxes:
            wallbox.saturating = True
            wallbox.send_call()
    else:
        period = 1.0 / float(spec.get("rate", 1.0))

        def tick(wallbox: Wallbox, at: float) -> None:
            if at >= stats.end:
                return
            wallbox.send_call(at)
            loop.call_at(at + period, tick, wallbox, at + period)

        for wallbox in wallboxes:
            first = loop.time() + random.random() * period
            loop.call_at(first, tick, wallbox, first)
    if spec["mode"] != "once":
        await asyncio.sleep(stats.end - time.monotonic())
    for wallbox in wallboxes:
        wallbox.saturating = False
        wallbox.period = 0.0
    # Let the last answers come in (they are counted only if sent inside the window).
    grace = time.monotonic() + float(spec.get("grace", 5.0))
    while any(w.pending for w in wallboxes) and time.monotonic() < grace:
        await asyncio.sleep(0.05)
    unanswered = sum(len(w.pending) for w in wallboxes)
    for wallbox in wallboxes:
        wallbox.pending.clear()
    return {"latencies_us": {kind: stats.latencies[i] for i, kind in enumerate(KINDS)},
            "duration": duration, "unanswered": unanswered, "unexpected": stats.unexpected,
            "completed_total": stats.total, "lag_us": stats.lag}


async def close_all(wallboxes: list[Wallbox]) -> None:
    for wallbox in wallboxes:
        wallbox.write(wire.frame(wire.CLOSE, (1000).to_bytes(2, "big"), mask=True))
    pending = [w.closed for w in wallboxes]
    if pending:
        await asyncio.wait(pending, timeout=10)
    for wallbox in wallboxes:
        if wallbox.transport is not None:
            wallbox.transport.abort()


def emit(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def main_async(job: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    targets = [(int(port), str(path)) for port, path in job["targets"]]
    wallboxes, setups, failures = await open_all(targets, stats, int(job.get("concurrency", 1000)))
    emit({"event": "connected", "setups": setups, "failures": failures})
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        command, _, argument = line.partition(" ")
        if command == "load":
            result = await run_load(wallboxes, stats, json.loads(argument))
            result["open"] = sum(1 for w in wallboxes if not w.closed.done())
            emit({"event": "load", **result})
        elif command == "close":
            break
    await close_all(wallboxes)
    emit({"event": "closed"})


def main() -> None:
    raise_nofile()
    argument = sys.argv[1]
    if argument.startswith("@"):
        with open(argument[1:]) as f:
            argument = f.read()
    asyncio.run(main_async(json.loads(argument)))


if __name__ == "__main__":
    main()
