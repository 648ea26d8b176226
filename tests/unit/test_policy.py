"""Command policy: defaults per role, the proxy's answers, rejections, conflicts."""

from __future__ import annotations

import json

import pytest
from ocpp.messages import get_validator
from ocpp.v16.enums import Action

from proxy.messages.ocppj import classify
from proxy.core.policy import (
    ANSWER,
    COMMANDS,
    EXCLUSIVE,
    FORWARD,
    LOCAL_ANSWERS,
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


def test_commands_are_every_1_6_backend_to_wallbox_action() -> None:
    assert COMMANDS == {a.value for a in Action} - FROM_WALLBOX | {"DataTransfer"}


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
