"""The group commit's pipeline (proxy.storage.offline_queue.AsyncQueue, docs/storage.md "Group commit").

A real SQLite file whose commits can be held at the start (a disk that stalls:
:class:`StallingStorage` waits for the test's permit, then writes for real).
The rule: a frame waits at most for the commit in progress when it arrived and
for its own, so the next commit starts the moment one ends, before the callers
of the one that ended run (and before any of them has to lead it).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import trio

from proxy.messages.ocppj import classify
from proxy.messages.versions import OcppVersion
from proxy.storage.interface import Append, Change, Delivered, LogRelayed
from proxy.storage.offline_queue import AsyncQueue, SqliteStorage
from tests.opskit import wait_until


class StallingStorage(SqliteStorage):
    """Each commit waits for a permit (:meth:`let`) before it writes (the disk stalls), and says when it began."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mirrors=False)
        self._permits = threading.Semaphore(0)
        self.began: list[list[Change]] = []

    def let(self, commits: int = 1) -> None:
        """Let this many more commits write."""
        self._permits.release(commits)

    def write(self, changes: Sequence[Change]) -> list[int | None]:
        self.began.append(list(changes))
        assert self._permits.acquire(timeout=10), "the test never let this commit write"
        return super().write(changes)


def text(n: int) -> str:
    return f'[2,"{n}","MeterValues",{{"connectorId":1,"meterValue":[]}}]'


async def test_frames_that_arrive_during_a_commit_go_in_the_next_which_starts_before_the_first_callers_run(
        tmp_path: Path) -> None:
    storage = StallingStorage(tmp_path / "queue.sqlite3")
    queue = AsyncQueue(storage)
    seen_when_first_answered: list[tuple[bool, int]] = []

    async def first() -> None:
        await queue.append("CP1", "MeterValues", text(0))
        # The commit of the frames that waited is already handed to the thread, although no caller led it.
        seen_when_first_answered.append((queue._committing, len(queue._batch)))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await wait_until(lambda: len(storage.began) == 1)  # the first commit is at the disk, held
            later = [queue.enqueue(Append(f"CP{n}", "MeterValues", text(n))) for n in range(1, 6)]
            storage.let(2)
        assert seen_when_first_answered == [(True, 0)]
        with trio.fail_after(10):
            for ticket in later:
                await queue.appended(ticket)
        # Two commits: the five frames that arrived while the first was at the disk went together.
        assert [len(changes) for changes in storage.began] == [1, 5]
        assert queue.commits == 2 and queue.stats.samples["idle"] and len(queue.stats.samples["idle"]) == 2
        assert [e.text for e in storage.pending("CP3")] == [text(3)]
    finally:
        storage.let(10)
        queue.close()


async def test_deliveries_are_released_before_the_rest_of_their_batch_is_written(tmp_path: Path) -> None:
    """A mixed batch: the deliveries' own transaction (no fsync) first, its callers woken before the appends' commit."""
    storage = StallingStorage(tmp_path / "queue.sqlite3")
    queue = AsyncQueue(storage)
    try:
        storage.let()
        row = await queue.append("CP1", "MeterValues", text(0))
        blocker = queue.enqueue(Append("CP9", "MeterValues", text(9)))  # a commit in progress, held
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.appended, blocker)
            await wait_until(lambda: len(storage.began) == 2)
            delivery = queue.enqueue(Delivered(row, "CP1"))
            append = queue.enqueue(Append("CP2", "MeterValues", text(2)))
            storage.let(2)  # the blocker, then the deliveries' transaction; the appends' stays held
            await wait_until(lambda: delivery.done)
            await wait_until(lambda: len(storage.began) == 4)
            assert delivery.error is None and not append.done
            storage.let()
            await queue.appended(append)
        assert [type(c[0]).__name__ for c in storage.began] == ["Append", "Append", "Delivered", "Append"]
        assert storage.pending("CP1") == []
    finally:
        storage.let(10)
        queue.close()


async def test_a_read_waits_for_the_commit_in_progress_not_the_other_way(tmp_path: Path) -> None:
    """Reads take the connection only between commits (one thread at a time on it)."""
    storage = StallingStorage(tmp_path / "queue.sqlite3")
    queue = AsyncQueue(storage)
    depth: list[int] = []

    async def read() -> None:
        depth.append((await queue.depth("CP1"))[0])

    try:
        async with trio.open_nursery() as nursery:
            ticket = queue.enqueue(Append("CP1", "MeterValues", text(1)))
            nursery.start_soon(queue.appended, ticket)
            await wait_until(lambda: len(storage.began) == 1)
            nursery.start_soon(read)
            await wait_until(lambda: queue._limiter.borrowed_tokens == 1)  # the read's thread has started
            assert depth == []
            storage.let()
        assert depth == [1]  # it ran after the commit, and saw it (run beside it, it would have found 0)
    finally:
        storage.let(10)
        queue.close()


async def test_an_offline_frame_does_not_wait_for_the_session_log_of_relayed_frames_in_its_batch(
        tmp_path: Path) -> None:
    """Relayed frames for the session log (read in the worker thread: tens of ms for a second of them) are
    written after the appends of the same batch: the append's caller is released before that work starts."""
    storage = StallingStorage(tmp_path / "queue.sqlite3")
    queue = AsyncQueue(storage)
    start = classify('[2,"s","StartTransaction",{"connectorId":1,"idTag":"T","meterStart":0,'
                     '"timestamp":"2026-11-27T08:00:00Z"}]')
    try:
        blocker = queue.enqueue(Append("CP9", "MeterValues", text(9)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.appended, blocker)
            await wait_until(lambda: len(storage.began) == 1)  # a commit in progress, held
            relayed = queue.enqueue(LogRelayed([("CPR", OcppVersion.V16, start,
                                                 classify('[3,"s",{"transactionId":7,"idTagInfo":{}}]'))]))
            append = queue.enqueue(Append("CP1", "MeterValues", text(1)))
            storage.let(2)  # the blocker, then the append's transaction; the session log's stays held
            await wait_until(lambda: append.done)
            await wait_until(lambda: len(storage.began) == 3)
            assert append.error is None and not relayed.done
            storage.let()
            await wait_until(lambda: relayed.done)
        assert relayed.error is None
        assert [type(c[0]).__name__ for c in storage.began] == ["Append", "Append", "LogRelayed"]
        assert [s.transaction for s in storage.sessions(None, None)] == ["7"]
    finally:
        storage.let(10)
        queue.close()


async def test_close_writes_a_commit_whose_caller_was_cancelled_before_its_thread_ran(tmp_path: Path) -> None:
    """Shutdown: the sessions are cancelled while their commit is handed to a thread that has not run yet
    (here: a read holds the connection). close() waits for that commit before it closes the file."""
    storage = StallingStorage(tmp_path / "queue.sqlite3")
    storage.let(10)
    queue = AsyncQueue(storage)
    queue._connection.acquire()  # a read in progress: the commit's thread waits for the connection
    release = threading.Timer(0.3, queue._connection.release)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.append, "CP1", "MeterValues", text(1))
            await wait_until(lambda: queue._committing)
            nursery.cancel_scope.cancel()
        assert storage.began == []  # not written yet
        release.start()
        queue.close()  # waits for the commit in flight, which runs once the "read" is done
    finally:
        release.join()
    reopened = SqliteStorage(tmp_path / "queue.sqlite3", mirrors=False)
    try:
        assert [e.text for e in reopened.pending("CP1")] == [text(1)]
    finally:
        reopened.close()
