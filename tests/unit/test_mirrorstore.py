"""What secondaries are owed survives a restart of the proxy (SQLite)."""

from __future__ import annotations

from pathlib import Path

import structlog.testing
import trio
import trio.testing

from proxy.messages.ocppj import classify
from proxy.core.mirror import BOOT, Mirror, MirrorEvent, MirrorQueued, MirrorSend, MirrorState, MirrorUnqueued, TxMapped
from proxy.storage.interface import MirrorRecord as Record
from proxy.storage.secondary_store import MirrorStore
from tests.unit.test_mirror import boot, meter, start, status, stop


def records(events: list[MirrorEvent]) -> list[tuple[str, Record]]:
    return [("CP1", e) for e in events if isinstance(e, (TxMapped, MirrorQueued, MirrorUnqueued, MirrorState))]


def test_pairs_survive_reopening_and_stay_bounded(tmp_path: Path) -> None:
    path = tmp_path / "data" / "queue.sqlite3"
    store = MirrorStore(path, keep=3)
    for n in range(5):
        store.put("CP1", "ems", 1000 + n, 500 + n)
    store.put("CP1", "ha", 1000, 9)
    store.put("CP1", "ems", 1002, 777)  # a re-mapped id replaces the old pair and becomes the newest
    store.close()

    reopened = MirrorStore(path, keep=3)
    assert reopened.load("CP1", "ems") == {1003: 503, 1004: 504, 1002: 777}
    assert list(reopened.load("CP1", "ems")) == [1003, 1004, 1002]  # oldest first
    assert reopened.load("CP1", "ha") == {1000: 9}
    assert reopened.load("CP2", "ems") == {}
    reopened.close()


def test_a_mirror_rebuilt_from_the_store_continues_where_it_stopped(tmp_path: Path) -> None:
    store = MirrorStore(tmp_path / "queue.sqlite3")
    mirror = Mirror("ems", replay_rate=1e9)
    log: list[tuple[str, Record]] = []
    mirror.link_up(0)
    for n, text in enumerate([boot(), status("st1", 1, "Charging")]):
        log += records(mirror.offer(classify(text), n))
        log += records(mirror.from_upstream(classify(f'[3,"{classify(text).msg_id}",{{}}]'), n))
    log += records(mirror.offer(classify(start("s1")), 3))
    log += records(mirror.from_upstream(classify('[3,"s1",{"transactionId":55,"idTagInfo":{}}]'), 3))
    log += records(mirror.wallbox_transaction("s1", 1001))
    mirror.link_down()
    for n, text in enumerate([meter("m1", 1001), stop("x1", 1001)]):  # the secondary is away
        log += records(mirror.offer(classify(text), 10 + n))
    store.apply(log)
    store.close()

    restored = MirrorStore(tmp_path / "queue.sqlite3").restore()[("CP1", "ems")]
    assert restored.transactions == {1001: 55}
    assert restored.state == {BOOT: boot(), 1: status("st1", 1, "Charging")}
    assert [action for _, action, _ in restored.queued] == ["MeterValues", "StopTransaction"]
    again = Mirror("ems", replay_rate=1e9, transactions=restored.transactions, queued=restored.queued,
                   state=restored.state)
    assert again.depth == 2
    out: list[str] = []
    events = again.link_up(100)
    later: list[tuple[str, Record]] = []
    for n in range(10):
        later += records(events)
        out += [e.text for e in events if isinstance(e, MirrorSend)]
        if not again.depth:
            break
        events = again.from_upstream(classify(f'[3,"{classify(out[-1]).msg_id}",{{}}]'), 101 + n)
    later += records(events)
    assert [classify(t).action for t in out] == ["BootNotification", "StatusNotification", "MeterValues",
                                                "StopTransaction"]
    assert '"transactionId":55' in out[2] and '"transactionId":55' in out[3]
    # Frames the secondary acknowledged are gone from the store.
    new = MirrorStore(tmp_path / "queue.sqlite3")
    new.apply(later)
    assert new.restore()[("CP1", "ems")].queued == []


