"""Local answers per OCPP version, checked against the ``ocpp`` library's JSON schemas (issue 18).

Every payload the proxy answers locally is validated with the library's sync
validator (``ocpp.messages.get_validator``) for the session's own version; the
requests fed in are validated too, so the inputs are ones a real station sends.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from ocpp.messages import get_validator

from proxy.config import ConfigError, LineIndex, loads, subprotocol_warnings
from proxy.core.offline import OfflineResponder, OfflineSettings, Stored, replay_plan
from proxy.core.offline_v2 import LOCAL_ANSWERS as V2_ANSWERS
from proxy.core.offline_v2 import LOCAL_ANSWERS_V21 as V21_ANSWERS
from proxy.core.session import PRIMARY, Persist, Replayed, Session, ToUpstream, ToWallbox
from proxy.messages.ocppj import MessageType, build_call, build_result, classify
from proxy.messages.versions import DEFAULT_SUBPROTOCOLS, OcppVersion, version_of

T = "2026-11-27T05:00:00Z"
SIGNED = {"signedMeterData": "OCMF|{}|{}", "signingMethod": "ECDSA-secp256r1-SHA256", "encodingMethod": "OCMF",
          "publicKey": "3059"}

#: A schema-valid request per station action (the same text is valid in 2.0.1 and 2.1).
V2_REQUESTS: dict[str, dict[str, Any]] = {
    "BootNotification": {"chargingStation": {"model": "M", "vendorName": "V"}, "reason": "PowerUp"},
    "Heartbeat": {},
    "StatusNotification": {"timestamp": T, "connectorStatus": "Available", "evseId": 1, "connectorId": 1},
    "Authorize": {"idToken": {"idToken": "LISTED", "type": "ISO14443"}},
    "TransactionEvent": {"eventType": "Started", "timestamp": T, "triggerReason": "Authorized", "seqNo": 0,
                         "transactionInfo": {"transactionId": "tx-1"}, "offline": False,
                         "idToken": {"idToken": "LISTED", "type": "ISO14443"},
                         "meterValue": [{"timestamp": T, "sampledValue": [{"value": 1.5,
                                                                           "signedMeterValue": SIGNED}]}]},
    "MeterValues": {"evseId": 1, "meterValue": [{"timestamp": T, "sampledValue": [{"value": 1.0}]}]},
    "NotifyEvent": {"generatedAt": T, "seqNo": 0, "eventData": [{
        "eventId": 1, "timestamp": T, "trigger": "Delta", "actualValue": "x",
        "eventNotificationType": "HardWiredNotification", "component": {"name": "C"}, "variable": {"name": "V"}}]},
    "NotifyReport": {"requestId": 1, "generatedAt": T, "seqNo": 0},
    "SecurityEventNotification": {"type": "StartupOfTheDevice", "timestamp": T},
    "FirmwareStatusNotification": {"status": "Installed"},
    "LogStatusNotification": {"status": "Uploaded"},
    "DataTransfer": {"vendorId": "com.example"},
}

V16_REQUESTS: dict[str, dict[str, Any]] = {
    "BootNotification": {"chargePointModel": "M", "chargePointVendor": "V"},
    "Heartbeat": {},
    "StatusNotification": {"connectorId": 1, "errorCode": "NoError", "status": "Available"},
    "Authorize": {"idTag": "LISTED"},
    "StartTransaction": {"connectorId": 1, "idTag": "LISTED", "meterStart": 0, "timestamp": T},
    "StopTransaction": {"meterStop": 5, "timestamp": T, "transactionId": 1},
    "MeterValues": {"connectorId": 1, "meterValue": [{"timestamp": T, "sampledValue": [{"value": "1"}]}]},
    "DataTransfer": {"vendorId": "com.example"},
    "FirmwareStatusNotification": {"status": "Idle"},
    "DiagnosticsStatusNotification": {"status": "Idle"},
}

REQUESTS = {OcppVersion.V16: V16_REQUESTS, OcppVersion.V201: V2_REQUESTS, OcppVersion.V21: V2_REQUESTS}


def validate(version: OcppVersion, kind: MessageType, action: str, payload: Any) -> None:
    """Raises jsonschema.ValidationError when ``payload`` breaks the version's schema."""
    get_validator(int(kind), action, version.value).validate(payload)


