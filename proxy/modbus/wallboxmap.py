"""Wallbox register maps as declarative TOML files: one schema for built-in maps and a user's own.

A map says where a wallbox keeps what the virtual charge point needs and how it
is encoded: the state register(s) and their value tables (what each value
means for the car: plugged, requesting, charging, fault), phase currents,
power, energy, the current-limit register (scale, range, the value that
pauses, whether it can be read back, FC6 or FC16, how often a set-point must
be rewritten before it expires), an optional enable coil/register, set-up
writes, a keep-alive write for wallboxes with a Modbus watchdog, and the
connectors (unit id and register offset per socket, so a two-socket wallbox
is one charge point with connectors 1 and 2). The built-in maps live in
``proxy/modbus/wallboxes/*.toml``; each cites its vendor's register table and
what it was cross-checked against. ``docs/modbus.md`` documents the format.

Parsing collects every problem at once (key and line, like the configuration),
so ``ocpp-proxy check-config`` can report a broken map file in one go.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from proxy.config.problems import ConfigError, LineIndex, Problem
from proxy.modbus.registers import KINDS, TYPES, Block, Field, key_at, value_at

#: Larger wallbox phase currents than this are a wiring or map error, not a reading.
MAX_WALLBOX_AMPS = 200.0
#: Likewise for power (some controllers report 0xFFFFFFFF W for a moment: a failed read, tried again).
MAX_WALLBOX_WATTS = 500_000.0
WRITES = ("fc6", "fc16")
_REGISTER_KEYS = {"register", "kind", "type", "word_order", "scale", "length"}


@dataclass(frozen=True)
class VehicleState:
    """What one value of a wallbox's state register means."""

    plugged: bool
    requesting: bool = False   # the car asks for current (IEC 61851 state C)
    charging: bool = False     # current flows (the wallbox allows it)
    fault: str | None = None   # vendor code of a fault state

    def merge(self, other: VehicleState) -> VehicleState:
        """Two state registers read together (cable state + charging state): flags add up, first fault wins."""
        return VehicleState(self.plugged or other.plugged, self.requesting or other.requesting,
                            self.charging or other.charging, self.fault or other.fault)


@dataclass(frozen=True)
class StateRegister:
    field: Field
    values: dict[int | str, VehicleState]


@dataclass(frozen=True)
class CurrentLimit:
    field: Field
    min: float
    max: float
    #: Written to stop charging; None: the map pauses with its enable coil/register.
    pause: float | None = 0.0
    readable: bool = True
    write: str = "fc16"
    #: Rewritten at least this often (s), even unchanged: a set-point that expires (0: only on change).
    refresh: float = 0.0


@dataclass(frozen=True)
class Enable:
    field: Field
    on: int = 1
    off: int = 0
    readable: bool = True
    write: str = "fc6"


@dataclass(frozen=True)
class Write:
    """One register or coil value (set-up, keep-alive)."""

    field: Field
    value: int
    write: str = "fc6"


@dataclass(frozen=True)
class KeepAlive:
    write: Write
    interval: float


@dataclass(frozen=True)
class Connector:
    #: Unit id of this socket; None: the charger's ``modbus_unit``.
    unit: int | None = None
    #: Added to every register address of this socket.
    offset: int = 0


@dataclass(frozen=True)
class WallboxReading:
    state: VehicleState
    currents: tuple[float, float, float]
    power_w: float | None
    energy_wh: float
    #: What the current-limit register holds now (A); None when the register cannot be read back.
    limit: float | None
    #: Whether the enable coil/register allows charging; None without one (or write-only).
    enabled: bool | None = None


