"""A Modbus wallbox as an OCPP charge point: the trio side of a virtual charge point.

Two tasks share one :class:`~proxy.modbus.chargepoint.VirtualChargePoint`:

* the poll loop reads the wallbox's registers every ``poll_interval`` (or at
  once when the charge point wants a new current), feeds the reading or the
  failure to the charge point, lets its timers run, and writes the current
  limit register when it differs from what the charge point decided;
* the session loop opens an in-process connection into the proxy's
  ordinary session machinery (:meth:`ProxyServer.serve_virtual`: upstream,
  offline queue, load management, secondaries, metrics) and hands every frame
  to the charge point; when that session ends it opens a new one after a
  backoff, and the charge point boots again.

Modbus trouble (timeouts, exception responses, implausible values) is logged
and reported to the charge point, which turns a lasting outage into Faulted;
it never ends the OCPP session.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio

from proxy.wire import closecodes
from proxy.wire.errors import ConnectionClosed
from proxy.core.backoff import Backoff
from proxy.config import ModbusChargerSettings, parse_listen
from proxy.wire.local import LocalConnection, local_pair
from proxy.modbus.chargepoint import Action, Log, Send, SetCurrent, VirtualChargePoint, VirtualSettings
from proxy.modbus.client import ModbusClient, ModbusError, SerialSettings, bus_key
from proxy.modbus.maps import WALLBOXES
from proxy.modbus.registers import Block, Field
from proxy.modbus.wallboxmap import WallboxMap, WallboxReading, load_map_file

#: A session that lasted this long was healthy: the next reconnect starts with a short delay again.
_HEALTHY_SESSION = 60.0
#: Silence after each answer through an RS485 gateway unless frame_gap says otherwise (device turnaround).
_GATEWAY_GAP = 0.005


def wallbox_map(charger: ModbusChargerSettings) -> WallboxMap:
    """The charger's own map file, else the built-in map it names (the config checks made sure both load)."""
    return load_map_file(charger.map_file) if charger.map_file else WALLBOXES[charger.map]


def virtual_settings(charger: ModbusChargerSettings, wallbox: WallboxMap, call_timeout: float) -> VirtualSettings:
    return VirtualSettings(
        charger_id=charger.id, vendor=charger.vendor or wallbox.vendor, model=charger.model or wallbox.model,
        serial_number=charger.serial_number, fixed_id_tag=charger.fixed_id_tag,
        min_current=max(charger.min_current, wallbox.min_current),
        max_current=min(charger.max_current, wallbox.max_current), phases=charger.phases,
        meter_interval=charger.meter_interval, call_timeout=call_timeout, fault_after=charger.fault_after,
        connectors=len(wallbox.connectors))


def new_client(charger: ModbusChargerSettings, unit: int) -> ModbusClient:
    """A client for the charger's transport (shared by every wallbox on the same bus, see :func:`bus_of`)."""
    serial = None
    host, port = "", 0
    if charger.transport == "rtu":
        serial = SerialSettings(charger.serial_port, charger.baudrate, charger.parity, charger.stopbits)
    else:
        host, port = parse_listen(charger.modbus)
    gap = charger.frame_gap or (_GATEWAY_GAP if charger.transport == "rtu-over-tcp" else 0.0)
    return ModbusClient(host, port, unit, charger.timeout, transport=charger.transport, serial=serial, frame_gap=gap)


def bus_of(charger: ModbusChargerSettings) -> tuple[str, str]:
    return bus_key(charger.transport, charger.serial_port if charger.transport == "rtu" else charger.modbus)


class _WriteFailed(ModbusError):
    """A write failed; names the register (the cause says why)."""

    def __init__(self, address: int, error: str) -> None:
        super().__init__(f"write to register {address} failed: {error}")
        self.address, self.error = address, error


@dataclass
class _Socket:
    """What the runner keeps per connector: where it is on the bus and what it last wrote."""

    number: int
    unit: int
    offset: int
    blocks: list[Block]
    set_up: bool = False
    limit_written: float | None = None      # A, the last value written to the current-limit register
    limit_written_at: float = -math.inf
    enable_written: bool | None = None
    next_keepalive: float = -math.inf


