"""A two-socket wallbox as one charge point, and the wallbox map format (sans-IO, issue 20).

The safety rules of a two-socket wallbox hold whatever the backend and the cars
do, checked by a hypothesis state machine against the charge point core:

* a connector's current is 0 or between the wallbox's minimum and maximum;
* current flows only on a connector with its own confirmed, running transaction,
  operative and answering;
* the connectors together never exceed the charge point's ChargePointMaxProfile,
  and each stays within its own TxProfile;
* two connectors never share a transaction.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from proxy.config.problems import ConfigError
from proxy.modbus.chargepoint import Action, Send, SetCurrent, VirtualChargePoint, VirtualSettings, share
from proxy.modbus.maps import WALLBOXES
from proxy.modbus.registers import Block
from proxy.modbus.wallboxmap import VehicleState, WallboxReading, parse_map

MIN, MAX = 6.0, 32.0
ANSWERS: dict[str, dict[str, Any]] = {
    "BootNotification": {"status": "Accepted", "currentTime": "2026-11-25T12:00:00Z", "interval": 300},
    "StatusNotification": {}, "Heartbeat": {"currentTime": "2026-11-25T12:00:00Z"}, "MeterValues": {},
    "StopTransaction": {}}


def profile(purpose: str, limit: float, pid: int, transaction_id: int | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {
        "chargingProfileId": pid, "stackLevel": 1, "chargingProfilePurpose": purpose,
        "chargingProfileKind": "Absolute",
        "chargingSchedule": {"startSchedule": "2026-01-01T00:00:00Z", "chargingRateUnit": "A",
                             "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}]}}
    if transaction_id is not None:
        result["transactionId"] = transaction_id
    return result


class TwoSockets(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cp = VirtualChargePoint(VirtualSettings("AL2", "Alfen", "Eve Double", fixed_id_tag="TAG",
                                                     min_current=MIN, max_current=MAX, connectors=2))
        self.now, self.wall = 100.0, datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
        self.outstanding: list[Any] | None = None
        self.next_tx = 1000
        self.max_limit: float | None = None
        self.tx_limit: dict[int, float] = {}
        self.run(self.cp.connected(self.now))
        for connector in (1, 2):
            self.read(connector, plugged=False)
        self.answer(True, 10)  # booted, statuses sent

    def run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                frame = json.loads(action.text)
                if frame[0] == 2:
                    self.outstanding = frame

    def read(self, connector: int, plugged: bool, requesting: bool = True) -> None:
        state = VehicleState(plugged, plugged and requesting, plugged and requesting)
        amps = self.cp.current_for(connector) or 0.0
        reading = WallboxReading(state, (amps, amps, amps), 3 * 230 * amps, 10_000.0, amps)
        self.run(self.cp.read(reading, self.now, self.wall, connector))

    def call(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        sent: list[Any] = []
        for item in self.cp.received(json.dumps([2, "b1", action, payload]), self.now, self.wall):
            if isinstance(item, Send):
                frame = json.loads(item.text)
                if frame[1] == "b1":
                    sent.append(frame)
                elif frame[0] == 2:
                    self.outstanding = frame
        assert sent and sent[0][0] == 3, sent
        return dict(sent[0][2])

    # -- the cars and the wallbox ----------------------------------------------------------

    @rule(connector=st.sampled_from([1, 2]), plugged=st.booleans(), requesting=st.booleans())
    def car(self, connector: int, plugged: bool, requesting: bool) -> None:
        self.read(connector, plugged, requesting)

    @rule(connector=st.sampled_from([1, 2]))
    def modbus_silent(self, connector: int) -> None:
        for _ in range(12):  # past fault_after (10 s)
            self.run(self.cp.read_failed("no answer", self.now, self.wall, connector))
            self.later(1)

    @rule(seconds=st.sampled_from([1, 5, 31]))
    def later(self, seconds: float) -> None:
        self.now += seconds
        self.wall += timedelta(seconds=seconds)
        self.run(self.cp.tick(self.now, self.wall))

    # -- the backend ---------------------------------------------------------------------------

    @rule(accept=st.booleans(), count=st.sampled_from([1, 10]))
    def answer(self, accept: bool, count: int = 1) -> None:
        """The backend answers the next ``count`` CALLs (Authorize and StartTransaction as ``accept`` says)."""
        for _ in range(count):
            self._answer_one(accept)

    def _answer_one(self, accept: bool) -> None:
        frame = self.outstanding
        if frame is None or self.cp._outstanding is None:
            return
        action = frame[2]
        if action == "Authorize":
            payload: dict[str, Any] = {"idTagInfo": {"status": "Accepted" if accept else "Invalid"}}
        elif action == "StartTransaction":
            self.next_tx += 1
            payload = {"transactionId": self.next_tx, "idTagInfo": {"status": "Accepted" if accept else "Blocked"}}
        else:
            payload = ANSWERS[action]
        self.outstanding = None
        self.run(self.cp.received(json.dumps([3, frame[1], payload]), self.now, self.wall))

    @rule(limit=st.one_of(st.none(), st.sampled_from([0, 4, 8, 12, 20, 40])))
    def charge_point_max(self, limit: float | None) -> None:
        if limit is None:
            self.call("ClearChargingProfile", {"chargingProfilePurpose": "ChargePointMaxProfile"})
        else:
            assert self.call("SetChargingProfile", {"connectorId": 0, "csChargingProfiles": profile(
                "ChargePointMaxProfile", limit, 1)})["status"] == "Accepted"
        self.max_limit = limit

    @rule(connector=st.sampled_from([1, 2]), limit=st.sampled_from([3, 7, 10, 16]))
    def tx_profile(self, connector: int, limit: float) -> None:
        tx = self.cp.connector(connector).tx
        if tx is None or tx.transaction_id is None or tx.stopping:
            return
        status = self.call("SetChargingProfile", {"connectorId": connector, "csChargingProfiles": profile(
            "TxProfile", limit, 10 + connector, tx.transaction_id)})["status"]
        assert status == "Accepted"
        self.tx_limit[connector] = limit

    @rule(connector=st.sampled_from([1, 2]))
    def remote_stop(self, connector: int) -> None:
        tx = self.cp.connector(connector).tx
        if tx is not None and tx.transaction_id:
            self.call("RemoteStopTransaction", {"transactionId": tx.transaction_id})

    @rule(connector=st.sampled_from([0, 1, 2]), operative=st.booleans())
    def availability(self, connector: int, operative: bool) -> None:
        self.call("ChangeAvailability", {"connectorId": connector,
                                         "type": "Operative" if operative else "Inoperative"})

    # -- the rules ---------------------------------------------------------------------------------

    @invariant()
    def currents_are_zero_or_in_range(self) -> None:
        for connector in self.cp.connectors.values():
            amps = connector.current or 0.0
            assert amps == 0.0 or MIN <= amps <= MAX, (connector.id, amps)

    @invariant()
    def current_only_in_its_own_running_transaction(self) -> None:
        for c in self.cp.connectors.values():
            if (c.current or 0.0) > 0:
                assert c.running is not None and not c.inoperative and not c.lost, c

    @invariant()
    def limits_hold(self) -> None:
        currents = {c.id: c.current or 0.0 for c in self.cp.connectors.values()}
        if self.max_limit is not None:
            assert sum(currents.values()) <= self.max_limit + 0.05, (currents, self.max_limit)
        for c in self.cp.connectors.values():
            if c.tx is None or c.tx.stopping:
                self.tx_limit.pop(c.id, None)  # the core drops TxProfiles with their transaction
            elif c.id in self.tx_limit:
                assert currents[c.id] <= self.tx_limit[c.id] + 0.05

    @invariant()
    def no_shared_transaction(self) -> None:
        ids = [c.tx.transaction_id for c in self.cp.connectors.values() if c.tx and c.tx.transaction_id]
        assert len(ids) == len(set(ids))


TestTwoSockets = TwoSockets.TestCase
TestTwoSockets.settings = settings(max_examples=60, stateful_step_count=40)


def test_two_transactions_run_at_once_and_share_the_maximum() -> None:
    machine = TwoSockets()
    for connector in (1, 2):
        machine.read(connector, plugged=True)
        machine.answer(True, 10)
    assert {c.id: c.current for c in machine.cp.connectors.values()} == {1: MAX, 2: MAX}
    assert machine.cp.connector(1).tx and machine.cp.connector(2).tx
    machine.charge_point_max(20)
    assert {c.id: c.current for c in machine.cp.connectors.values()} == {1: 10.0, 2: 10.0}
    machine.tx_profile(2, 7)
    assert {c.id: c.current for c in machine.cp.connectors.values()} == {1: 13.0, 2: 7.0}
    machine.charge_point_max(8)  # not enough for two: the later connector pauses, the other charges
    assert {c.id: c.current for c in machine.cp.connectors.values()} == {1: 8.0, 2: 0.0}
    record = machine.cp.record()
    assert record is not None and "transaction" in record and "transaction" in record["connectors"]["2"]
    again = VirtualChargePoint(VirtualSettings("AL2", "Alfen", "Eve Double", connectors=2))
    again.restore(json.loads(json.dumps(record)))
    restored = again.connector(2).tx
    assert restored is not None and restored.transaction_id == 1002


def test_one_sockets_tx_profile_never_removes_the_others() -> None:
    """Found by the state machine: two TxProfiles with the same purpose and stack level on the two
    connectors. Replacing across connectors dropped socket 1's 3 A profile and it drew 32 A."""
    machine = TwoSockets()
    machine.car(2, plugged=True, requesting=False)
    machine.car(1, plugged=True, requesting=False)
    machine.answer(True, 10)
    machine.tx_profile(1, 3)
    machine.tx_profile(2, 3)
    assert {c.id: c.current for c in machine.cp.connectors.values()} == {1: 0.0, 2: 0.0}  # 3 A < minimum: paused
    assert sorted(i.connector for i in machine.cp.profiles) == [1, 2]
    machine.tx_profile(2, 10)  # the same connector, purpose and stack level: replaced there only
    assert {c.id: c.current for c in machine.cp.connectors.values()} == {1: 0.0, 2: 10.0}
    assert sorted(i.connector for i in machine.cp.profiles) == [1, 2]


