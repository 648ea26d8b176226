"""Register maps of grid meters and wallboxes, as data.

Sources:
- Eastron SDM630 Modbus V2: "Eastron SDM630 Modbus Protocol", input registers, IEEE 754 float,
  high word first: phase currents 30007/30009/30011 (addresses 6/8/10), total system power
  30053 (52), total import energy 30073 (72, kWh).
- Carlo Gavazzi EM24-DIN: "EM24 DIN Communication protocol" v2, INT32 with the least significant
  word first: A L1/L2/L3 at 0x000C/0x000E/0x0010 (mA), W sys at 0x0028 (W x 10), kWh (+) TOT at
  0x003E (kWh x 10).

Wallbox maps are TOML files (:mod:`proxy.modbus.wallboxmap`): the built-in ones in
``proxy/modbus/wallboxes/``, each citing its vendor's register table.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.modbus.registers import Field

@dataclass(frozen=True)
class MeterMap:
    currents: tuple[Field, Field, Field]
    power: Field | None = None       # W
    energy: Field | None = None      # Wh

    @property
    def fields(self) -> list[Field]:
        return [*self.currents, *(f for f in (self.power, self.energy) if f is not None)]


def _f32(address: int, scale: float = 1.0) -> Field:
    return Field(address, "input", "float32", "big", scale)


def _em24(address: int, scale: float) -> Field:
    return Field(address, "input", "int32", "little", scale)


METERS: dict[str, MeterMap] = {
    "sdm630": MeterMap((_f32(6), _f32(8), _f32(10)), power=_f32(52), energy=_f32(72, 1000.0)),
    "em24": MeterMap((_em24(0x0C, 0.001), _em24(0x0E, 0.001), _em24(0x10, 0.001)),
                     power=_em24(0x28, 0.1), energy=_em24(0x3E, 100.0)),
}


from proxy.modbus.wallboxmap import (  # noqa: E402 - the wallbox maps live in their own module
    MAX_WALLBOX_AMPS,
    VehicleState,
    WallboxMap,
    WallboxReading,
    builtin_maps,
)

#: The built-in wallbox maps by name (``map = "..."``).
WALLBOXES: dict[str, WallboxMap] = builtin_maps()

__all__ = ["MAX_WALLBOX_AMPS", "METERS", "WALLBOXES", "MeterMap", "VehicleState", "WallboxMap", "WallboxReading"]
