"""The storage interface's contract (docs/storage.md), run against every implementation.

Each test runs twice: on SQLite (a file in tmp_path) and on a real PostgreSQL server
(tests/pgkit.py). "Reopen" means a second client of the same data: a new SQLite
connection to the file, a new PostgreSQL connection to the database, as after a restart
of the proxy or on a second proxy process.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from proxy.core.sessionlog import Relayed, SessionEvent
from proxy.core.mirror import TX_MEMORY, MirrorQueued, MirrorStartKnown, MirrorState, MirrorUnqueued, TxMapped
from proxy.messages.ocppj import classify
from proxy.messages.versions import OcppVersion
from proxy.storage.interface import (Append, Delivered, Journal, LogRelayed, MarkSent, MirrorRecord, Storage,
                                     StorageError, StorageUnusable)
from proxy.storage.offline_queue import DB_NAME, AsyncQueue, SqliteStorage, Ticket
from proxy.storage.postgres import PostgresStorage
from tests.pgkit import PgCluster

#: A new client of the same data (the first call creates it).
Opener = Callable[[], Storage]


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    opened: list[Storage] = []
    if request.param == "sqlite":
        path = tmp_path / DB_NAME

        def open_sqlite() -> Storage:
            opened.append(SqliteStorage(path))
            return opened[-1]

        yield open_sqlite
    else:
        url = cast(str, request.getfixturevalue("pg_url"))

        def open_postgres() -> Storage:
            opened.append(PostgresStorage(url))
            return opened[-1]

        yield open_postgres
    for storage in opened:
        storage.close()


def frame(n: int) -> str:
    return f'[2,"{n}","MeterValues",{{"connectorId":1}}]'


def test_appends_come_back_in_commit_order_per_charger(opener: Opener) -> None:
    store = opener()
    first = store.write([Append("CP1", "MeterValues", frame(1), -1, "ocpp1.6"),
                         Append("CP2", "Heartbeat", "[2,\"h\",\"Heartbeat\",{}]"),
                         Append("CP1", "MeterValues", frame(2), -2, "ocpp1.6")])
    second = store.write([Append("CP1", "StopTransaction", frame(3), None, "ocpp2.0.1")])
    rows = [row for row in first + second if row is not None]
    assert rows == sorted(rows) and len(set(rows)) == 4  # rows grow in commit order
    pending = opener().pending("CP1")  # another client sees the same, in the same order
    assert [(e.row, e.text, e.local_transaction_id, e.attempts) for e in pending] == [
        (rows[0], frame(1), -1, 0), (rows[2], frame(2), -2, 0), (rows[3], frame(3), None, 0)]
    assert store.backlog() == {"CP1": 3, "CP2": 1}
    count, oldest = store.depth("CP1")
    assert count == 3 and oldest is not None
    assert store.depth("CP9") == (0, None)
    assert store.last_local_tx("CP1") == -2 and store.last_local_tx("CP2") == 0
    assert store.subprotocol("CP1") == "ocpp2.0.1" and store.subprotocol("CP2") is None


def test_marks_and_deliveries_are_idempotent_and_survive_a_new_client(opener: Opener) -> None:
    store = opener()
    a, b = store.write([Append("CP1", "StartTransaction", frame(1), -1), Append("CP1", "MeterValues", frame(2), -1)])
    assert a is not None and b is not None
    assert store.write([MarkSent(a), MarkSent(a)]) == [None, None]
    store.write([Delivered(a, "CP1", -1, 1001)])
    store.write([Delivered(a, "CP1", -1, 1001), MarkSent(a)])  # both of a row that is gone: nothing
    again = opener()
    assert [(e.row, e.attempts) for e in again.pending("CP1")] == [(b, 0)]
    assert again.transactions("CP1") == {-1: 1001}
    assert again.backlog() == {"CP1": 1}


def test_a_batch_that_fails_changes_nothing(opener: Opener) -> None:
    store = opener()
    store.write([Append("CP1", "MeterValues", frame(1))])
    broken = Append(cast(str, None), "MeterValues", frame(2))  # NOT NULL: the database refuses it
    with pytest.raises(StorageError) as refused:
        store.write([Append("CP1", "MeterValues", frame(3), -7), broken])
    assert refused.value.operation == "append"
    assert [e.text for e in store.pending("CP1")] == [frame(1)]
    assert store.last_local_tx("CP1") == 0  # the counter of the failed batch was not kept either
    store.write([Append("CP1", "MeterValues", frame(4))])  # and the store still works
    assert [e.text for e in opener().pending("CP1")] == [frame(1), frame(4)]


def test_two_clients_appending_at_once_keep_each_chargers_order(opener: Opener) -> None:
    """Two proxies (two clients) append for different chargers at the same time."""
    clients = [opener(), opener()]
    failures: list[BaseException] = []

    def append(client: Storage, charger: str) -> None:
        try:
            for n in range(40):
                client.write([Append(charger, "MeterValues", frame(n)), Append(charger, "MeterValues", frame(-n))])
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=append, args=(c, f"CP{i}")) for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures
    reader = opener()
    for i in range(2):
        texts = [e.text for e in reader.pending(f"CP{i}")]
        assert texts == [t for n in range(40) for t in (frame(n), frame(-n))]
    everything = reader.pending("CP0") + reader.pending("CP1")
    assert len({e.row for e in everything}) == 160


def test_mirror_records_round_trip(opener: Opener) -> None:
    store = opener()
    records: list[tuple[str, MirrorRecord]] = [
        ("CP1", MirrorState("ems", 0, "[2,\"b\",\"BootNotification\",{}]")),
        ("CP1", MirrorState("ems", 0, "[2,\"b2\",\"BootNotification\",{}]")),  # replaces
        ("CP1", MirrorQueued("ems", 1, "MeterValues", frame(1))),
        ("CP1", MirrorQueued("ems", 2, "MeterValues", frame(2))),
        ("CP1", MirrorUnqueued("ems", 1)),
        ("CP1", MirrorStartKnown("ems", "s1", 1001)),
        ("CP1", MirrorStartKnown("ems", "s2", 1002)),
        ("CP1", TxMapped("ems", 1001, 55)),  # drops the start it answers
    ]
    store.write_mirrors(records)
    store.write_mirrors(records[2:4])  # idempotent: applied again, nothing changes
    store.write_mirrors([("CP2", TxMapped("ha", 2000 + n, n)) for n in range(TX_MEMORY + 3)])
    restored = opener().restore_mirrors()
    ems = restored[("CP1", "ems")]
    assert ems.state == {0: "[2,\"b2\",\"BootNotification\",{}]"}
    assert ems.queued == [(1, "MeterValues", frame(1)), (2, "MeterValues", frame(2))]  # re-queued by the retry
    assert ems.starts == {"s2": 1002} and ems.transactions == {1001: 55}
    ha = restored[("CP2", "ha")].transactions
    assert list(ha) == [2000 + n for n in range(3, TX_MEMORY + 3)]  # bounded, oldest first


def test_the_session_log_keeps_each_transaction_once_with_its_signed_values(opener: Opener) -> None:
    store = opener()
    start = SessionEvent("CP1", "-1", "start", "s1", at="2026-11-27T07:00:00Z", connector=1, id_tag="TAG",
                         meter_wh=100.0, local_tx=-1)
    meter = SessionEvent("CP1", "-1", "meter", "m1", meter_wh=150.0, signed=("OCMF|a", "OCMF|b"))
    stop = SessionEvent("CP1", "-1", "stop", "x1", at="2026-11-27T08:00:00Z", meter_wh=300.0, reason="Local",
                        signed=("OCMF|c",))
    store.write([Journal(start), Append("CP1", "StartTransaction", frame(1), -1)])
    store.write([Journal(meter), Journal(meter)])  # a retransmission changes nothing
    store.write([Journal(stop), Journal(start)])
    row = store.pending("CP1")[0].row
    store.write([Delivered(row, "CP1", -1, 1001)])
    [record] = opener().sessions(None, None)
    assert (record.charger, record.transaction, record.connector, record.id_tag) == ("CP1", "-1", 1, "TAG")
    assert (record.started, record.stopped) == ("2026-11-27T07:00:00Z", "2026-11-27T08:00:00Z")
    assert (record.meter_start_wh, record.meter_stop_wh, record.reason) == (100.0, 300.0, "Local")
    assert list(record.signed) == ["OCMF|a", "OCMF|b", "OCMF|c"] and record.backend_transaction == 1001
    assert store.last_local_tx("CP1") == -1
    assert store.sessions("2026-11-27T07:00:01Z", None) == []
    assert len(store.sessions("2026-11-27T07:00:00Z", "2026-11-27T07:00:01Z")) == 1


SIGNED_FRAME = ('[2, "m9", "MeterValues", {"connectorId": 2, "transactionId": 7, "meterValue": [{"timestamp": '
                '"2026-11-27T07:30:00Z", "sampledValue": [{"value": "1", "unit": "kWh"}, '
                '{ "value" : "OCMF|\\u00c4x" , "format": "SignedData"}]}]}]')


def _relayed_meter(n: int, wh: int) -> Relayed:
    """A relayed 1.6 MeterValues of transaction 7 with a reading and a signed value (the backend's answer too)."""
    text = ('[2, "m%d", "MeterValues", {"connectorId": 2, "transactionId": 7, "meterValue": [{"timestamp": '
            '"2026-11-27T07:%02d:00Z", "sampledValue": [{"value": "%d", "unit": "Wh"}, '
            '{ "value" : "OCMF|\\u00c4%d" , "format": "SignedData"}]}]}]' % (n, n, wh, n))
    return ("CP1", OcppVersion.V16, classify(text), classify('[3, "m%d", {}]' % n))


def test_relayed_frames_are_read_by_the_store_in_order_and_idempotently(opener: Opener) -> None:
    """LogRelayed: the store reads the frames itself (a run of readings, few of them parsed); the record is
    what each frame's entry gives, and writing the same frames again (a retried commit) changes nothing."""
    store = opener()
    start: Relayed = ("CP1", OcppVersion.V16,
                      classify('[2, "s1", "StartTransaction", {"connectorId": 2, "idTag": "T", "meterStart": 1000, '
                               '"timestamp": "2026-11-27T07:00:00Z"}]'),
                      classify('[3, "s1", {"transactionId": 7, "idTagInfo": {"status": "Accepted"}}]'))
    meters = [_relayed_meter(n, 1000 + 100 * n) for n in range(1, 6)]
    stop: Relayed = ("CP1", OcppVersion.V16,
                     classify('[2, "p1", "StopTransaction", {"transactionId": 7, "meterStop": 1700, '
                              '"timestamp": "2026-11-27T08:00:00Z", "reason": "EVDisconnected"}]'),
                     classify('[3, "p1", {}]'))
    batch = [start, *meters[:2]]
    store.write([LogRelayed(batch)])
    for _ in range(2):  # the second time as a commit retried whose outcome was not known: nothing changes
        store.write([LogRelayed(meters[2:]), LogRelayed([stop])])
    [record] = opener().sessions(None, None)
    assert (record.transaction, record.connector, record.id_tag, record.meter_start_wh) == ("7", 2, "T", 1000.0)
    assert (record.meter_stop_wh, record.meter_last_wh, record.reason) == (1700.0, 1700.0, "EVDisconnected")
    assert list(record.signed) == ['{ "value" : "OCMF|\\u00c4%d" , "format": "SignedData"}' % n for n in range(1, 6)]


def test_signed_frames_are_cut_when_read_and_recent_sessions_page(opener: Opener) -> None:
    """A stored frame gives back its signed sampledValues byte for byte; the status list is newest first."""
    store = opener()
    for n, charger in enumerate(("CP1", "CP2", "CP1", "CP1")):
        store.write([Journal(SessionEvent(charger, str(n), "start", f"s{n}", at=f"2026-11-27T07:0{n}:00Z",
                                          connector=1, meter_wh=0.0))])
    store.write([Journal(SessionEvent("CP1", "3", "meter", "m9", meter_wh=1000.0, signed_frame=SIGNED_FRAME)),
                 Journal(SessionEvent("CP1", "3", "meter", "m9", meter_wh=1000.0, signed_frame=SIGNED_FRAME)),
                 Journal(SessionEvent("CP1", "0", "stop", "x0", meter_wh=5.0, reason="EVDisconnected"))])
    records = {r.transaction: r for r in opener().sessions(None, None)}
    assert list(records["3"].signed) == ['{ "value" : "OCMF|\\u00c4x" , "format": "SignedData"}']
    newest = store.recent_sessions(None, None, None, 10)
    assert [(s.record.charger, s.record.transaction) for s in newest] == [("CP1", "3"), ("CP1", "2"), ("CP2", "1"),
                                                                          ("CP1", "0")]
    assert [s.signed for s in newest] == [True, False, False, False]
    assert (newest[0].record.meter_last_wh, newest[0].record.energy_wh, newest[0].record.stopped) == (1000.0, 1000.0,
                                                                                                       None)
    assert (newest[3].record.reason, newest[3].record.energy_wh) == ("EVDisconnected", 5.0)
    numbers = [s.number for s in newest]
    assert numbers == sorted(numbers, reverse=True)
    assert [s.record.transaction for s in store.recent_sessions("CP1", numbers[0], None, 1)] == ["2"]
    assert [s.record.transaction for s in store.recent_sessions(None, None, 1, 10)] == ["3", "1"]  # one each
    assert store.recent_sessions("CP9", None, None, 10) == []


async def test_group_commit_through_the_trio_front(opener: Opener) -> None:
    queue = AsyncQueue(opener())
    rows: dict[str, int] = {}

    async def wallbox(n: int) -> None:
        for k in range(10):
            rows[f"{n}/{k}"] = await queue.append(f"CP{n}", "MeterValues", f'[2,"{n}/{k}","MeterValues",{{}}]')

    async with trio.open_nursery() as nursery:
        for n in range(30):
            nursery.start_soon(wallbox, n)
    assert queue.committed_changes == 300
    assert queue.commits < 300 / 4, queue.commits  # many frames per transaction
    for n in range(30):
        assert [e.row for e in await queue.pending(f"CP{n}")] == [rows[f"{n}/{k}"] for k in range(10)]
    queue.close()


async def test_a_delivery_is_committed_and_its_caller_released_before_the_rest_of_its_batch(opener: Opener) -> None:
    """Until a delivery is committed a kill -9 re-sends its frame: it does not wait for the batch's fsync."""
    queue = AsyncQueue(opener())
    row, later = queue.storage.write([Append("CP1", "StartTransaction", frame(1), -1),
                                      Append("CP1", "MeterValues", frame(3))])
    assert row is not None and later is not None
    order: list[str] = []
    append = queue.enqueue(Append("CP2", "MeterValues", frame(2)))
    mark = queue.enqueue(MarkSent(later))  # the replay's next frame
    delivery = queue.enqueue(Delivered(row, "CP1", -1, 1001))  # one batch: enqueued while no commit runs

    async def settle(ticket: Ticket, name: str) -> None:
        assert (await queue.settled(ticket)).error is None
        order.append(name)

    commits = queue.commits
    async with trio.open_nursery() as nursery:
        nursery.start_soon(settle, append, "append")  # the leader: it writes the whole batch
        nursery.start_soon(settle, mark, "mark")
        nursery.start_soon(settle, delivery, "delivery")
    assert order[0] == "delivery" and sorted(order[1:]) == ["append", "mark"]
    assert queue.commits == commits + 2
    assert [e.action for e in await queue.pending("CP2")] == ["MeterValues"]
    assert [(e.row, e.attempts) for e in await queue.pending("CP1")] == [(later, 1)]
    assert await queue.transactions("CP1") == {-1: 1001}
    queue.close()


# --- PostgreSQL only: what SQLite has no counterpart for ------------------------------------

def test_a_lost_connection_is_a_storage_error_and_the_next_call_reconnects(
        pg_cluster: PgCluster, pg_url: str) -> None:
    store = PostgresStorage(pg_url)
    [row] = store.write([Append("CP1", "MeterValues", frame(1))])
    assert pg_cluster.terminate_connections(pg_url) >= 1
    with pytest.raises(StorageError) as lost:
        store.pending("CP1")
    assert lost.value.operation == "read"
    assert [e.row for e in store.pending("CP1")] == [row]  # connected again
    pg_cluster.terminate_connections(pg_url)
    with pytest.raises(StorageError) as lost_write:
        store.write([MarkSent(cast(int, row))])
    assert lost_write.value.operation == "mark"
    store.write([MarkSent(cast(int, row))])
    assert [e.attempts for e in store.pending("CP1")] == [1]
    store.close()


def test_an_unreachable_database_names_the_url_without_its_password(tmp_path: Path) -> None:
    url = f"postgresql://proxy:s3cret@/nowhere?host={tmp_path}&connect_timeout=2"
    with pytest.raises(StorageUnusable) as unusable:
        PostgresStorage(url)
    assert unusable.value.key == "[store] url"
    assert "s3cret" not in str(unusable.value.path) and "s3cret" not in unusable.value.detail
    assert str(unusable.value.path).startswith("postgresql://***@/nowhere")


# --- the contract as a state machine ----------------------------------------------------------

class QueueContract(RuleBasedStateMachine):
    """Any sequence of appends, marks, deliveries and new clients keeps pending() equal to a model."""

    def __init__(self, open_store: Opener) -> None:
        super().__init__()
        self.open_store = open_store
        self.store = open_store()
        self.model: dict[int, tuple[str, str, int]] = {}  # row → (charger, text, attempts)
        self.mapped: dict[str, dict[int, int]] = {}
        self.gone: list[int] = []
        self.count = 0

    @rule(charger=st.sampled_from(["A", "B"]), n=st.integers(1, 3))
    def append(self, charger: str, n: int) -> None:
        texts = [frame(self.count + k) for k in range(n)]
        self.count += n
        rows = self.store.write([Append(charger, "MeterValues", t) for t in texts])
        assert all(row is not None and row > max(self.model, default=0) for row in rows)
        for row, text in zip(rows, texts):
            self.model[cast(int, row)] = (charger, text, 0)

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, 10_000))
    def mark(self, pick: int) -> None:
        row = sorted(self.model)[pick % len(self.model)]
        self.store.write([MarkSent(row)])
        charger, text, attempts = self.model[row]
        self.model[row] = (charger, text, attempts + 1)

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, 10_000), backend=st.integers(1, 10**6))
    def deliver(self, pick: int, backend: int) -> None:
        row = sorted(self.model)[pick % len(self.model)]
        charger = self.model.pop(row)[0]
        self.store.write([Delivered(row, charger, -row, backend)])
        self.mapped.setdefault(charger, {})[-row] = backend
        self.gone.append(row)

    @precondition(lambda self: self.gone)
    @rule(pick=st.integers(0, 10_000))
    def repeat_for_a_gone_row(self, pick: int) -> None:
        row = self.gone[pick % len(self.gone)]
        self.store.write([Delivered(row, "A", None, None), MarkSent(row)])

    @rule()
    def new_client(self) -> None:
        self.store.close()
        self.store = self.open_store()

    @invariant()
    def pending_matches_the_model(self) -> None:
        for charger in ("A", "B"):
            expected = [(row, text, attempts) for row, (owner, text, attempts) in sorted(self.model.items())
                        if owner == charger]
            assert [(e.row, e.text, e.attempts) for e in self.store.pending(charger)] == expected
            assert self.store.transactions(charger) == self.mapped.get(charger, {})


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_the_queue_contract_holds_for_any_sequence(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The same state machine on both implementations, each example on empty storage."""
    opened: list[Storage] = []
    examples = itertools.count()

    def fresh() -> QueueContract:
        if kind == "sqlite":
            path = tmp_path / f"{next(examples)}.sqlite3"

            def open_store() -> Storage:
                opened.append(SqliteStorage(path))
                return opened[-1]
        else:
            url = cast(PgCluster, request.getfixturevalue("pg_cluster")).database()

            def open_store() -> Storage:
                opened.append(PostgresStorage(url))
                return opened[-1]
        return QueueContract(open_store)

    try:
        # A factory is what run_state_machine_as_test calls; its annotation asks for the class.
        run_state_machine_as_test(cast(type[QueueContract], fresh), settings=settings(max_examples=15, stateful_step_count=15))
    finally:
        for store in opened:
            store.close()
