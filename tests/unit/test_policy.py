"""Command policy: defaults per role, the proxy's answers, rejections, conflicts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from ocpp.messages import get_validator
from ocpp.v16.enums import Action

from proxy.messages.ocppj import classify
from proxy.messages.versions import OcppVersion
from proxy.core.policy import (
    ANSWER,
    COMMANDS,
    EXCLUSIVE,
    FORWARD,
    BUILT_ANSWERS_V2,
    LOCAL_ANSWERS,
    LOCAL_ANSWERS_V2,
    READ_ONLY,
    REJECT,
    CommandPolicy,
    conflicts,
)


#: OCPP 1.6 (+ security extension) messages a wallbox sends: every other action is a command.
FROM_WALLBOX = {"Authorize", "BootNotification", "DataTransfer", "DiagnosticsStatusNotification",
                "FirmwareStatusNotification", "Heartbeat", "LogStatusNotification", "MeterValues",
                "SecurityEventNotification", "SignCertificate", "SignedFirmwareStatusNotification",
                "StartTransaction", "StatusNotification", "StopTransaction"}


#: OCPP 2.0.1 messages a station sends (CSMS → station commands are the rest, DataTransfer both ways).
FROM_STATION_201 = {"Authorize", "BootNotification", "ClearedChargingLimit", "DataTransfer",
                    "FirmwareStatusNotification", "Get15118EVCertificate", "GetCertificateStatus", "Heartbeat",
                    "LogStatusNotification", "MeterValues", "NotifyChargingLimit", "NotifyCustomerInformation",
                    "NotifyDisplayMessages", "NotifyEVChargingNeeds", "NotifyEVChargingSchedule", "NotifyEvent",
                    "NotifyMonitoringReport", "NotifyReport", "PublishFirmwareStatusNotification",
                    "ReportChargingProfiles", "ReservationStatusUpdate", "SecurityEventNotification",
                    "SignCertificate", "StatusNotification", "TransactionEvent"}


def test_commands_are_every_1_6_and_2_0_1_backend_to_wallbox_action() -> None:
    from ocpp.v201.enums import Action as Action201

    v16 = {a.value for a in Action} - FROM_WALLBOX | {"DataTransfer"}
    v201 = {a.value for a in Action201} - FROM_STATION_201 | {"DataTransfer"}
    assert COMMANDS == v16 | v201
    assert set(LOCAL_ANSWERS_V2) | set(BUILT_ANSWERS_V2) == v201


@pytest.mark.parametrize("version", ["2.0.1", "2.1"])
@pytest.mark.parametrize("action", sorted(LOCAL_ANSWERS_V2))
def test_local_answers_are_valid_ocpp_2(action: str, version: str) -> None:
    get_validator(3, action, version).validate(LOCAL_ANSWERS_V2[action])


#: A schema-valid request for each 2.x command whose answer is built from it.
V2_REQUESTS: dict[str, dict[str, Any]] = {
    "GetVariables": {"getVariableData": [{"component": {"name": "EVSE", "evse": {"id": 1}},
                                          "variable": {"name": "Power"}}]},
    "SetVariables": {"setVariableData": [{"attributeValue": "32", "component": {"name": "SmartChargingCtrlr"},
                                          "variable": {"name": "LimitChangeSignificance"}}]},
    "SetVariableMonitoring": {"setMonitoringData": [{"value": 1.0, "type": "Delta", "severity": 5,
                                                     "component": {"name": "C"}, "variable": {"name": "V"}}]},
    "ClearVariableMonitoring": {"id": [3, 4]},
}


@pytest.mark.parametrize("version", [OcppVersion.V201, OcppVersion.V21])
@pytest.mark.parametrize("action", sorted(BUILT_ANSWERS_V2))
def test_built_2x_answers_are_valid_and_list_what_was_asked(action: str, version: OcppVersion) -> None:
    request = V2_REQUESTS[action]
    get_validator(2, action, version.value).validate(request)
    policy = CommandPolicy("primary", {"ems": {action: "answer"}})
    decision = policy.decide("ems", classify(json.dumps([2, "e1", action, request])), version)
    message: list[Any] = json.loads(decision.reply or "")
    assert message[:2] == [3, "e1"]
    get_validator(3, action, version.value).validate(message[2])
    assert len(next(iter(message[2].values()))) == len(next(iter(request.values())))


def test_answers_follow_the_session_version() -> None:
    policy = CommandPolicy("primary", {"ems": {"*": "answer"}})
    frame = classify('[2,"e2","GetLocalListVersion",{}]')
    assert json.loads(policy.decide("ems", frame).reply or "")[2] == {"listVersion": -1}
    assert json.loads(policy.decide("ems", frame, OcppVersion.V201).reply or "")[2] == {"versionNumber": 0}
    for text, version in (('[2,"e3","SetDERControl",{}]', OcppVersion.V21),  # 2.1-only: no answer known
                          ('[2,"e4","GetVariables",{"getVariableData":[]}]', OcppVersion.V201),
                          ('[2,"e5","Reset",{"type":"Immediate"}]', None)):  # relay-only session
        reply = json.loads(policy.decide("ems", classify(text), version).reply or "")
        assert reply[0] == 4 and reply[2] == "NotSupported"


@pytest.mark.parametrize("action", sorted(LOCAL_ANSWERS))
def test_local_answers_are_valid_ocpp_1_6(action: str) -> None:
    get_validator(3, action, "1.6").validate(LOCAL_ANSWERS[action])


def test_defaults_primary_forwards_secondaries_only_read_only() -> None:
    policy = CommandPolicy("primary")
    for action in COMMANDS:
        assert policy.mode("primary", action) == FORWARD
        assert policy.mode("ems", action) == (FORWARD if action in READ_ONLY else REJECT)
    assert {"GetConfiguration", "GetCompositeSchedule", "TriggerMessage"} <= READ_ONLY
    assert policy.mode("ems", "VendorThing") == REJECT and policy.mode("primary", "VendorThing") == FORWARD


def test_tables_override_defaults_with_star_fallback() -> None:
    policy = CommandPolicy("primary", {"ems": {"Reset": "forward", "*": "answer"},
                                       "primary": {"Reset": "reject"}})
    assert policy.mode("ems", "Reset") == FORWARD
    assert policy.mode("ems", "GetConfiguration") == ANSWER  # "*" beats the default
    assert policy.mode("primary", "Reset") == REJECT
    assert policy.mode("primary", "SetChargingProfile") == FORWARD


def test_decide_builds_answers_and_errors_with_the_callers_id() -> None:
    policy = CommandPolicy("primary", {"ems": {"RemoteStartTransaction": "answer", "UnlockConnector": "answer"}})
    start = policy.decide("ems", classify('[2,"e-1","RemoteStartTransaction",{"idTag":"X"}]'))
    assert start.mode == ANSWER and json.loads(start.reply or "") == [3, "e-1", {"status": "Accepted"}]
    unlock = policy.decide("ems", classify('[2,"e-2","UnlockConnector",{"connectorId":1}]'))
    assert json.loads(unlock.reply or "") == [3, "e-2", {"status": "Unlocked"}]
    reset = policy.decide("ems", classify('[2,"e-3","Reset",{"type":"Hard"}]'))
    error = json.loads(reset.reply or "")
    assert reset.mode == REJECT and error[:3] == [4, "e-3", "SecurityError"] and "'ems'" in error[3]
    vendor = json.loads(policy.decide("ems", classify('[2,"e-4","Frobnicate",{}]')).reply or "")
    assert vendor[2] == "NotSupported"
    forward = policy.decide("ems", classify('[2,"e-5","GetConfiguration",{}]'))
    assert forward.mode == FORWARD and forward.reply is None


def test_conflicts_name_both_upstreams_per_state() -> None:
    assert list(conflicts([("primary", {}, True), ("ems", {}, False), ("ha", {}, False)])) == []
    found = list(conflicts([("primary", {}, True), ("ems", {"SetChargingProfile": "forward"}, False),
                            ("ha", {"*": "forward"}, False)]))
    pairs = {(c.state, c.first, c.second) for c in found}
    assert ("charging profiles", "primary", "ems") in pairs
    assert {(state, "primary", "ha") for state in EXCLUSIVE} <= pairs
    ems = next(c for c in found if c.second == "ems")
    assert ems.actions == ("SetChargingProfile",)
    # Handing a kind of state over to a secondary is fine once the primary no longer sends it.
    assert list(conflicts([("primary", {"SetChargingProfile": "reject", "ClearChargingProfile": "answer"}, True),
                           ("ems", {"SetChargingProfile": "forward", "ClearChargingProfile": "forward"},
                            False)])) == []
