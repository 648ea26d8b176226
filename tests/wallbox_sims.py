"""Simulated Modbus wallboxes of several makes, each written from its vendor's register table.

Every simulator keeps its own register constants, copied from the vendor
document (or, where the map file says so, from the open implementations it
was cross-checked against), and never imports the proxy's map files: a test
that drives a simulator through a map fails if either one is wrong.

A simulator is a real pymodbus server on 127.0.0.1 (Modbus TCP, or RTU frames
over TCP as an RS485 gateway in transparent mode passes them on) with one
device per unit id; each unit is one socket with a car (:class:`Car`). The
car draws min(its own limit, what the wallbox allows) on three phases while
it requests current; energy grows with real time. Registers are recomputed on
every request (:meth:`SimWallbox.refresh`), so a test changes the car and sees
the wallbox's registers follow, as on the real device.
"""

from __future__ import annotations

import asyncio
import functools
import struct
import time
from dataclasses import dataclass, field
from typing import Any

#: Modbus exception code 2 (illegal data address) and 1 (illegal function).
ILLEGAL_ADDRESS = 2
ILLEGAL_FUNCTION = 1


@dataclass
class Car:
    plugged: bool = False
    requesting: bool = True   # a plugged car asks for current
    car_amps: float = 16.0
    energy_wh: float = 1_000_000.0
    voltage: float = 230.0
    amps: float = 0.0         # what flows now
    last: float = field(default_factory=time.monotonic)

    def draw(self, allowed_amps: float) -> None:
        """Integrate energy up to now at the old current, then take the new one."""
        now = time.monotonic()
        self.energy_wh += 3 * self.amps * self.voltage * (now - self.last) / 3600
        self.last = now
        self.amps = min(self.car_amps, allowed_amps) if self.plugged and self.requesting else 0.0


def f32(value: float) -> list[int]:
    data = struct.pack(">f", value)
    return [int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big")]


def f64(value: float) -> list[int]:
    data = struct.pack(">d", value)
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, 8, 2)]


def u32(value: int, low_word_first: bool = False) -> list[int]:
    words = [(value >> 16) & 0xFFFF, value & 0xFFFF]
    return words[::-1] if low_word_first else words


def from_f32(words: list[int]) -> float:
    return float(struct.unpack(">f", b"".join(w.to_bytes(2, "big") for w in words))[0])


def text(value: str, length: int) -> list[int]:
    data = value.encode("ascii").ljust(2 * length, b"\0")
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, 2 * length, 2)]


@dataclass
class Unit:
    coil: dict[int, int] = field(default_factory=dict)
    input: dict[int, int] = field(default_factory=dict)
    holding: dict[int, int] = field(default_factory=dict)
    car: Car = field(default_factory=Car)


