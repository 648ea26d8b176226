"""Durable offline queue and transaction-id map (SQLite, WAL, synchronous=FULL).

A CALL answered locally is committed here before its answer goes out, so a
crash (``kill -9``) or power loss loses nothing the wallbox was told was
received. Rows are deleted only after the backend answered the replayed CALL,
in the same transaction that records the backend's transactionId.

Guarantee: each stored CALL reaches the backend at least once, with its
original message id; it is sent twice only if the proxy dies in the
milliseconds between sending a replayed CALL and committing its answer, and
then with the same uniqueId, which OCPP backends must treat as a
retransmission.

SQLite blocks, so :class:`AsyncQueue` runs every call in one worker thread
(one connection, serialized by a CapacityLimiter), keeping the trio loop free.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from proxy.core.offline import Stored

T = TypeVar("T")

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


class Queue:
    """The synchronous store; use :class:`AsyncQueue` from trio code."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def append(self, charger: str, action: str, text: str, local_tx: int | None = None) -> int:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cursor = self.db.execute("INSERT INTO frames (charger, action, text, local_tx, created) "
                                     "VALUES (?, ?, ?, ?, ?)", (charger, action, text, local_tx, time.time()))
            if local_tx is not None:
                self.db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(charger) DO UPDATE "
                                "SET last_local_tx = min(last_local_tx, excluded.last_local_tx)",
                                (charger, local_tx))
            return int(cursor.lastrowid or 0)

    def pending(self, charger: str) -> list[Stored]:
        rows = self.db.execute("SELECT row, action, text, local_tx FROM frames WHERE charger = ? ORDER BY row",
                               (charger,))
        return [Stored(row, action, text, local_tx) for row, action, text, local_tx in rows]

    def delivered(self, row: int, charger: str = "", local_tx: int | None = None,
                  backend_tx: int | None = None) -> None:
        """Forget a replayed CALL; for a StartTransaction also record the id mapping."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if local_tx is not None and backend_tx is not None:
                self.db.execute("INSERT OR REPLACE INTO transactions VALUES (?, ?, ?)",
                                (charger, local_tx, backend_tx))
            self.db.execute("DELETE FROM frames WHERE row = ?", (row,))

    def transactions(self, charger: str) -> dict[int, int]:
        rows = self.db.execute("SELECT local_tx, backend_tx FROM transactions WHERE charger = ?", (charger,))
        return {local: backend for local, backend in rows}

    def last_local_tx(self, charger: str) -> int:
        row = self.db.execute("SELECT last_local_tx FROM counters WHERE charger = ?", (charger,)).fetchone()
        return int(row[0]) if row else 0

    def depth(self, charger: str) -> tuple[int, float | None]:
        """(queued frames, age in seconds of the oldest)."""
        count, oldest = self.db.execute("SELECT count(*), min(created) FROM frames WHERE charger = ?",
                                        (charger,)).fetchone()
        return int(count), (time.time() - oldest) if oldest is not None else None


class AsyncQueue:
    """The queue for trio code: every call runs in the queue's own worker thread."""

    def __init__(self, path: Path) -> None:
        self.queue = Queue(path)
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def append(self, charger: str, action: str, text: str, local_tx: int | None = None) -> int:
        return await self.run(self.queue.append, charger, action, text, local_tx)

    async def pending(self, charger: str) -> list[Stored]:
        return await self.run(self.queue.pending, charger)

    async def delivered(self, row: int, charger: str = "", local_tx: int | None = None,
                        backend_tx: int | None = None) -> None:
        await self.run(self.queue.delivered, row, charger, local_tx, backend_tx)

    async def transactions(self, charger: str) -> dict[int, int]:
        return await self.run(self.queue.transactions, charger)

    async def depth(self, charger: str) -> tuple[int, float | None]:
        return await self.run(self.queue.depth, charger)

    async def last_local_tx(self, charger: str) -> int:
        return await self.run(self.queue.last_local_tx, charger)

    def close(self) -> None:
        self.queue.close()