def responder(version: OcppVersion, auth: str = "local_list") -> OfflineResponder:
    return OfflineResponder(OfflineSettings(auth=auth, local_list=frozenset({"LISTED"})), version=version)


def answer_payload(text: str) -> Any:
    return json.loads(text)[2]


@pytest.mark.parametrize("version", list(OcppVersion))
def test_every_local_answer_is_valid_in_its_own_version(version: OcppVersion) -> None:
    checked = []
    for action, request in REQUESTS[version].items():
        validate(version, MessageType.CALL, action, request)
        local = responder(version).answer(classify(build_call("m1", action, request)))
        assert local.store, action
        validate(version, MessageType.CALLRESULT, action, answer_payload(local.text))
        checked.append(action)
    table = {OcppVersion.V201: V2_ANSWERS, OcppVersion.V21: V21_ANSWERS}.get(version, {})
    for action in sorted(set(table) - set(checked)):  # answered {} whatever the request says
        local = responder(version).answer(classify(build_call("m2", action, {})))
        assert local.store and answer_payload(local.text) == {}, action
        validate(version, MessageType.CALLRESULT, action, {})
        checked.append(action)
    if version.is_v2:
        assert sorted(checked) == sorted(table)  # every action in the table was checked
        with pytest.raises(jsonschema.ValidationError):  # the check can fail: a 1.6 answer is not valid here
            validate(version, MessageType.CALLRESULT, "Authorize", {"idTagInfo": {"status": "Accepted"}})


def test_2_1_notifications_are_not_answered_in_2_0_1_sessions() -> None:
    local = responder(OcppVersion.V201).answer(classify(build_call("m3", "NotifySettlement", {})))
    assert not local.store and json.loads(local.text)[2] == "GenericError"


@pytest.mark.parametrize("version", [OcppVersion.V201, OcppVersion.V21])
@pytest.mark.parametrize(("auth", "listed", "other"), [("local_list", "Accepted", "Invalid"),
                                                       ("accept_all", "Accepted", "Accepted"),
                                                       ("reject_all", "Invalid", "Invalid")])
def test_id_token_info_follows_offline_auth(version: OcppVersion, auth: str, listed: str, other: str) -> None:
    r = responder(version, auth)
    for token, expected in (("LISTED", listed), ("OTHER", other)):
        for action in ("Authorize", "TransactionEvent"):
            request = {**V2_REQUESTS[action], "idToken": {"idToken": token, "type": "ISO14443"}}
            payload = answer_payload(r.answer(classify(build_call("m", action, request))).text)
            assert payload == {"idTokenInfo": {"status": expected}}
            validate(version, MessageType.CALLRESULT, action, payload)


def test_transaction_event_without_id_token_gets_an_empty_answer() -> None:
    request = {k: v for k, v in V2_REQUESTS["TransactionEvent"].items() if k != "idToken"}
    answer = responder(OcppVersion.V201).answer(classify(build_call("m", "TransactionEvent", request)))
    assert answer_payload(answer.text) == {} and answer.store and answer.local_transaction_id is None


@pytest.mark.parametrize("version", [OcppVersion.V201, OcppVersion.V21])
def test_unanswerable_and_malformed_calls_get_version_error_codes(version: OcppVersion) -> None:
    r = responder(version)
    for text, code in ((build_call("a", "NotifyEVChargingNeeds", {}), "GenericError"),
                       ('[2,"b","Heartbeat",[1]]', "FormatViolation")):
        local = r.answer(classify(text))
        assert not local.store and json.loads(local.text)[2] == code
    assert json.loads(responder(OcppVersion.V16).answer(classify('[2,"c","Heartbeat",[1]]')).text)[2] \
        == "FormationViolation"


