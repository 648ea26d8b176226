"""The session log's tables in the proxy's SQLite file (part of :class:`~proxy.storage.offline_queue.SqliteStorage`).

Written in the same transaction (and fsync) as the offline queue's frames, on
the queue's connection, so a group commit covers both. Each
:class:`~proxy.core.sessionlog.SessionEvent` updates its transaction's record
(fields a later frame fills in or overwrites, per kind): applying one twice (a
wallbox retransmitting a frame with the same message id) leaves the record as
applying it once did, and each signed sampledValue is kept once per (message
id, position).

Signed data an event carries as a whole frame (``signed_frame``, what
:func:`~proxy.core.sessionlog.events` gives) is stored as that frame's text
under position :data:`FRAME` and cut into its signed sampledValues when read
(:func:`~proxy.core.sessionlog.signed_texts`): writing parses nothing more.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from proxy.core.sessionlog import SessionEvent, SessionRecord, SessionSummary, signed_texts

#: ``session_signed.seq`` of a row holding a whole frame (its signed sampledValues are cut out when read).
FRAME = -1

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    charger TEXT NOT NULL,
    tx TEXT NOT NULL,
    start_msg TEXT,
    connector INTEGER,
    id_tag TEXT,
    started TEXT,
    stopped TEXT,
    first_seen TEXT NOT NULL,
    meter_start REAL,
    meter_stop REAL,
    meter_last REAL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_tx ON sessions (charger, tx, id);
CREATE INDEX IF NOT EXISTS sessions_by_time ON sessions (first_seen);
CREATE INDEX IF NOT EXISTS sessions_by_charger ON sessions (charger, id);
CREATE TABLE IF NOT EXISTS session_signed (
    session INTEGER NOT NULL,
    msg_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (session, msg_id, seq)
);
"""

# Per kind: what a later frame about the same transaction fills in or overwrites (":name" = the event's value).
UPDATE = {
    "start": "start_msg = :msg, connector = coalesce(:connector, connector), id_tag = coalesce(:id_tag, id_tag), "
             "started = coalesce(started, :at), meter_start = coalesce(:meter, meter_start)",
    "meter": "connector = coalesce(connector, :connector), meter_start = coalesce(meter_start, :meter), "
             "meter_last = coalesce(:meter, meter_last), id_tag = coalesce(id_tag, :id_tag)",
    "stop": "stopped = coalesce(stopped, :at), meter_stop = coalesce(meter_stop, :meter), "
            "meter_last = coalesce(:meter, meter_last), reason = coalesce(reason, :reason), "
            "id_tag = coalesce(id_tag, :id_tag), connector = coalesce(connector, :connector)",
}


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


#: Several meter readings of one record in a row, as one update (what applying them one by one leaves).
METERS = ("connector = coalesce(connector, :connector), meter_start = coalesce(meter_start, :first), "
          "meter_last = coalesce(:last, meter_last), id_tag = coalesce(id_tag, :id_tag)")


#: (charger, transaction) → (its latest record, that record's start message id), as found or made so far in
#: one transaction (the same dict may be passed to several calls of :func:`apply` in one transaction).
Rows = dict[tuple[str, str], tuple[int, str | None]]


