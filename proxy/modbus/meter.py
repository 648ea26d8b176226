"""Grid meter polling (trio): phase currents into the limit engine.

Every ``poll_interval`` the meter's registers are read in as few requests as
the map allows. A good reading goes to ``sink.meter_reading``; a failing or
implausible one (timeout, Modbus exception, negative or absurd currents) is
logged and, once readings have been missing for ``stale_after``, reported
with ``sink.meter_lost`` so the engine falls back to its safe current.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from proxy.modbus.client import ModbusClient, ModbusError
from proxy.modbus.maps import MeterMap
from proxy.modbus.registers import Block, blocks, value_at

#: Larger phase currents than this are a wiring or map error, not a reading.
MAX_PLAUSIBLE_AMPS = 10_000.0


class MeterHealth(Protocol):
    """Where the meter's state is reported (the Prometheus metrics)."""

    def set_meter(self, up: bool, currents: Sequence[float] | None = None, read_at: float | None = None) -> None: ...


class MeterSink(Protocol):
    def meter_reading(self, currents: tuple[float, float, float], now: float) -> None: ...
    def meter_lost(self, now: float) -> None: ...


@dataclass(frozen=True)
class Reading:
    currents: tuple[float, float, float]
    power_w: float | None
    energy_wh: float | None


def decode_reading(meter: MeterMap, data: dict[Block, list[int]]) -> Reading:
    """Values from raw registers; ValueError for implausible ones (sans-IO)."""
    currents = tuple(value_at(field, data) for field in meter.currents)
    for amps in currents:
        if not 0.0 <= amps <= MAX_PLAUSIBLE_AMPS:
            raise ValueError(f"implausible phase current {amps:g} A")
    power = value_at(meter.power, data) if meter.power else None
    energy = value_at(meter.energy, data) if meter.energy else None
    return Reading((currents[0], currents[1], currents[2]), power, energy)


class MeterPoller:
    def __init__(self, client: ModbusClient, meter: MeterMap, sink: MeterSink, *, poll_interval: float,
                 stale_after: float, log: Any, on_change: Callable[[], None] = lambda: None,
                 health: MeterHealth | None = None) -> None:
        self.client, self.meter, self.sink = client, meter, sink
        self.poll_interval, self.stale_after = poll_interval, stale_after
        self.log, self.on_change = log, on_change
        self.health = health
        self.last: Reading | None = None
        self.last_ok: float | None = None
        self.lost = False
        self._blocks = blocks(meter.fields)

    async def run(self) -> None:
        started = trio.current_time()
        try:
            while True:
                await self.poll_once(started)
                await trio.sleep(self.poll_interval)
        finally:
            await self.client.aclose()

    async def poll_once(self, started: float) -> None:
        now = trio.current_time()
        try:
            data = {block: await self.client.read(block.kind, block.address, block.count) for block in self._blocks}
            reading = decode_reading(self.meter, data)
        except (ModbusError, ValueError) as exc:
            self.log.warning("meter_read_failed", error=str(exc))
            if self.health is not None:
                self.health.set_meter(False)
            if not self.lost and now - (self.last_ok if self.last_ok is not None else started) >= self.stale_after:
                self.lost = True
                self.log.error("meter_stale", seconds=self.stale_after)
                self.sink.meter_lost(now)
                self.on_change()
            return
        if self.lost:
            self.log.info("meter_recovered")
        self.lost = False
        self.last, self.last_ok = reading, now
        self.sink.meter_reading(reading.currents, now)
        if self.health is not None:
            self.health.set_meter(True, reading.currents, time.time())
        self.on_change()
