"""Secondaries' transaction ids, kept across restarts (SQLite).

A secondary upstream knows each of the wallbox's transactions under the id it
answered to StartTransaction (see :mod:`proxy.mirror`). A transaction often
outlives a proxy restart (a car charges overnight, the proxy is updated), and
the StopTransaction copy must then still carry the secondary's id, so the
pairs are written to a small SQLite database as soon as they are known.

One table, one row per (charger, upstream, wallbox transaction); only the
newest :data:`~proxy.mirror.TX_MEMORY` rows per charger and upstream are
kept. WAL mode; each pair is committed on its own (one per transaction and
secondary, so nothing waits for a batch).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from proxy.mirror import TX_MEMORY

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secondary_tx (
    charger TEXT NOT NULL,
    upstream TEXT NOT NULL,
    wallbox_tx INTEGER NOT NULL,
    upstream_tx INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (charger, upstream, wallbox_tx)
)
"""


class TxMapStore:
    def __init__(self, path: str | Path, keep: int = TX_MEMORY) -> None:
        self.path = str(path)
        self.keep = keep
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a crash or kill of the process (it is in the WAL
        # before execute returns) without an fsync on the path that answers the wallbox;
        # a power cut may lose the newest pairs (that secondary then gets no StopTransaction
        # for those transactions, and the proxy logs it).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM secondary_tx").fetchone()
        self._seq = int(row[0])

    def load(self, charger: str, upstream: str) -> dict[int, int]:
        """Pairs of one charger and upstream, oldest first (the mirror keeps that order)."""
        rows = self._db.execute(
            "SELECT wallbox_tx, upstream_tx FROM secondary_tx WHERE charger = ? AND upstream = ? ORDER BY seq",
            (charger, upstream)).fetchall()
        return {int(w): int(u) for w, u in rows}

    def put(self, charger: str, upstream: str, wallbox_tx: int, upstream_tx: int) -> None:
        self._seq += 1
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO secondary_tx VALUES (?, ?, ?, ?, ?)",
                             (charger, upstream, wallbox_tx, upstream_tx, self._seq))
            self._db.execute(
                "DELETE FROM secondary_tx WHERE charger = ? AND upstream = ? AND seq <= "
                "(SELECT seq FROM secondary_tx WHERE charger = ? AND upstream = ? "
                "ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (charger, upstream, charger, upstream, self.keep))

    def close(self) -> None:
        self._db.close()