@dataclass(frozen=True)
class WallboxMap:
    name: str
    vendor: str
    model: str
    states: tuple[StateRegister, ...]
    currents: tuple[Field, Field, Field]   # A
    power: Field | None                    # W
    energy: Field                          # Wh, monotonic
    current_limit: CurrentLimit
    enable: Enable | None = None
    setup: tuple[Write, ...] = ()
    keepalive: KeepAlive | None = None
    connectors: tuple[Connector, ...] = (Connector(),)
    #: Default unit id when the charger sets none.
    unit: int = 1
    #: Largest gap bridged by one read; -1 reads every value on its own.
    max_gap: int = 16
    source: str = ""
    cross_checked: str = ""

    @property
    def min_current(self) -> float:
        return self.current_limit.min

    @property
    def max_current(self) -> float:
        return self.current_limit.max

    def fields(self, offset: int = 0) -> list[Field]:
        """Everything one poll reads for the connector at ``offset``."""
        found = [s.field for s in self.states] + list(self.currents) + [self.energy]
        if self.power is not None:
            found.append(self.power)
        if self.current_limit.readable:
            found.append(self.current_limit.field)
        if self.enable is not None and self.enable.readable:
            found.append(self.enable.field)
        return [f.shifted(offset) for f in found]

    def blocks(self, offset: int = 0) -> list[Block]:
        from proxy.modbus.registers import blocks
        return blocks(self.fields(offset), max_gap=self.max_gap)

    def decode(self, data: dict[Block, list[int]], offset: int = 0) -> WallboxReading:
        """Raw registers → a reading; ValueError for values no working wallbox reports."""
        state: VehicleState | None = None
        for register in self.states:
            raw = key_at(register.field.shifted(offset), data)
            meaning = register.values.get(raw)
            if meaning is None:
                shown = raw if isinstance(raw, int) else repr(raw[:40])  # text from the device: cut
                raise ValueError(f"unknown state register value {shown} (register {register.field.address + offset})")
            state = meaning if state is None else state.merge(meaning)
        assert state is not None  # a map has at least one state register
        currents = tuple(value_at(f.shifted(offset), data) for f in self.currents)
        for amps in currents:
            if not 0.0 <= amps <= MAX_WALLBOX_AMPS:
                raise ValueError(f"implausible phase current {amps:g} A")
        power = value_at(self.power.shifted(offset), data) if self.power else None
        energy = value_at(self.energy.shifted(offset), data)
        if energy < 0 or (power is not None and power < 0):
            raise ValueError(f"negative power {power} W or energy {energy} Wh")
        if power is not None and power > MAX_WALLBOX_WATTS:
            raise ValueError(f"implausible power {power:g} W")
        limit = value_at(self.current_limit.field.shifted(offset), data) if self.current_limit.readable else None
        enabled = None
        if self.enable is not None and self.enable.readable:
            enabled = int(value_at(self.enable.field.shifted(offset), data)) == self.enable.on
        return WallboxReading(state, (currents[0], currents[1], currents[2]), power, energy, limit, enabled)


# --- parsing ---------------------------------------------------------------------------------