class SimWallbox:
    """The server and the bookkeeping every make shares; a make fills in :meth:`refresh` and :meth:`limit_amps`."""

    units_ids: tuple[int, ...] = (1,)
    size = 6100

    def __init__(self, units: tuple[int, ...] | None = None) -> None:
        self.units = {u: Unit() for u in (units or self.units_ids)}
        self.writes: list[tuple[int, int, list[int]]] = []   # (unit, address, values)
        self.functions: list[int] = []                        # function codes received, in order
        self.times: list[float] = []                          # when each request arrived
        self.port = 0
        self.failing = False
        self.silent: set[int] = set()   # units that stop answering (a dead device on the bus)
        self.delay = 0.0                # seconds before each answer (a slow device)
        self._server: Any = None
        for unit in self.units:
            self.reset(unit)
            self.refresh(unit)

    # -- what a make defines ------------------------------------------------------------------

    def reset(self, unit: int) -> None:
        """Power-on register values."""

    def refresh(self, unit: int) -> None:
        """Registers from the car and the wallbox's settings."""
        raise NotImplementedError

    def limit_amps(self, unit: int = 0) -> float:
        """What the wallbox lets the car draw now (A), decoded from its own registers."""
        raise NotImplementedError

    def check(self, function_code: int, unit: int, address: int, count: int, writing: bool) -> int | None:
        """An exception code for requests this make refuses, else None."""
        return None

    def written(self, unit: int, address: int, values: list[int]) -> None:
        """A write arrived (after the registers took it)."""

    # -- helpers --------------------------------------------------------------------------------

    def car(self, unit: int = 0) -> Car:
        return self.units[unit or next(iter(self.units))].car

    def first(self, unit: int) -> int:
        return unit or next(iter(self.units))

    def writes_to(self, address: int, unit: int = 0) -> list[list[int]]:
        unit = self.first(unit)
        return [values for u, a, values in self.writes if u == unit and a == address]

    # -- the server -------------------------------------------------------------------------------

    async def _action(self, unit: int, function_code: int, start: int, address: int, count: int,
                      registers: list[int], values: list[Any] | None) -> Any:
        from pymodbus.constants import ExcCodes

        writing = function_code in (5, 6, 15, 16)
        if writing and values is None:
            return None  # pymodbus reads the written registers back for its answer: not a request
        if unit in self.silent:
            await asyncio.sleep(3600)  # no answer: the client times out
        self.functions.append(function_code)
        self.times.append(time.monotonic())
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failing:
            return ExcCodes.DEVICE_FAILURE
        refused = self.check(function_code, unit, address, count, writing)
        if refused is not None:
            return ExcCodes.ILLEGAL_ADDRESS if refused == ILLEGAL_ADDRESS else ExcCodes.ILLEGAL_FUNCTION
        state = self.units[unit]
        if function_code in (1, 5, 15):
            return self._coils(unit, state, function_code, start, address, count, registers, values)
        table = state.input if function_code == 4 else state.holding
        self.refresh(unit)  # integrate energy up to now with the old limit
        if values is not None:
            self.writes.append((unit, address, [int(v) for v in values]))
            for offset, value in enumerate(values):
                table[address + offset] = int(value)
            self.written(unit, address, [int(v) for v in values])
            self.refresh(unit)
            return None
        for offset in range(count):
            registers[address - start + offset] = table.get(address + offset, 0)
        return None

    def _coils(self, unit: int, state: Unit, function_code: int, start: int, address: int, count: int,
               registers: list[int], values: list[Any] | None) -> None:
        # pymodbus packs coils 16 to a register: coil n is bit (n % 16) of register n // 16
        if values is not None:
            self.writes.append((unit, address, [1 if v else 0 for v in values]))
            for offset, value in enumerate(values):
                state.coil[address + offset] = 1 if value else 0
            self.written(unit, address, [1 if v else 0 for v in values])
            self.refresh(unit)
            return
        self.refresh(unit)
        for word in range(address // 16, (address + count - 1) // 16 + 1):
            registers[word - start] = sum(state.coil.get(16 * word + bit, 0) << bit for bit in range(16))

    def _devices(self) -> list[Any]:
        from pymodbus.simulator import DataType, SimData, SimDevice

        def block(kind: DataType) -> list[SimData]:
            return [SimData(0, count=self.size, values=False if kind == DataType.BITS else 0, datatype=kind)]

        return [SimDevice(unit, simdata=(block(DataType.BITS), block(DataType.BITS),
                                         block(DataType.REGISTERS), block(DataType.REGISTERS)),
                          action=functools.partial(self._action, unit))
                for unit in self.units]

    async def start(self, host: str = "127.0.0.1", port: int = 0, rtu: bool = False) -> int:
        """Modbus TCP, or (``rtu``) RTU frames over TCP as a transparent RS485 gateway passes them."""
        from pymodbus import FramerType
        from pymodbus.server import ModbusTcpServer

        self._server = ModbusTcpServer(self._devices(), address=(host, port),
                                       framer=FramerType.RTU if rtu else FramerType.SOCKET)
        await self._server.serve_forever(background=True)
        await asyncio.sleep(0)
        self.port = self._server.transport.sockets[0].getsockname()[1]
        return self.port

    async def start_serial(self, device: str, baudrate: int = 57600, parity: str = "N", stopbits: int = 2) -> None:
        """Modbus RTU on a serial device (a pseudo-terminal in the tests)."""
        from pymodbus.server import ModbusSerialServer

        self._server = ModbusSerialServer(self._devices(), port=device, baudrate=baudrate, parity=parity,
                                          stopbits=stopbits)
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()


# --- Alfen NG9xx ("Implementation of Modbus Slave TCP/IP for Alfen NG9xx platform" v2.3, section 3.4) -----

ALFEN_CURRENTS = 320          # Current Phase L1..L3, FLOAT32
ALFEN_POWER = 344             # Real Power Sum, FLOAT32
ALFEN_ENERGY = 374            # Real Energy Delivered Sum, FLOAT64, Wh
ALFEN_MODE3 = 1201            # Mode 3 state, STRING, 5 registers
ALFEN_APPLIED = 1206          # Actual Applied Max Current, FLOAT32
ALFEN_VALID = 1208            # Modbus Slave Max Current valid time, UNSIGNED32, s
ALFEN_MAX_CURRENT = 1210      # Modbus Slave Max Current, FLOAT32, R/W
ALFEN_SAFE = 1212             # Active Load Balancing Safe Current, FLOAT32


class SimAlfen(SimWallbox):
    """An Alfen Eve: socket registers at unit 1 (and 2 for a double); a written max current holds for
    ``validity`` seconds, then the station falls back to its safe current."""

    def __init__(self, double: bool = False, validity: float = 60.0, safe_current: float = 6.0) -> None:
        self.validity, self.safe_current = validity, safe_current
        self.set_at: dict[int, float] = {}
        super().__init__((1, 2) if double else (1,))

    def reset(self, unit: int) -> None:
        self.units[unit].holding.update(dict(enumerate(f32(0.0), ALFEN_MAX_CURRENT)))
        self.units[unit].holding.update(dict(enumerate(f32(self.safe_current), ALFEN_SAFE)))

    def written(self, unit: int, address: int, values: list[int]) -> None:
        if address == ALFEN_MAX_CURRENT and len(values) == 2:
            self.set_at[unit] = time.monotonic()

    def check(self, function_code: int, unit: int, address: int, count: int, writing: bool) -> int | None:
        if function_code == 4:
            return ILLEGAL_FUNCTION  # holding registers only (FC3, FC6, FC16)
        if writing and address == ALFEN_MAX_CURRENT and count != 2:
            return ILLEGAL_ADDRESS  # a float must be written whole, in one request
        return None

    def remaining(self, unit: int) -> float:
        started = self.set_at.get(unit)
        return 0.0 if started is None else max(0.0, self.validity - (time.monotonic() - started))

    def limit_amps(self, unit: int = 0) -> float:
        unit = self.first(unit)
        holding = self.units[unit].holding
        if self.remaining(unit) <= 0:
            return self.safe_current
        return from_f32([holding.get(ALFEN_MAX_CURRENT, 0), holding.get(ALFEN_MAX_CURRENT + 1, 0)])

    def refresh(self, unit: int) -> None:
        state = self.units[unit]
        car, applied = state.car, self.limit_amps(unit)
        allowed = applied >= 6.0
        car.draw(applied if allowed else 0.0)
        if not car.plugged:
            mode3 = "A"
        elif car.requesting:
            mode3 = "C2" if allowed else "C1"
        else:
            mode3 = "B2" if allowed else "B1"
        regs = state.holding
        regs.update(dict(enumerate(text(mode3, 5), ALFEN_MODE3)))
        regs.update(dict(enumerate(f32(car.amps) * 3, ALFEN_CURRENTS)))
        regs.update(dict(enumerate(f32(3 * car.amps * car.voltage), ALFEN_POWER)))
        regs.update(dict(enumerate(f64(car.energy_wh), ALFEN_ENERGY)))
        regs.update(dict(enumerate(f32(applied), ALFEN_APPLIED)))
        regs.update(dict(enumerate(u32(int(self.remaining(unit))), ALFEN_VALID)))


# --- Phoenix Contact EV-CC-AC1-M3 (unit 255; letters A-F, enable coil 400, current in holding 528) --------

PHOENIX_STATUS = 100          # input, vehicle status letter in the low byte
PHOENIX_CURRENTS = 114        # input, int32 low word first, A
PHOENIX_POWER = 120           # input, int32 low word first, W
PHOENIX_ENERGY = 904          # input, uint32 low word first, Wh
PHOENIX_ENABLE = 400          # coil
PHOENIX_CURRENT = 528         # holding, A


class SimPhoenix(SimWallbox):
    units_ids = (255,)

    def reset(self, unit: int) -> None:
        self.units[unit].holding[PHOENIX_CURRENT] = 16
        self.units[unit].coil[PHOENIX_ENABLE] = 0

    def check(self, function_code: int, unit: int, address: int, count: int, writing: bool) -> int | None:
        if writing and function_code == 16 and address == PHOENIX_CURRENT:
            return ILLEGAL_FUNCTION  # the controller takes FC6 for its charging current
        return None

    def limit_amps(self, unit: int = 0) -> float:
        state = self.units[self.first(unit)]
        if not state.coil.get(PHOENIX_ENABLE, 0):
            return 0.0
        amps = float(state.holding.get(PHOENIX_CURRENT, 0))
        return amps if amps >= 6 else 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.units[255].coil.get(PHOENIX_ENABLE, 0))

    def refresh(self, unit: int) -> None:
        state = self.units[unit]
        car = state.car
        car.draw(self.limit_amps(unit))
        letter = "A" if not car.plugged else ("C" if car.amps > 0 else "B")
        regs = state.input
        regs[PHOENIX_STATUS] = ord(letter)
        for i in range(3):
            regs.update(dict(enumerate(u32(round(car.amps), True), PHOENIX_CURRENTS + 2 * i)))
        regs.update(dict(enumerate(u32(round(3 * car.amps * car.voltage), True), PHOENIX_POWER)))
        regs.update(dict(enumerate(u32(int(car.energy_wh), True), PHOENIX_ENERGY)))


