"""A grid meter over Modbus (a real pymodbus server) drives the limit engine (issue 6)."""

from __future__ import annotations

import struct

import trio

from proxy.loadmgmt.engine import ChargerLimits, LimitEngine, SiteLimits
from proxy.ops.logs import get_logger
from proxy.modbus.client import ModbusClient
from proxy.modbus.maps import METERS
from proxy.modbus.meter import MeterPoller
from proxy.demo.peers import LoopThread, SimModbusDevice
from tests.opskit import wait_until
from tests.peers import in_loop


def sdm630(l1: float, l2: float, l3: float) -> dict[int, int]:
    registers: dict[int, int] = {}
    for address, value in ((6, l1), (8, l2), (10, l3)):
        data = struct.pack(">f", value)
        registers[address], registers[address + 1] = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big")
    return registers


async def test_meter_readings_stall_and_recovery(peers: LoopThread, nursery: trio.Nursery) -> None:
    meter = SimModbusDevice(input=sdm630(5.0, 5.0, 5.0))
    port = await in_loop(peers, meter.start())
    engine = LimitEngine(SiteLimits(max_current=32, meter=True, meter_timeout=60, ramp_up_interval=0,
                                    hysteresis=0, min_hold_time=0),
                         {"CP1": ChargerLimits(max_current=16, min_current=6)})
    now = trio.current_time()
    engine.charger_connected("CP1", now)
    engine.status("CP1", 1, "Charging", now)
    engine.transaction_started("CP1", 1, now)
    poller = MeterPoller(ModbusClient("127.0.0.1", port, 1, timeout=0.2), METERS["sdm630"], engine,
                         poll_interval=0.05, stale_after=0.5, log=get_logger())
    nursery.start_soon(poller.run)

    await wait_until(lambda: poller.last is not None)
    assert poller.last.currents == (5.0, 5.0, 5.0)  # type: ignore[union-attr]
    assert engine.targets(trio.current_time())["CP1"] == 16  # 32 A fuse, 5 A house load

    # The grid reading includes the car (16 A): 45 A means a 29 A house load, 3 A left, below 6 A.
    meter.input.update(sdm630(45.0, 45.0, 45.0))
    await wait_until(lambda: poller.last is not None and poller.last.currents[0] == 45.0)
    assert engine.targets(trio.current_time())["CP1"] == 0  # paused rather than starved

    meter.silent = True  # the meter stops answering: fallback within stale_after
    await wait_until(lambda: poller.lost)
    assert engine.targets(trio.current_time())["CP1"] == 6  # fallback_current default: its minimum
    assert not engine.site_view(trio.current_time()).meter_fresh

    meter.input.update(sdm630(5.0, 5.0, 5.0))
    meter.silent = False  # recovery restores normal limits
    await wait_until(lambda: not poller.lost)
    assert engine.site_view(trio.current_time()).meter_fresh
    await in_loop(peers, meter.stop())