def apply(db: sqlite3.Connection, events: Sequence[SessionEvent], rows: Rows | None = None) -> None:
    """Apply each event to its transaction's record (inside the caller's transaction).

    A batch of relayed frames is mostly meter readings of a few running
    transactions: each record's readings up to its next start or stop become
    one update (records are independent, so only each record's own order
    counts), each record is looked up once, and the signed rows of the whole
    batch go in one statement.
    """
    rows = {} if rows is None else rows
    signed: list[tuple[int, str, int, str]] = []
    meters: dict[tuple[str, str], list[SessionEvent]] = {}
    now = now_utc()
    for event in events:
        key = (event.charger, event.transaction)
        if event.kind == "meter":
            meters.setdefault(key, []).append(event)
            continue
        if key in meters:
            _apply_meters(db, meters.pop(key), rows, signed, now)
        row = _record(db, event, rows, now)
        values = {"id": row, "msg": event.msg_id, "connector": event.connector, "id_tag": event.id_tag,
                  "at": event.at or now, "meter": event.meter_wh, "reason": event.reason}
        db.execute(f"UPDATE sessions SET {UPDATE[event.kind]} WHERE id = :id", values)
        _signed_rows(signed, row, event)
        if event.local_tx is not None:  # the proxy's own id: its counter must never hand it out again
            db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(charger) DO UPDATE "
                       "SET last_local_tx = min(last_local_tx, excluded.last_local_tx)",
                       (event.charger, event.local_tx))
    for run in meters.values():
        _apply_meters(db, run, rows, signed, now)
    if signed:
        db.executemany("INSERT OR IGNORE INTO session_signed VALUES (?, ?, ?, ?)", signed)


def _apply_meters(db: sqlite3.Connection, run: list[SessionEvent], rows: Rows,
                  signed: list[tuple[int, str, int, str]], now: str) -> None:
    row = _record(db, run[0], rows, now)
    readings = [event.meter_wh for event in run if event.meter_wh is not None]
    values = {"id": row, "connector": next((e.connector for e in run if e.connector is not None), None),
              "id_tag": next((e.id_tag for e in run if e.id_tag is not None), None),
              "first": readings[0] if readings else None, "last": readings[-1] if readings else None}
    db.execute(f"UPDATE sessions SET {METERS} WHERE id = :id", values)
    for event in run:
        _signed_rows(signed, row, event)


def _signed_rows(signed: list[tuple[int, str, int, str]], row: int, event: SessionEvent) -> None:
    if event.signed:
        signed += [(row, event.msg_id, seq, text) for seq, text in enumerate(event.signed)]
    if event.signed_frame is not None:
        signed.append((row, event.msg_id, FRAME, event.signed_frame))
    if event.signed_frames:
        signed += [(row, msg_id, FRAME, text) for msg_id, text in event.signed_frames]


def begun(db: sqlite3.Connection, charger: str, transaction: str, rows: Rows) -> bool:
    """Does the transaction's latest record hold its meter start and connector (a first reading changes nothing)?

    The record found goes into ``rows``, so :func:`apply` does not look it up again.
    """
    found = db.execute("SELECT id, start_msg, meter_start IS NOT NULL AND connector IS NOT NULL FROM sessions "
                       "WHERE charger = ? AND tx = ? ORDER BY id DESC LIMIT 1", (charger, transaction)).fetchone()
    if found is None:
        return False
    rows[(charger, transaction)] = (int(found[0]), found[1])
    return bool(found[2])


def _record(db: sqlite3.Connection, event: SessionEvent, rows: Rows,
            now: str) -> int:
    """The row the event belongs to: the transaction's latest record, or a new one.

    A start opens a new record unless the latest one with this id is the same
    StartTransaction (same message id: a retransmission) or was opened by a
    later frame whose start was not seen yet. So a backend that hands out an id
    again (another backend, a reset database) starts a record of its own.
    ``rows``: (record, its start's message id) already found in this batch.
    """
    key = (event.charger, event.transaction)
    found = rows.get(key)
    if found is None:
        latest = db.execute("SELECT id, start_msg FROM sessions WHERE charger = ? AND tx = ? "
                            "ORDER BY id DESC LIMIT 1", key).fetchone()
        found = None if latest is None else (int(latest[0]), latest[1])
    if found is not None and not (event.kind == "start" and found[1] not in (None, event.msg_id)):
        row = found[0]
    else:
        cursor = db.execute("INSERT INTO sessions (charger, tx, first_seen) VALUES (?, ?, ?)",
                            (event.charger, event.transaction, event.at or now))
        row = int(cursor.lastrowid or 0)
    rows[key] = (row, event.msg_id if event.kind == "start" else found[1] if found is not None and found[0] == row
                 else None)
    return row