def test_2x_tokens_accepted_online_and_local_lists_count_offline() -> None:
    """The cache learns from Authorize/TransactionEvent answers and an accepted SendLocalList."""
    session = Session("CS1", offline=responder(OcppVersion.V201), version=OcppVersion.V201)
    token = {"idToken": "CARD-9", "type": "ISO14443"}
    session.from_wallbox(build_call("a1", "Authorize", {"idToken": token}), 0.0)
    session.from_upstream(PRIMARY, build_result("a1", {"idTokenInfo": {"status": "Accepted"}}), 0.1)
    local_list = {"versionNumber": 2, "updateType": "Differential", "localAuthorizationList": [
        {"idToken": {"idToken": "CARD-7", "type": "ISO14443"}, "idTokenInfo": {"status": "Accepted"}},
        {"idToken": {"idToken": "CARD-8", "type": "ISO14443"}, "idTokenInfo": {"status": "Blocked"}}]}
    validate(OcppVersion.V201, MessageType.CALL, "SendLocalList", local_list)
    session.from_upstream(PRIMARY, build_call("s1", "SendLocalList", local_list), 0.2)
    session.from_wallbox(build_result("s1", {"status": "Accepted"}), 0.3)
    assert session.offline is not None and session.offline.accepted_cache == {"CARD-9", "CARD-7"}
    session.upstream_down(PRIMARY, 1.0)
    for name, expected in (("CARD-7", "Accepted"), ("CARD-8", "Invalid"), ("CARD-9", "Accepted")):
        actions = session.from_wallbox(build_call(f"x{name}", "Authorize",
                                                  {"idToken": {"idToken": name, "type": "ISO14443"}}), 1.1)
        persisted = [a for a in actions if isinstance(a, Persist)]
        assert answer_payload(persisted[0].answer) == {"idTokenInfo": {"status": expected}}


def test_subprotocol_names_select_the_version() -> None:
    assert [version_of(p) for p in DEFAULT_SUBPROTOCOLS] == [OcppVersion.V16, OcppVersion.V201, OcppVersion.V21]
    assert version_of("ocpp2.0") is None and version_of(None) is None and version_of("OCPP2.0.1") is None


def test_default_config_offers_all_three_and_unknown_names_are_refused() -> None:
    base = '[backend]\nurl = "ws://127.0.0.1:9/ocpp"\n'
    assert loads(base).server.subprotocols == ["ocpp1.6", "ocpp2.0.1", "ocpp2.1"]
    assert loads('[server]\nsubprotocols = ["ocpp2.0"]\n' + base).server.subprotocols == ["ocpp2.0"]
    with pytest.raises(ConfigError) as error:
        loads('[server]\nsubprotocols = ["ocpp1.6", "ocpp201"]\n' + base)
    message = str(error.value)
    assert "server.subprotocols[1]" in message and "'ocpp201'" in message
    assert "ocpp1.6, ocpp2.0.1, ocpp2.1 ([site] load management and offline mode" in message
    assert "ocpp2.0 (relayed only" in message
    with pytest.raises(ConfigError, match="is empty"):
        loads('[server]\nsubprotocols = []\n' + base)


def test_relay_only_names_are_warned_about_where_site_or_offline_mode_is_on() -> None:
    text = '[server]\nsubprotocols = ["ocpp1.6", "ocpp2.0"]\n[backend]\nurl = "ws://127.0.0.1:9/ocpp"\n'
    (warning,) = subprotocol_warnings(loads(text), LineIndex(text), load_managed=True)
    assert warning.key == "server.subprotocols" and warning.line == 2
    assert "ocpp2.0 is relayed only: [site] load management and offline mode work in ocpp1.6" in warning.message
    quiet = text + "[offline]\nenabled = false\n"
    assert subprotocol_warnings(loads(quiet), LineIndex(quiet), load_managed=False) == []


# --- invariant: whatever a 2.x station sends while the backend is down, its answers are valid in its
# version and the backend later receives exactly the stored frames, in order, byte for byte -----------

V2_ACTIONS = sorted(V2_REQUESTS)