@given(st.one_of(st.none(), st.floats(0, 64)), st.dictionaries(st.sampled_from([1, 2, 3]), st.floats(0, 32)))
def test_share_never_exceeds_the_limit_nor_what_each_wants(limit: float | None, wanted: dict[int, float]) -> None:
    result = share(limit, wanted, MIN)
    assert set(result) == set(wanted)
    for connector, amps in result.items():
        assert amps <= wanted[connector] + 1e-9
    if limit is not None:
        assert sum(result.values()) <= limit + 1e-6


# --- the map format ---------------------------------------------------------------------------------

GOOD = """[wallbox]
vendor = "X"
model = "Y"
[[state]]
register = 5
[state.values]
1 = {}
2 = { plugged = true }
[currents]
registers = [6, 7, 8]
[energy]
register = 10
type = "uint32"
[current_limit]
register = 300
kind = "holding"
pause = 0
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_map(text, "mine", "mine.toml")
    return [p.render("mine.toml") for p in error.value.problems]


def test_a_minimal_map_file_decodes_registers() -> None:
    built = parse_map(GOOD, "mine", "mine.toml")
    assert built.blocks() == [Block("input", 5, 7), Block("holding", 300, 1)]
    reading = built.decode({Block("input", 5, 7): [2, 16, 16, 16, 0, 0x000F, 0x4240],
                            Block("holding", 300, 1): [10]})
    assert reading.state.plugged and reading.currents == (16.0, 16.0, 16.0)
    assert reading.energy_wh == 1_000_000 and reading.limit == 10.0


@pytest.mark.parametrize(("change", "expected"), [
    (('registers = [6, 7, 8]', 'registers = [6, 7]'),
     "mine.toml:10: currents.registers: must be three register addresses (L1, L2, L3); got [6, 7]"),
    (('type = "uint32"', 'type = "uint24"'),
     "mine.toml:13: energy.type: must be one of uint16, int16, uint32, int32, float32, float64, string; got 'uint24'"),
    (('register = 300', 'register = 70000'), "mine.toml:15: current_limit.register: must be 0-65535; got 70000"),
    (('pause = 0', 'pause = 0\nmin = 20\nmax = 10'),
     "mine.toml:18: current_limit.min: need 0 < min <= max <= 200 A; got min 20, max 10"),
    (('pause = 0', 'write = "fc6"\ntype = "float32"\npause = 0'),
     "mine.toml:17: current_limit.write: fc6 writes one register; float32 needs 2 (use fc16)"),
    (('[energy]\nregister = 10', '[energy]\nregister = 7'),
     "mine.toml:12: energy.register: register 7 overlaps currents (at 7)"),
    (('vendor = "X"\n', ''), "mine.toml:1: wallbox.vendor: is required"),
    (('1 = {}', 'one = {}'), "mine.toml:7: state[0].values.one: must be an integer register value; got 'one'"),
    (('2 = { plugged = true }', '2 = { plugged = true, charing = true }'),
     "mine.toml:8: state[0].values.2.charing: unknown key (known: charging, fault, plugged, requesting)"),
])
def test_map_file_problems_name_key_and_line(change: tuple[str, str], expected: str) -> None:
    assert expected in problems(GOOD.replace(*change, 1))


def test_check_config_names_the_map_files_key_and_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "mine.toml").write_text(GOOD.replace('type = "uint32"', 'type = "uint24"'))
    config = tmp_path / "site.toml"
    config.write_text('[backend]\nurl = "ws://b/ocpp"\n[[modbus_chargers]]\nid = "M1"\nmodbus = "127.0.0.1:502"\n'
                      'map_file = "mine.toml"\n')
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert (f"{config}:6: modbus_chargers[0].map_file: {tmp_path / 'mine.toml'}:13: energy.type: must be one of "
            in result.stderr), result.stderr
    (tmp_path / "mine.toml").write_text(GOOD)
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_builtin_map_loads_and_its_docs_row_exists() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "modbus.md").read_text()
    for name, built in WALLBOXES.items():
        assert f"| `{name}` |" in docs, name
        assert built.current_limit.pause is not None or built.enable is not None
        for connector in built.connectors:
            assert built.blocks(connector.offset)


def test_the_schema_lists_every_builtin_map() -> None:
    from proxy.config.schema import WALLBOX_MAPS

    assert set(WALLBOX_MAPS) == set(WALLBOXES)


def test_a_power_glitch_is_a_failed_read_not_a_meter_value() -> None:
    bender = WALLBOXES["bender-cc613"]
    data = {block: [0] * block.count for block in bender.blocks()}
    holding = next(b for b in data if b.address <= 122 < b.address + b.count)
    data[holding][122 - holding.address] = 1
    assert bender.decode(data).power_w == 0.0
    power = next(b for b in data if b.address <= 220 < b.address + b.count)
    data[power][220 - power.address:222 - power.address] = [0xFFFF, 0xFFFF]
    with pytest.raises(ValueError, match="implausible power"):
        bender.decode(data)


def test_setcurrent_names_its_connector() -> None:
    assert SetCurrent(10.0, 2).connector == 2 and SetCurrent(6.0).connector == 1


_TOML_VALUES = st.one_of(
    st.integers(-(2**40), 2**40).map(str), st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["true", "false", '""', '"holding"', '"coil"', '"string"', '"float64"', '"fc6"', "[]",
                     "[1, 2, 3]", '["a"]', "{}", "{ plugged = 1 }", "0x10000", "-1", "nan", "inf"]))


@given(st.lists(st.tuples(st.integers(0, 30), _TOML_VALUES), max_size=4))
def test_no_map_file_crashes_the_parser(edits: list[tuple[int, str]]) -> None:
    """A user's map file is untrusted: whatever its values, the result is a map or a ConfigError."""
    lines = GOOD.splitlines()
    for index, value in edits:
        key_lines = [i for i, line in enumerate(lines) if " = " in line]
        target = key_lines[index % len(key_lines)]
        lines[target] = f"{lines[target].split(' = ')[0]} = {value}"
    text = "\n".join(lines) + "\n"
    try:
        built = parse_map(text, "fuzz", "fuzz.toml")
    except ConfigError as error:
        assert error.problems and all(p.message for p in error.problems)
    else:
        assert built.blocks() and built.current_limit.min <= built.current_limit.max