def expand_signed(rows: Sequence[tuple[int, str]]) -> list[str]:
    """(seq, text) rows of one record, in order, as the signed sampledValues they hold."""
    found: list[str] = []
    for seq, text in rows:
        found += signed_texts(text) if seq == FRAME else [text]
    return found


def read(db: sqlite3.Connection, since: str | None, until: str | None) -> list[SessionRecord]:
    """Transactions whose start (or first frame, when the start was never seen) is in [since, until)."""
    rows = list(db.execute(
        "SELECT s.id, s.charger, s.tx, connector, id_tag, started, stopped, meter_start, meter_stop, meter_last, "
        "reason, t.backend_tx FROM sessions s LEFT JOIN transactions t "
        "ON t.charger = s.charger AND CAST(t.local_tx AS TEXT) = s.tx "
        "WHERE coalesce(started, first_seen) >= ? AND coalesce(started, first_seen) < ? "
        "ORDER BY coalesce(started, first_seen), s.id",
        (since or "", until or "\uffff")))
    stored: dict[int, list[tuple[int, str]]] = {}
    for row, seq, text in db.execute("SELECT session, seq, text FROM session_signed WHERE session IN "
                                     "(SELECT value FROM json_each(?)) ORDER BY rowid",
                                     (json.dumps([r[0] for r in rows]),)):
        stored.setdefault(row, []).append((seq, text))
    return [SessionRecord(charger, tx, connector, id_tag, started, stopped, meter_start, meter_stop, reason,
                          expand_signed(stored.get(row, [])), backend_tx, meter_last)
            for row, charger, tx, connector, id_tag, started, stopped, meter_start, meter_stop, meter_last, reason,
            backend_tx in rows]


#: The newest records (of one charger, or of each), below a record number: the status page's list.
#: Parameters: charger (or NULL: every charger), before (or NULL), per charger (or NULL), limit; typed by
#: CAST so that PostgreSQL knows a NULL's type too.
RECENT = """
SELECT * FROM (
    SELECT s.id, s.charger, s.tx, connector, id_tag, started, stopped, meter_start, meter_stop, meter_last, reason,
           t.backend_tx, EXISTS (SELECT 1 FROM session_signed g WHERE g.session = s.id) AS signed,
           row_number() OVER (PARTITION BY s.charger ORDER BY s.id DESC) AS nth
    FROM sessions s LEFT JOIN transactions t ON t.charger = s.charger AND CAST(t.local_tx AS TEXT) = s.tx
    WHERE (CAST(:charger AS TEXT) IS NULL OR s.charger = CAST(:charger AS TEXT))
      AND (CAST(:before AS BIGINT) IS NULL OR s.id < CAST(:before AS BIGINT))
) AS listed WHERE (CAST(:per_charger AS BIGINT) IS NULL OR nth <= CAST(:per_charger AS BIGINT))
ORDER BY id DESC LIMIT :limit
"""


def summaries(rows: Sequence[Sequence[Any]]) -> list[SessionSummary]:
    """RECENT's rows as summaries."""
    return [SessionSummary(int(number), SessionRecord(charger, tx, connector, id_tag, started, stopped, meter_start,
                                                      meter_stop, reason, (), backend_tx, meter_last), bool(signed))
            for number, charger, tx, connector, id_tag, started, stopped, meter_start, meter_stop, meter_last, reason,
            backend_tx, signed, _ in rows]


def recent(db: sqlite3.Connection, charger: str | None, before: int | None, per_charger: int | None,
           limit: int) -> list[SessionSummary]:
    """The newest records, newest first (see :data:`RECENT`)."""
    return summaries(list(db.execute(RECENT, {"charger": charger, "before": before, "per_charger": per_charger,
                                              "limit": limit})))
