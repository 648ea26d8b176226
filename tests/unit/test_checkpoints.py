"""WAL checkpoints off the commit path (proxy.storage.checkpoints, docs/storage.md "Checkpoints").

Real SQLite files in a temp directory. A process killed with ``kill -9`` leaves
the database and WAL files as the kernel has them: the state machine copies
both at any point between its steps and opens the copy, as a restarted proxy
would, and every committed frame must be there (the end-to-end kill of a real
process under load is in tests/e2e/test_offline.py).
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import threading
from contextlib import closing
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy.storage.interface import Append, Delivered
from proxy.storage.offline_queue import SqliteStorage

FRAME = '[2,"m","MeterValues",{"connectorId":1,"meterValue":[{"sampledValue":[{"value":"' + "7" * 900 + '"}]}]}]'


def wal_pages(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size // 4096 if wal.exists() else 0


def quiet(storage: SqliteStorage) -> None:
    """Stop the checkpoint thread: only what the test calls checkpoints."""
    storage.checkpoints.stop()


def test_no_commit_checkpoints_by_itself(tmp_path: Path) -> None:
    """SQLite's default would checkpoint inside the commit that takes the WAL past 1000 pages (two more fsyncs
    a frame's answer waits for): the queue's connection never does; the checkpoint connection does, apart."""
    path = tmp_path / "queue.sqlite3"
    storage = SqliteStorage(path, mirrors=False)
    try:
        quiet(storage)
        before = path.stat().st_size
        for n in range(1500):
            storage.write([Append(f"CP{n % 7}", "MeterValues", FRAME)])
        assert wal_pages(path) > 1500  # past SQLite's 1000-page default, and nothing copied back
        assert path.stat().st_size == before
        storage.checkpoints.checkpoint()
        assert path.stat().st_size > before + 1000 * 1024  # the checkpoint connection copied the frames back
        assert storage.checkpoints.stats.runs == 1 and storage.checkpoints.stats.failures == 0
    finally:
        storage.close()


def test_the_wal_starts_over_under_endless_commits(tmp_path: Path) -> None:
    """A writer that never pauses never lets a passive checkpoint catch up; the writer's own catch-up
    after every ``restart_pages`` makes the WAL start over, so its file stays bounded (no RESTART needed)."""
    path = tmp_path / "queue.sqlite3"
    storage = SqliteStorage(path, mirrors=False)
    storage.checkpoints.interval = 0.01
    storage.checkpoints.restart_pages = 200
    try:
        for n in range(6000):
            storage.write([Append(f"CP{n % 7}", "MeterValues", FRAME), Append("CPX", "Heartbeat", "[2,\"h\",\"Heartbeat\",{}]")])
            if storage.checkpoints.stats.catch_ups >= 3:
                break
        stats = storage.checkpoints.stats
        assert stats.catch_ups >= 3, stats
        assert stats.restarts == 0 and stats.failures == 0, stats
        assert stats.most_pages < storage.checkpoints.limit_pages, stats
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT count(*) FROM frames").fetchone()[0] == 2 * (n + 1)
    finally:
        storage.close()


def test_a_busy_wal_keeps_its_file_when_it_starts_over(tmp_path: Path) -> None:
    """A WAL that starts over is overwritten in place, not cut back and grown again: growing the file makes
    every commit's fsync a file-system journal commit too, and cutting it frees blocks the disk must discard
    (docs/storage.md, "Checkpoints"). Its size never shrinks while the queue is busy."""
    path = tmp_path / "queue.sqlite3"
    storage = SqliteStorage(path, mirrors=False)
    storage.checkpoints.interval = 0.01
    storage.checkpoints.restart_pages = 1200  # 4.7 MiB: past the 4 MiB the file was once cut back to
    wal = Path(f"{path}-wal")
    try:
        largest = 0
        for n in range(20_000):
            storage.write([Append(f"CP{n % 7}", "MeterValues", FRAME), Append("CPX", "Heartbeat", "[2,\"h\",\"Heartbeat\",{}]")])
            size = wal.stat().st_size
            assert size >= largest, f"the WAL was cut from {largest} to {size} bytes after {n + 1} commits"
            largest = size
            if storage.checkpoints.stats.catch_ups >= 2:
                break
        assert storage.checkpoints.stats.catch_ups >= 2, storage.checkpoints.stats
        assert largest > 1200 * 4096
    finally:
        storage.close()


def test_a_wal_past_the_limit_is_restarted(tmp_path: Path) -> None:
    """The bound on the file when the writer's catch-up cannot run: a RESTART checkpoint from the thread."""
    path = tmp_path / "queue.sqlite3"
    storage = SqliteStorage(path, mirrors=False)
    try:
        quiet(storage)
        storage.checkpoints.limit_pages = 300
        for n in range(400):
            storage.write([Append("CP1", "MeterValues", FRAME)])
        storage.checkpoints.checkpoint()
        assert storage.checkpoints.stats.restarts == 1
        storage.write([Append("CP1", "MeterValues", FRAME)])  # starts at the WAL's beginning again
        storage.checkpoints.checkpoint()
        assert storage.checkpoints.stats.most_pages > 300
        _, pages, _ = storage.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert pages < 10
    finally:
        storage.close()


