"""The storage interface's SQLite implementation on a full disk (real filesystem); the contract both
implementations keep, group commit included, is tests/unit/test_storage_contract.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from proxy.storage.interface import Append, StorageError, StorageUnusable
from proxy.storage.offline_queue import DB_NAME, AsyncQueue, SqliteStorage
from tests.diskfull import small_disk
from tests.opskit import wait_until


async def test_a_full_disk_refuses_appends_and_defers_deliveries_and_marks_until_space_returns(
        tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk:
        path = disk.path / DB_NAME
        errors: list[tuple[str, str]] = []
        queue = AsyncQueue(SqliteStorage(path), on_error=lambda op, detail: errors.append((op, detail)),
                           retry_min=0.01, retry_max=0.05)
        rows = [await queue.append("CP1", "MeterValues", f'[2,"{k}","MeterValues",{{}}]') for k in range(3)]
        disk.fill(path)
        with pytest.raises(StorageError) as refused:
            await queue.append("CP1", "MeterValues", '[2,"x","MeterValues",{}]')
        assert "full" in refused.value.detail
        await queue.mark_sent(rows[0])  # neither raises: kept and retried
        await queue.delivered(rows[0], "CP1", -1, 1001)
        assert queue.deferred == 2
        assert [op for op, _ in errors] == ["append", "mark", "deliver"]
        # Reads already show the outcome: the delivered frame is not replayed again.
        assert [e.row for e in await queue.pending("CP1")] == rows[1:]
        assert (await queue.depth("CP1"))[0] == 2 and await queue.transactions("CP1") == {-1: 1001}
        assert not await queue.flush_deferred()  # still full
        disk.free()
        assert await queue.flush_deferred()
        assert queue.deferred == 0 and errors[-1] == ("retry", "")
        queue.close()
        reopened = SqliteStorage(path)  # on disk now
        assert [e.row for e in reopened.pending("CP1")] == rows[1:] and reopened.transactions("CP1") == {-1: 1001}
        reopened.close()


async def test_the_retry_task_commits_deferred_deliveries_once_the_disk_has_room(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk:
        path = disk.path / DB_NAME
        queue = AsyncQueue(SqliteStorage(path), retry_min=0.01, retry_max=0.05)
        row = await queue.append("CP1", "MeterValues", '[2,"1","MeterValues",{}]')
        disk.fill(path)
        await queue.delivered(row, "CP1")
        assert queue.deferred == 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.retry_deferred)
            disk.free()
            await wait_until(lambda: not queue.deferred)  # the retry loop's own backoff is what is waited for
            nursery.cancel_scope.cancel()
        assert queue.storage.pending("CP1") == []
        queue.close()


def test_an_unusable_database_names_its_file(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageUnusable) as unusable:
        SqliteStorage(path)
    assert unusable.value.path == path and "not a database" in unusable.value.detail


def test_a_queue_written_before_sent_marks_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE frames (row INTEGER PRIMARY KEY AUTOINCREMENT, charger TEXT NOT NULL, "
                   "action TEXT NOT NULL, text TEXT NOT NULL, local_tx INTEGER, created REAL NOT NULL)")
        db.execute("INSERT INTO frames (charger, action, text, created) VALUES ('CP1', 'Heartbeat', 'h', 1)")
    storage = SqliteStorage(path)
    [entry] = storage.pending("CP1")
    assert entry.attempts == 0 and entry.text == "h"
    storage.write([Append("CP1", "Heartbeat", "h2")])
    storage.close()


def test_a_checkpoint_on_a_full_disk_is_counted_and_loses_nothing(tmp_path: Path) -> None:
    """A checkpoint copies WAL pages into the database file, which may have to grow: on a full disk it fails.
    Both the checkpoint thread's round and the writer's own catch-up count the failure (docs/storage.md,
    "Checkpoints") instead of raising into a commit, and the frames stay in the WAL until one succeeds."""
    with small_disk(tmp_path / "disk") as disk:
        path = disk.path / DB_NAME
        storage = SqliteStorage(path, mirrors=False)
        storage.checkpoints.stop()  # only the checkpoints this test runs
        frame = '[2,"{}","MeterValues",{{"v":"' + "7" * 900 + '"}}]'
        storage.write([Append("CP1", "MeterValues", frame.format(k)) for k in range(36)])
        storage.checkpoints.checkpoint()  # all copied back: the writer's next commit starts the WAL over
        storage.checkpoints.restart_pages = 1  # and makes its own catch-up due
        disk.fill()
        # The WAL file keeps its size, so a commit after the start-over needs no new blocks: it succeeds on
        # the full disk. Copying its frames into the database file needs new blocks: both checkpoints fail.
        rows = storage.write([Append("CP1", "MeterValues", frame.format(k)) for k in range(36, 40)])
        assert len(rows) == 4 and storage.checkpoints.stats.catch_ups == 1
        storage.checkpoints.checkpoint()
        stats = storage.checkpoints.stats
        assert stats.failures == 2 and "full" in stats.last_error, stats.summary()
        disk.free()
        storage.checkpoints.checkpoint()
        assert stats.failures == 2 and stats.runs == 2, stats.summary()
        storage.close()
        reopened = SqliteStorage(path, mirrors=False)
        assert len(reopened.pending("CP1")) == 40
        reopened.close()
