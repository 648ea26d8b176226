"""The virtual charge point's OCPP behaviour, without sockets (sans-IO)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.modbus.chargepoint import Action, Log, Send, SetCurrent, VirtualChargePoint, VirtualSettings
from proxy.modbus.maps import WALLBOXES, WallboxReading
from proxy.loadmgmt.profiles import composite_schedule, parse_set
from proxy.loadmgmt.profiles import Installed

HEIDELBERG = WALLBOXES["heidelberg"]


class Harness:
    """Drives one VirtualChargePoint; keeps what it sent and the currents it set."""

    def __init__(self, **settings: Any) -> None:
        self.cp = VirtualChargePoint(VirtualSettings("V1", "Heidelberg", "Energy Control", **settings))
        self.now = 100.0
        self.wall = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
        self.sent: list[list[Any]] = []
        self.currents: list[float] = []
        self.logs: list[str] = []

    def run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.sent.append(json.loads(action.text))
            elif isinstance(action, SetCurrent):
                self.currents.append(action.amps)
            elif isinstance(action, Log):
                self.logs.append(action.event)

    def later(self, seconds: float) -> None:
        self.now += seconds
        self.wall += timedelta(seconds=seconds)
        self.run(self.cp.tick(self.now, self.wall))

    def outstanding(self) -> list[Any]:
        calls = [f for f in self.sent if f[0] == 2]
        assert calls, "no CALL sent"
        return calls[-1]

    def answer(self, payload: dict[str, Any]) -> None:
        self.run(self.cp.received(json.dumps([3, self.outstanding()[1], payload]), self.now, self.wall))

    def call(self, action: str, payload: dict[str, Any], msg_id: str = "b1") -> list[Any]:
        self.run(self.cp.received(json.dumps([2, msg_id, action, payload]), self.now, self.wall))
        return next(f for f in reversed(self.sent) if f[1] == msg_id and f[0] in (3, 4))

    def read(self, state: int, amps: float = 0.0, energy: float = 5000.0, limit: float | None = None) -> None:
        state_info = HEIDELBERG.states[0].values[state]
        reading = WallboxReading(state_info, (amps, amps, amps), 3 * 230 * amps, energy,
                                 self.cp.current or 0.0 if limit is None else limit)
        self.run(self.cp.read(reading, self.now, self.wall))

    def boot(self) -> None:
        self.run(self.cp.connected(self.now))
        self.read(3)
        assert self.outstanding()[2] == "BootNotification"
        self.answer({"status": "Accepted", "currentTime": "2026-11-25T12:00:00Z", "interval": 300})
        self.answer_all()

    def answer_all(self, results: dict[str, dict[str, Any]] | None = None) -> None:
        """Answer CALLs as a backend would until none is outstanding."""
        results = results or {}
        defaults: dict[str, dict[str, Any]] = {
            "StatusNotification": {}, "Heartbeat": {"currentTime": "2026-11-25T12:00:00Z"}, "MeterValues": {},
            "Authorize": {"idTagInfo": {"status": "Accepted"}},
            "StartTransaction": {"transactionId": 42, "idTagInfo": {"status": "Accepted"}},
            "StopTransaction": {}}
        for _ in range(20):
            if self.cp._outstanding is None:
                return
            action = self.outstanding()[2]
            self.answer(results.get(action, defaults[action]))

    def actions_sent(self) -> list[str]:
        return [f[2] for f in self.sent if f[0] == 2]

    def charging(self, **results: dict[str, Any]) -> None:
        self.boot()
        self.read(6)  # car plugged in, asks for current
        self.answer_all(results)


def profile(purpose: str, limit: float, *, stack: int = 1, periods: list[tuple[int, float]] | None = None,
            start: str = "2026-11-25T12:00:00Z", pid: int = 5) -> dict[str, Any]:
    return {"chargingProfileId": pid, "stackLevel": stack, "chargingProfilePurpose": purpose,
            "chargingProfileKind": "Absolute",
            "chargingSchedule": {"startSchedule": start, "chargingRateUnit": "A",
                                 "chargingSchedulePeriod": [{"startPeriod": s, "limit": lim}
                                                            for s, lim in (periods or [(0, limit)])]}}


def test_nothing_but_boot_until_it_is_accepted_then_retry_after_the_interval() -> None:
    h = Harness()
    h.run(h.cp.connected(h.now))
    h.read(3)
    h.answer({"status": "Pending", "currentTime": "2026-11-25T12:00:00Z", "interval": 30})
    assert h.actions_sent() == ["BootNotification"]
    h.later(29)
    assert h.actions_sent() == ["BootNotification"]  # no status, no heartbeat while pending
    h.later(2)
    assert h.actions_sent() == ["BootNotification", "BootNotification"]
    h.answer({"status": "Accepted", "currentTime": "2026-11-25T12:00:00Z", "interval": 60})
    h.answer_all()
    statuses = [(f[3]["connectorId"], f[3]["status"]) for f in h.sent if f[0] == 2 and f[2] == "StatusNotification"]
    assert statuses == [(0, "Available"), (1, "Available")]
    h.later(61)
    assert h.actions_sent()[-1] == "Heartbeat"  # at the interval the backend gave


def test_connector_status_waits_for_the_first_reading() -> None:
    """Booted before Modbus answered: the connector's state is unknown, so nothing is claimed about it."""
    h = Harness()
    h.run(h.cp.connected(h.now))
    h.answer({"status": "Accepted", "currentTime": "2026-11-25T12:00:00Z", "interval": 60})
    h.answer_all()
    h.later(1)
    h.answer_all()
    statuses = [(f[3]["connectorId"], f[3]["status"]) for f in h.sent if f[0] == 2 and f[2] == "StatusNotification"]
    assert statuses == [(0, "Available")]
    h.read(3)
    h.answer_all()
    statuses = [(f[3]["connectorId"], f[3]["status"]) for f in h.sent if f[0] == 2 and f[2] == "StatusNotification"]
    assert statuses == [(0, "Available"), (1, "Available")]