def test_close_stops_the_thread(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "queue.sqlite3", mirrors=False)
    storage.write([Append("CP1", "Heartbeat", "[2,\"h\",\"Heartbeat\",{}]")])
    thread = storage.checkpoints._thread
    assert thread.is_alive()
    storage.close()
    assert not thread.is_alive() and thread not in threading.enumerate()


class KilledAnyTime(RuleBasedStateMachine):
    """Invariant: whatever the checkpoints did, a process killed now leaves every committed, undelivered frame."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ckpt-"))
        self.storage = SqliteStorage(self.dir / "queue.sqlite3", mirrors=False)
        quiet(self.storage)
        self.storage.checkpoints.restart_pages = 8
        self.storage.checkpoints.limit_pages = 40
        self.rows: dict[int, str] = {}

    @rule(count=st.integers(1, 30), size=st.integers(10, 3000))
    def append(self, count: int, size: int) -> None:
        texts = [f'[2,"{n}","DataTransfer",{{"data":"{"x" * size}"}}]' for n in range(count)]
        rows = self.storage.write([Append("CP1", "DataTransfer", text) for text in texts])
        self.rows.update((int(row or 0), text) for row, text in zip(rows, texts))

    @precondition(lambda self: bool(self.rows))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        row = data.draw(st.sampled_from(sorted(self.rows)))
        self.storage.write([Delivered(row, "CP1")])
        del self.rows[row]

    @rule()
    def checkpoint(self) -> None:
        """The checkpoint thread's round (passive; restarting past the limit)."""
        self.storage.checkpoints.checkpoint()

    @rule()
    def writer_catches_up(self) -> None:
        if self.storage.checkpoints.due():
            self.storage._catch_up()

    @invariant()
    def a_kill_now_loses_nothing_committed(self) -> None:
        copy = Path(tempfile.mkdtemp(prefix="ckpt-killed-"))
        try:
            for suffix in ("", "-wal"):
                source = Path(f"{self.storage.path}{suffix}")
                if source.exists():
                    shutil.copyfile(source, copy / f"queue.sqlite3{suffix}")
            with closing(sqlite3.connect(copy / "queue.sqlite3")) as db:
                found = dict(db.execute("SELECT row, text FROM frames").fetchall())
            assert found == self.rows
        finally:
            shutil.rmtree(copy)

    def teardown(self) -> None:
        self.storage.close()
        shutil.rmtree(self.dir)


TestKilledAnyTime = KilledAnyTime.TestCase
TestKilledAnyTime.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
