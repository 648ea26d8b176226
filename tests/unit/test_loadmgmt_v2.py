"""Load management in 2.0.1 / 2.1 shapes: translation, schema validity, and the min(backend, local) rule."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from ocpp.messages import get_validator

from proxy.loadmgmt.control import Control, ControlSettings
from proxy.loadmgmt.profiles import ProfileError, parse_clear, parse_set
from proxy.loadmgmt.v2 import V2Profiles, validate_v2
from proxy.messages.versions import OcppVersion
from tests.station_v2 import backend_profile, composite, installed

V2 = (OcppVersion.V201, OcppVersion.V21)
WALL = datetime(2026, 11, 27, 5, 0, tzinfo=UTC)


def own_commands(version: OcppVersion, strategy: str) -> list[tuple[str, dict[str, Any]]]:
    """The proxy's own Set (limit) and Clear in ``version``, from a control that installs and then clears."""
    control = Control("CS1", ControlSettings(strategy=strategy))
    control.wallbox_connected(0.0)
    control.boot_answered("Accepted")
    control.set_local(13.4)
    first = control.next_command(1.0, WALL)
    assert first is not None
    control.answered(first, "Accepted", None, 1.0)
    control.configure(ControlSettings(managed=False, strategy=strategy))
    second = control.next_command(2.0, WALL)
    assert second is not None
    v2 = V2Profiles(version)
    return [(c.action, v2.command(c.action, c.payload)) for c in (first, second)]


@pytest.mark.parametrize("version", V2)
@pytest.mark.parametrize("strategy", ["max-profile", "tx-default"])
def test_the_proxys_own_calls_are_valid_in_the_stations_version(version: OcppVersion, strategy: str) -> None:
    (set_action, set_payload), (clear_action, clear_payload) = own_commands(version, strategy)
    for action, payload in ((set_action, set_payload), (clear_action, clear_payload)):
        get_validator(2, action, version.value).validate(payload)
        validate_v2(version, action, payload)
    profile = set_payload["chargingProfile"]
    assert set_payload["evseId"] == 0 and profile["id"] == 990001
    assert (profile["chargingProfilePurpose"], profile["stackLevel"]) == \
        (("ChargingStationMaxProfile", 8) if strategy == "max-profile" else ("TxDefaultProfile", 0))
    assert profile["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"] == 13.4
    assert clear_payload == {"chargingProfileId": 990001}  # by id only


@pytest.mark.parametrize("version", V2)
def test_backend_frames_map_onto_the_model(version: OcppVersion) -> None:
    v2 = V2Profiles(version)
    request = backend_profile("ChargingStationMaxProfile", 12.0, 5, stack_level=2)
    get_validator(2, "SetChargingProfile", version.value).validate(request)
    connector, profile = parse_set(v2.set_request(request))
    assert (connector, profile.id, profile.purpose, profile.stack_level, profile.periods[0].limit) == \
        (0, 5, "ChargePointMaxProfile", 2, 12.0)
    tx = {"evseId": 1, "chargingProfile": {**request["chargingProfile"], "id": 6,
                                           "chargingProfilePurpose": "TxProfile", "transactionId": "abc-1"}}
    assert parse_set(v2.set_request(tx))[1].transaction_id == v2.transaction_number("abc-1") == 1
    assert parse_clear(v2.clear_request({"chargingProfileId": 6})).id == 6
    criteria = v2.clear_request({"chargingProfileCriteria": {"evseId": 0, "chargingProfilePurpose": "TxDefaultProfile",
                                                             "stackLevel": 1}})
    assert parse_clear(criteria) == parse_clear({"connectorId": 0, "chargingProfilePurpose": "TxDefaultProfile",
                                                 "stackLevel": 1})


def test_a_clamped_backend_profile_keeps_every_other_field() -> None:
    request = backend_profile("TxDefaultProfile", 30.0, 7)
    request["chargingProfile"]["chargingSchedule"].append({"id": 2, "chargingRateUnit": "W", "chargingSchedulePeriod": [
        {"startPeriod": 0, "limit": 22000.0, "numberPhases": 3}, {"startPeriod": 600, "limit": 1000.0}]})
    request["chargingProfile"]["chargingSchedule"][0]["salesTariff"] = {"id": 1, "salesTariffEntry": [
        {"relativeTimeInterval": {"start": 0}}]}
    get_validator(2, "SetChargingProfile", "2.0.1").validate(request)
    out = V2Profiles.clamped(request, 10.0, charger_phases=3, voltage=230.0)
    get_validator(2, "SetChargingProfile", "2.0.1").validate(out)
    first, second = out["chargingProfile"]["chargingSchedule"]
    assert first["chargingSchedulePeriod"][0]["limit"] == 10.0 and first["salesTariff"]["id"] == 1
    assert [p["limit"] for p in second["chargingSchedulePeriod"]] == [6900.0, 1000.0]  # 10 A × 3 × 230 V
    unchanged = json.loads(json.dumps(out))
    for schedule in unchanged["chargingProfile"]["chargingSchedule"]:
        for period in schedule["chargingSchedulePeriod"]:
            period.pop("limit")
    original = json.loads(json.dumps(request))
    for schedule in original["chargingProfile"]["chargingSchedule"]:
        for period in schedule["chargingSchedulePeriod"]:
            period.pop("limit")
    assert unchanged == original