class OfflineV2Machine(RuleBasedStateMachine):
    """One 2.x session; the backend goes down and up; the queue is replayed like the relay does."""

    def __init__(self) -> None:
        super().__init__()
        self.version = OcppVersion.V201
        self.session = Session("CS1", offline=responder(self.version), version=self.version)
        self.now = 0.0
        self.down = False
        self.queue: list[Stored] = []
        self.sent_offline: list[str] = []
        self.backend_received: list[str] = []
        self.seq = 0

    @precondition(lambda self: not self.down and self.seq == 0)
    @rule(version=st.sampled_from([OcppVersion.V201, OcppVersion.V21]))
    def pick_version(self, version: OcppVersion) -> None:
        self.version = version
        self.session = Session("CS1", offline=responder(version), version=version)

    @rule(action=st.sampled_from(V2_ACTIONS), token=st.sampled_from(["LISTED", "OTHER"]),
          signed=st.text(alphabet='OCMF|{}":\\,ÄÖ€ \u2028', max_size=30), unknown=st.booleans())
    def station_call(self, action: str, token: str, signed: str, unknown: bool) -> None:
        self.seq += 1
        self.now += 0.01
        request = json.loads(json.dumps(V2_REQUESTS[action]))
        if "idToken" in request:
            request["idToken"]["idToken"] = token
        if action == "TransactionEvent":
            request["seqNo"] = self.seq
            request["meterValue"][0]["sampledValue"][0]["signedMeterValue"]["signedMeterData"] = signed
        name = "NotifyEVChargingNeeds" if unknown else action
        text = build_call(f"m{self.seq}", name, request)
        actions = self.session.from_wallbox(text, self.now)
        if not self.down:
            assert [a.text for a in actions if isinstance(a, ToUpstream)] == [text]  # live: relayed as is
            self.session.from_upstream(PRIMARY, build_result(f"m{self.seq}", {}), self.now)
            return
        for item in actions:
            if isinstance(item, Persist):
                assert item.text == text and item.local_transaction_id is None
                validate(self.version, MessageType.CALLRESULT, action, answer_payload(item.answer))
                self.queue.append(Stored(len(self.queue) + 1, item.action, item.text))
                self.sent_offline.append(text)
            else:
                assert isinstance(item, ToWallbox) and unknown  # only what cannot be answered gets an error
                assert json.loads(item.text)[2] == "GenericError"

    @precondition(lambda self: not self.down)
    @rule()
    def backend_down(self) -> None:
        self.down = True
        self.session.upstream_down(PRIMARY, self.now)

    @precondition(lambda self: self.down)
    @rule()
    def backend_back_and_replay(self) -> None:
        self.down = False
        self.session.upstream_up(PRIMARY, replay=bool(self.queue))
        keep, _ = replay_plan(self.queue)
        for entry in keep:
            sent = self.session.replay_call(classify(entry.text), entry.text, self.now)
            self.backend_received += [a.text for a in sent if isinstance(a, ToUpstream)]
            answered = self.session.from_upstream(PRIMARY, build_result(classify(entry.text).msg_id or "", {}),
                                                  self.now)
            assert any(isinstance(a, Replayed) for a in answered)
            assert not any(isinstance(a, ToWallbox) for a in answered)  # the station had its answer already
        self.session.replay_finished()
        boots = [e.text for e in self.queue if e.action == "BootNotification"]
        expected = [t for t in self.sent_offline if '"Heartbeat"' not in t
                    and ('"BootNotification"' not in t or t == boots[-1])]
        assert self.backend_received == expected
        self.queue, self.sent_offline, self.backend_received = [], [], []

    @invariant()
    def nothing_is_remapped(self) -> None:
        assert self.session.transactions == {}


TestOfflineV2Machine = OfflineV2Machine.TestCase


def test_strict_mode_refuses_in_the_sessions_version() -> None:
    """A malformed CALL from a 2.x station gets FormatViolation (1.6: FormationViolation)."""
    for version, code in ((OcppVersion.V16, "FormationViolation"), (OcppVersion.V201, "FormatViolation"),
                          (OcppVersion.V21, "FormatViolation")):
        actions = Session("CS1", strict=True, version=version).from_wallbox('[2,"x","Heartbeat",{"a":}]', 0)
        (error,) = [a.text for a in actions if isinstance(a, ToWallbox)]
        assert json.loads(error)[:3] == [4, "x", code]

