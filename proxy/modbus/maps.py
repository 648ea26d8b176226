"""Register maps of grid meters and wallboxes, as data.

Sources:
- Eastron SDM630 Modbus V2: "Eastron SDM630 Modbus Protocol", input registers, IEEE 754 float,
  high word first: phase currents 30007/30009/30011 (addresses 6/8/10), total system power
  30053 (52), total import energy 30073 (72, kWh).
- Carlo Gavazzi EM24-DIN: "EM24 DIN Communication protocol" v2, INT32 with the least significant
  word first: A L1/L2/L3 at 0x000C/0x000E/0x0010 (mA), W sys at 0x0028 (W x 10), kWh (+) TOT at
  0x003E (kWh x 10).
- Heidelberg (Amperfied) Energy Control wallbox: "EC_ModBus_register_table_20210222" (Heidelberger
  Druckmaschinen, Modbus register table, register layout version 1.0.7+), published at
  https://wallbox.heidelberg.com/wp-content/uploads/2021/05/EC_ModBus_register_table_20210222.pdf
  (now amperfied.de). Input registers: 5 charging state (2 A1, 3 A2, 4 B1, 5 B2, 6 C1, 7 C2,
  8 derating, 9 E, 10 F, 11 error; A no vehicle, B vehicle without charging request, C vehicle
  requesting; x1 wallbox does not allow charging, x2 allows), 6-8 RMS current L1-L3 (0.1 A),
  14 power L1+L2+L3 (VA), 17-18 energy since installation (VAh, high word first). Holding
  registers: 257 watchdog timeout (ms), 258 standby function (4 = disabled), 259 remote lock
  (1 = unlocked), 261 maximal current (0.1 A; 0 or 60-160), 262 failsafe current (0.1 A).
  The addresses were cross-checked against evcc's independent implementation (charger/heidelberg-ec.go).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.modbus.registers import Block, Field, value_at

#: Larger wallbox phase currents than this are a wiring or map error, not a reading.
MAX_WALLBOX_AMPS = 200.0


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


@dataclass(frozen=True)
class VehicleState:
    """What one value of a wallbox's state register means."""

    plugged: bool
    requesting: bool = False   # the car asks for current (IEC 61851 state C)
    charging: bool = False     # current flows (the wallbox allows it)
    fault: str | None = None   # vendor code of a fault state


@dataclass(frozen=True)
class WallboxMap:
    vendor: str
    model: str
    state: Field
    states: dict[int, VehicleState]
    currents: tuple[Field, Field, Field]   # A
    power: Field | None                    # W
    energy: Field                          # Wh, since installation (monotonic)
    #: Holding register the charging current limit is written to (A after scale).
    current_limit: Field
    #: Lowest and highest current the register accepts; below the lowest only 0 (stop) is valid.
    min_current: float
    max_current: float
    #: (address, value) written once after connecting: settings the proxy relies on.
    setup: tuple[tuple[int, int], ...] = ()

    @property
    def fields(self) -> list[Field]:
        return [self.state, *self.currents, *(f for f in (self.power,) if f), self.energy, self.current_limit]

    def decode(self, data: dict[Block, list[int]]) -> WallboxReading:
        """Raw registers → a reading; ValueError for values no working wallbox reports."""
        raw_state = int(value_at(self.state, data))
        state = self.states.get(raw_state)
        if state is None:
            raise ValueError(f"unknown state register value {raw_state}")
        currents = tuple(value_at(f, data) for f in self.currents)
        for amps in currents:
            if not 0.0 <= amps <= MAX_WALLBOX_AMPS:
                raise ValueError(f"implausible phase current {amps:g} A")
        power = value_at(self.power, data) if self.power else None
        energy = value_at(self.energy, data)
        if energy < 0 or (power is not None and power < 0):
            raise ValueError(f"negative power {power} W or energy {energy} Wh")
        return WallboxReading(state, (currents[0], currents[1], currents[2]), power, energy,
                              value_at(self.current_limit, data))


@dataclass(frozen=True)
class WallboxReading:
    state: VehicleState
    currents: tuple[float, float, float]
    power_w: float | None
    energy_wh: float
    #: What the current-limit register holds now (A): the runner rewrites it when it drifts.
    limit: float


def _hd(address: int, kind: str = "input", scale: float = 1.0, type: str = "uint16") -> Field:
    return Field(address, kind, type, "big", scale)


WALLBOXES: dict[str, WallboxMap] = {
    "heidelberg": WallboxMap(
        vendor="Heidelberg", model="Energy Control",
        state=_hd(5),
        states={2: VehicleState(False), 3: VehicleState(False),
                4: VehicleState(True), 5: VehicleState(True),
                6: VehicleState(True, True), 7: VehicleState(True, True, True), 8: VehicleState(True, True, True),
                9: VehicleState(False, fault="E"), 10: VehicleState(False, fault="F"),
                11: VehicleState(False, fault="error")},
        currents=(_hd(6, scale=0.1), _hd(7, scale=0.1), _hd(8, scale=0.1)),
        power=_hd(14),
        energy=_hd(17, type="uint32"),
        current_limit=_hd(261, "holding", 0.1),
        min_current=6.0, max_current=16.0,
        setup=((258, 4), (259, 1)),  # standby off (it would drop Modbus), remote lock open
    ),
}