# --- Vestel EVC04 (unit 255, input registers; holding 5004 current A, 6000 alive, 2002 failsafe timeout) --

VESTEL_CHARGING = 1001        # input: 0 not charging, 1 charging
VESTEL_CABLE = 1004           # input: 0 no cable, 1 cable no vehicle, 2 vehicle, 3 vehicle locked
VESTEL_CURRENTS = 1008        # input, uint16 mA at 1008, 1010, 1012
VESTEL_POWER = 1020           # input, uint32 W
VESTEL_ENERGY = 1036          # input, uint32 0.1 kWh
VESTEL_FAILSAFE_CURRENT = 2000
VESTEL_FAILSAFE_TIMEOUT = 2002
VESTEL_CURRENT = 5004         # holding, A
VESTEL_ALIVE = 6000


class SimVestel(SimWallbox):
    units_ids = (255,)

    def __init__(self, failsafe_timeout: int = 20) -> None:
        self.failsafe_timeout = failsafe_timeout
        self.alive_at = -1e9
        super().__init__()

    def reset(self, unit: int) -> None:
        self.units[unit].holding.update({VESTEL_FAILSAFE_CURRENT: 0, VESTEL_FAILSAFE_TIMEOUT: self.failsafe_timeout,
                                         VESTEL_CURRENT: 0})

    def written(self, unit: int, address: int, values: list[int]) -> None:
        if address == VESTEL_ALIVE:
            self.alive_at = time.monotonic()

    def check(self, function_code: int, unit: int, address: int, count: int, writing: bool) -> int | None:
        if writing and function_code == 16:
            return ILLEGAL_FUNCTION  # single-register writes (FC6)
        return None

    @property
    def alive(self) -> bool:
        return time.monotonic() - self.alive_at < self.failsafe_timeout

    def limit_amps(self, unit: int = 0) -> float:
        holding = self.units[255].holding
        amps = float(holding.get(VESTEL_CURRENT if self.alive else VESTEL_FAILSAFE_CURRENT, 0))
        return amps if amps >= 6 else 0.0

    def refresh(self, unit: int) -> None:
        state = self.units[unit]
        car = state.car
        car.draw(self.limit_amps(unit))
        regs = state.input
        regs[VESTEL_CABLE] = 3 if car.plugged else 0
        regs[VESTEL_CHARGING] = 1 if car.amps > 0 else 0
        for i in range(3):
            regs[VESTEL_CURRENTS + 2 * i] = round(car.amps * 1000)
        regs.update(dict(enumerate(u32(round(3 * car.amps * car.voltage)), VESTEL_POWER)))
        regs.update(dict(enumerate(u32(int(car.energy_wh / 100)), VESTEL_ENERGY)))


