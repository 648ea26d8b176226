"""WAL checkpoints of the SQLite store, off the commit path (docs/storage.md, "Checkpoints").

In WAL mode every commit appends pages to ``queue.sqlite3-wal``; a checkpoint
copies them back into the database file and fsyncs it, so the WAL can start
over. SQLite's default runs that checkpoint inside whichever commit takes the
WAL past 1000 pages: about four times a second at 2000 offline answers a
second, each time one commit took two more fsyncs (the WAL's, the database
file's) plus the copy, and every frame waiting for that commit, or arriving
during it, waited for all of them: the classic tail of a WAL writer.

:class:`Checkpointer` takes checkpoints away from the writer: the queue's
connection runs with ``wal_autocheckpoint=0`` and this one, a second connection
to the same file in a thread of its own, runs ``PASSIVE`` checkpoints (they never
wait for, and never block, the writer) at most every :data:`CHECKPOINT_INTERVAL`
seconds while commits happen, and once more after the last one. A checkpoint
never risks a commit: SQLite's WAL recovery makes a process killed mid-checkpoint
(``kill -9``) or a power cut lose nothing that was committed
(``tests/e2e/test_offline.py``, the kill -9 during checkpoints).

The WAL starts over only when a writer begins while everything in it has been
copied back, which a busy writer does not allow: the checkpoint's copy is
always a few commits behind. So once the WAL holds :data:`RESTART_PAGES`, the
writer takes the last step itself, between two commits (:meth:`Checkpointer.due`):
a passive checkpoint of the few pages this thread's last round left, after which
its next commit starts the WAL over. That costs one commit one extra fsync (of the
database file) every 16 MiB of frames, not two fsyncs and a copy four times a
second. Should even that not happen (a reader holding the WAL, say), a WAL past
:data:`WAL_LIMIT_PAGES` gets a ``RESTART`` checkpoint from this thread, which
makes the writer wait while it runs: a bound on the file, not the normal path.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

#: Seconds between two checkpoints while commits happen (SQLite's default works out at about 0.25 s at full load).
CHECKPOINT_INTERVAL = 0.25
#: WAL pages (4 KiB each) after which the writer checkpoints the rest itself, so its next commit starts the WAL over.
RESTART_PAGES = 4096
#: WAL pages past which a checkpoint makes the writer wait so the WAL starts over (64 MiB): the fallback.
WAL_LIMIT_PAGES = 16_384


@dataclass
class CheckpointStats:
    """What the checkpoints did (logged with the queue's ``queue_stats``)."""

    runs: int = 0
    #: The writer's own catch-up checkpoints (the WAL starts over at its next commit).
    catch_ups: int = 0
    #: Checkpoints that made the writer wait (the WAL had passed the limit).
    restarts: int = 0
    failures: int = 0
    last_error: str = ""
    #: The longest checkpoint (seconds) and the most WAL pages one found.
    longest: float = 0.0
    most_pages: int = 0

    def failed(self, detail: str) -> None:
        """Count a checkpoint that failed (a full disk, say): the WAL keeps the frames and a later one tries again."""
        self.failures += 1
        self.last_error = detail[:200]

    def summary(self) -> dict[str, object]:
        return {"runs": self.runs, "catch_ups": self.catch_ups, "restarts": self.restarts, "failures": self.failures,
                "longest_ms": round(self.longest * 1000, 3), "most_pages": self.most_pages,
                **({"last_error": self.last_error} if self.last_error else {})}


class Checkpointer:
    """Checkpoints ``path``'s WAL in a thread of its own, woken by :meth:`wrote` (cheap: the writer calls it per commit)."""

    def __init__(self, path: Path, *, interval: float = CHECKPOINT_INTERVAL, restart_pages: int = RESTART_PAGES,
                 limit_pages: int = WAL_LIMIT_PAGES) -> None:
        self.interval = interval
        self.restart_pages = restart_pages
        self.limit_pages = limit_pages
        #: WAL pages at this thread's last checkpoint, all copied back (0 once the writer has caught up).
        self._behind = 0
        self.stats = CheckpointStats()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA synchronous=FULL")  # the database file is fsync'd before the WAL may start over
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoints", daemon=True)
        self._thread.start()

    def wrote(self) -> None:
        """A commit appended to the WAL: a checkpoint follows within :attr:`interval`."""
        if not self._wake.is_set():
            self._wake.set()

    def due(self) -> bool:
        """Whether the writer should checkpoint the last few pages itself now (called between its commits).

        True once per :attr:`restart_pages` of WAL, right after this thread
        copied back all the WAL held when it began: what is left is what the
        writer committed since, a few pages.
        """
        if self._behind < self.restart_pages:
            return False
        self._behind = 0
        self.stats.catch_ups += 1
        return True

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stopping.wait(self.interval):  # one checkpoint for every commit of the interval
                return
            self._wake.clear()  # a commit from now on wakes the next round (the last one is caught up after)
            self.checkpoint()

    def checkpoint(self) -> None:
        """One passive checkpoint (a restarting one if the WAL is past the limit); failures are counted, not raised."""
        stats = self.stats
        began = time.perf_counter()
        try:
            busy, pages, copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            stats.most_pages = max(stats.most_pages, int(pages))
            self._behind = int(pages) if not busy and copied == pages else 0
            if pages > self.limit_pages:
                self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                stats.restarts += 1
        except sqlite3.Error as exc:
            stats.failed(f"{type(exc).__name__}: {exc}")
            return
        finally:
            stats.longest = max(stats.longest, time.perf_counter() - began)
        stats.runs += 1

    def stop(self) -> None:
        """Stop the thread (after a checkpoint in progress); :meth:`checkpoint` still works, called directly."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def close(self) -> None:
        """Stop the thread and close the connection."""
        self.stop()
        self._db.close()
