"""The EMS interface: a Modbus TCP server an energy manager writes limits to.

Register table (holding registers, function 3 to read, 6/16 to write; the same
values readable as input registers, function 4). Currents are in 0.1 A;
65535 means "no limit from the EMS".

| address | access | meaning |
|---|---|---|
| 0 | rw | site limit per phase, 0.1 A (65535 = none) |
| 1 | ro | number of chargers N |
| 100 + 20·i + 0 | rw | charger i limit, 0.1 A (65535 = none; 0 pauses) |
| 100 + 20·i + 1 | rw | charger i enable (1) / pause (0) |
| 100 + 20·i + 2 | ro | state: 0 offline, 1 Available, 2 Preparing, 3 Charging, 4 SuspendedEV, 5 SuspendedEVSE, 6 Finishing, 7 Reserved, 8 Unavailable, 9 Faulted |
| 100 + 20·i + 3..5 | ro | measured current L1..L3, 0.1 A |
| 100 + 20·i + 6..7 | ro | power, W (uint32, high word first) |
| 100 + 20·i + 8..9 | ro | energy, Wh (uint32, high word first) |
| 100 + 20·i + 10 | ro | effective limit, 0.1 A (65535 unknown) |
| 100 + 20·i + 11 | ro | local (engine) limit, 0.1 A |
| 100 + 20·i + 12 | ro | backend limit, 0.1 A |

Charger i is the i-th ``[[chargers]]`` entry (0-based). A limit written by the
EMS expires after ``ems_timeout`` seconds without being written again (when
configured), so a crashed EMS cannot pin a site at a stale value.

The register logic (:class:`EmsRegisters`) is sans-IO; :class:`EmsServer`
speaks Modbus TCP on trio with pymodbus's framer and PDU classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
    WriteMultipleRegistersResponse,
    WriteSingleRegisterResponse,
)

from proxy.core.admission import Allowlist

NONE = 0xFFFF
SITE, COUNT = 0, 1
BASE, STRIDE = 100, 20
STATES = ["offline", "Available", "Preparing", "Charging", "SuspendedEV", "SuspendedEVSE", "Finishing",
          "Reserved", "Unavailable", "Faulted"]
ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE = 1, 2, 3
#: Largest limit an EMS may write (0.1 A): 2000 A per phase is beyond any site fuse.
MAX_TENTHS = 20_000


class ModbusException(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class EmsSink(Protocol):
    def ems_site_limit(self, amps: float | None, now: float) -> None: ...
    def ems_charger_limit(self, charger_id: str, amps: float | None, now: float) -> None: ...
    def ems_charger_enabled(self, charger_id: str, enabled: bool, now: float) -> None: ...
    def charger_view(self, charger_id: str) -> Any: ...


def _tenths(amps: float | None) -> int:
    return NONE if amps is None else max(0, min(NONE - 1, round(amps * 10)))


class EmsRegisters:
    def __init__(self, chargers: Sequence[str], sink: EmsSink, timeout: float = 0.0) -> None:
        self.chargers = list(chargers)
        self.sink = sink
        self.timeout = timeout
        self.site = NONE
        self.limits = {cp: NONE for cp in self.chargers}
        self.enabled = {cp: 1 for cp in self.chargers}
        self._written: dict[str, float] = {}  # "site" or charger id → time of the last limit write

    def read(self, address: int, count: int) -> list[int]:
        return [self._value(a) for a in range(address, address + count)]

    def _value(self, address: int) -> int:
        if address == SITE:
            return self.site
        if address == COUNT:
            return len(self.chargers)
        charger, offset = self._charger_at(address)
        if offset == 0:
            return self.limits[charger]
        if offset == 1:
            return self.enabled[charger]
        return self._view_value(charger, offset)

    def _view_value(self, charger: str, offset: int) -> int:
        view = self.sink.charger_view(charger)
        if view is None:
            return 0 if offset in (2, 3, 4, 5, 6, 7, 8, 9) else NONE
        if offset == 2:
            state = getattr(view, "state", "offline")
            return STATES.index(state) if state in STATES else 0
        if 3 <= offset <= 5:
            return _tenths(view.currents[offset - 3])
        if offset in (6, 7, 8, 9):
            value = view.power_w if offset < 8 else view.energy_wh
            raw = max(0, min(0xFFFFFFFF, int(value or 0)))
            return raw >> 16 if offset % 2 == 0 else raw & 0xFFFF
        limits = {10: view.effective_limit, 11: view.local_limit, 12: view.backend_limit}
        if offset in limits:
            return _tenths(limits[offset])
        return 0

    def write(self, address: int, values: Sequence[int], now: float) -> None:
        for offset, value in enumerate(values):  # validate everything before changing anything
            self._check(address + offset, value)
        for offset, value in enumerate(values):
            self._apply(address + offset, value, now)

    def _check(self, address: int, value: int) -> None:
        if address == SITE or (address >= BASE and (address - BASE) % STRIDE == 0):
            if address != SITE:
                self._charger_at(address)
            if value != NONE and value > MAX_TENTHS:
                raise ModbusException(ILLEGAL_VALUE, f"limit {value / 10:g} A out of range")
            return
        if address >= BASE and (address - BASE) % STRIDE == 1:
            self._charger_at(address)
            if value not in (0, 1):
                raise ModbusException(ILLEGAL_VALUE, "enable must be 0 or 1")
            return
        raise ModbusException(ILLEGAL_ADDRESS, f"register {address} is read-only or unknown")

    def _apply(self, address: int, value: int, now: float) -> None:
        amps = None if value == NONE else value / 10
        if address == SITE:
            self.site = value
            self._written["site"] = now
            self.sink.ems_site_limit(amps, now)
            return
        charger, offset = self._charger_at(address)
        if offset == 0:
            self.limits[charger] = value
            self._written[charger] = now
            self.sink.ems_charger_limit(charger, amps, now)
        else:
            self.enabled[charger] = value
            self.sink.ems_charger_enabled(charger, bool(value), now)

    def expire(self, now: float) -> list[str]:
        """Drop EMS limits not renewed within ``timeout``; returns what expired."""
        if self.timeout <= 0:
            return []
        expired = [key for key, at in self._written.items() if now - at >= self.timeout]
        for key in expired:
            del self._written[key]
            if key == "site":
                self.site = NONE
                self.sink.ems_site_limit(None, now)
            else:
                self.limits[key] = NONE
                self.sink.ems_charger_limit(key, None, now)
        return expired

    def _charger_at(self, address: int) -> tuple[str, int]:
        index, offset = divmod(address - BASE, STRIDE)
        if address < BASE or index >= len(self.chargers) or offset > 12:
            raise ModbusException(ILLEGAL_ADDRESS, f"no register {address}")
        return self.chargers[index], offset


def handle(registers: EmsRegisters, request: ModbusPDU, now: float) -> ModbusPDU:
    """One request → its response PDU (sans-IO)."""
    code = request.function_code
    try:
        if code in (3, 4):
            if not 1 <= request.count <= 125:
                raise ModbusException(ILLEGAL_VALUE, "count out of range")
            values = registers.read(request.address, request.count)
            cls = ReadHoldingRegistersResponse if code == 3 else ReadInputRegistersResponse
            response: ModbusPDU = cls(registers=values)
        elif code == 6:
            registers.write(request.address, [request.registers[0]], now)
            response = WriteSingleRegisterResponse(address=request.address, registers=request.registers)
        elif code == 16:
            registers.write(request.address, list(request.registers), now)
            response = WriteMultipleRegistersResponse(address=request.address, count=len(request.registers))
        else:
            raise ModbusException(ILLEGAL_FUNCTION, f"function {code} not supported")
    except ModbusException as exc:
        response = ExceptionResponse(code, exc.code)
    response.dev_id = request.dev_id
    response.transaction_id = request.transaction_id
    return response


class EmsServer:
    def __init__(self, registers: EmsRegisters, host: str, port: int, *, log: Any,
                 on_change: Callable[[], None] = lambda: None, allow: Sequence[str] = ("127.0.0.1", "::1")) -> None:
        self.registers, self.host, self.port = registers, host, port
        self.log, self.on_change = log, on_change
        #: ``[ems] allow``: a site limit of 0 pauses every charger, so only these may connect.
        self.allow = Allowlist(allow)
        self.ports: list[int] = []

    async def serve(self, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host or None)
        self.ports = [listener.socket.getsockname()[1] for listener in listeners]
        self.log.info("ems_listening", ports=self.ports)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire)
            nursery.start_soon(trio.serve_listeners, self._client, listeners)
            task_status.started(self.ports)

    async def _expire(self) -> None:
        while True:
            await trio.sleep(max(0.1, self.registers.timeout / 4) if self.registers.timeout else 3600)
            for key in self.registers.expire(trio.current_time()):
                self.log.warning("ems_limit_expired", limit=key, seconds=self.registers.timeout)
                self.on_change()

    async def _client(self, stream: trio.SocketStream) -> None:
        try:
            address = str(stream.socket.getpeername()[0])
        except OSError:
            address = "?"
        if not self.allow.allows(address):
            self.log.warning("ems_refused", peer=address, reason="not in [ems] allow")
            await trio.aclose_forcefully(stream)
            return
        framer = FramerSocket(DecodePDU(is_server=True))
        buffer = b""
        try:
            while chunk := await stream.receive_some(1024):
                buffer += chunk
                while buffer:
                    try:
                        used, request = framer.handleFrame(buffer, 0, 0)
                    except Exception as exc:  # noqa: BLE001 - garbage from a client ends only its connection
                        self.log.warning("ems_bad_request", error=str(exc))
                        return
                    buffer = buffer[used:]
                    if request is None:
                        break
                    response = handle(self.registers, request, trio.current_time())
                    if request.function_code in (6, 16) and not response.isError():
                        self.on_change()
                    await stream.send_all(framer.buildFrame(response))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