def test_a_wallbox_that_never_answers_is_reported_faulted() -> None:
    h = Harness(fault_after=5)
    h.run(h.cp.connected(h.now))
    h.answer({"status": "Accepted", "currentTime": "2026-11-25T12:00:00Z", "interval": 60})
    for _ in range(6):
        h.run(h.cp.read_failed("no answer", h.now, h.wall))
        h.answer_all()
        h.later(1)
    statuses = [(f[3]["connectorId"], f[3]["status"]) for f in h.sent if f[0] == 2 and f[2] == "StatusNotification"]
    assert statuses == [(0, "Available"), (1, "Faulted")]


def test_fixed_tag_plug_authorize_start_and_current() -> None:
    h = Harness(fixed_id_tag="TAG1", max_current=16)
    h.charging()
    assert h.actions_sent() == ["BootNotification", "StatusNotification", "StatusNotification",
                                "StatusNotification", "Authorize", "StartTransaction", "StatusNotification"]
    start = next(f[3] for f in h.sent if f[0] == 2 and f[2] == "StartTransaction")
    assert start == {"connectorId": 1, "idTag": "TAG1", "meterStart": 5000, "timestamp": "2026-11-25T12:00:00Z"}
    assert h.currents == [0.0, 16.0]
    assert h.cp.record() == {"transaction": {"id_tag": "TAG1", "meter_start": 5000, "started": "2026-11-25T12:00:00Z",
                                             "transaction_id": 42, "stop": None}}


def test_rejected_tag_starts_nothing_and_unplug_makes_it_available() -> None:
    h = Harness(fixed_id_tag="TAG1")
    h.charging(Authorize={"idTagInfo": {"status": "Blocked"}})
    assert "StartTransaction" not in h.actions_sent() and h.cp.current == 0.0
    assert h.cp.connector_status() == "Preparing"
    h.read(3)
    h.answer_all()
    assert h.cp.connector_status() == "Available"