class _Parser:
    """Builds a WallboxMap from a TOML table, collecting problems with key and line."""

    def __init__(self, text: str) -> None:
        self.index = LineIndex(text)
        self.problems: list[Problem] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message, self.index.find(key)))

    def table(self, data: Mapping[str, Any], key: str, required: bool = True) -> dict[str, Any] | None:
        value = data.get(key)
        if value is None:
            if required:
                self.problem(key, "is required")
            return None
        if not isinstance(value, dict):
            self.problem(key, "must be a table")
            return None
        return value

    def value(self, table: Mapping[str, Any], name: str, key: str, kind: type | tuple[type, ...],
              default: Any = None, required: bool = False) -> Any:
        if name not in table:
            if required:
                self.problem(f"{key}.{name}", "is required")
            return default
        value = table[name]
        if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            self.problem(f"{key}.{name}", f"must be a {_type_name(kind)}; got {value!r}")
            return default
        if not isinstance(value, kind):
            self.problem(f"{key}.{name}", f"must be a {_type_name(kind)}; got {value!r}")
            return default
        return value

    def unknown(self, table: Mapping[str, Any], known: set[str], key: str) -> None:
        for name in table:
            if name not in known:
                self.problem(f"{key}.{name}", f"unknown key (known: {', '.join(sorted(known))})")

    def field(self, table: Mapping[str, Any], key: str, kind: str = "input", register: int | None = None,
              kinds: tuple[str, ...] = KINDS) -> Field | None:
        address = register if register is not None else self.value(table, "register", key, int, required=True)
        kind = self.value(table, "kind", key, str, kind)
        type_ = self.value(table, "type", key, str, "uint16")
        order = self.value(table, "word_order", key, str, "big")
        scale = float(self.value(table, "scale", key, (int, float), 1.0))
        length = self.value(table, "length", key, int, 1)
        ok = address is not None
        if address is not None and not 0 <= address <= 65535:
            self.problem(f"{key}.register", f"must be 0-65535; got {address}")
            ok = False
        if kind not in kinds:
            self.problem(f"{key}.kind", f"must be one of {', '.join(kinds)}; got {kind!r}")
            ok = False
        if type_ not in TYPES:
            self.problem(f"{key}.type", f"must be one of {', '.join(TYPES)}; got {type_!r}")
            ok = False
        if order not in ("big", "little"):
            self.problem(f"{key}.word_order", f"must be big or little; got {order!r}")
            ok = False
        if scale == 0:
            self.problem(f"{key}.scale", "must not be 0")
            ok = False
        if not 1 <= length <= 32:
            self.problem(f"{key}.length", f"must be 1-32; got {length}")
            ok = False
        if not ok or address is None:
            return None
        result = Field(address, kind, type_, order, scale, length)
        if address + result.words > 65536:
            self.problem(f"{key}.register", f"{result.words} registers from {address} run past 65535")
            return None
        return result

    def write_mode(self, table: Mapping[str, Any], key: str, default: str, single: Field | None) -> str:
        mode = str(self.value(table, "write", key, str, default))
        if mode not in WRITES:
            self.problem(f"{key}.write", f"must be fc6 or fc16; got {mode!r}")
            return default
        if mode == "fc6" and single is not None and single.kind != "coil" and single.words != 1:
            self.problem(f"{key}.write", f"fc6 writes one register; {single.type} needs {single.words} (use fc16)")
        return mode


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list", dict: "table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _states(p: _Parser, data: Mapping[str, Any]) -> tuple[StateRegister, ...]:
    entries = data.get("state")
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list) or not entries:
        p.problem("state", "is required: at least one [[state]] register with its value table")
        return ()
    result = []
    for i, entry in enumerate(entries):
        key = f"state[{i}]"
        p.unknown(entry, _REGISTER_KEYS | {"values"}, key)
        register = p.field(entry, key, "input")
        values = p.value(entry, "values", key, dict, required=True)
        if register is None or values is None:
            continue
        table: dict[int | str, VehicleState] = {}
        for raw, meaning in values.items():
            vkey = f"{key}.values.{raw}"
            parsed: int | str = raw
            if register.type != "string":
                try:
                    parsed = int(raw, 0)
                except ValueError:
                    p.problem(vkey, f"must be an integer register value; got {raw!r}")
                    continue
            if not isinstance(meaning, dict):
                p.problem(vkey, "must be a table like {plugged = true, requesting = true}")
                continue
            p.unknown(meaning, {"plugged", "requesting", "charging", "fault"}, vkey)
            flags = [p.value(meaning, n, vkey, bool, False) for n in ("plugged", "requesting", "charging")]
            fault = p.value(meaning, "fault", vkey, str, None)
            table[parsed] = VehicleState(flags[0], flags[1], flags[2], fault)
        if not table:
            p.problem(f"{key}.values", "needs at least one value")
        result.append(StateRegister(register, table))
    return tuple(result)


def _currents(p: _Parser, data: Mapping[str, Any]) -> tuple[Field, Field, Field] | None:
    table = p.table(data, "currents")
    if table is None:
        return None
    p.unknown(table, (_REGISTER_KEYS - {"register"}) | {"registers"}, "currents")
    registers = p.value(table, "registers", "currents", list, required=True)
    if registers is None:
        return None
    if len(registers) != 3 or not all(isinstance(r, int) and not isinstance(r, bool) for r in registers):
        p.problem("currents.registers", f"must be three register addresses (L1, L2, L3); got {registers!r}")
        return None
    fields = [p.field(table, "currents", "input", register=r) for r in registers]
    if any(f is None for f in fields):
        return None
    return fields[0], fields[1], fields[2]  # type: ignore[return-value]