# --- KEBA P30 x ("Modbus TCP Programmers Guide" V 1.04: holding, uint32, one value per read, FC6 writes) ----

KEBA_CHARGING_STATE = 1000    # 0 start-up, 1 not ready, 2 ready, 3 charging, 4 error, 5 interrupted
KEBA_CABLE_STATE = 1004       # 0, 1, 3: no vehicle; 5, 7: vehicle plugged (7 locked)
KEBA_CURRENTS = 1008          # mA at 1008, 1010, 1012
KEBA_POWER = 1020             # mW
KEBA_ENERGY = 1036            # 0.1 Wh
KEBA_SET_CURRENT = 5004       # mA, write only
KEBA_ENABLE = 5014            # 1 enable, 0 disable, write only
_KEBA_READABLE = {KEBA_CHARGING_STATE, KEBA_CABLE_STATE, KEBA_CURRENTS, KEBA_CURRENTS + 2, KEBA_CURRENTS + 4,
                  KEBA_POWER, KEBA_ENERGY}


class SimKeba(SimWallbox):
    units_ids = (255,)

    def reset(self, unit: int) -> None:
        self.units[unit].holding.update({KEBA_SET_CURRENT: 6000, KEBA_ENABLE: 1})

    def check(self, function_code: int, unit: int, address: int, count: int, writing: bool) -> int | None:
        if writing:
            if function_code != 6 or address not in (KEBA_SET_CURRENT, KEBA_ENABLE):
                return ILLEGAL_FUNCTION if function_code != 6 else ILLEGAL_ADDRESS
            return None
        if function_code != 3 or address not in _KEBA_READABLE or count != 2:
            return ILLEGAL_ADDRESS  # no reads across register boundaries, nothing write-only
        return None

    def limit_amps(self, unit: int = 0) -> float:
        holding = self.units[255].holding
        if not holding.get(KEBA_ENABLE, 0):
            return 0.0
        amps = holding.get(KEBA_SET_CURRENT, 0) / 1000
        return amps if amps >= 6 else 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.units[255].holding.get(KEBA_ENABLE, 0))

    def refresh(self, unit: int) -> None:
        state = self.units[unit]
        car = state.car
        car.draw(self.limit_amps(unit))
        regs = state.holding
        regs.update(dict(enumerate(u32(7 if car.plugged else 0), KEBA_CABLE_STATE)))
        charging = 3 if car.amps > 0 else (5 if car.plugged and not self.enabled else (2 if car.plugged else 1))
        regs.update(dict(enumerate(u32(charging), KEBA_CHARGING_STATE)))
        for i in range(3):
            regs.update(dict(enumerate(u32(round(car.amps * 1000)), KEBA_CURRENTS + 2 * i)))
        regs.update(dict(enumerate(u32(round(3 * car.amps * car.voltage * 1000)), KEBA_POWER)))
        regs.update(dict(enumerate(u32(int(car.energy_wh * 10)), KEBA_ENERGY)))