def test_start_answered_invalid_stops_deauthorized() -> None:
    h = Harness(fixed_id_tag="TAG1")
    h.charging(StartTransaction={"transactionId": 7, "idTagInfo": {"status": "Invalid"}})
    stop = next(f[3] for f in h.sent if f[0] == 2 and f[2] == "StopTransaction")
    assert stop["reason"] == "DeAuthorized" and stop["transactionId"] == 7
    assert h.cp.current == 0.0 and h.cp.record() is None


def test_profiles_set_clear_and_pause_below_minimum() -> None:
    h = Harness(fixed_id_tag="TAG1")
    h.charging()
    assert h.call("SetChargingProfile", {"connectorId": 1, "csChargingProfiles": profile("TxProfile", 10)})[2] == {
        "status": "Accepted"}
    assert h.cp.current == 10.0
    cap = profile("ChargePointMaxProfile", 4, stack=3, pid=6)
    assert h.call("SetChargingProfile", {"connectorId": 1, "csChargingProfiles": cap}, "b2")[2]["status"] == "Rejected"
    assert h.call("SetChargingProfile", {"connectorId": 0, "csChargingProfiles": cap}, "b3")[2]["status"] == "Accepted"
    assert h.cp.current == 0.0  # 4 A is below the 6 A a car needs: paused, not starved
    assert h.call("ClearChargingProfile", {"id": 6}, "b4")[2] == {"status": "Accepted"}
    assert h.cp.current == 10.0
    assert h.call("ClearChargingProfile", {"id": 99}, "b5")[2] == {"status": "Unknown"}


def test_tx_profile_without_a_transaction_is_rejected() -> None:
    h = Harness()
    h.boot()
    answer = h.call("SetChargingProfile", {"connectorId": 1, "csChargingProfiles": profile("TxProfile", 10)})
    assert answer[2] == {"status": "Rejected"}


def test_composite_schedule_follows_the_profile_periods() -> None:
    h = Harness(fixed_id_tag="TAG1")
    h.charging()
    steps = profile("TxDefaultProfile", 0, periods=[(0, 16), (600, 8), (1200, 16)])
    h.call("SetChargingProfile", {"connectorId": 0, "csChargingProfiles": steps})
    answer = h.call("GetCompositeSchedule", {"connectorId": 1, "duration": 900}, "b2")[2]
    assert answer["status"] == "Accepted"
    assert answer["chargingSchedule"]["chargingSchedulePeriod"] == [{"startPeriod": 0, "limit": 16.0},
                                                                    {"startPeriod": 600, "limit": 8.0}]
    watts = h.call("GetCompositeSchedule", {"connectorId": 1, "duration": 300, "chargingRateUnit": "W"}, "b3")[2]
    assert watts["chargingSchedule"]["chargingSchedulePeriod"] == [{"startPeriod": 0, "limit": 11040.0}]


def test_composite_schedule_of_a_daily_profile_crosses_midnight() -> None:
    raw = profile("ChargePointMaxProfile", 0, periods=[(0, 10), (3600, 20)], start="2026-11-24T23:30:00Z")
    raw["chargingProfileKind"], raw["recurrencyKind"] = "Recurring", "Daily"
    _, parsed = parse_set({"connectorId": 0, "csChargingProfiles": raw})
    start = datetime(2026, 11, 25, 23, 0, tzinfo=UTC)
    steps = composite_schedule([Installed(0, parsed, start)], start, 7200)
    assert steps == [(0, 20.0), (1800, 10.0), (5400, 20.0)]


def test_trigger_messages_and_unknown_actions() -> None:
    h = Harness(fixed_id_tag="TAG1")
    h.charging()
    assert h.call("TriggerMessage", {"requestedMessage": "MeterValues"})[2] == {"status": "Accepted"}
    meter = h.outstanding()
    assert meter[2] == "MeterValues" and meter[3]["transactionId"] == 42
    assert {v["context"] for v in meter[3]["meterValue"][0]["sampledValue"]} == {"Trigger"}
    h.answer_all()
    trigger = h.call("TriggerMessage", {"requestedMessage": "DiagnosticsStatusNotification"}, "b2")
    assert trigger[2] == {"status": "NotImplemented"}
    assert h.call("SendLocalList", {"listVersion": 1, "updateType": "Full"}, "b3")[2] == "NotSupported"
    assert h.call("MakeCoffee", {}, "b4")[2] == "NotImplemented"
    assert h.call("RemoteStartTransaction", {"connectorId": 1}, "b5")[2] == "ProtocolError"  # no idTag
    assert h.call("DataTransfer", {"vendorId": "x"}, "b6")[2] == {"status": "UnknownVendorId"}


