"""Routing and CALL arbitration of the sans-IO session."""

from __future__ import annotations

import pytest

from proxy.messages.ocppj import Frame
from proxy.core.session import (
    PRIMARY,
    Action,
    CallCompleted,
    Malformed,
    Observed,
    ProxyAnswer,
    ProxyCallFailed,
    Session,
    Tap,
    ToUpstream,
    ToWallbox,
)


def sent(actions: list[Action]) -> list[tuple[str, str]]:
    out = []
    for action in actions:
        if isinstance(action, ToWallbox):
            out.append(("wallbox", action.text))
        elif isinstance(action, ToUpstream):
            out.append((action.name, action.text))
    return out


def test_wallbox_call_goes_to_every_upstream_and_primary_answer_back() -> None:
    session = Session("CP1", upstreams=(PRIMARY, "ems"))
    call = '[2,"1","Heartbeat",{}]'
    assert sent(session.from_wallbox(call, 0.0)) == [(PRIMARY, call), ("ems", call)]
    assert sent(session.from_upstream("ems", '[3,"1",{"currentTime":"x"}]', 0.1)) == []
    answer = '[3,"1",{"currentTime":"y"}]'
    actions = session.from_upstream(PRIMARY, answer, 0.2)
    assert sent(actions) == [("wallbox", answer)]
    assert [a for a in actions if isinstance(a, CallCompleted)] == [CallCompleted(PRIMARY, "Heartbeat", 0.2)]


def test_answers_with_unknown_ids_are_still_forwarded() -> None:
    session = Session("CP1")
    assert sent(session.from_wallbox('[3,"never-asked",{}]', 0)) == [(PRIMARY, '[3,"never-asked",{}]')]
    assert sent(session.from_upstream(PRIMARY, '[3,"nope",{}]', 0)) == [("wallbox", '[3,"nope",{}]')]


def test_proxy_call_waits_for_backend_call_and_answer_is_consumed() -> None:
    session = Session("CP1")
    backend_call = '[2,"b1","GetConfiguration",{}]'
    assert sent(session.from_upstream(PRIMARY, backend_call, 0)) == [("wallbox", backend_call)]
    msg_id, actions = session.proxy_call("SetChargingProfile", {"connectorId": 0}, 1)
    assert msg_id == "ocpp-proxy:1" and actions == [] and session.wallbox_waiting == 1
    actions = session.from_wallbox('[3,"b1",{}]', 2)
    assert sent(actions) == [(PRIMARY, '[3,"b1",{}]'),
                             ("wallbox", '[2,"ocpp-proxy:1","SetChargingProfile",{"connectorId":0}]')]
    actions = session.from_wallbox('[3,"ocpp-proxy:1",{"status":"Accepted"}]', 3)
    assert sent(actions) == []
    answer = [a for a in actions if isinstance(a, ProxyAnswer)]
    assert answer[0].msg_id == msg_id and answer[0].action == "SetChargingProfile"


def test_backend_calls_wait_behind_proxy_call_in_order() -> None:
    session = Session("CP1")
    session.proxy_call("SetChargingProfile", {}, 0)
    assert session.from_upstream(PRIMARY, '[2,"b1","Reset",{}]', 1) == []
    assert session.from_upstream(PRIMARY, '[2,"b2","GetConfiguration",{}]', 1) == []
    actions = session.from_wallbox('[3,"ocpp-proxy:1",{"status":"Accepted"}]', 2)
    # The backend's own pipelining is preserved once the proxy's CALL is done.
    assert sent(actions) == [("wallbox", '[2,"b1","Reset",{}]'), ("wallbox", '[2,"b2","GetConfiguration",{}]')]
    assert session.wallbox_outstanding == 2


def test_outstanding_call_times_out_and_frees_the_slot() -> None:
    session = Session("CP1", call_timeout=30)
    msg_id, _ = session.proxy_call("SetChargingProfile", {}, 0)
    assert session.from_upstream(PRIMARY, '[2,"b1","Reset",{}]', 1) == []
    assert session.next_deadline() == 30
    actions = session.poll(30)
    assert ProxyCallFailed(msg_id, "SetChargingProfile", "timeout") in actions
    assert sent(actions) == [("wallbox", '[2,"b1","Reset",{}]')]
    # A late answer to the timed-out CALL is still recognised and consumed.
    late = session.from_wallbox(f'[3,"{msg_id}",{{}}]', 31)
    assert sent(late) == [] and any(isinstance(a, ProxyAnswer) for a in late)


def test_colliding_and_secondary_ids_are_rewritten_on_wallbox_leg_only() -> None:
    session = Session("CP1", upstreams=(PRIMARY, "ems"))
    hostile = '[2,"ocpp-proxy:1","Reset",{"type":"Soft"}]'
    (dest, text), = sent(session.from_upstream(PRIMARY, hostile, 0))
    assert dest == "wallbox" and text == '[2,"ocpp-proxy:1","Reset",{"type":"Soft"}]'.replace("proxy:1", "proxy:1")
    wire_id = text.split('"')[1]
    back = session.from_wallbox(f'[3,"{wire_id}",{{"status":"Accepted"}}]', 1)
    assert sent(back) == [(PRIMARY, '[3,"ocpp-proxy:1",{"status":"Accepted"}]')]
    # A secondary's CALL gets an id of the proxy's namespace and its answer its own id back.
    assert sent(session.from_upstream("ems", '[2,"42","GetConfiguration",{}]', 2)) == [
        ("wallbox", '[2,"ocpp-proxy:2","GetConfiguration",{}]')]
    assert sent(session.from_wallbox('[3,"ocpp-proxy:2",{}]', 3)) == [("ems", '[3,"42",{}]')]