def _current_limit(p: _Parser, data: Mapping[str, Any]) -> CurrentLimit | None:
    table = p.table(data, "current_limit")
    if table is None:
        return None
    key = "current_limit"
    p.unknown(table, _REGISTER_KEYS | {"min", "max", "pause", "readable", "write", "refresh"}, key)
    register = p.field(table, key, "holding", kinds=("holding",))
    low = float(p.value(table, "min", key, (int, float), 6.0))
    high = float(p.value(table, "max", key, (int, float), 16.0))
    pause = p.value(table, "pause", key, (int, float), None)
    readable = p.value(table, "readable", key, bool, True)
    refresh = float(p.value(table, "refresh", key, (int, float), 0.0))
    if not 0 < low <= high <= MAX_WALLBOX_AMPS:
        p.problem(f"{key}.min", f"need 0 < min <= max <= {MAX_WALLBOX_AMPS:g} A; got min {low:g}, max {high:g}")
    if pause is not None and not 0 <= pause < low:
        p.problem(f"{key}.pause", f"must be below min ({low:g} A) and not negative; got {pause!r}")
    if refresh < 0:
        p.problem(f"{key}.refresh", f"must not be negative; got {refresh:g}")
    write = p.write_mode(table, key, "fc16", register)
    if register is None:
        return None
    return CurrentLimit(register, low, high, None if pause is None else float(pause), readable, write, refresh)


def _enable(p: _Parser, data: Mapping[str, Any]) -> Enable | None:
    table = p.table(data, "enable", required=False)
    if table is None:
        return None
    p.unknown(table, _REGISTER_KEYS | {"on", "off", "readable", "write"}, "enable")
    register = p.field(table, "enable", "coil", kinds=("coil", "holding"))
    on = p.value(table, "on", "enable", int, 1)
    off = p.value(table, "off", "enable", int, 0)
    if on == off:
        p.problem("enable.off", f"must differ from on ({on})")
    readable = p.value(table, "readable", "enable", bool, True)
    write = p.write_mode(table, "enable", "fc6", register)
    return Enable(register, on, off, readable, write) if register else None


def _write(p: _Parser, table: Mapping[str, Any], key: str, extra: set[str]) -> Write | None:
    p.unknown(table, _REGISTER_KEYS | {"value", "write"} | extra, key)
    register = p.field(table, key, "holding", kinds=("coil", "holding"))
    value = p.value(table, "value", key, int, required=True)
    if value is not None and not 0 <= value <= 65535:
        p.problem(f"{key}.value", f"must be 0-65535; got {value}")
    write = p.write_mode(table, key, "fc6", register)
    if register is None or value is None:
        return None
    return Write(register, value, write)


def _connectors(p: _Parser, data: Mapping[str, Any]) -> tuple[Connector, ...]:
    entries = data.get("connectors")
    if entries is None:
        return (Connector(),)
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        p.problem("connectors", "must be one or more [[connectors]] tables")
        return (Connector(),)
    result = []
    for i, entry in enumerate(entries):
        key = f"connectors[{i}]"
        p.unknown(entry, {"unit", "offset"}, key)
        unit = p.value(entry, "unit", key, int, None)
        offset = p.value(entry, "offset", key, int, 0)
        if unit is not None and not 1 <= unit <= 255:
            p.problem(f"{key}.unit", f"must be 1-255; got {unit}")
        if not 0 <= offset <= 65535:
            p.problem(f"{key}.offset", f"must be 0-65535; got {offset}")
        result.append(Connector(unit, offset))
    if len({(c.unit, c.offset) for c in result}) != len(result):
        p.problem("connectors", "two connectors with the same unit and offset would read the same socket")
    return tuple(result)


def _overlaps(p: _Parser, named: list[tuple[str, Field | None]]) -> None:
    """Two values sharing a register is a typo in a map."""
    seen: dict[tuple[str, int], tuple[str, Field]] = {}
    for name, item in named:
        if item is None:
            continue
        for address in range(item.address, item.address + item.words):
            kind = "coil" if item.kind == "coil" else "register"  # input and holding may share a table
            other = seen.get((kind, address))
            if other is not None and other[0] != name:
                p.problem(name, f"register {address} overlaps {other[0].rpartition('.')[0]} (at {other[1].address})")
                break
            seen.setdefault((kind, address), (name, item))


