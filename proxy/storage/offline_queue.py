"""The SQLite implementation of :class:`~proxy.storage.interface.Storage`, and its trio front.

:class:`SqliteStorage`: one file in ``[offline] data_dir`` (WAL). The offline
queue's connection commits with ``synchronous=FULL``: a CALL answered locally
is on disk before its answer goes out, so a crash (``kill -9``) or a power cut
loses nothing the wallbox was told was received. The secondaries' mirrors are
in the same file (:mod:`proxy.storage.secondary_store`, their own connection).

:class:`AsyncQueue` is what sessions use, from trio:

* **Group commit.** Appends, sent-marks and deliveries from every session are
  collected while one commit runs and go to the disk together in the next one
  (one transaction, one fsync), in a worker thread, so a slow disk never
  blocks the event loop and 100 wallboxes answered offline cost one fsync per
  batch instead of one per frame. Each caller still returns only after its own
  change is committed. The next commit starts the moment one ends (the event
  loop hands it to the thread before it wakes the callers of the one that
  ended), so a frame waits at most for the commit in progress and its own.
* **Storage trouble never ends a session.** An append that fails is reported
  to its caller (the frame is refused with a CALLERROR, nothing else). A
  sent-mark or a delivery that fails is kept in memory and retried with
  backoff (they are idempotent) while reads act as if it had been committed,
  so a delivered frame is not replayed again by this process. Every failure is
  reported to ``on_error`` (log event and metric) and the recovery too.
* **The session log of relayed chargers costs the event loop next to nothing.**
  :meth:`AsyncQueue.log_later` only keeps a reference to the frames;
  :meth:`AsyncQueue.commit_behind` hands them to the store once a second (or
  every :data:`LATER_BATCH` frames) as one :class:`LogRelayed`, and the store
  reads them into session-log entries in its worker thread, pausing for the
  event loop every millisecond, and commits them in one transaction: one
  fsync a second, not one per meter reading (docs/standalone.md, "What the
  log costs").
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from proxy.core.backoff import Backoff
from proxy.core.offline import Stored
from proxy.storage.interface import (
    Append,
    Change,
    Delivered,
    Journal,
    LogRelayed,
    MarkSent,
    MirrorRecord,
    RestoredMirror,
    Storage,
    StorageError,
    StorageUnusable,
    change_runs,
    write_operation,
)
from proxy.storage import session_log
from proxy.storage.checkpoints import RESTART_PAGES, Checkpointer
from proxy.storage.commit_stats import CommitStats
from proxy.storage.queue_reads import QueueReads
from proxy.storage.secondary_store import MirrorStore
from proxy.core.sessionlog import MeterRun, Relayed, SessionEvent, SessionRecord, SessionSummary
from proxy.core.sessionlog import plan_relayed, planned_events, run_events
from proxy.messages.ocppj import Frame
from proxy.messages.versions import OcppVersion

T = TypeVar("T")

#: Seconds relayed transaction frames wait for the session log's next batch (at most).
LATER_INTERVAL = 1.0
#: A batch starts at once when this many relayed frames wait (the more frames of a charger in one batch, the
#: fewer are parsed: :func:`plan_relayed`; the store reads them in its thread, pausing for the event loop).
LATER_BATCH = 10_000
#: Relayed frames kept while the store cannot keep up (failing or far too slow); beyond, the oldest are
#: dropped and counted (``later_dropped``): the backend, the authority for those chargers, has them.
LATER_LIMIT = 200_000
#: Seconds the store's thread reads relayed frames before it pauses (:meth:`SqliteStorage._log_relayed`) ...
_LOG_HOLD = 0.001
#: ... and the pause, so that a waiting event loop gets the GIL.
_LOG_PAUSE = 0.0002
#: Session-log entries of relayed frames applied together (one multi-row insert of their signed frames).
_LOG_APPLY = 500


#: Bytes of WAL file kept after a checkpoint let it start over (SQLite truncates it to this): twice the
#: WAL's size at a normal start-over, so a busy queue overwrites the file it has instead of cutting it
#: and growing it again (docs/storage.md, "Checkpoints").
WAL_KEEP_BYTES = 2 * RESTART_PAGES * 4096

#: The file in ``[offline] data_dir`` (shared by the offline queue and the secondaries' mirrors).
DB_NAME = "queue.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    charger TEXT NOT NULL,
    action TEXT NOT NULL,
    text TEXT NOT NULL,
    local_tx INTEGER,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS frames_by_charger ON frames (charger, row);
CREATE TABLE IF NOT EXISTS transactions (
    charger TEXT NOT NULL,
    local_tx INTEGER NOT NULL,
    backend_tx INTEGER NOT NULL,
    PRIMARY KEY (charger, local_tx)
);
CREATE TABLE IF NOT EXISTS counters (
    charger TEXT PRIMARY KEY,
    last_local_tx INTEGER NOT NULL
);
"""


