"""Local answers, transaction-id edits, replay plan, queue and backoff (sans-IO / no sockets)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from proxy.core.backoff import Backoff
from proxy.messages.ocppj import classify
from proxy.core.offline import (
    OfflineResponder,
    OfflineSettings,
    Stored,
    map_transaction,
    replace_transaction_id,
    replay_plan,
)
from proxy.storage.interface import Append, Delivered, MarkSent
from proxy.storage.offline_queue import SqliteStorage
from proxy.core.session import PRIMARY, Persist, Session, ToUpstream, ToWallbox


def answer(responder: OfflineResponder, text: str) -> list[Any]:
    """The local answer as JSON: [3, id, payload] or [4, id, code, ...]."""
    parsed: list[Any] = json.loads(responder.answer(classify(text)).text)
    return parsed


def test_local_answers_and_negative_transaction_ids() -> None:
    responder = OfflineResponder(OfflineSettings(auth="local_list", local_list=frozenset({"TAG1"})))
    assert answer(responder, '[2,"1","BootNotification",{}]')[2]["status"] == "Accepted"
    assert answer(responder, '[2,"2","Authorize",{"idTag":"TAG1"}]')[2] == {"idTagInfo": {"status": "Accepted"}}
    assert answer(responder, '[2,"3","Authorize",{"idTag":"NOPE"}]')[2] == {"idTagInfo": {"status": "Invalid"}}
    first = responder.answer(classify('[2,"4","StartTransaction",{"idTag":"TAG1"}]'))
    second = responder.answer(classify('[2,"5","StartTransaction",{"idTag":"TAG1"}]'))
    assert (first.local_transaction_id, second.local_transaction_id) == (-1, -2) and first.store
    unknown = responder.answer(classify('[2,"6","VendorThing",{}]'))
    assert not unknown.store and json.loads(unknown.text)[2] == "GenericError"


def test_authorization_cache_learns_from_backend_answers() -> None:
    responder = OfflineResponder()
    responder.learn(classify('[2,"a","Authorize",{"idTag":"CARD"}]'),
                    classify('[3,"a",{"idTagInfo":{"status":"Accepted"}}]'))
    assert responder.id_tag_status("CARD") == "Accepted"
    responder.learn(classify('[2,"b","Authorize",{"idTag":"CARD"}]'),
                    classify('[3,"b",{"idTagInfo":{"status":"Blocked"}}]'))
    assert responder.id_tag_status("CARD") == "Invalid"


def test_transaction_id_edit_is_surgical() -> None:
    signed = json.dumps('OCMF|{"transactionId":-1,"TT":"Köln"}', ensure_ascii=False)
    text = ('[2,"m","MeterValues",{"connectorId":1, "transactionId" : -1,"meterValue":[{"sampledValue":'
            f'[{{"value":{signed},"format":"SignedData"}}]}}]}}]')
    mapped = map_transaction(classify(text), {-1: 1001})
    assert mapped == text.replace('"transactionId" : -1', '"transactionId" : 1001')
    assert signed in mapped  # the escaped key inside the signed string is untouched
    assert map_transaction(classify(text), {-7: 5}) is text
    assert replace_transaction_id('{"transactionId":-1,"x":{"transactionId":-1}}', -1, 5) is None


@given(st.integers(-10**6, -1), st.integers(1, 2**31 - 1), st.text(max_size=30))
def test_mapping_changes_only_the_number(local: int, backend: int, noise: str) -> None:
    text = json.dumps([2, "id", "StopTransaction", {"note": noise, "transactionId": local, "meterStop": 5}],
                      ensure_ascii=False)
    mapped = map_transaction(classify(text), {local: backend})
    assert mapped == text.replace(f'"transactionId": {local}', f'"transactionId": {backend}')


def test_replay_plan_drops_heartbeats_and_older_boots() -> None:
    entries = [Stored(1, "BootNotification", "b1"), Stored(2, "Heartbeat", "h"), Stored(3, "StartTransaction", "s", -1),
               Stored(4, "BootNotification", "b2"), Stored(5, "StopTransaction", "t")]
    keep, drop = replay_plan(entries)
    assert [e.row for e in keep] == [3, 4, 5] and [e.row for e in drop] == [1, 2]


def test_queue_survives_reopen_and_keeps_order(tmp_path: Path) -> None:
    queue = SqliteStorage(tmp_path / "q.sqlite3")
    rows = queue.write([Append("CP1", "StartTransaction", '[2,"s","StartTransaction",{}]', -1),
                        Append("CP1", "MeterValues", '[2,"m","MeterValues",{}]'),
                        Append("CP2", "Heartbeat", '[2,"h","Heartbeat",{}]')])
    assert all(isinstance(row, int) for row in rows) and rows == sorted(rows)  # type: ignore[type-var]
    queue.close()
    queue = SqliteStorage(tmp_path / "q.sqlite3")
    assert [e.row for e in queue.pending("CP1")] == rows[:2]
    assert queue.last_local_tx("CP1") == -1 and queue.last_local_tx("CP2") == 0
    assert queue.backlog() == {"CP1": 2, "CP2": 1}
    first = rows[0]
    assert isinstance(first, int)
    queue.write([MarkSent(first)])
    assert queue.pending("CP1")[0].attempts == 1
    queue.write([Delivered(first, "CP1", -1, 1001)])
    queue.write([Delivered(first, "CP1", -1, 1001), MarkSent(first)])  # idempotent: a retry changes nothing
    assert queue.transactions("CP1") == {-1: 1001}
    assert [e.action for e in queue.pending("CP1")] == ["MeterValues"]
    assert queue.depth("CP1")[0] == 1
    assert queue.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_replay_plan_drops_a_state_report_sent_before_only_when_a_later_one_supersedes_it() -> None:
    status = '[2,"%s","StatusNotification",{"connectorId":%d,"status":"%s","errorCode":"NoError"}]'
    entries = [Stored(1, "StatusNotification", status % ("a", 1, "Preparing"), attempts=1),
               Stored(2, "StartTransaction", "s", -1, attempts=1),
               Stored(3, "StatusNotification", status % ("b", 2, "Available"), attempts=1),
               Stored(4, "StatusNotification", status % ("c", 1, "Charging")),
               Stored(5, "MeterValues", "m", attempts=2)]
    keep, drop = replay_plan(entries)
    # Connector 1's in-flight report is superseded by row 4; connector 2's is the latest: resent.
    assert [e.row for e in keep] == [2, 3, 4, 5] and [e.row for e in drop] == [1]


def test_session_answers_locally_while_primary_is_down() -> None:
    session = Session("CP1", offline=OfflineResponder())
    session.upstream_down(PRIMARY, 0)
    actions = session.from_wallbox('[2,"s","StartTransaction",{"idTag":"X","connectorId":1}]', 1)
    assert len(actions) == 1 and isinstance(actions[0], Persist) and actions[0].local_transaction_id == -1
    session.upstream_up(PRIMARY, replay=True)
    assert session.offline_mode  # until the replay is finished
    session.replay_finished()
    session.transactions[-1] = 1001
    live = session.from_wallbox('[2,"m","MeterValues",{"connectorId":1,"transactionId":-1}]', 2)
    assert live == [ToUpstream(PRIMARY, '[2,"m","MeterValues",{"connectorId":1,"transactionId":1001}]')]
    stop = session.from_upstream(PRIMARY, '[2,"r","RemoteStopTransaction",{"transactionId":1001}]', 3)
    assert stop == [ToWallbox('[2,"r","RemoteStopTransaction",{"transactionId":-1}]')]


def test_backoff_is_capped_and_jittered() -> None:
    backoff = Backoff(1.0, 60.0, random.Random(4))
    delays = [backoff.next_delay() for _ in range(12)]
    assert 0.5 <= delays[0] <= 1.0 and all(d <= 60.0 for d in delays) and delays[-1] >= 30.0
    backoff.reset()
    assert backoff.next_delay() <= 1.0
