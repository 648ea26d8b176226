"""Starting the Modbus parts from the configuration (trio)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from proxy.config import Config, MeterSettings, parse_listen
from proxy.modbus.client import ModbusClient
from proxy.modbus.ems import EmsRegisters, EmsServer, EmsSink
from proxy.modbus.maps import METERS, MeterMap
from proxy.modbus.meter import MeterHealth, MeterPoller, MeterSink
from proxy.modbus.registers import Field


def meter_map(settings: MeterSettings) -> MeterMap:
    if settings.map != "generic":
        return METERS[settings.map]
    fields = {r.name: Field(r.address, r.kind, r.type, r.word_order, r.scale) for r in settings.registers}
    return MeterMap((fields["l1"], fields["l2"], fields["l3"]), fields.get("power"), fields.get("energy"))


async def run_modbus(config: Config, engine: Any, on_change: Callable[[], None], log: Any,
                     *, health: MeterHealth | None = None,
                     task_status: trio.TaskStatus[EmsServer | None] = trio.TASK_STATUS_IGNORED) -> None:
    """Meter poller and EMS server, as configured; returns only when cancelled."""
    async with trio.open_nursery() as nursery:
        if config.meter.modbus:
            host, port = parse_listen(config.meter.modbus)
            client = ModbusClient(host, port, config.meter.unit, config.meter.timeout)
            sink: MeterSink = engine
            poller = MeterPoller(client, meter_map(config.meter), sink, poll_interval=config.meter.poll_interval,
                                 stale_after=config.meter.stale_after, log=log.bind(part="meter"),
                                 on_change=on_change, health=health)
            nursery.start_soon(poller.run)
        server = None
        if config.ems.modbus_listen:
            host, port = parse_listen(config.ems.modbus_listen)
            ems_sink: EmsSink = engine
            registers = EmsRegisters([c.id for c in config.all_chargers], ems_sink, config.ems.ems_timeout)
            server = EmsServer(registers, host, port, log=log.bind(part="ems"), on_change=on_change,
                               allow=config.ems.allow)
            await nursery.start(server.serve)
        task_status.started(server)
