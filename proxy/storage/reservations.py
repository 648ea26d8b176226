"""Durable fuse reservations: the highest limit each charger may be applying (SQLite, WAL, fsync).

Next to them, in the same file, the backend's charging profiles that may be on
each wallbox (``backend_profiles``, docs/load-management.md, "The backend's
profiles over a restart"): a restart counts them as maybe installed until settled.

After a restart the proxy does not know what the wallboxes that have not
reconnected yet are drawing: they keep charging on their installed profiles.
So the fuse (:mod:`proxy.loadmgmt.fuse`) records, per charger, the highest
limit it may be applying, and a restart counts each charger at that value
until it reconnects (absent: its ``max_current``). An increase is recorded
before its SetChargingProfile leaves, a decrease after the wallbox accepted it,
so the record is never below what a wallbox may apply.

The SQLite implementation of :class:`proxy.storage.interface.ReservationStore`
(one process: the appliance) in its own file (``[offline] data_dir``/``reservations.sqlite3``),
so it never waits for the offline queue's writer. The PostgreSQL one, shared by
several processes, is :class:`proxy.storage.postgres.PostgresReservations`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from proxy.storage.interface import ReservationStore, StorageError

__all__ = ["DB_NAME", "ReservationStore", "SqliteReservations"]

#: The file in ``[offline] data_dir``.
DB_NAME = "reservations.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fuse_reservations (
    charger TEXT PRIMARY KEY,
    amps REAL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS backend_profiles (
    charger TEXT PRIMARY KEY,
    profiles TEXT NOT NULL,
    updated REAL NOT NULL
);
"""


class SqliteReservations:
    """:class:`ReservationStore` in one SQLite file (blocking: the trio layer calls it from a thread)."""

    def __init__(self, path: Path | str) -> None:
        self.location = str(path)
        try:
            if str(path) != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an increase is sent only once this is on disk
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError("open", f"{path}: {exc}") from exc

    def load(self, chargers: Sequence[str] | None = None) -> dict[str, float | None]:
        try:
            rows = self._db.execute("SELECT charger, amps FROM fuse_reservations").fetchall()
        except sqlite3.Error as exc:
            raise StorageError("read", str(exc)) from exc
        wanted = None if chargers is None else set(chargers)
        return {str(charger): None if amps is None else float(amps) for charger, amps in rows
                if wanted is None or charger in wanted}

    def served_elsewhere(self) -> set[str]:
        return set()  # one process serves every charger

    def record(self, limits: Mapping[str, float | None]) -> None:
        if not limits:
            return
        now = time.time()
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT OR REPLACE INTO fuse_reservations VALUES (?, ?, ?)",
                                     [(charger, amps, now) for charger, amps in limits.items()])
        except (sqlite3.Error, OSError) as exc:
            raise StorageError("reservation", str(exc)) from exc

    def load_profiles(self, chargers: Sequence[str] | None = None) -> dict[str, str]:
        try:
            rows = self._db.execute("SELECT charger, profiles FROM backend_profiles").fetchall()
        except sqlite3.Error as exc:
            raise StorageError("read", str(exc)) from exc
        wanted = None if chargers is None else set(chargers)
        return {str(charger): str(text) for charger, text in rows if wanted is None or charger in wanted}

    def record_profiles(self, profiles: Mapping[str, str | None]) -> None:
        if not profiles:
            return
        now = time.time()
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("DELETE FROM backend_profiles WHERE charger = ?",
                                     [(charger,) for charger, text in profiles.items() if text is None])
                self._db.executemany("INSERT OR REPLACE INTO backend_profiles VALUES (?, ?, ?)",
                                     [(charger, text, now) for charger, text in profiles.items() if text is not None])
        except (sqlite3.Error, OSError) as exc:
            raise StorageError("profiles", str(exc)) from exc

    def close(self) -> None:
        self._db.close()
