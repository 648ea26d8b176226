"""A secondary's copy of the wallbox: own queue, own transaction ids, replay on reconnect."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.messages.ocppj import classify
from proxy.core.mirror import (
    Mirror,
    MirrorCompleted,
    MirrorDropped,
    MirrorEvent,
    MirrorSend,
    MirrorStartKnown,
    TxMapped,
)
from proxy.demo.peers import OCMF_SAMPLE

SIGNED = json.dumps(OCMF_SAMPLE, ensure_ascii=False)


def boot(msg_id: str = "b1") -> str:
    return f'[2,"{msg_id}","BootNotification",{{"chargePointVendor":"V","chargePointModel":"M"}}]'


def status(msg_id: str, connector: int, state: str) -> str:
    return (f'[2,"{msg_id}","StatusNotification",{{"connectorId":{connector},"errorCode":"NoError",'
            f'"status":"{state}"}}]')


def start(msg_id: str = "s1") -> str:
    return f'[2,"{msg_id}","StartTransaction",{{"connectorId":1,"idTag":"T","meterStart":0,"timestamp":"t"}}]'


def meter(msg_id: str, tx: int | None) -> str:
    tx_part = "" if tx is None else f'"transactionId":{tx},'
    return (f'[2,"{msg_id}","MeterValues",{{"connectorId":1,{tx_part}"meterValue":[{{"timestamp":"t",'
            f'"sampledValue":[{{"value":{SIGNED},"format":"SignedData"}}]}}]}}]')


def stop(msg_id: str, tx: int) -> str:
    return (f'[2,"{msg_id}","StopTransaction",{{"meterStop":5,"timestamp":"t","transactionId":{tx},'
            f'"transactionData":[{{"timestamp":"t","sampledValue":[{{"value":{SIGNED},"format":"SignedData"}}]}}]}}]')


def sent(events: list[MirrorEvent]) -> list[str]:
    return [e.text for e in events if isinstance(e, MirrorSend)]


def answer(mirror: Mirror, text: str, now: float, payload: str = "{}") -> list[MirrorEvent]:
    msg_id = classify(text).msg_id
    return mirror.from_upstream(classify(f'[3,"{msg_id}",{payload}]'), now)


def offer(mirror: Mirror, text: str, now: float = 0.0) -> list[MirrorEvent]:
    return mirror.offer(classify(text), now)


def test_one_call_at_a_time_in_order() -> None:
    mirror = Mirror("ems", replay_rate=1e9)
    mirror.link_up(0)
    assert sent(offer(mirror, boot())) == [boot()]
    assert sent(offer(mirror, status("st1", 1, "Available"))) == []  # waits for the Boot's answer
    events = answer(mirror, boot(), 0.5, '{"status":"Accepted","currentTime":"t","interval":300}')
    assert MirrorCompleted("BootNotification", 0.5) in events
    assert sent(events) == [status("st1", 1, "Available")]
    assert mirror.depth == 1


def test_transaction_ids_are_its_own_and_signed_data_stays_byte_identical() -> None:
    mirror = Mirror("ems", replay_rate=1e9)
    mirror.link_up(0)
    offer(mirror, start("s1"))
    # The secondary answers before the primary did (either order works).
    events = answer(mirror, start("s1"), 1, '{"transactionId":77,"idTagInfo":{"status":"Accepted"}}')
    assert not [e for e in events if isinstance(e, TxMapped)]
    assert mirror.wallbox_transaction("s1", 1001) == [TxMapped("ems", 1001, 77)]
    (copy,) = sent(offer(mirror, meter("m1", 1001), 2))
    assert copy == meter("m1", 1001).replace('"transactionId":1001', '"transactionId":77')
    answer(mirror, copy, 3)
    (copy,) = sent(offer(mirror, stop("x1", 1001), 4))
    assert copy == stop("x1", 1001).replace('"transactionId":1001', '"transactionId":77')
    assert SIGNED in copy


def test_primary_answer_first_then_secondary() -> None:
    mirror = Mirror("ems")
    offer(mirror, start("s1"))  # queued: link down
    # Kept (durably, by the caller) until the secondary's half of the pair arrives.
    assert mirror.wallbox_transaction("s1", 1001) == [MirrorStartKnown("ems", "s1", 1001)]
    assert mirror.wallbox_transaction("unknown", 5) == []
    mirror.link_up(0)
    events = answer(mirror, start("s1"), 1, '{"transactionId":9,"idTagInfo":{"status":"Accepted"}}')
    assert TxMapped("ems", 1001, 9) in events
    assert mirror.transactions() == {1001: 9}


def test_persisted_ids_are_used_after_restart() -> None:
    mirror = Mirror("ems", transactions={1001: 77}, replay_rate=1e9)
    mirror.link_up(0)
    (copy,) = sent(offer(mirror, stop("x1", 1001)))
    assert '"transactionId":77,' in copy


def test_unknown_transactions_meter_values_lose_the_id_stop_is_not_sent() -> None:
    mirror = Mirror("ems", replay_rate=1e9)
    mirror.link_up(0)
    (copy,) = sent(offer(mirror, meter("m1", 555)))
    assert copy == meter("m1", None)
    answer(mirror, copy, 1)
    events = offer(mirror, stop("x1", 555), 2)
    assert sent(events) == [] and MirrorDropped("ems", "StopTransaction", "unknown_transaction") in events
    # A refused StartTransaction (CALLERROR) means the same for its transaction.
    offer(mirror, start("s2"), 3)
    mirror.from_upstream(classify('[4,"s2","InternalError","no",{}]'), 4)
    mirror.wallbox_transaction("s2", 1002)
    assert sent(offer(mirror, meter("m2", 1002), 5)) == [meter("m2", None)]


def test_down_queues_up_replays_state_first_then_in_order() -> None:
    mirror = Mirror("ems", replay_rate=1e9)
    mirror.link_up(0)
    for n, text in enumerate((boot(), status("st1", 1, "Available"), status("st2", 2, "Available"))):
        offer(mirror, text, n)
        answer(mirror, text, n)
    offer(mirror, status("st3", 1, "Preparing"), 4)
    mirror.link_down()  # st3 was in flight: it goes back to the front
    offer(mirror, start("s1"), 5)
    assert mirror.depth == 2
    events = mirror.link_up(10)
    (first,) = sent(events)
    replayed = [first]
    for now in range(11, 20):
        events = mirror.from_upstream(classify(f'[3,"{classify(replayed[-1]).msg_id}",{{}}]'), now)
        if not sent(events):
            break
        replayed += sent(events)
    # Boot and the last acknowledged status per connector, with fresh ids, then the queue.
    assert [classify(t).action for t in replayed] == ["BootNotification", "StatusNotification",
                                                     "StatusNotification", "StatusNotification",
                                                     "StartTransaction"]
    assert replayed[0] == boot().replace('"b1"', '"ocpp-proxy:r1"')
    assert replayed[1:3] == [status("st1", 1, "Available").replace('"st1"', '"ocpp-proxy:r2"'),
                             status("st2", 2, "Available").replace('"st2"', '"ocpp-proxy:r3"')]
    assert replayed[3:] == [status("st3", 1, "Preparing"), start("s1")]


def test_replay_is_throttled() -> None:
    mirror = Mirror("ems", replay_rate=10)
    for n in range(3):
        offer(mirror, status(f"st{n}", 1, "Available"))
    assert sent(mirror.link_up(100.0)) == [status("st0", 1, "Available")]
    assert sent(answer(mirror, status("st0", 1, "Available"), 100.01)) == []  # answered fast, still waits
    assert mirror.next_deadline() == 100.1
    assert sent(mirror.poll(100.1)) == [status("st1", 1, "Available")]


def test_bounded_queue_drops_non_transaction_frames_first() -> None:
    mirror = Mirror("ems", queue_limit=3)
    offer(mirror, start("s1"))
    offer(mirror, status("st1", 1, "Charging"))
    offer(mirror, meter("m1", 1001))
    events = offer(mirror, meter("m2", None))
    assert MirrorDropped("ems", "StatusNotification", "queue_full") in events
    events = offer(mirror, meter("m3", 1001))
    assert MirrorDropped("ems", "MeterValues", "queue_full") in events  # the one without a transaction
    assert mirror.depth == 3
    # The dropped status is still part of the state a reconnect replays.
    replay = sent(mirror.link_up(0))
    assert replay == [status("st1", 1, "Charging").replace('"st1"', '"ocpp-proxy:r1"')]


def test_byte_bound_too() -> None:
    mirror = Mirror("ems", queue_bytes=3 * len(meter("m0", 1)))
    for n in range(5):
        offer(mirror, meter(f"m{n}", 1))
    assert mirror.depth == 3


def test_unanswered_calls_are_retried_then_dropped() -> None:
    mirror = Mirror("ems", call_timeout=5, max_attempts=2)
    mirror.link_up(0)
    offer(mirror, status("st1", 1, "Available"))
    offer(mirror, status("st2", 1, "Charging"))
    assert mirror.next_deadline() == 5
    assert sent(mirror.poll(5)) == [status("st1", 1, "Available")]  # same text, same id
    events = mirror.poll(10)
    assert MirrorDropped("ems", "StatusNotification", "unanswered") in events
    assert sent(events) == [status("st2", 1, "Charging")]


def test_filter_retransmissions_and_heartbeats() -> None:
    mirror = Mirror("ha", forward_actions=frozenset({"MeterValues", "StatusNotification", "Heartbeat"}))
    assert offer(mirror, boot()) == [] and mirror.depth == 0
    assert offer(mirror, '[2,"h1","Heartbeat",{}]') == [] and mirror.depth == 0  # down: not worth queueing
    mirror.link_up(0)
    assert sent(offer(mirror, '[2,"h2","Heartbeat",{}]', 1)) == ['[2,"h2","Heartbeat",{}]']
    assert sent(offer(mirror, status("st1", 1, "Available"), 2)) == []  # queued behind the heartbeat
    assert offer(mirror, status("st1", 1, "Available"), 3) == [] and mirror.depth == 2  # retransmission
    assert offer(mirror, '[2,"h3","Heartbeat",{}]', 4) == [] and mirror.depth == 2  # busy: skipped


def test_secondary_commands_get_the_wallbox_transaction_id() -> None:
    mirror = Mirror("ems", transactions={1001: 77, 1002: 78})
    text, error = mirror.inbound(classify('[2,"e1","RemoteStopTransaction",{"transactionId":78}]'))
    assert error is None and text == '[2,"e1","RemoteStopTransaction",{"transactionId":1002}]'
    profile = ('[2,"e2","SetChargingProfile",{"connectorId":1,"csChargingProfiles":{"chargingProfileId":1,'
               '"transactionId":77,"stackLevel":0}}]')
    text, error = mirror.inbound(classify(profile))
    assert error is None and text == profile.replace('"transactionId":77', '"transactionId":1001')
    text, error = mirror.inbound(classify('[2,"e3","RemoteStopTransaction",{"transactionId":1001}]'))
    assert text == "" and error is not None and json.loads(error)[:3] == [4, "e3", "PropertyConstraintViolation"]
    untouched = '[2,"e4","GetConfiguration",{}]'
    assert mirror.inbound(classify(untouched)) == (untouched, None)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(st.sampled_from(["offer", "answer", "down", "up", "poll"]), max_size=60))
def test_never_loses_or_reorders_what_fits(steps: list[str]) -> None:
    """Whatever the link does, the secondary gets every offered frame once, in order (no limit hit)."""
    mirror = Mirror("ems", call_timeout=1, replay_rate=1e9, max_attempts=10**6)
    offered: list[str] = []
    acknowledged: list[str] = []
    in_flight: str | None = None
    now = 0.0

    def take(events: list[MirrorEvent]) -> None:
        nonlocal in_flight
        for text in sent(events):
            in_flight = text

    for step in steps:
        now += 0.5
        if step == "offer":
            text = status(f"st{len(offered)}", 1, "Charging")
            offered.append(text)
            take(offer(mirror, text, now))
        elif step == "answer" and in_flight is not None and mirror.up:
            done, in_flight = in_flight, None
            if not classify(done).msg_id.startswith("ocpp-proxy:"):  # type: ignore[union-attr]
                acknowledged.append(done)
            take(answer(mirror, done, now))
        elif step == "down":
            mirror.link_down()
            in_flight = None
        elif step == "up":
            take(mirror.link_up(now))
        elif step == "poll":
            take(mirror.poll(now))
    assert acknowledged == offered[:len(acknowledged)]
    mirror.link_down()  # what is left: exactly the frames not acknowledged yet
    assert mirror.depth == len(offered) - len(acknowledged)


def test_bounded_queue_keeps_2x_transaction_events() -> None:
    """A 2.0.1 / 2.1 TransactionEvent is billing data like StartTransaction: evicted last."""
    mirror = Mirror("ems", queue_limit=2)
    event = '[2,"te1","TransactionEvent",{"eventType":"Started","seqNo":0,"transactionInfo":{"transactionId":"t1"}}]'
    offer(mirror, event)
    offer(mirror, status("st1", 1, "Charging"))
    events = offer(mirror, meter("m1", None))
    assert [e.action for e in events if isinstance(e, MirrorDropped)] == ["StatusNotification"]
    events = offer(mirror, meter("m2", None))
    assert [e.action for e in events if isinstance(e, MirrorDropped)] == ["MeterValues"]  # never the event
    assert mirror.depth == 2
