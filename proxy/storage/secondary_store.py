"""What secondaries are owed, kept across restarts (SQLite, in the offline queue's file).

For each (charger, secondary): the transaction id pairs (see
:mod:`proxy.core.mirror`: a transaction often outlives a proxy restart, and its
StopTransaction copy must still carry the secondary's id), the frames still
queued for it, and the state a reconnect replays first (last
BootNotification, last status per connector).

Tables live next to the offline queue's in the same SQLite file (WAL), each
in its own namespace (``secondary_*``). Writes come in batches from one writer
(:class:`proxy.runtime.secondary.Secondaries`, behind the session, never on the path
that answers the wallbox), one transaction per batch, ``synchronous=NORMAL``:
a batch survives a crash or kill of the process once committed; a power cut
may lose the newest batch. What a secondary then misses is exactly what it
would miss had it been unreachable while the proxy was down.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from proxy.core.mirror import TX_MEMORY, MirrorQueued, MirrorStartKnown, MirrorState, MirrorUnqueued, TxMapped
from proxy.storage.interface import MirrorRecord as Record
from proxy.storage.interface import RestoredMirror

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secondary_tx (
    charger TEXT NOT NULL, upstream TEXT NOT NULL,
    wallbox_tx INTEGER NOT NULL, upstream_tx INTEGER NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (charger, upstream, wallbox_tx));
CREATE TABLE IF NOT EXISTS secondary_frames (
    charger TEXT NOT NULL, upstream TEXT NOT NULL, seq INTEGER NOT NULL, action TEXT NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (charger, upstream, seq));
CREATE TABLE IF NOT EXISTS secondary_starts (
    charger TEXT NOT NULL, upstream TEXT NOT NULL, msg_id TEXT NOT NULL, wallbox_tx INTEGER NOT NULL,
    PRIMARY KEY (charger, upstream, msg_id));
CREATE TABLE IF NOT EXISTS secondary_state (
    charger TEXT NOT NULL, upstream TEXT NOT NULL, connector INTEGER NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (charger, upstream, connector));
"""


def restored() -> RestoredMirror:
    """An empty stored part (a mirror nothing was stored for)."""
    return RestoredMirror({}, [], {}, {})


class MirrorStore:
    def __init__(self, path: str | Path, keep: int = TX_MEMORY) -> None:
        self.keep = keep
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection, used by one thread at a time (the writer's); 10 s for the offline
        # queue's writer to finish its own transaction in the same file.
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM secondary_tx").fetchone()
        self._tx_seq = int(row[0])

    def restore(self) -> dict[tuple[str, str], RestoredMirror]:
        """Everything stored, by (charger, upstream)."""
        found: dict[tuple[str, str], RestoredMirror] = {}

        def entry(charger: str, upstream: str) -> RestoredMirror:
            return found.setdefault((charger, upstream), restored())

        db = self._db
        for charger, upstream, wallbox_tx, upstream_tx in db.execute(
                "SELECT charger, upstream, wallbox_tx, upstream_tx FROM secondary_tx ORDER BY seq"):
            entry(charger, upstream).transactions[int(wallbox_tx)] = int(upstream_tx)
        for charger, upstream, seq, action, text in db.execute(
                "SELECT charger, upstream, seq, action, text FROM secondary_frames ORDER BY seq"):
            entry(charger, upstream).queued.append((int(seq), action, text))
        for charger, upstream, connector, text in db.execute(
                "SELECT charger, upstream, connector, text FROM secondary_state"):
            entry(charger, upstream).state[int(connector)] = text
        for charger, upstream, msg_id, wallbox_tx in db.execute(
                "SELECT charger, upstream, msg_id, wallbox_tx FROM secondary_starts"):
            entry(charger, upstream).starts[msg_id] = int(wallbox_tx)
        return found

    def load(self, charger: str, upstream: str) -> dict[int, int]:
        return self.restore().get((charger, upstream), restored()).transactions

    def apply(self, records: Sequence[tuple[str, Record]]) -> None:
        """Write (charger, record) pairs in order, in one transaction."""
        if not records:
            return
        db = self._db
        with db:
            db.execute("BEGIN")
            for charger, record in records:
                if isinstance(record, MirrorQueued):
                    db.execute("INSERT OR REPLACE INTO secondary_frames VALUES (?, ?, ?, ?, ?)",
                               (charger, record.upstream, record.seq, record.action, record.text))
                elif isinstance(record, MirrorUnqueued):
                    db.execute("DELETE FROM secondary_frames WHERE charger = ? AND upstream = ? AND seq = ?",
                               (charger, record.upstream, record.seq))
                elif isinstance(record, MirrorState):
                    db.execute("INSERT OR REPLACE INTO secondary_state VALUES (?, ?, ?, ?)",
                               (charger, record.upstream, record.connector, record.text))
                elif isinstance(record, MirrorStartKnown):
                    db.execute("INSERT OR REPLACE INTO secondary_starts VALUES (?, ?, ?, ?)",
                               (charger, record.upstream, record.msg_id, record.wallbox_tx))
                else:
                    self._pair(charger, record)

    def put(self, charger: str, upstream: str, wallbox_tx: int, upstream_tx: int) -> None:
        self.apply([(charger, TxMapped(upstream, wallbox_tx, upstream_tx))])

    def _pair(self, charger: str, record: TxMapped) -> None:
        self._db.execute("DELETE FROM secondary_starts WHERE charger = ? AND upstream = ? AND wallbox_tx = ?",
                         (charger, record.upstream, record.wallbox_tx))
        self._tx_seq += 1
        self._db.execute("INSERT OR REPLACE INTO secondary_tx VALUES (?, ?, ?, ?, ?)",
                         (charger, record.upstream, record.wallbox_tx, record.upstream_tx, self._tx_seq))
        self._db.execute(
            "DELETE FROM secondary_tx WHERE charger = ? AND upstream = ? AND seq <= "
            "(SELECT seq FROM secondary_tx WHERE charger = ? AND upstream = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (charger, record.upstream, charger, record.upstream, self.keep))

    def close(self) -> None:
        self._db.close()