class SqliteStorage(QueueReads):
    """:class:`~proxy.storage.interface.Storage` in one SQLite file (blocking; see :class:`AsyncQueue`)."""

    def __init__(self, path: Path, *, mirrors: bool = True) -> None:
        self.path = path
        self.location = str(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            # Checkpoints run on their own connection and thread (proxy.storage.checkpoints), never inside a
            # commit a wallbox's answer waits for; the WAL file keeps its size (WAL_KEEP_BYTES).
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self.db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
            self._durable = True
            self.db.executescript(_SCHEMA + session_log.SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(frames)")}
            if "attempts" not in columns:  # a queue written before sent-marks existed
                self.db.execute("ALTER TABLE frames ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
            if "subprotocol" not in columns:
                self.db.execute("ALTER TABLE frames ADD COLUMN subprotocol TEXT")
            self.db.execute("SELECT count(*) FROM frames").fetchone()
            self.checkpoints = Checkpointer(path)
            self.mirrors = MirrorStore(path) if mirrors else None
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnusable(path, _detail(exc)) from exc

    def close(self) -> None:
        self.checkpoints.close()
        self.db.close()
        if self.mirrors is not None:
            self.mirrors.close()

    # -- writes -------------------------------------------------------------------------

    def write(self, changes: Sequence[Change]) -> list[int | None]:
        """One transaction with as few statements as the batch allows.

        Every statement is a round trip through the GIL for the worker thread
        that runs this, and on a busy event loop each one can wait for the
        loop's switch interval (5 ms): runs of appends become one multi-row
        INSERT, runs of marks or deliveries one UPDATE or DELETE.
        """
        results: list[int | None] = []
        db = self.db
        try:
            # Deliveries alone need no fsync (docs/storage.md): a power cut that undoes one only makes
            # the proxy send an already marked frame again. Their commit is the window in which a kill
            # makes the backend see a frame twice, so it is kept short.
            durable = not all(type(change) is Delivered for change in changes)
            if durable != self._durable:
                db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._durable = durable
            runs = change_runs(changes)
            if len(runs) == 1 and type(changes[0]) is Append and not any(c.local_tx for c in changes):  # type: ignore[union-attr]
                # Frames without a local transaction id (most of them): one INSERT is one transaction
                # already (autocommit), without the round trips of BEGIN and COMMIT.
                results = self._append(changes)  # type: ignore[arg-type]
            else:
                with db:
                    db.execute("BEGIN IMMEDIATE")
                    for run in runs:
                        results += self._apply(run)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(write_operation(changes), _detail(exc)) from exc
        self.checkpoints.wrote()
        if self.checkpoints.due():
            self._catch_up()
        return results

    def _catch_up(self) -> None:
        """Checkpoint the few pages the checkpoint thread left, so the next commit starts the WAL over.

        This commit's callers wait for it (one more fsync, of the database file,
        once per :data:`~proxy.storage.checkpoints.RESTART_PAGES` of WAL, instead
        of a whole checkpoint four times a second). A failure changes nothing
        committed: it is counted, and the checkpoint thread goes on.
        """
        try:
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            self.checkpoints.stats.failed(_detail(exc))

    def _apply(self, run: Sequence[Change]) -> list[int | None]:
        """One run of changes of one kind."""
        first = run[0]
        if isinstance(first, Append):
            return self._append(run)  # type: ignore[arg-type]
        if isinstance(first, Journal):
            session_log.apply(self.db, [change.event for change in run])  # type: ignore[union-attr]
            return [None] * len(run)
        if isinstance(first, LogRelayed):  # read here, in the worker thread, not on the event loop
            self._log_relayed([f for change in run for f in change.frames])  # type: ignore[union-attr]
            return [None] * len(run)
        rows = [change.row for change in run]  # type: ignore[union-attr]
        marks = ",".join("?" * len(rows))
        if isinstance(first, MarkSent):
            self.db.execute(f"UPDATE frames SET attempts = attempts + 1 WHERE row IN ({marks})", rows)
            return [None] * len(run)
        pairs = [(c.charger, c.local_tx, c.backend_tx) for c in run  # type: ignore[union-attr]
                 if c.local_tx is not None and c.backend_tx is not None]  # type: ignore[union-attr]
        if pairs:
            self.db.executemany("INSERT OR REPLACE INTO transactions VALUES (?, ?, ?)", pairs)
        self.db.execute(f"DELETE FROM frames WHERE row IN ({marks})", rows)
        return [None] * len(run)

    def _log_relayed(self, frames: Sequence[Relayed]) -> None:
        """Read relayed frames into the session log and apply them, pausing so that the event loop can run.

        A charger's meter readings of one transaction form a run
        (:func:`plan_relayed`); when its record already has a meter start
        (``session_log.begun``), only the run's last reading is parsed.

        This thread holds the GIL while it reads and builds rows, and a thread
        that keeps taking it back (each SQLite statement lets it go and takes it
        again) can keep the event loop waiting for several switch intervals
        (5 ms each). So once it has held it for :data:`_LOG_HOLD` it sleeps
        :data:`_LOG_PAUSE`: the event loop, if it is waiting, gets the GIL at
        once. The entries are applied in order, up to :data:`_LOG_APPLY` at a
        time, so the log ends as applying them one by one would leave it.
        """
        db = self.db
        rows: session_log.Rows = {}  # each record looked up once in the batch
        pending: list[SessionEvent] = []  # entries not applied yet (applied together: fewer statements)
        keys: set[tuple[str, str]] = set()  # their records
        held = time.perf_counter()

        def flush() -> None:
            session_log.apply(db, pending, rows)
            pending.clear()
            keys.clear()

        def pause() -> None:
            nonlocal held
            if time.perf_counter() - held >= _LOG_HOLD:
                if pending:
                    flush()
                time.sleep(_LOG_PAUSE)
                held = time.perf_counter()

        for item in plan_relayed(frames, pause):
            if type(item) is MeterRun:
                first = len(item.frames) == 1
                if not first:
                    key = (item.charger, str(item.transaction))
                    if key in keys:  # begun() reads the record as the entries before this run leave it
                        flush()
                    first = not session_log.begun(db, *key, rows)
                made = run_events(item, first)
            else:
                made = planned_events(item)
            pending += made
            keys.update((event.charger, event.transaction) for event in made)
            if len(pending) >= _LOG_APPLY:
                flush()
            pause()
        if pending:
            flush()

    def _append(self, run: Sequence[Append]) -> list[int | None]:
        # One INSERT for the run: holding the write lock, AUTOINCREMENT numbers its rows consecutively.
        now = time.time()
        values = [v for a in run for v in (a.charger, a.action, a.text, a.local_tx, now, a.subprotocol)]
        cursor = self.db.execute("INSERT INTO frames (charger, action, text, local_tx, created, subprotocol) VALUES "
                                 + ",".join(["(?, ?, ?, ?, ?, ?)"] * len(run)), values)
        last = int(cursor.lastrowid or 0)
        counters = [(a.charger, a.local_tx) for a in run if a.local_tx is not None]
        if counters:
            self.db.executemany("INSERT INTO counters VALUES (?, ?) ON CONFLICT(charger) DO UPDATE "
                                "SET last_local_tx = min(last_local_tx, excluded.last_local_tx)", counters)
        return list(range(last - len(run) + 1, last + 1))

    # -- reads --------------------------------------------------------------------------

    def _rows(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        try:
            return list(self.db.execute(sql, args))
        except (sqlite3.Error, OSError) as exc:
            raise StorageError("read", _detail(exc)) from exc

    def sessions(self, since: str | None, until: str | None) -> list[SessionRecord]:
        try:
            return session_log.read(self.db, since, until)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError("read", _detail(exc)) from exc

    def recent_sessions(self, charger: str | None, before: int | None, per_charger: int | None,
                        limit: int) -> list[SessionSummary]:
        try:
            return session_log.recent(self.db, charger, before, per_charger, limit)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError("read", _detail(exc)) from exc

    # -- secondaries' mirrors ------------------------------------------------------------

    def write_mirrors(self, records: Sequence[tuple[str, MirrorRecord]]) -> None:
        assert self.mirrors is not None
        try:
            self.mirrors.apply(records)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError("mirror", _detail(exc)) from exc

    def restore_mirrors(self) -> dict[tuple[str, str], RestoredMirror]:
        assert self.mirrors is not None
        try:
            return self.mirrors.restore()
        except (sqlite3.Error, OSError) as exc:
            raise StorageError("read", _detail(exc)) from exc


#: Changes that touch only the queue's tables: they may be written before session-log work of the same batch.
_QUEUE_ONLY = (Append, MarkSent)


def _parts(batch: list[_Slot]) -> list[list[_Slot]]:
    """``batch`` as the transactions to write, in order, each released to its callers as it is committed.

    Deliveries go first, in a transaction of their own without an fsync
    (docs/storage.md): until a delivery is committed, a kill -9 makes the
    replay send that frame again, so it does not wait for the others' fsync.
    Relayed frames for the session log (:class:`LogRelayed`, a second of a
    relayed charger's frames, read in the worker thread: tens of ms) go after
    the appends and sent-marks of the same batch, so no wallbox answered
    offline waits for them. The session log's own entries keep their order
    (Journal and LogRelayed stay together, as enqueued).
    """
    deliveries = [slot for slot in batch if type(slot.change) is Delivered]
    if deliveries and len(deliveries) < len(batch):
        parts, rest = [deliveries], [slot for slot in batch if type(slot.change) is not Delivered]
    else:
        parts, rest = [], batch
    if any(type(slot.change) is LogRelayed for slot in rest):
        first = [slot for slot in rest if type(slot.change) in _QUEUE_ONLY]
        if first and len(first) < len(rest):
            return parts + [first, [slot for slot in rest if type(slot.change) not in _QUEUE_ONLY]]
    return parts + [rest]


def _ignore(outcome: object) -> None:
    """``start_thread_soon``'s delivery: a commit reports through the trio token itself (AsyncQueue._settle)."""


def _detail(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


# --- trio front -------------------------------------------------------------------------

#: Reports a storage failure (operation, detail) or, with an empty detail, a recovery.
ErrorHook = Callable[[str, str], None]


@dataclass(eq=False)
class _Slot:
    change: Change
    #: perf_counter when the change joined the batch (CommitStats).
    enqueued: float = field(default_factory=time.perf_counter)
    done: bool = False
    result: int | None = None
    error: StorageError | None = None
    #: A session-log entry written behind: nobody waits for it, so a failed commit puts it back.
    behind: bool = False
    deferred: bool = False


#: A change enqueued for the next commit (:meth:`AsyncQueue.enqueue`): its row or error once settled.
Ticket = _Slot


@dataclass
class _Deferred:
    """Sent-marks and deliveries whose commit failed: retried, and already applied to reads."""

    changes: list[MarkSent | Delivered] = field(default_factory=list)
    #: Rows delivered but not yet deleted on disk (hidden from pending/depth).
    gone: dict[int, str] = field(default_factory=dict)
    marks: dict[int, int] = field(default_factory=dict)
    mapped: dict[str, dict[int, int]] = field(default_factory=dict)


class AsyncQueue:
    """The storage for trio code: group commit, one worker thread, deferred retries."""

    def __init__(self, storage: Storage, *, on_error: ErrorHook | None = None,
                 retry_min: float = 0.5, retry_max: float = 30.0) -> None:
        self.storage = storage
        self.on_error = on_error
        self._limiter = trio.CapacityLimiter(1)
        #: One thread at a time uses the store's connection: the commit in progress, or a read.
        self._connection = threading.Lock()
        self._batch: list[_Slot] = []
        self._committing = False
        #: Set while no commit is with a worker thread (close() waits for the one in flight).
        self._idle = threading.Event()
        self._idle.set()
        #: When the last commit ended (perf_counter, in the worker thread).
        self._last_ended = 0.0
        self._closed = False
        self._committed = trio.Event()
        self._deferred = _Deferred()
        self._retry_wake = trio.Event()
        self._behind_wake = trio.Event()
        self._backoff = Backoff(retry_min, retry_max)
        #: Pauses between commits of entries written behind while those commits fail.
        self._behind_backoff = Backoff(retry_min, retry_max)
        self._behind_failed = False
        self._failing = False
        #: Commits done and changes committed (the benchmark reports changes per commit).
        self.commits = 0
        self.committed_changes = 0
        #: Seconds spent in commits (worker thread hop included).
        self.commit_seconds = 0.0
        #: Where a commit's time goes (logged as ``queue_stats`` at shutdown).
        self.stats = CommitStats()
        #: Relayed transaction frames not yet read into the session log (:meth:`log_later`).
        self._later: deque[Relayed] = deque()
        #: Relayed frames dropped because LATER_LIMIT were waiting.
        self.later_dropped = 0

    @property
    def deferred(self) -> int:
        """Sent-marks and deliveries waiting for a retry."""
        return len(self._deferred.changes)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` (a read, a retry) in a worker thread, never while a commit uses the connection."""
        return await trio.to_thread.run_sync(self._exclusive, fn, *args, limiter=self._limiter)

    def _exclusive(self, fn: Callable[..., T], *args: object) -> T:
        with self._connection:
            return fn(*args)

    # -- writes ---------------------------------------------------------------------

    async def append(self, charger: str, action: str, text: str, local_tx: int | None = None,
                     subprotocol: str | None = None) -> int:
        """Commit one frame (with whatever else is waiting); raises StorageError if it could not be stored."""
        return await self.appended(self.enqueue(Append(charger, action, text, local_tx, subprotocol)))

    async def journal(self, events: Sequence[SessionEvent]) -> None:
        """Commit session-log entries (with whatever else is waiting); raises StorageError if they were not."""
        for charger in {event.charger for event in events}:
            self._take_later(charger)  # the log's order is the frames' order
        for slot in [self.enqueue(Journal(event)) for event in events]:
            await self.settled(slot, raise_error=True)

    def enqueue(self, change: Change) -> Ticket:
        """Put ``change`` in the next commit now, without waiting; :meth:`settled` waits for it.

        A session enqueues each frame as it reads it and waits for the commit
        separately (docs/storage.md, "Pipelining"), so a wallbox's frames that
        arrive while one commit runs all go to the disk in the next one, in the
        order they were read.
        """
        slot = _Slot(change)
        self._batch.append(slot)
        self._behind_wake.set()  # commit_behind starts the next commit as soon as the current one ends
        return slot

    async def appended(self, ticket: Ticket) -> int:
        """The row of an enqueued :class:`Append` once committed; raises StorageError if it could not be stored."""
        slot = await self.settled(ticket, raise_error=True)
        assert slot.result is not None
        return slot.result

    async def settled(self, ticket: Ticket, *, raise_error: bool = False) -> Ticket:
        """Wait until ``ticket``'s change is committed (or failed: a mark or delivery is then deferred)."""
        slot = await self._commit(ticket)
        if raise_error and slot.error is not None:
            raise slot.error
        return slot

    def journal_behind(self, events: Sequence[SessionEvent]) -> None:
        """Queue session-log entries for the next commit without waiting for it (the caller answers at once).

        They join the batch now (after the charger's relayed frames still
        waiting), so a later awaited change (a StopTransaction's entry) commits
        with or after them: the log's order is the frames' order.
        :meth:`commit_behind` (run by the server) commits them when nobody else does.
        """
        for charger in {event.charger for event in events}:
            self._take_later(charger)
        self._batch.extend(_Slot(Journal(event), behind=True) for event in events)
        self._behind_wake.set()

    def log_later(self, charger: str, version: OcppVersion, call: Frame, answer: Frame) -> None:
        """Keep a relayed transaction frame for the session log's next batch (nothing is parsed now).

        For a charger with a backend the backend is the authority and the answer
        has gone out already; the frame becomes an entry within
        :data:`LATER_INTERVAL` seconds (:meth:`commit_behind`), in order with
        the charger's other entries.
        """
        later = self._later
        if len(later) >= LATER_LIMIT:
            later.popleft()
            self.later_dropped += 1
        later.append((charger, version, call, answer))
        if len(later) == 1 or len(later) == LATER_BATCH:  # the first starts the interval; a full batch ends it
            self._behind_wake.set()

    @property
    def later(self) -> int:
        """Relayed frames waiting for the session log's next batch."""
        return len(self._later)

    async def commit_behind(self, interval: float = LATER_INTERVAL) -> None:
        """Commit write-behind entries and relayed frames, until cancelled (the server runs this).

        Whatever is enqueued goes the moment no commit runs (the next batch gathers
        while the current one commits); relayed frames (:meth:`log_later`) wait up
        to ``interval`` to be read and committed together.
        """
        while True:
            await self._behind_wake.wait()
            self._behind_wake = trio.Event()
            if not self._batch and len(self._later) < LATER_BATCH:
                with trio.move_on_after(interval):  # let relayed frames gather (or a batch fill up)
                    await self._behind_wake.wait()
                self._behind_wake = trio.Event()
            if not self._behind_failed:  # while commits fail, relayed frames wait where they are (bounded)
                self._read_later()
            while self._batch:
                if self._committing:
                    await self._committed.wait()
                else:
                    await self._commit_batch()
                if self._behind_failed:  # the disk failed them: try again after a pause, not at once
                    await trio.sleep(self._behind_backoff.next_delay())
            self._behind_backoff.reset()
            if self._later:  # frames left behind (commits were failing): the next round reads them
                self._behind_wake.set()

    def _read_later(self) -> None:
        """Hand the waiting relayed frames to the next commit; the store reads them in its worker thread."""
        if self._later:
            self._batch.append(_Slot(LogRelayed(list(self._later)), behind=True))
            self._later.clear()

    def _take_later(self, charger: str) -> None:
        """Read ``charger``'s waiting relayed frames into the batch now (its awaited entry comes after them)."""
        if not self._later:
            return
        mine = [entry for entry in self._later if entry[0] == charger]
        if not mine:
            return
        others = [entry for entry in self._later if entry[0] != charger]
        self._later.clear()
        self._later.extend(others)
        self._batch.append(_Slot(LogRelayed(mine), behind=True))

    async def mark_sent(self, row: int) -> None:
        """Mark ``row`` sent before it goes out; a failure is retried later and never raised."""
        await self._commit(self.enqueue(MarkSent(row)))

    async def delivered(self, row: int, charger: str, local_tx: int | None = None,
                        backend_tx: int | None = None) -> None:
        """Forget a replayed frame (and record its transaction id pair); failures are retried, never raised."""
        await self._commit(self.enqueue(Delivered(row, charger, local_tx, backend_tx)))

    async def _commit(self, slot: _Slot) -> _Slot:
        change = slot.change
        while not slot.done:
            if not self._committing:
                self._start_commit()
            await self._committed.wait()
        if slot.error is not None and isinstance(change, (MarkSent, Delivered)) and not slot.deferred:
            slot.deferred = True
            self._defer(change, slot.error)
        return slot

    async def _commit_batch(self) -> None:
        """Commit everything waiting and return once it is committed (or wait for the commit in progress)."""
        if self._committing:
            await self._committed.wait()
            return
        batch = self._start_commit()
        while batch and not batch[-1].done:
            await self._committed.wait()

    def _start_commit(self) -> list[_Slot]:
        """Hand everything waiting to a worker thread as the next commit; :meth:`_settle` ends it.

        No task waits for the thread: when a commit ends, :meth:`_settle` (run by
        the event loop as soon as the thread reports) starts the next one at once
        if anything waits, before the answers of the one that ended go out, so
        the disk never idles while frames wait and a frame waits at most for the
        commit in progress and its own (docs/storage.md, "Group commit").

        A batch may be written as up to three transactions (:func:`_parts`).
        """
        batch, self._batch = self._batch, []
        if not batch:
            return batch
        self._committing = True
        now = time.perf_counter()
        self.stats.add("idle", now - max(self._last_ended, batch[0].enqueued))  # waited while no commit ran
        self._idle.clear()
        trio.lowlevel.start_thread_soon(
            functools.partial(self._write_parts, trio.lowlevel.current_trio_token(), _parts(batch), now),
            _ignore)
        return batch

    def _write_parts(self, token: trio.lowlevel.TrioToken, parts: list[list[_Slot]], started: float) -> None:
        """In the worker thread: one :meth:`Storage.write` per part, each reported to :meth:`_settle` at once."""
        for number, part in enumerate(parts):
            last = number == len(parts) - 1
            with self._connection:
                began = time.perf_counter()
                changes = [slot.change for slot in part]
                try:
                    results, error = self.storage.write(changes), None
                except StorageError as exc:
                    results, error = [], exc
                except Exception as exc:  # a bug: its callers get a storage error rather than wait for ever
                    results, error = [], StorageError(write_operation(changes), _detail(exc))
                ended = time.perf_counter()
            if last:  # written: close() need not wait (before _settle, which may start the next commit)
                self._idle.set()
            try:
                token.run_sync_soon(self._settle, part, results, error, started, began, ended, last)
            except trio.RunFinishedError:  # the event loop is gone (shutdown): nobody waits any more
                self._idle.set()
                return
            started = ended

    def _settle(self, batch: list[_Slot], results: list[int | None], error: StorageError | None,
                started: float, began: float, ended: float, last: bool) -> None:
        """In the event loop: ``batch`` is committed (or failed); start the next commit, then wake its callers."""
        resumed = time.perf_counter()
        stats = self.stats
        if error is None:
            stats.add("gather", started - batch[0].enqueued)
            stats.add("hop_in", began - started)
            stats.add("work", ended - began)
            stats.add("hop_out", resumed - ended)
            stats.add("batch", len(batch))
            stats.worked(began, ended)
            for slot, result in zip(batch, results):
                slot.result = result
                kind = type(slot.change)
                if kind is Append:
                    stats.add("enqueue_to_commit", resumed - slot.enqueued)
                elif kind is Delivered:
                    stats.add("deliver_to_commit", resumed - slot.enqueued)
            self.commits += 1
            self.committed_changes += len(batch)
            self._behind_failed = False
            if self._failing:
                self._report("write", "")
        else:
            for slot in batch:
                slot.error = error
            # Entries written behind have no caller to tell: they wait for the next commit (commit_behind
            # tries again after a pause). Applying a Journal twice changes nothing.
            again = [_Slot(slot.change, behind=True) for slot in batch if slot.behind]
            self._batch[:0] = again
            self._behind_failed = bool(again)
            self._report(error.operation, error.detail)
        self.commit_seconds += resumed - began
        for slot in batch:
            slot.done = True
        if last:
            self._committing = False
            self._last_ended = ended
            # The next commit starts before this one's callers run. After a failure only if someone waits
            # for it: entries written behind alone are retried by commit_behind, after a pause.
            if self._batch and not self._closed and (error is None or not all(s.behind for s in self._batch)):
                self._start_commit()
        self._pulse()

    def _pulse(self) -> None:
        """Wake the callers waiting for a commit (each checks whether its own change is done)."""
        self._committed.set()
        self._committed = trio.Event()

    def _defer(self, change: MarkSent | Delivered, error: StorageError) -> None:
        deferred = self._deferred
        deferred.changes.append(change)
        if isinstance(change, MarkSent):
            deferred.marks[change.row] = deferred.marks.get(change.row, 0) + 1
        else:
            deferred.gone[change.row] = change.charger
            if change.local_tx is not None and change.backend_tx is not None:
                deferred.mapped.setdefault(change.charger, {})[change.local_tx] = change.backend_tx
        self._retry_wake.set()

    async def retry_deferred(self) -> None:
        """Retry failed sent-marks and deliveries with backoff, until cancelled (the server runs this)."""
        while True:
            await self._retry_wake.wait()
            self._retry_wake = trio.Event()
            while self._deferred.changes:
                await trio.sleep(self._backoff.next_delay())
                if await self.flush_deferred():
                    self._backoff.reset()

    async def flush_deferred(self) -> bool:
        """One retry of everything deferred; True when it all got committed."""
        deferred, self._deferred = self._deferred, _Deferred()
        if not deferred.changes:
            return True
        try:
            await self.run(self.storage.write, deferred.changes)
        except StorageError as exc:
            # Put them back in front of whatever failed meanwhile (order matters only per row).
            failed_meanwhile, self._deferred = self._deferred, deferred
            for change in failed_meanwhile.changes:
                self._defer(change, exc)
            self._report(exc.operation, exc.detail)
            return False
        self._report("retry", "")
        return not self._deferred.changes

    def _report(self, operation: str, detail: str) -> None:
        self._failing = bool(detail)
        if self.on_error is not None:
            self.on_error(operation, detail)

    # -- reads (deferred changes applied) ------------------------------------------------

    async def _read(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await self.run(fn, *args)
        except StorageError as exc:
            self._report(exc.operation, exc.detail)
            raise

    async def pending(self, charger: str) -> list[Stored]:
        entries = await self._read(self.storage.pending, charger)
        deferred = self._deferred
        if not deferred.changes:
            return entries
        return [Stored(e.row, e.action, e.text, e.local_transaction_id, e.attempts + deferred.marks.get(e.row, 0))
                for e in entries if e.row not in deferred.gone]

    async def depth(self, charger: str) -> tuple[int, float | None]:
        count, oldest = await self._read(self.storage.depth, charger)
        gone = sum(1 for owner in self._deferred.gone.values() if owner == charger)
        return max(count - gone, 0), oldest

    async def backlog(self) -> dict[str, int]:
        found = await self._read(self.storage.backlog)
        for charger in self._deferred.gone.values():
            found[charger] = found.get(charger, 0) - 1
        return {charger: count for charger, count in found.items() if count > 0}

    async def transactions(self, charger: str) -> dict[int, int]:
        found = await self._read(self.storage.transactions, charger)
        found.update(self._deferred.mapped.get(charger, {}))
        return found

    async def last_local_tx(self, charger: str) -> int:
        return await self._read(self.storage.last_local_tx, charger)

    async def subprotocol(self, charger: str) -> str | None:
        return await self._read(self.storage.subprotocol, charger)

    async def sessions(self, since: str | None, until: str | None) -> list[SessionRecord]:
        return await self._read(self.storage.sessions, since, until)

    async def recent_sessions(self, charger: str | None, before: int | None, per_charger: int | None,
                              limit: int) -> list[SessionSummary]:
        """The status page's list (:meth:`Storage.recent_sessions`), read in the worker thread."""
        return await self._read(self.storage.recent_sessions, charger, before, per_charger, limit)

    def close(self) -> None:
        """Last synchronous commit of write-behind entries and retry of deferred changes, then close the file."""
        self._closed = True
        self._idle.wait()  # a commit handed to a thread (its caller perhaps cancelled) is written first
        with self._connection:
            self._close()

    def _close(self) -> None:
        behind: list[Change] = [slot.change for slot in self._batch if isinstance(slot.change, (Journal, LogRelayed))]
        if self._later:
            behind.append(LogRelayed(list(self._later)))
            self._later.clear()
        if behind:
            try:
                self.storage.write(behind)
            except StorageError as exc:
                self._report(exc.operation, exc.detail)
        if self._deferred.changes:
            try:
                self.storage.write(self._deferred.changes)
            except StorageError as exc:
                self._report(exc.operation, exc.detail)
        self.storage.close()