def test_triggered_status_of_connector_0_is_the_charge_point_not_the_connector() -> None:
    h = Harness(fixed_id_tag="TAG1")
    h.charging()
    for n, connector in enumerate((0, 1)):
        assert h.call("TriggerMessage", {"requestedMessage": "StatusNotification", "connectorId": connector},
                      f"t{n}")[2] == {"status": "Accepted"}
        h.answer_all()
    triggered = [(f[3]["connectorId"], f[3]["status"]) for f in h.sent if f[2:3] == ["StatusNotification"]][-2:]
    assert triggered == [(0, "Available"), (1, "SuspendedEVSE")]  # a connector's state is none of connector 0's
    trigger = h.call("TriggerMessage", {"requestedMessage": "StatusNotification", "connectorId": 2}, "t2")
    assert trigger[2] == {"status": "Rejected"}  # there is no connector 2


def test_transaction_messages_are_retried_and_heartbeats_are_not() -> None:
    h = Harness(fixed_id_tag="TAG1", call_timeout=10)
    h.charging()
    h.read(3)  # unplugged: StopTransaction
    assert h.outstanding()[2] == "StopTransaction"
    first_id = h.outstanding()[1]
    h.later(11)
    assert h.outstanding()[2] == "StopTransaction" and h.outstanding()[1] != first_id  # sent again
    h.answer_all()
    assert h.cp.record() is None
    h.later(400)
    assert h.outstanding()[2] == "Heartbeat"
    h.later(11)  # unanswered heartbeat: dropped, not retried
    assert h.actions_sent().count("Heartbeat") == 1


def test_restored_transaction_goes_on_when_plugged_and_stops_when_not() -> None:
    record = {"id_tag": "TAG1", "meter_start": 5000, "started": "2026-11-25T11:00:00Z", "transaction_id": 42,
              "stop": None}
    plugged = Harness(fixed_id_tag="TAG1")
    plugged.run(plugged.cp.restore({"transaction": dict(record)}))
    plugged.run(plugged.cp.connected(plugged.now))
    plugged.read(6, limit=0)  # the car is still there; the wallbox stopped while the proxy was away
    plugged.answer({"status": "Accepted", "currentTime": "2026-11-25T12:00:00Z", "interval": 300})
    plugged.answer_all()
    assert "StartTransaction" not in plugged.actions_sent() and plugged.cp.current == 16.0

    gone = Harness(fixed_id_tag="TAG1")
    gone.run(gone.cp.restore(dict(record)))  # a record from before it held more than the transaction
    gone.boot()  # the first reading (state A2) says the car is gone
    stop = next(f[3] for f in gone.sent if f[0] == 2 and f[2] == "StopTransaction")
    assert stop["reason"] == "PowerLoss" and stop["transactionId"] == 42 and stop["meterStop"] == 5000
    assert gone.cp.record() is None