# --- MENNEKES AMTRON Compact 2.0s (Modbus RTU specification v2.0, layout 1.0.3; unit 50) -------------------

MENNEKES_EVSE_STATE = 0x0100  # 1 idle, 2 EV connected, 4 ready to charge, 5 charging
MENNEKES_CURRENT_EM = 0x0302  # float32, 0 = no limitation, 6-32 A
MENNEKES_CURRENTS = 0x0500    # float32 L1..L3
MENNEKES_POWER = 0x0512       # float32 W
MENNEKES_HEARTBEAT = 0x0D00   # 0x55AA at least every 10 s
MENNEKES_RELEASE = 0x0D05     # 1 charging released by the energy manager, 0 not
MENNEKES_ENERGY = 0x1000      # float32 kWh


class SimMennekes(SimWallbox):
    """One AMTRON per unit id: several on one simulated RS485 bus share the server, like on a real bus."""

    units_ids = (50,)

    def __init__(self, heartbeat_timeout: float = 10.0, units: tuple[int, ...] = (50,)) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_at = {u: -1e9 for u in units}
        super().__init__(units)

    def reset(self, unit: int) -> None:
        self.units[unit].holding.update({MENNEKES_RELEASE: 0, **dict(enumerate(f32(0.0), MENNEKES_CURRENT_EM))})

    def written(self, unit: int, address: int, values: list[int]) -> None:
        if address == MENNEKES_HEARTBEAT and values == [0x55AA]:
            self.heartbeat_at[unit] = time.monotonic()

    def heartbeat_fresh(self, unit: int = 0) -> bool:
        return time.monotonic() - self.heartbeat_at[self.first(unit)] < self.heartbeat_timeout

    def limit_amps(self, unit: int = 0) -> float:
        unit = self.first(unit)
        holding = self.units[unit].holding
        if not self.heartbeat_fresh(unit) or holding.get(MENNEKES_RELEASE, 0) != 1:
            return 0.0  # master lost (fallback: pause) or not released
        amps = from_f32([holding.get(MENNEKES_CURRENT_EM, 0), holding.get(MENNEKES_CURRENT_EM + 1, 0)])
        return 32.0 if amps == 0 else (amps if amps >= 6 else 0.0)

    def refresh(self, unit: int) -> None:
        state = self.units[unit]
        car = state.car
        car.draw(self.limit_amps(unit))
        regs = state.holding
        regs[MENNEKES_EVSE_STATE] = 1 if not car.plugged else (5 if car.amps > 0 else (
            4 if self.limit_amps(unit) > 0 else 2))
        for i in range(3):
            regs.update(dict(enumerate(f32(car.amps), MENNEKES_CURRENTS + 2 * i)))
        regs.update(dict(enumerate(f32(3 * car.amps * car.voltage), MENNEKES_POWER)))
        regs.update(dict(enumerate(f32(car.energy_wh / 1000), MENNEKES_ENERGY)))