def test_what_cannot_be_modelled_is_refused_not_guessed() -> None:
    v2 = V2Profiles(OcppVersion.V21)
    setpoint = backend_profile("TxProfile", 0.0, 8)
    del setpoint["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"]
    setpoint["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"][0]["setpoint"] = 5000.0
    with pytest.raises(ProfileError, match="without limit"):
        v2.set_request(setpoint)
    with pytest.raises(ProfileError, match="not load-managed"):
        v2.set_request(backend_profile("PriorityCharging", 10.0, 9))


def test_meter_values_with_units_and_multipliers() -> None:
    payload = {"meterValue": [{"timestamp": "2026-11-27T05:00:00Z", "sampledValue": [
        {"value": 16.5, "measurand": "Current.Import", "phase": "L1", "unitOfMeasure": {"unit": "A"}},
        {"value": 11, "measurand": "Power.Active.Import", "unitOfMeasure": {"unit": "kW"}},
        {"value": 123, "unitOfMeasure": {"unit": "Wh", "multiplier": 3}},
        {"value": True, "measurand": "Current.Import", "phase": "L2"}]}]}
    from proxy.loadmgmt.control import read_meter_values

    meter = read_meter_values(V2Profiles.meter_values(payload))
    assert meter.currents == (16.5, 0.0, 0.0) and meter.power_w == 11000.0 and meter.energy_wh == 123000.0


# --- invariant: the station's composite limit is min(backend, local), whatever the backend does ---------


class CompositeMachine(RuleBasedStateMachine):
    """A Control driving a 2.x station model through the translation, with a backend changing its profiles."""

    def __init__(self) -> None:
        super().__init__()
        self.version = OcppVersion.V201
        self.v2 = V2Profiles(self.version)
        self.control = Control("CS1", ControlSettings())
        self.control.wallbox_connected(0.0)
        self.control.boot_answered("Accepted")
        self.control.set_local(16.0)
        self.station: list[str] = []  # the Set/Clear CALLs the station accepted, in order
        self.backend: dict[int, dict[str, Any]] = {}
        self.now = 1.0
        self.settle()

    def settle(self) -> None:
        """Send the proxy's CALLs until the control has nothing more to say (each accepted)."""
        for _ in range(10):
            command = self.control.next_command(self.now, WALL)
            if command is None:
                return
            payload = self.v2.command(command.action, command.payload)
            get_validator(2, command.action, self.version.value).validate(payload)
            self.station.append(json.dumps([2, "p", command.action, payload]))
            self.control.answered(command, "Accepted", None, self.now)
        raise AssertionError("the control did not settle")

    @rule(purpose=st.sampled_from(["ChargingStationMaxProfile", "TxDefaultProfile"]),
          limit=st.integers(0, 40).map(float), pid=st.integers(1, 4), stack=st.integers(0, 7))
    def backend_sets(self, purpose: str, limit: float, pid: int, stack: int) -> None:
        request = backend_profile(purpose, limit, pid, stack_level=stack)
        self.station.append(json.dumps([2, "b", "SetChargingProfile", request]))
        self.control.backend_set_answered("b", self.v2.set_request(request), "Accepted", WALL)
        self.settle()

    @rule(pid=st.integers(1, 4))
    def backend_clears(self, pid: int) -> None:
        self.station.append(json.dumps([2, "c", "ClearChargingProfile", {"chargingProfileId": pid}]))
        self.control.backend_clear_answered(self.v2.clear_request({"chargingProfileId": pid}), "Accepted")
        self.settle()

    @rule(amps=st.integers(0, 32).map(float))
    def local_changes(self, amps: float) -> None:
        self.control.set_local(amps)
        self.settle()

    @invariant()
    def composite_is_min_of_backend_and_local(self) -> None:
        profiles = installed(self.station)
        backend = composite({pid: p for pid, p in profiles.items() if pid != 990001})
        local = self.control.local
        assert local is not None
        expected = local if backend is None else min(backend, local)
        assert composite(profiles) == expected
        assert profiles[990001]["stackLevel"] == 8 and profiles[990001]["evse"] == 0


TestCompositeMachine = CompositeMachine.TestCase
