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
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio
from trio_websocket import ConnectionClosed

from proxy.wire import closecodes
from proxy.core.backoff import Backoff
from proxy.config import ModbusChargerSettings, parse_listen
from proxy.wire.local import LocalConnection, local_pair
from proxy.modbus.chargepoint import Action, Log, Send, SetCurrent, VirtualChargePoint, VirtualSettings
from proxy.modbus.client import ModbusClient, ModbusError
from proxy.modbus.maps import WALLBOXES, WallboxMap, WallboxReading
from proxy.modbus.registers import blocks

#: A session that lasted this long was healthy: the next reconnect starts with a short delay again.
_HEALTHY_SESSION = 60.0


def virtual_settings(charger: ModbusChargerSettings, wallbox: WallboxMap, call_timeout: float) -> VirtualSettings:
    return VirtualSettings(
        charger_id=charger.id, vendor=charger.vendor or wallbox.vendor, model=charger.model or wallbox.model,
        serial_number=charger.serial_number, fixed_id_tag=charger.fixed_id_tag,
        min_current=max(charger.min_current, wallbox.min_current),
        max_current=min(charger.max_current, wallbox.max_current), phases=charger.phases,
        meter_interval=charger.meter_interval, call_timeout=call_timeout, fault_after=charger.fault_after)


class VirtualWallbox:
    def __init__(self, charger: ModbusChargerSettings, open_session: Callable[[LocalConnection], None], *,
                 log: Any, data_dir: str | Path, call_timeout: float = 30.0, retry_max: float = 60.0,
                 health: Callable[[bool], None] = lambda up: None) -> None:
        self.charger = charger
        self.map = WALLBOXES[charger.map]
        self.open_session = open_session
        self.log = log
        self.retry_max = retry_max
        host, port = parse_listen(charger.modbus)
        self.client = ModbusClient(host, port, charger.modbus_unit, charger.timeout)
        self.core = VirtualChargePoint(virtual_settings(charger, self.map, call_timeout))
        self._blocks = blocks(self.map.fields)
        self._connection: LocalConnection | None = None
        self._poke = trio.Event()
        self._set_up = False
        #: Polls made (successful or not), for benchmarks and diagnostics.
        self.polls = 0
        #: Told whether the last poll gave a good reading, when that changes (metrics).
        self.health = health
        self._healthy: bool | None = None
        self.record_path = Path(data_dir) / "virtual" / f"{quote(charger.id, safe='')}.json"
        self._saved: dict[str, Any] | None = None
        self._saving = trio.Lock()
        #: Answers to a SetChargingProfile/ClearChargingProfile that changed the current, held until the
        #: limit register reads back at most that current (the fuse counts a limit only once applied):
        #: (amps, frame text).
        self._unconfirmed: list[tuple[float, str]] = []

    def reconfigure(self, charger: ModbusChargerSettings) -> None:
        """A reload: the current limits apply from the next poll (the rest needs a restart)."""
        new = virtual_settings(charger, self.map, self.core.settings.call_timeout)
        self.core.settings = replace(self.core.settings, min_current=new.min_current, max_current=new.max_current,
                                     phases=new.phases)
        self._poke.set()

    async def run(self) -> None:
        """Until cancelled; the session is closed with 1001 on the way out."""
        self.log.info("virtual_charge_point", modbus=self.charger.modbus, map=self.charger.map,
                      fixed_id_tag=bool(self.charger.fixed_id_tag))
        await self._restore()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poll_loop)
                nursery.start_soon(self._session_loop)
        finally:
            with trio.CancelScope(shield=True):
                if self._connection is not None:
                    await self._connection.aclose(closecodes.GOING_AWAY, "proxy shutting down")
                await self.client.aclose()

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
        written = [a.amps for a in actions if isinstance(a, SetCurrent)]
        for action in actions:
            if isinstance(action, Send) and written and action.text.startswith("[3"):
                self._unconfirmed.append((written[-1], action.text))  # sent once the register shows it
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
        now, wall = trio.current_time(), _wall()
        try:
            if not self._set_up:
                for address, value in self.map.setup:
                    await self.client.write(address, [value])
                self._set_up = True
            data = {block: await self.client.read(block.kind, block.address, block.count) for block in self._blocks}
            reading = self.map.decode(data)
        except ModbusError as exc:
            self._set_up = False  # the wallbox may have restarted: its settings again when it is back
            self._report(False)
            await self._execute(self.core.read_failed(str(exc), now, wall))
        except ValueError as exc:
            self._report(False)
            await self._execute(self.core.read_failed(f"implausible values: {exc}", now, wall))
        else:
            self._report(True)
            await self._confirm(reading)
            await self._execute(self.core.read(reading, now, wall))
            await self._write_current(reading)
        await self._execute(self.core.tick(trio.current_time(), _wall()))

    async def _confirm(self, reading: WallboxReading) -> None:
        """Answers whose current the limit register now shows (or less) go out."""
        due = [text for amps, text in self._unconfirmed if reading.limit <= amps + 0.05]
        self._unconfirmed = [(amps, text) for amps, text in self._unconfirmed if reading.limit > amps + 0.05]
        for text in due:
            if self._connection is not None:
                try:
                    await self._connection.send_message(text)
                except ConnectionClosed:
                    pass

    def _report(self, healthy: bool) -> None:
        if healthy != self._healthy:
            self._healthy = healthy
            self.health(healthy)

    async def _write_current(self, reading: WallboxReading) -> None:
        wanted = self.core.current or 0.0  # 0 or within the map's range: virtual_settings bounds the core
        if abs(reading.limit - wanted) < 0.05:
            return
        field = self.map.current_limit
        try:
            await self.client.write(field.address, field.encode(wanted))
        except ModbusError as exc:
            self.log.warning("virtual_write_failed", register=field.address, amps=wanted, error=str(exc))
            return
        self.log.info("virtual_current_set", amps=wanted, was=reading.limit)
        self._poke.set()  # read it back at once: an answer may wait for it


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