async def test_a_failing_store_is_logged_retried_and_the_writer_goes_on(tmp_path: Path) -> None:
    from proxy.config import loads
    from proxy.runtime.secondary import Secondaries
    from proxy.storage.offline_queue import DB_NAME, SqliteStorage

    config = loads(f'[offline]\ndata_dir = "{tmp_path}"\n[backend]\nurl = "ws://127.0.0.1:9/ocpp"\n'
                   '[backends.ems]\nurl = "ws://127.0.0.1:9/ems"\n[[chargers]]\nid = "CP1"\nsecondaries = ["ems"]\n')
    storage = SqliteStorage(tmp_path / DB_NAME)
    assert storage.mirrors is not None
    db = storage.mirrors._db
    secondaries = Secondaries(config)
    errors: list[tuple[str, str]] = []
    secondaries.on_error = lambda operation, detail: errors.append((operation, detail))
    secondaries.open(storage)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(secondaries.run)
        secondaries.record("CP1", MirrorQueued("ems", 1, "Heartbeat", '[2,"1","Heartbeat",{}]'))
        with trio.fail_after(10):
            await secondaries.written()
        assert storage.restore_mirrors()[("CP1", "ems")].queued == [(1, "Heartbeat", '[2,"1","Heartbeat",{}]')]
        db.execute("DROP TABLE secondary_frames")  # the disk "breaks" for this table
        with structlog.testing.capture_logs() as logged:
            secondaries.record("CP1", MirrorQueued("ems", 2, "Heartbeat", '[2,"2","Heartbeat",{}]'))
            with trio.fail_after(10):
                await secondaries.written()
        assert [e["event"] for e in logged] == ["secondary_store_failed"] and logged[0]["records"] == 1
        assert errors and errors[0][0] == "mirror" and errors[0][1]
        secondaries.record("CP1", TxMapped("ems", 1001, 5))  # still writing what it can
        with trio.fail_after(10):
            await secondaries.written()
        assert db.execute("SELECT wallbox_tx, upstream_tx FROM secondary_tx").fetchall() == [(1001, 5)]
        db.execute("CREATE TABLE secondary_frames (charger TEXT NOT NULL, upstream TEXT NOT NULL, "
                   "seq INTEGER NOT NULL, action TEXT NOT NULL, text TEXT NOT NULL, PRIMARY KEY (charger, upstream, seq))")
        with trio.fail_after(10):
            await secondaries.settled()  # the kept record is retried with backoff
        assert db.execute("SELECT seq FROM secondary_frames").fetchall() == [(2,)]
        assert errors[-1] == ("mirror", "")  # recovered
        nursery.cancel_scope.cancel()
    secondaries.close()
    storage.close()


async def test_records_taken_by_the_writer_when_shutdown_cancels_it_are_written_at_close(tmp_path: Path) -> None:
    """A session's last records wake the writer, and the shutdown cancels it in the same tick: it has taken
    the batch but its worker thread never ran. close() writes them (they were lost: a restarted proxy then
    missed the end of a dead secondary's queue, the flaky test_queue_for_a_dead_secondary_survives_a_proxy_restart)."""
    from proxy.config import loads
    from proxy.runtime.secondary import Secondaries
    from proxy.storage.offline_queue import DB_NAME, SqliteStorage

    config = loads(f'[offline]\ndata_dir = "{tmp_path}"\n[backend]\nurl = "ws://127.0.0.1:9/ocpp"\n'
                   '[backends.ems]\nurl = "ws://127.0.0.1:9/ems"\n[[chargers]]\nid = "CP1"\nsecondaries = ["ems"]\n')
    storage = SqliteStorage(tmp_path / DB_NAME)
    secondaries = Secondaries(config)
    secondaries.open(storage)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(secondaries.run)
        await trio.testing.wait_all_tasks_blocked()  # the writer waits for records
        secondaries.record("CP1", MirrorQueued("ems", 1, "StopTransaction", '[2,"9","StopTransaction",{}]'))
        nursery.cancel_scope.cancel()  # before the writer runs: it wakes cancelled
    secondaries.close()
    try:
        assert storage.restore_mirrors()[("CP1", "ems")].queued == [(1, "StopTransaction", '[2,"9","StopTransaction",{}]')]
    finally:
        storage.close()