def parse_map(text: str, name: str, source: str = "<map>") -> WallboxMap:
    """A map file's text → WallboxMap, or ConfigError listing every problem with key and line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [Problem("map", f"not valid TOML: {exc}", None)]) from None
    p = _Parser(text)
    p.unknown(data, {"wallbox", "read", "state", "currents", "power", "energy", "current_limit", "enable",
                     "setup", "keepalive", "connectors"}, "")
    info = p.table(data, "wallbox") or {}
    p.unknown(info, {"vendor", "model", "unit", "source", "cross_checked"}, "wallbox")
    vendor = p.value(info, "vendor", "wallbox", str, "", required=True)
    model = p.value(info, "model", "wallbox", str, "", required=True)
    unit = p.value(info, "unit", "wallbox", int, 1)
    if not 1 <= unit <= 255:
        p.problem("wallbox.unit", f"must be 1-255; got {unit}")
    reads = p.table(data, "read", required=False) or {}
    p.unknown(reads, {"max_gap"}, "read")
    max_gap = p.value(reads, "max_gap", "read", int, 16)
    states = _states(p, data)
    currents = _currents(p, data)
    power_table = p.table(data, "power", required=False)
    power = p.field(power_table, "power") if power_table is not None else None
    energy_table = p.table(data, "energy")
    energy = p.field(energy_table, "energy") if energy_table is not None else None
    for key, table in (("power", power_table), ("energy", energy_table)):
        if table is not None:
            p.unknown(table, _REGISTER_KEYS, key)
    limit = _current_limit(p, data)
    enable = _enable(p, data)
    if limit is not None and limit.pause is None and enable is None:
        p.problem("current_limit.pause", "is required without an [enable] coil/register: nothing could stop charging")
    setup = []
    raw_setup = data.get("setup", [])
    for i, entry in enumerate(raw_setup if isinstance(raw_setup, list) else []):
        write = _write(p, entry, f"setup[{i}]", set()) if isinstance(entry, dict) else None
        if write is not None:
            setup.append(write)
    keepalive = None
    keep_table = p.table(data, "keepalive", required=False)
    if keep_table is not None:
        write = _write(p, keep_table, "keepalive", {"interval"})
        interval = float(p.value(keep_table, "interval", "keepalive", (int, float), 0.0, required=True))
        if interval <= 0:
            p.problem("keepalive.interval", "must be a positive number of seconds")
        if write is not None and interval > 0:
            keepalive = KeepAlive(write, interval)
    connectors = _connectors(p, data)
    named: list[tuple[str, Field | None]] = [(f"state[{i}].register", s.field) for i, s in enumerate(states)]
    named += [("currents.registers", f) for f in currents or ()] + [("energy.register", energy),
                                                                     ("power.register", power)]
    named += [("current_limit.register", limit.field if limit else None),
              ("enable.register", enable.field if enable else None),
              ("keepalive.register", keepalive.write.field if keepalive else None)]
    _overlaps(p, named)
    if p.problems or currents is None or energy is None or limit is None or not states:
        raise ConfigError(source, p.problems or [Problem("map", "incomplete", None)])
    return WallboxMap(name, vendor, model, states, currents, power, energy, limit, enable, tuple(setup), keepalive,
                      connectors, unit, max_gap, str(info.get("source", "")), str(info.get("cross_checked", "")))


def load_map_file(path: str | Path) -> WallboxMap:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [Problem("map_file", f"cannot be read: {exc}", None)]) from None
    return parse_map(text, path.stem, str(path))


def builtin_maps() -> dict[str, WallboxMap]:
    """Every ``proxy/modbus/wallboxes/*.toml`` by file name (package data)."""
    folder = resources.files("proxy.modbus").joinpath("wallboxes")
    found: dict[str, WallboxMap] = {}
    for item in sorted(folder.iterdir(), key=lambda i: i.name):
        if item.name.endswith(".toml"):
            name = item.name.removesuffix(".toml")
            found[name] = parse_map(item.read_text(encoding="utf-8"), name, f"proxy/modbus/wallboxes/{item.name}")
    return found


__all__ = ["MAX_WALLBOX_AMPS", "Connector", "CurrentLimit", "Enable", "KeepAlive", "StateRegister", "VehicleState",
           "WallboxMap", "WallboxReading", "Write", "builtin_maps", "load_map_file", "parse_map"]
