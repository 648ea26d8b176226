"""Charger and site leases in the store (docs/cluster.md): atomic take-over, renewal, release.

:class:`LeaseStore` is a narrow interface like :mod:`proxy.storage.reservations`
(the same rules as :mod:`proxy.storage.interface`: one transaction per call,
:class:`StorageError` only). :meth:`LeaseStore.acquire` is one atomic step: it
takes the charger's lease if nobody holds it, if its lease ran out, or if the
caller already holds it (a renewal), and answers the lease as it then stands,
for :class:`proxy.core.lease.LeasePolicy` to decide on. The PostgreSQL
implementation is in :mod:`proxy.storage.postgres` (several processes); the
SQLite one here serves processes on one machine sharing one file, and the
contract tests.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from proxy.core.lease import LeaseState
from proxy.storage.interface import StorageError
from proxy.storage.sqlite_wal import use_wal


class LeaseStore(Protocol):
    def acquire(self, charger: str, owner: str, ttl: float) -> LeaseState:
        """Take or renew the lease for ``ttl`` seconds unless another holds a live one; the lease as it stands."""
        ...

    def acquire_many(self, chargers: Sequence[str], owner: str, ttl: float) -> list[LeaseState]:
        """:meth:`acquire` for several in one transaction (the handshakes that arrive together)."""
        ...

    def renew(self, chargers: Sequence[str], owner: str, ttl: float) -> list[LeaseState]:
        """Extend every one of ``chargers`` that ``owner`` still holds, in one transaction (a process renews
        all its leases at once); never takes one: a lease released meanwhile stays released. Each lease as
        it stands, in order; one nobody holds is answered with holder ``""``."""
        ...

    def release(self, charger: str, owner: str) -> None:
        """Give the lease up if ``owner`` holds it (idempotent: nothing otherwise)."""
        ...

    def release_all(self, owner: str) -> None:
        """Give up every lease ``owner`` holds (a process that stops)."""
        ...


_SCHEMA = "CREATE TABLE IF NOT EXISTS leases (charger TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL)"


class SqliteLeases:
    """:class:`LeaseStore` in a SQLite file (processes on one machine: one clock).

    Every step waits up to ``timeout`` seconds for the other processes' writes, opening too:
    processes started together on a new file each switch it to WAL (:func:`use_wal`);
    ``pause`` is the clock of that wait."""

    def __init__(self, path: Path | str, *, timeout: float = 10.0,
                 pause: Callable[[float], None] = time.sleep) -> None:
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=timeout)
            use_wal(self._db, timeout, pause)
            self._db.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError("open", f"{path}: {exc}") from exc

    def acquire(self, charger: str, owner: str, ttl: float) -> LeaseState:
        return self.acquire_many([charger], owner, ttl)[0]

    def acquire_many(self, chargers: Sequence[str], owner: str, ttl: float) -> list[LeaseState]:
        return self._write(chargers, owner, ttl, "INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT (charger) "
                           "DO UPDATE SET owner = excluded.owner, expires = excluded.expires "
                           "WHERE leases.owner = excluded.owner OR leases.expires <= ?")

    def renew(self, chargers: Sequence[str], owner: str, ttl: float) -> list[LeaseState]:
        return self._write(chargers, owner, ttl, "UPDATE leases SET expires = ?3 WHERE charger = ?1 AND owner = ?2 "
                           "AND ?4 = ?4")

    def _write(self, chargers: Sequence[str], owner: str, ttl: float, sql: str) -> list[LeaseState]:
        now = time.time()
        states: list[LeaseState] = []
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                for charger in chargers:
                    self._db.execute(sql, (charger, owner, now + ttl, now))
                    row = self._db.execute("SELECT owner, expires FROM leases WHERE charger = ?",
                                           (charger,)).fetchone()
                    holder, expires = row if row is not None else ("", now)
                    states.append(LeaseState(charger, str(holder), float(expires) - now))
        except sqlite3.Error as exc:
            raise StorageError("lease", str(exc)) from exc
        return states

    def release(self, charger: str, owner: str) -> None:
        self._delete("DELETE FROM leases WHERE charger = ? AND owner = ?", (charger, owner))

    def release_all(self, owner: str) -> None:
        self._delete("DELETE FROM leases WHERE owner = ?", (owner,))

    def _delete(self, sql: str, args: tuple[str, ...]) -> None:
        try:
            with self._db:
                self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StorageError("lease", str(exc)) from exc

    def close(self) -> None:
        self._db.close()
