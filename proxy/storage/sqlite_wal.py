"""Switching a SQLite file to WAL while another connection may be doing the same (docs/storage.md).

``PRAGMA journal_mode=WAL`` on a file still in rollback mode (a new file) reads
page 1, then upgrades to the write lock to rewrite it. SQLite never calls the
busy handler for such an upgrade (a reader that waited for a writer waiting for
it would deadlock), so while another connection holds the write lock, typically
another process converting the same new file, the pragma fails at once with
SQLITE_BUSY whatever the connection's busy timeout. Two proxy processes started
together on a new file would then fail to start on "database is locked". The
answer SQLite documents for this SQLITE_BUSY is to run the statement again once
the other writer is done; :func:`use_wal` does that for as long as the busy
timeout the connection was opened with.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable


def use_wal(db: sqlite3.Connection, timeout: float, pause: Callable[[float], None] = time.sleep) -> None:
    """Put ``db`` (autocommit, no transaction open) in WAL mode, waiting up to ``timeout`` seconds
    for other writers of the file; raises the last :class:`sqlite3.OperationalError` after that.
    ``pause`` waits between tries (the clock, replaceable in tests)."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
        pause(delay)
        delay = min(delay * 2, 0.05)  # the other writer's conversion takes a few milliseconds
