"""The session with a primary and mirrored secondaries: routing, policy, transaction ids."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.messages.ocppj import classify
from proxy.core.mirror import Mirror, TxMapped
from proxy.core.policy import CommandPolicy
from proxy.core.session import PRIMARY, CallCompleted, Policed, Session, ToWallbox
from tests.unit.test_mirror import SIGNED, boot, meter, start, status, stop
from tests.unit.test_session import sent


def three_way(**policy: dict[str, str]) -> Session:
    mirrors = {name: Mirror(name, replay_rate=1e9) for name in ("ems", "ha")}
    session = Session("CP1", upstreams=(PRIMARY, "ems", "ha"), mirrors=mirrors,
                      policy=CommandPolicy(PRIMARY, policy))
    for name in mirrors:
        assert session.secondary_up(name, 0) == []
    return session


def test_transaction_reaches_all_three_each_with_its_own_ids() -> None:
    session = three_way()
    now = 0.0
    secondary_tx = {"ems": 500, "ha": 900}
    to_primary: list[str] = []
    copies: dict[str, list[str]] = {"ems": [], "ha": []}
    wallbox_got: list[str] = []
    for n, text in enumerate([boot(), status("st1", 1, "Preparing"), start("s1")]):
        now += 1
        for dest, out in sent(session.from_wallbox(text, now)):
            (to_primary if dest == PRIMARY else copies[dest]).append(out)
    assert to_primary == [boot(), status("st1", 1, "Preparing"), start("s1")]
    # Each secondary got the Boot; the rest waits for its answers, the primary's pace is its own.
    assert copies == {"ems": [boot()], "ha": [boot()]}
    for name in ("ems", "ha"):
        for _ in range(3):  # Boot, Status, StartTransaction: each secondary answers with its own id
            now += 1
            msg_id = classify(copies[name][-1]).msg_id
            payload = '{"transactionId":%d,"idTagInfo":{"status":"Accepted"}}' % secondary_tx[name] \
                if classify(copies[name][-1]).action == "StartTransaction" else "{}"
            actions = session.from_upstream(name, f'[3,"{msg_id}",{payload}]', now)
            assert not [a for a in actions if isinstance(a, ToWallbox)]  # secondary answers are consumed
            copies[name] += [out for dest, out in sent(actions) if dest == name]
    primary_answer = '[3,"s1",{"transactionId":1001,"idTagInfo":{"status":"Accepted"}}]'
    actions = session.from_upstream(PRIMARY, primary_answer, now)
    wallbox_got += [out for dest, out in sent(actions) if dest == "wallbox"]
    assert wallbox_got == [primary_answer]
    assert {a for a in actions if isinstance(a, TxMapped)} == {TxMapped("ems", 1001, 500), TxMapped("ha", 1001, 900)}
    assert [classify(t).action for t in copies["ems"]] == ["BootNotification", "StatusNotification",
                                                         "StartTransaction"]
    for text in (meter("m1", 1001), stop("x1", 1001)):
        now += 1
        actions = session.from_wallbox(text, now)
        assert (PRIMARY, text) in sent(actions)  # the primary's copy is the wallbox's text
        for name in ("ems", "ha"):
            (copy,) = [out for dest, out in sent(actions) if dest == name]
            assert copy == text.replace('"transactionId":1001', f'"transactionId":{secondary_tx[name]}')
            assert SIGNED in copy
            session.from_upstream(name, f'[3,"{classify(copy).msg_id}",{{}}]', now)
        session.from_upstream(PRIMARY, f'[3,"{classify(text).msg_id}",{{}}]', now)


def test_default_policy_rejects_state_changes_from_secondaries_and_forwards_reads() -> None:
    session = three_way()
    for action, payload in (("RemoteStartTransaction", '{"idTag":"T"}'), ("Reset", '{"type":"Hard"}')):
        actions = session.from_upstream("ems", f'[2,"e-{action}","{action}",{payload}]', 0)
        assert Policed("ems", action, "reject") in actions
        ((dest, text),) = sent(actions)
        assert dest == "ems" and json.loads(text)[:3] == [4, f"e-{action}", "SecurityError"]
    assert session.wallbox_outstanding == 0
    ((dest, text),) = sent(session.from_upstream("ha", '[2,"h1","GetConfiguration",{}]', 1))
    assert dest == "wallbox" and text == '[2,"ocpp-proxy:1","GetConfiguration",{}]'
    assert sent(session.from_wallbox('[3,"ocpp-proxy:1",{"configurationKey":[]}]', 2)) == [
        ("ha", '[3,"h1",{"configurationKey":[]}]')]


def test_allowed_commands_are_forwarded_and_answer_mode_never_reaches_the_wallbox() -> None:
    session = three_way(ems={"RemoteStartTransaction": "forward", "Reset": "answer"})
    ((dest, text),) = sent(session.from_upstream("ems", '[2,"e1","RemoteStartTransaction",{"idTag":"T"}]', 0))
    assert dest == "wallbox" and text == '[2,"ocpp-proxy:1","RemoteStartTransaction",{"idTag":"T"}]'
    actions = session.from_upstream("ems", '[2,"e2","Reset",{"type":"Hard"}]', 1)
    assert sent(actions) == [("ems", '[3,"e2",{"status":"Accepted"}]')]
    assert Policed("ems", "Reset", "answer") in actions
    # The primary can be restricted too.
    session = three_way(primary={"Reset": "reject"})
    ((dest, text),) = sent(session.from_upstream(PRIMARY, '[2,"p1","Reset",{"type":"Soft"}]', 0))
    assert dest == PRIMARY and json.loads(text)[2] == "SecurityError"


def test_secondary_remote_stop_uses_the_wallbox_transaction_id() -> None:
    mirrors = {"ems": Mirror("ems", transactions={1001: 500})}
    session = Session("CP1", upstreams=(PRIMARY, "ems"), mirrors=mirrors,
                      policy=CommandPolicy(PRIMARY, {"ems": {"RemoteStopTransaction": "forward"}}))
    ((dest, text),) = sent(session.from_upstream("ems", '[2,"e1","RemoteStopTransaction",{"transactionId":500}]', 0))
    assert (dest, text) == ("wallbox", '[2,"ocpp-proxy:1","RemoteStopTransaction",{"transactionId":1001}]')
    assert sent(session.from_wallbox('[3,"ocpp-proxy:1",{"status":"Accepted"}]', 1)) == [
        ("ems", '[3,"e1",{"status":"Accepted"}]')]
    ((dest, text),) = sent(session.from_upstream("ems", '[2,"e2","RemoteStopTransaction",{"transactionId":1}]', 2))
    assert dest == "ems" and json.loads(text)[2] == "PropertyConstraintViolation"


def test_secondary_round_trips_are_reported_per_upstream() -> None:
    session = three_way()
    session.from_wallbox('[2,"h","Heartbeat",{}]', 0)
    actions = session.from_upstream("ha", '[3,"h",{"currentTime":"t"}]', 0.25)
    assert actions == [CallCompleted("ha", "Heartbeat", 0.25)]


def test_secondary_down_does_not_touch_primary_traffic_and_catches_up_later() -> None:
    session = three_way()
    session.secondary_down("ha")
    texts = [boot(), status("st1", 1, "Available"), start("s1")]
    for n, text in enumerate(texts):
        actions = session.from_wallbox(text, n)
        assert [d for d, _ in sent(actions)] == [PRIMARY, "ems"] if n == 0 else [PRIMARY]
        assert sent(session.from_upstream(PRIMARY, f'[3,"{classify(text).msg_id}",{{}}]', n)) == [
            ("wallbox", f'[3,"{classify(text).msg_id}",{{}}]')]
    ((dest, text),) = sent(session.secondary_up("ha", 10))
    assert (dest, text) == ("ha", boot())


@settings(max_examples=100, deadline=None)
@given(events=st.lists(st.tuples(st.sampled_from(["ems", "ha"]),
                                 st.sampled_from(["up", "down", "answer", "garbage", "call"])), max_size=30))
def test_secondaries_never_change_what_primary_and_wallbox_exchange(events: list[tuple[str, str]]) -> None:
    """Whatever the secondaries do (in any order), the primary and the wallbox see the same frames."""
    baseline = Session("CP1")
    session = three_way()
    script = [boot(), status("st1", 1, "Preparing"), start("s1"), meter("m1", 1001), stop("x1", 1001)]
    for n, text in enumerate(script):
        for name, what in events[n * 6:(n + 1) * 6]:
            if what == "up":
                session.secondary_up(name, n)
            elif what == "down":
                session.secondary_down(name)
            elif what == "answer":
                session.from_upstream(name, f'[3,"{classify(text).msg_id}",{{"transactionId":7}}]', n)
            elif what == "garbage":
                session.from_upstream(name, "not ocpp", n)
            else:
                assert all(d == name for d, _ in sent(session.from_upstream(name, '[2,"c","Reset",{}]', n)))
        answer = f'[3,"{classify(text).msg_id}",{{"transactionId":1001}}]'
        for s in (baseline, session):
            primary = [(d, t) for d, t in sent(s.from_wallbox(text, n)) if d in (PRIMARY, "wallbox")]
            assert primary == [(PRIMARY, text)]
            assert [(d, t) for d, t in sent(s.from_upstream(PRIMARY, answer, n)) if d in (PRIMARY, "wallbox")] == [
                ("wallbox", answer)]