# --- Webasto Next (TQ-DM100 layout: holding; 5004 current A write only; 6000 life bit) ---------------------

WEBASTO_STATE = 1000          # 0 no vehicle, 1 attached without permission, 3 charging, 4 paused, 7 error
WEBASTO_CURRENTS = 1008       # mA at 1008, 1010, 1012
WEBASTO_POWER = 1020          # uint32 W
WEBASTO_ENERGY = 1036         # uint32 Wh
WEBASTO_TIMEOUT = 2002        # communication timeout, s
WEBASTO_CURRENT = 5004        # A, write only
WEBASTO_LIFE = 6000


class SimWebasto(SimWallbox):
    units_ids = (255,)

    def __init__(self, timeout: int = 20) -> None:
        self.timeout = timeout
        self.life_at = -1e9
        self.current = 0
        super().__init__()

    def reset(self, unit: int) -> None:
        self.units[unit].holding[WEBASTO_TIMEOUT] = self.timeout

    def written(self, unit: int, address: int, values: list[int]) -> None:
        if address == WEBASTO_LIFE:
            self.life_at = time.monotonic()
        if address == WEBASTO_CURRENT:
            self.current = values[0]

    def check(self, function_code: int, unit: int, address: int, count: int, writing: bool) -> int | None:
        if not writing and address <= WEBASTO_CURRENT < address + count:
            return ILLEGAL_ADDRESS  # write only
        return None

    def limit_amps(self, unit: int = 0) -> float:
        if time.monotonic() - self.life_at >= self.timeout:
            return 0.0  # communication lost: safe current 0
        return float(self.current) if self.current >= 6 else 0.0

    def refresh(self, unit: int) -> None:
        state = self.units[unit]
        car = state.car
        car.draw(self.limit_amps(unit))
        regs = state.holding
        if not car.plugged:
            regs[WEBASTO_STATE] = 0
        elif self.limit_amps(unit) <= 0:
            regs[WEBASTO_STATE] = 1
        else:
            regs[WEBASTO_STATE] = 3 if car.amps > 0 else 4
        for i in range(3):
            regs[WEBASTO_CURRENTS + 2 * i] = round(car.amps * 1000)
        regs.update(dict(enumerate(u32(round(3 * car.amps * car.voltage)), WEBASTO_POWER)))
        regs.update(dict(enumerate(u32(int(car.energy_wh)), WEBASTO_ENERGY)))