class VirtualWallbox:
    def __init__(self, charger: ModbusChargerSettings, open_session: Callable[[LocalConnection], None], *,
                 log: Any, data_dir: str | Path, call_timeout: float = 30.0, retry_max: float = 60.0,
                 health: Callable[[bool], None] = lambda up: None,
                 buses: dict[tuple[str, str], ModbusClient] | None = None) -> None:
        self.charger = charger
        self.map = wallbox_map(charger)
        self.open_session = open_session
        self.log = log
        self.retry_max = retry_max
        unit = charger.modbus_unit or self.map.unit
        buses = {} if buses is None else buses
        bus = bus_of(charger)
        if bus not in buses:  # the first wallbox on a bus opens it; the others share its client
            buses[bus] = new_client(charger, unit)
        self.client = buses[bus]
        self.sockets = [_Socket(n, c.unit or unit, c.offset, self.map.blocks(c.offset))
                        for n, c in enumerate(self.map.connectors, start=1)]
        self.core = VirtualChargePoint(virtual_settings(charger, self.map, call_timeout))
        self._connection: LocalConnection | None = None
        self._poke = trio.Event()
        #: Polls made (successful or not), for benchmarks and diagnostics.
        self.polls = 0
        #: Told whether the last poll gave a good reading, when that changes (metrics).
        self.health = health
        self._healthy: bool | None = None
        self.record_path = Path(data_dir) / "virtual" / f"{quote(charger.id, safe='')}.json"
        self._saved: dict[str, Any] | None = None
        self._saving = trio.Lock()
        #: Answers to a SetChargingProfile/ClearChargingProfile that changed the current, held until the
        #: connectors it changed apply at most their new current (the fuse counts a limit only once
        #: applied): ({connector: amps still to confirm}, frame text).
        self._unconfirmed: list[tuple[dict[int, float], str]] = []

    def reconfigure(self, charger: ModbusChargerSettings) -> None:
        """A reload: the current limits apply from the next poll (the rest needs a restart)."""
        new = virtual_settings(charger, self.map, self.core.settings.call_timeout)
        self.core.settings = replace(self.core.settings, min_current=new.min_current, max_current=new.max_current,
                                     phases=new.phases)
        self._poke.set()

    async def run(self) -> None:
        """Until cancelled; the session is closed with 1001 on the way out."""
        self.log.info("virtual_charge_point", modbus=self.client.where, transport=self.charger.transport,
                      map=self.map.name, fixed_id_tag=bool(self.charger.fixed_id_tag))
        await self._restore()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poll_loop)
                nursery.start_soon(self._session_loop)
        finally:
            with trio.CancelScope(shield=True):
                if self._connection is not None:
                    await self._connection.aclose(closecodes.GOING_AWAY, "proxy shutting down")
                await self.client.aclose()  # a shared bus reconnects on its next request

    # -- OCPP side ---------------------------------------------------------------------

    async def _session_loop(self) -> None:
        backoff = Backoff(1.0, self.retry_max)
        while True:
            mine, theirs = local_pair()
            self._connection = mine
            self.open_session(theirs)
            opened = trio.current_time()
            await self._execute(self.core.connected(opened))
            try:
                while True:
                    text = await mine.get_message()
                    await self._execute(self.core.received(text, trio.current_time(), _wall()))
            except ConnectionClosed as exc:
                reason = exc.reason
                self.log.info("virtual_session_ended", code=reason.code if reason else None,
                              reason=reason.reason if reason else None)
            finally:
                self.core.disconnected()
                self._connection = None
                self._unconfirmed.clear()  # the proxy counts those CALLs as unanswered
            if trio.current_time() - opened >= _HEALTHY_SESSION:
                backoff.reset()
            await trio.sleep(backoff.next_delay())

    async def _execute(self, actions: Sequence[Action]) -> None:
        async with self._saving:  # both loops execute actions; one writer at a time
            record = self.core.record()
            if record != self._saved:  # stored before any frame about it leaves
                try:
                    await trio.to_thread.run_sync(_write_atomically, self.record_path, record)
                    self._saved = record
                except OSError as exc:  # charging goes on; only a restart could lose the transaction now
                    self.log.error("virtual_record_write_failed", file=str(self.record_path), error=str(exc))
        written = {a.connector: a.amps for a in actions if isinstance(a, SetCurrent)}
        for action in actions:
            if isinstance(action, Send) and written and action.text.startswith("[3"):
                self._unconfirmed.append((dict(written), action.text))  # sent once every connector shows it
            elif isinstance(action, Send):
                if self._connection is not None:
                    try:
                        await self._connection.send_message(action.text)
                    except ConnectionClosed:
                        pass  # the session loop sees the close and reconnects
            elif isinstance(action, SetCurrent):
                self._poke.set()  # the poll loop writes it now
            elif isinstance(action, Log):
                getattr(self.log, action.level)(action.event, **action.fields)

    async def _restore(self) -> None:
        try:
            text = await trio.to_thread.run_sync(self.record_path.read_text)
        except FileNotFoundError:
            return
        except OSError as exc:
            self.log.error("virtual_record_unreadable", file=str(self.record_path), error=str(exc))
            return
        try:
            record = json.loads(text)
            actions = self.core.restore(record)
        except (ValueError, KeyError, TypeError) as exc:
            broken = self.record_path.with_suffix(".broken")
            self.log.error("virtual_record_unreadable", file=str(self.record_path), error=str(exc)[:200],
                           kept_as=str(broken))
            await trio.to_thread.run_sync(self.record_path.replace, broken)
            return
        self._saved = record
        await self._execute(actions)

    # -- Modbus side --------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            await self._poll_once()
            with trio.move_on_after(self.charger.poll_interval):
                await self._poke.wait()
            self._poke = trio.Event()

    async def _poll_once(self) -> None:
        self.polls += 1
        healthy = True
        for socket in self.sockets:
            healthy = await self._poll_socket(socket) and healthy
        self._report(healthy)
        await self._execute(self.core.tick(trio.current_time(), _wall()))

    async def _poll_socket(self, socket: _Socket) -> bool:
        """Set-up, keep-alive, read, then the writes the charge point's decision needs; False if it failed."""
        now, wall = trio.current_time(), _wall()
        try:
            if not socket.set_up:
                for write in self.map.setup:
                    await self._write(write.field, write.value, write.write, socket)
                socket.set_up = True
            await self._keep_alive(socket)
            data = {block: await self.client.read(block.kind, block.address, block.count, socket.unit)
                    for block in socket.blocks}
            reading = self.map.decode(data, socket.offset)
        except ModbusError as exc:
            socket.set_up = False  # the wallbox may have restarted: its settings again when it is back
            socket.limit_written = socket.enable_written = None
            await self._execute(self.core.read_failed(str(exc), now, wall, socket.number))
            return False
        except ValueError as exc:
            await self._execute(self.core.read_failed(f"implausible values: {exc}", now, wall, socket.number))
            return False
        await self._confirm(socket, reading)
        await self._execute(self.core.read(reading, now, wall, socket.number))
        await self._apply(socket, reading)
        if not self.map.current_limit.readable:
            await self._confirm(socket, reading)  # nothing to read back: the accepted write counts
        return True

    async def _confirm(self, socket: _Socket, reading: WallboxReading) -> None:
        """Answers go out once every connector they changed applies its new current (or less).

        Applied means read back from the limit register (and the enable coil/register when the
        map has one); for a register the wallbox cannot report (write only), the accepted write
        is the best evidence there is.
        """
        applied = self._applied(socket, reading)
        if applied is None:
            return
        due: list[tuple[dict[int, float], str]] = []
        waiting: list[tuple[dict[int, float], str]] = []
        for pending, text in self._unconfirmed:
            if socket.number in pending and applied <= pending[socket.number] + 0.05:
                pending = {c: amps for c, amps in pending.items() if c != socket.number}
            (waiting if pending else due).append((pending, text))
        self._unconfirmed = waiting
        for _, text in due:
            if self._connection is not None:
                try:
                    await self._connection.send_message(text)
                except ConnectionClosed:
                    pass

    def _applied(self, socket: _Socket, reading: WallboxReading) -> float | None:
        """The current the wallbox applies at this connector, as far as it can tell (None: unknown)."""
        enable = self.map.enable
        if enable is not None:
            on = reading.enabled if enable.readable else socket.enable_written
            if on is False:
                return 0.0
            if on is None:
                return None
        return reading.limit if self.map.current_limit.readable else socket.limit_written

    def _report(self, healthy: bool) -> None:
        if healthy != self._healthy:
            self._healthy = healthy
            self.health(healthy)

    async def _keep_alive(self, socket: _Socket) -> None:
        keepalive = self.map.keepalive
        if keepalive is None or trio.current_time() < socket.next_keepalive:
            return
        await self._write(keepalive.write.field, keepalive.write.value, keepalive.write.write, socket)
        socket.next_keepalive = trio.current_time() + keepalive.interval

    async def _write(self, field: Field, value: float, function: str, socket: _Socket) -> None:
        target = field.shifted(socket.offset)
        try:
            if target.kind == "coil":
                await self.client.write_coil(target.address, bool(value), socket.unit)
            else:
                await self.client.write(target.address, target.encode(value), socket.unit, function)
        except ModbusError as exc:
            raise _WriteFailed(target.address, str(exc)) from exc

    async def _apply(self, socket: _Socket, reading: WallboxReading) -> None:
        """Bring the wallbox to the charge point's current: limit register, enable coil/register, or both.

        Charging stops with the enable coil/register when the map has one (before the limit changes),
        else with the limit's pause value; it starts with the limit first, then the enable. A value
        the wallbox cannot report back is written when it changes and every ``refresh`` seconds.
        """
        wanted = self.core.current_for(socket.number) or 0.0  # 0 or within the map's range (virtual_settings)
        limit, enable = self.map.current_limit, self.map.enable
        target = wanted if wanted > 0 else limit.pause
        try:
            if enable is not None and wanted <= 0:
                await self._set_enable(socket, reading, False)
            if target is not None:
                await self._set_limit(socket, reading, target, wanted)
            if enable is not None and wanted > 0:
                await self._set_enable(socket, reading, True)
        except _WriteFailed as exc:
            self.log.warning("virtual_write_failed", register=exc.address, amps=wanted, connector=socket.number,
                             error=exc.error)

    async def _set_limit(self, socket: _Socket, reading: WallboxReading, target: float, wanted: float) -> None:
        limit = self.map.current_limit
        now = trio.current_time()
        held = reading.limit if limit.readable else socket.limit_written
        due = limit.refresh > 0 and now - socket.limit_written_at >= limit.refresh
        if held is not None and abs(held - target) < 0.05 and not due:
            return
        await self._write(limit.field, target, limit.write, socket)
        socket.limit_written, socket.limit_written_at = target, now
        if held is None or abs(held - target) >= 0.05:
            self.log.info("virtual_current_set", amps=wanted, was=held, connector=socket.number)
            self._poke.set()  # read it back at once: an answer may wait for it

    async def _set_enable(self, socket: _Socket, reading: WallboxReading, on: bool) -> None:
        enable = self.map.enable
        assert enable is not None
        held = reading.enabled if enable.readable else socket.enable_written
        if held == on:
            return
        await self._write(enable.field, enable.on if on else enable.off, enable.write, socket)
        socket.enable_written = on
        self._poke.set()  # read it back at once: an answer may wait for it
        self.log.info("virtual_charging_enabled" if on else "virtual_charging_paused", connector=socket.number)


def _write_atomically(path: Path, record: dict[str, Any] | None) -> None:
    """The kept state, or its removal, durable before returning (temp file, fsync, rename)."""
    if record is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    with open(temp, "w", encoding="utf-8") as file:
        json.dump(record, file)
        file.flush()
        os.fsync(file.fileno())
    temp.replace(path)


def _wall() -> datetime:
    return datetime.now(UTC)