def test_availability_keys_and_profiles_survive_a_restart_as_on_a_wallbox() -> None:
    """OCPP 1.6 section 5.2: an Unavailable connector stays so across a reboot; keys and profiles are kept too."""
    h = Harness(fixed_id_tag="TAG1")
    h.boot()
    assert h.cp.record() is None  # nothing to keep yet: no file
    assert h.call("ChangeAvailability", {"connectorId": 0, "type": "Inoperative"})[2] == {"status": "Accepted"}
    assert h.call("ChangeConfiguration", {"key": "MeterValueSampleInterval", "value": "30"}, "b2")[2] == {
        "status": "Accepted"}
    daily = profile("TxDefaultProfile", 8, pid=9)
    assert h.call("SetChargingProfile", {"connectorId": 1, "csChargingProfiles": daily}, "b3")[2] == {
        "status": "Accepted"}
    record = h.cp.record()
    assert record is not None and record["availability"] == "Inoperative"
    assert record["configuration"] == {"MeterValueSampleInterval": "30"}
    assert [p["profile"] for p in record["profiles"]] == [daily]

    again = Harness(fixed_id_tag="TAG1")  # the proxy restarted
    again.run(again.cp.restore(json.loads(json.dumps(record))))
    again.boot()
    again.read(6)  # a car plugs in: an Unavailable connector starts nothing
    again.answer_all()
    statuses = [(f[3]["connectorId"], f[3]["status"]) for f in again.sent if f[2:3] == ["StatusNotification"]]
    assert statuses == [(0, "Unavailable"), (1, "Unavailable")]
    assert "Authorize" not in again.actions_sent()
    assert again.call("GetConfiguration", {"key": ["MeterValueSampleInterval"]})[2]["configurationKey"][0][
        "value"] == "30"
    assert again.cp.record() == record
    assert again.call("ChangeAvailability", {"connectorId": 0, "type": "Operative"}, "b2")[2] == {"status": "Accepted"}
    again.answer_all()
    assert "StartTransaction" in again.actions_sent() and again.cp.current == 8.0  # the kept TxDefaultProfile


def test_a_kept_key_or_profile_that_no_longer_passes_is_dropped_and_logged() -> None:
    h = Harness()
    h.run(h.cp.restore({"configuration": {"NumberOfConnectors": "2", "HeartbeatInterval": "60"},
                        "profiles": [{"connector": 1, "installed_at": "2026-11-25T11:00:00Z",
                                      "profile": profile("TxDefaultProfile", 8, stack=100)}]}))
    assert h.logs.count("virtual_record_key_dropped") == 1 and "virtual_record_profile_dropped" in h.logs
    assert h.cp.record() == {"configuration": {"HeartbeatInterval": "60"}}


def test_modbus_outage_reports_faulted_and_recovers() -> None:
    h = Harness(fixed_id_tag="TAG1", fault_after=5)
    h.charging()
    h.read(7, amps=16)  # the wallbox follows the new current
    h.run(h.cp.read_failed("timeout", h.now, h.wall))
    h.later(4)
    h.run(h.cp.read_failed("timeout", h.now, h.wall))
    assert h.cp.connector_status() == "Charging"
    h.later(2)
    h.run(h.cp.read_failed("timeout", h.now, h.wall))
    h.answer_all()
    faulted = [f[3] for f in h.sent if f[0] == 2 and f[2] == "StatusNotification"][-1]
    assert faulted["status"] == "Faulted" and faulted["errorCode"] == "OtherError"
    h.read(7, amps=16)
    assert h.cp.connector_status() == "Charging" and h.cp.record() is not None


def test_status_follows_the_vehicle_state_register() -> None:
    h = Harness(fixed_id_tag="TAG1")
    h.charging()
    seen = []
    for state, amps in ((6, 0), (7, 16), (5, 0), (4, 0), (7, 16), (10, 0), (7, 16)):
        h.read(state, amps=amps)
        seen.append(h.cp.connector_status())
    # C1 wallbox not yet allowing, C2 charging, B2 car paused itself, B1, C2 again, F fault, recovered
    assert seen == ["SuspendedEVSE", "Charging", "SuspendedEV", "SuspendedEV", "Charging", "Faulted", "Charging"]
    h.answer_all()
    sent = [f[3]["status"] for f in h.sent if f[0] == 2 and f[2] == "StatusNotification" and f[3]["connectorId"] == 1]
    assert sent[-4:] == ["SuspendedEV", "Charging", "Faulted", "Charging"]
    faulted = next(f[3] for f in h.sent if f[0] == 2 and f[2] == "StatusNotification" and f[3]["status"] == "Faulted")
    assert faulted["vendorErrorCode"] == "F" and faulted["errorCode"] == "OtherError"
    h.call("ChangeAvailability", {"connectorId": 0, "type": "Inoperative"})
    assert h.cp.connector_status() == "Charging"  # Scheduled: the transaction goes on