# --- Bender CC612/CC613 ("Modbus TCP server for energy management systems", ebee address set; unit 255) ------

BENDER_STATE = 122            # vehicle state: 1 A, 2 B, 3 C, 4 D, 5 E/F
BENDER_CURRENTS = 212         # uint32 mA at 212, 214, 216 (high word first)
BENDER_ENERGY = 218           # uint32 Wh
BENDER_POWER = 220            # uint32 W
BENDER_HEMS = 1000            # HEMS current limit, A


class SimBender(SimWallbox):
    """``glitches`` reads of the power register answer 0xFFFFFFFF, as some controllers do for a moment."""

    units_ids = (255,)

    def __init__(self) -> None:
        self.glitches = 0
        super().__init__()

    def limit_amps(self, unit: int = 0) -> float:
        amps = float(self.units[255].holding.get(BENDER_HEMS, 0))
        return amps if amps >= 6 else 0.0

    def refresh(self, unit: int) -> None:
        state = self.units[unit]
        car = state.car
        car.draw(self.limit_amps(unit))
        regs = state.holding
        regs[BENDER_STATE] = 1 if not car.plugged else (3 if car.amps > 0 else 2)
        for i in range(3):
            regs.update(dict(enumerate(u32(round(car.amps * 1000)), BENDER_CURRENTS + 2 * i)))
        regs.update(dict(enumerate(u32(int(car.energy_wh)), BENDER_ENERGY)))
        power = 0xFFFFFFFF if self.glitches > 0 else round(3 * car.amps * car.voltage)
        self.glitches = max(0, self.glitches - 1)
        regs.update(dict(enumerate(u32(power), BENDER_POWER)))


# --- a two-socket wallbox on one unit id, the second socket's registers 100 further on ----------------------

class SimTwinHeidelberg(SimWallbox):
    """Two Heidelberg Energy Control register sets in one device (unit 1), socket 2 at +100: input 5 state,
    6-8 currents (0.1 A), 14 power, 17-18 energy (VAh, high word first); holding 261 max current (0.1 A)."""

    units_ids = (1,)
    OFFSETS = (0, 100)

    def __init__(self) -> None:
        self.cars = (Car(), Car())
        super().__init__()

    def reset(self, unit: int) -> None:
        for offset in self.OFFSETS:
            self.units[unit].holding[261 + offset] = 0

    def socket_limit(self, socket: int) -> float:
        amps = self.units[1].holding.get(261 + self.OFFSETS[socket - 1], 0) / 10
        return amps if amps >= 6 else 0.0

    def limit_amps(self, unit: int = 0) -> float:
        return self.socket_limit(1)

    def refresh(self, unit: int) -> None:
        regs = self.units[unit].input
        for car, offset in zip(self.cars, self.OFFSETS):
            allowed = self.units[unit].holding.get(261 + offset, 0) >= 60
            car.draw(self.units[unit].holding.get(261 + offset, 0) / 10 if allowed else 0.0)
            state = (3 if allowed else 2) if not car.plugged else (7 if allowed else 6)
            tenths, energy = round(car.amps * 10), int(car.energy_wh)
            regs.update({5 + offset: state, 6 + offset: tenths, 7 + offset: tenths, 8 + offset: tenths,
                         14 + offset: round(3 * car.amps * car.voltage),
                         17 + offset: energy >> 16, 18 + offset: energy & 0xFFFF})
