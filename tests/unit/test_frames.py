"""Frame classification by prefix scan: routing facts without re-encoding."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from proxy.messages.ocppj import MessageType, build_call, build_error, build_result, classify, replace_id, strict_problem


def test_call_result_error_are_routed() -> None:
    call = classify('[2,"abc","BootNotification",{"a":1}]')
    assert (call.kind, call.msg_id, call.action, call.problem) == (MessageType.CALL, "abc", "BootNotification", None)
    result = classify('[3, "abc", {"status":"Accepted"}]')
    assert (result.kind, result.msg_id, result.action) == (MessageType.CALLRESULT, "abc", None)
    error = classify('[4,"abc","NotImplemented","no",{}]')
    assert (error.kind, error.msg_id, error.action) == (MessageType.CALLERROR, "abc", "NotImplemented")


def test_whitespace_and_escapes_in_prefix() -> None:
    frame = classify(' \n[ 2 ,\t"id\\"x" , "Data\\u0054ransfer" ,{}]\n')
    assert frame.msg_id == 'id"x' and frame.action == "DataTransfer" and frame.problem is None


def test_malformed_frames_are_named() -> None:
    assert classify("hello").kind is None
    assert classify('{"a":1}').kind is None
    assert classify('[5,"x",{}]').kind is None
    assert classify('[2,"x","A",{}').problem == "frame is not a closed JSON array"
    assert classify('[2,"x",{}]').problem == "CALL without an action"
    assert classify('[2,"x","A"]').problem == "missing payload"
    assert classify('[2,"x","A",[1]]').problem == "payload is not an object"
    assert classify('[4,"x","Code"]').problem == "missing payload"
    long_id = "x" * 37
    assert classify(f'[2,"{long_id}","A",{{}}]').problem == "message id longer than 36 characters"


def test_strict_problem_parses_fully() -> None:
    assert (strict_problem(classify('[2,"x","A",{"a":}]')) or "").startswith("invalid JSON")
    assert strict_problem(classify('[2,"x","A",{"a":1},5]')) == "expected 4 elements"
    assert strict_problem(classify('[2,"x","A",{"a":1}]')) is None


def test_replace_id_touches_only_the_id() -> None:
    text = '[2, "orig" ,"SetChargingProfile",{"k":"orig"}]'
    assert replace_id(classify(text), "ocpp-proxy:7") == '[2, "ocpp-proxy:7" ,"SetChargingProfile",{"k":"orig"}]'


def test_built_frames_classify_back() -> None:
    assert classify(build_call("ocpp-proxy:1", "SetChargingProfile", {"connectorId": 0})).action == "SetChargingProfile"
    assert classify(build_result("1", {"status": "Accepted"})).kind is MessageType.CALLRESULT
    assert classify(build_error("1", "FormationViolation", "bad")).action == "FormationViolation"


ids = st.text(min_size=1, max_size=36)
actions = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=30)


@given(ids, actions, st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
       st.booleans())
def test_any_json_encoded_call_classifies_like_a_parser_sees_it(msg_id: str, action: str, payload: dict[str, object],
                                                                ascii_only: bool) -> None:
    text = json.dumps([2, msg_id, action, payload], ensure_ascii=ascii_only)
    frame = classify(text)
    assert (frame.kind, frame.msg_id, frame.action, frame.problem) == (MessageType.CALL, msg_id, action, None)
    assert frame.text is text


@given(st.text(max_size=200))
def test_classify_never_raises(text: str) -> None:
    frame = classify(text)
    assert frame.text == text