def test_proxy_ids_never_collide_with_primary_ids() -> None:
    session = Session("CP1")
    seen = set()
    for n in range(50):
        msg_id, _ = session.proxy_call("SetChargingProfile", {}, n)
        session.from_wallbox(f'[3,"{msg_id}",{{}}]', n)
        text = sent(session.from_upstream(PRIMARY, f'[2,"ocpp-proxy:{n + 1}","Reset",{{}}]', n))[0][1]
        wire_id = text.split('"')[1]
        session.from_wallbox(f'[3,"{wire_id}",{{}}]', n)
        assert wire_id != msg_id and wire_id not in seen and msg_id not in seen
        seen |= {wire_id, msg_id}
        assert len(wire_id) <= 36


def test_observed_frames_carry_their_call() -> None:
    session = Session("CP1", taps={"test": Tap(frozenset({"SetChargingProfile", "BootNotification"}))})
    call = '[2,"b1","SetChargingProfile",{"connectorId":1}]'
    observed = [a for a in session.from_upstream(PRIMARY, call, 0) if isinstance(a, Observed)]
    assert observed[0].frame.text == call and observed[0].call is None
    answer = [a for a in session.from_wallbox('[3,"b1",{"status":"Accepted"}]', 1) if isinstance(a, Observed)]
    assert answer[0].call is not None and answer[0].call.text == call
    assert not [a for a in session.from_wallbox('[2,"h","Heartbeat",{}]', 2) if isinstance(a, Observed)]


def test_rewriter_changes_only_registered_actions() -> None:
    def clamp(source: str, destination: str, frame: Frame) -> str:
        return frame.text.replace('"limit":32', '"limit":16')

    session = Session("CP1", taps={"test": Tap(rewriters={"SetChargingProfile": clamp})})
    text = '[2,"b1","SetChargingProfile",{"limit":32}]'
    assert sent(session.from_upstream(PRIMARY, text, 0)) == [("wallbox", '[2,"b1","SetChargingProfile",{"limit":16}]')]
    other = '[2,"b2","DataTransfer",{"limit":32}]'
    session.from_wallbox('[3,"b1",{}]', 1)
    assert sent(session.from_upstream(PRIMARY, other, 2)) == [("wallbox", other)]


def test_malformed_forwarded_by_default_dropped_in_strict_mode() -> None:
    lenient = Session("CP1")
    actions = lenient.from_wallbox('[2,"x","Heartbeat",{}', 0)
    assert sent(actions) == [(PRIMARY, '[2,"x","Heartbeat",{}')]
    assert isinstance(actions[0], Malformed) and not actions[0].dropped

    strict = Session("CP1", strict=True)
    actions = strict.from_wallbox('[2,"x","Heartbeat",{"a":}]', 0)
    assert isinstance(actions[0], Malformed) and actions[0].dropped
    (dest, text), = sent(actions)
    assert dest == "wallbox" and text.startswith('[4,"x","FormationViolation"')
    assert sent(strict.from_wallbox("garbage", 0)) == []


def test_close_fails_open_proxy_calls() -> None:
    session = Session("CP1")
    first, _ = session.proxy_call("SetChargingProfile", {}, 0)
    second, _ = session.proxy_call("ClearChargingProfile", {"id": 1}, 0)
    assert session.cancel_proxy_call(second)
    assert session.close() == [ProxyCallFailed(first, "SetChargingProfile", "session closed")]


def test_taps_are_the_one_way_to_observe_and_rewrite() -> None:
    """A tap registered after construction takes effect at once, is replaced and removed by owner,
    and two owners may not rewrite one action (their edits would depend on their order)."""
    def mark(source: str, destination: str, frame: Frame) -> str:
        return frame.text.replace("32", "16")

    session = Session("CP1")
    call = '[2,"b1","SetChargingProfile",{"limit":32}]'
    session.tap("limiter", Tap(frozenset({"SetChargingProfile"}), {"SetChargingProfile": mark}))
    actions = session.from_upstream(PRIMARY, call, 0)
    assert sent(actions) == [("wallbox", call.replace("32", "16"))]
    assert [a.action for a in actions if isinstance(a, Observed)] == ["SetChargingProfile"]
    with pytest.raises(ValueError, match="limiter.*SetChargingProfile"):
        session.tap("other", Tap(rewriters={"SetChargingProfile": mark}))
    assert set(session.taps) == {"limiter"}
    session.tap("other", Tap(frozenset({"Heartbeat"})))
    assert session.observe == frozenset({"SetChargingProfile", "Heartbeat"})
    session.tap("limiter", None)
    session.from_wallbox('[3,"b1",{}]', 1)
    assert sent(session.from_upstream(PRIMARY, call.replace("b1", "b2"), 2)) == [("wallbox", call.replace("b1", "b2"))]
    assert session.observe == frozenset({"Heartbeat"}) and set(session.taps) == {"other"}
