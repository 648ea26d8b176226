"""The PostgreSQL implementation of :class:`~proxy.storage.interface.Storage` (``[store] url``).

Several proxy processes can share one database (docs/cluster.md); one process with a PostgreSQL URL behaves as with SQLite. The same
guarantees as the SQLite implementation (docs/storage.md):

* **Durable before return.** A batch with an append or a sent-mark commits
  with ``synchronous_commit = on`` (the server flushes its WAL before the
  commit returns), whatever the server's default. A batch of deliveries alone
  and a batch of mirror records commit with ``synchronous_commit = off``: they
  survive a crash of the proxy (the commit is in the server), a crash of the
  database server may undo the newest of them, and the frame is then sent
  again, marked (at-least-once), exactly like SQLite's ``synchronous=NORMAL``.
* **One transaction per call**, runs of appends as one multi-row INSERT.
* **Order across processes.** A batch with appends takes a transaction-level
  advisory lock before its INSERT, so appends of all processes commit one at a
  time and the rows a sequence hands out grow in commit order, as the
  interface promises (``pending`` orders by row).
* **Errors are** :class:`StorageError` **only.** A lost connection raises
  StorageError for that call; the next call connects again. A commit whose
  answer was lost may have happened: the caller retries marks and deliveries
  (idempotent); an append that raised is refused to the wallbox, which sends it
  again, so the backend may see it twice (at-least-once, docs/offline.md).

Blocking (psycopg 3, synchronous API): the trio layer runs every call in a
worker thread (:class:`proxy.storage.offline_queue.AsyncQueue`), as for
SQLite. The secondaries' mirrors use their own connection, so their writer
never waits behind the offline queue's transaction (the SQLite store does the
same with a second connection to its file).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

import psycopg

from proxy.config.schema import redact_url
from proxy.core.lease import LeaseState
from proxy.core.sessionlog import SessionEvent, SessionRecord, SessionSummary, relayed_events
from proxy.core.mirror import TX_MEMORY, MirrorQueued, MirrorStartKnown, MirrorState, MirrorUnqueued, TxMapped
from proxy.storage.interface import (
    Append,
    Change,
    Delivered,
    Journal,
    LogRelayed,
    MarkSent,
    MirrorRecord,
    RestoredMirror,
    StorageError,
    StorageUnusable,
    change_runs,
    write_operation,
)
from proxy.storage import session_log
from proxy.storage.queue_reads import QueueReads
from proxy.storage.secondary_store import restored

T = TypeVar("T")

#: The advisory lock every append batch holds until its commit (any constant the proxy owns).
APPEND_LOCK = 0x6F637070  # "ocpp"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    row BIGSERIAL PRIMARY KEY,
    charger TEXT NOT NULL,
    action TEXT NOT NULL,
    text TEXT NOT NULL,
    local_tx BIGINT,
    created DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    subprotocol TEXT
);
CREATE INDEX IF NOT EXISTS frames_by_charger ON frames (charger, row);
CREATE TABLE IF NOT EXISTS transactions (
    charger TEXT NOT NULL,
    local_tx BIGINT NOT NULL,
    backend_tx BIGINT NOT NULL,
    PRIMARY KEY (charger, local_tx)
);
CREATE TABLE IF NOT EXISTS counters (
    charger TEXT PRIMARY KEY,
    last_local_tx BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    charger TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS fuse_reservations (
    site TEXT NOT NULL,
    charger TEXT NOT NULL,
    amps DOUBLE PRECISION,
    updated DOUBLE PRECISION NOT NULL,
    writer TEXT NOT NULL,
    PRIMARY KEY (site, charger)
);
CREATE TABLE IF NOT EXISTS backend_profiles (
    site TEXT NOT NULL,
    charger TEXT NOT NULL,
    profiles TEXT NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    writer TEXT NOT NULL,
    PRIMARY KEY (site, charger)
);
CREATE TABLE IF NOT EXISTS sessions (
    id BIGSERIAL PRIMARY KEY,
    charger TEXT NOT NULL,
    tx TEXT NOT NULL,
    start_msg TEXT,
    connector INTEGER,
    id_tag TEXT,
    started TEXT,
    stopped TEXT,
    first_seen TEXT NOT NULL,
    meter_start DOUBLE PRECISION,
    meter_stop DOUBLE PRECISION,
    meter_last DOUBLE PRECISION,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_tx ON sessions (charger, tx, id);
CREATE INDEX IF NOT EXISTS sessions_by_time ON sessions (first_seen);
CREATE TABLE IF NOT EXISTS session_signed (
    n BIGSERIAL,
    session BIGINT NOT NULL,
    msg_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (session, msg_id, seq)
);
CREATE SEQUENCE IF NOT EXISTS secondary_tx_seq;
CREATE TABLE IF NOT EXISTS secondary_tx (
    charger TEXT NOT NULL, upstream TEXT NOT NULL,
    wallbox_tx BIGINT NOT NULL, upstream_tx BIGINT NOT NULL, seq BIGINT NOT NULL,
    PRIMARY KEY (charger, upstream, wallbox_tx));
CREATE TABLE IF NOT EXISTS secondary_frames (
    charger TEXT NOT NULL, upstream TEXT NOT NULL, seq BIGINT NOT NULL, action TEXT NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (charger, upstream, seq));
CREATE TABLE IF NOT EXISTS secondary_starts (
    charger TEXT NOT NULL, upstream TEXT NOT NULL, msg_id TEXT NOT NULL, wallbox_tx BIGINT NOT NULL,
    PRIMARY KEY (charger, upstream, msg_id));
CREATE TABLE IF NOT EXISTS secondary_state (
    charger TEXT NOT NULL, upstream TEXT NOT NULL, connector INTEGER NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (charger, upstream, connector));
"""


class _Link:
    """One connection that connects again after it broke (each call runs in one worker thread at a time)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._lock = threading.Lock()

    def get(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        return self._conn

    @contextmanager
    def transaction(self, operation: str, *, durable: bool) -> Iterator[psycopg.Cursor[tuple[object, ...]]]:
        """One transaction; every psycopg error becomes StorageError(operation)."""
        with self._lock:
            try:
                conn = self.get()
                with conn.transaction(), conn.cursor() as cursor:
                    cursor.execute(f"SET LOCAL synchronous_commit = {'on' if durable else 'off'}")
                    yield cursor
            except psycopg.Error as exc:
                self._drop_if_broken()
                raise StorageError(operation, _detail(exc)) from exc

    def read(self, fn: Callable[[psycopg.Cursor[tuple[object, ...]]], T]) -> T:
        with self._lock:
            try:
                with self.get().cursor() as cursor:
                    return fn(cursor)
            except psycopg.Error as exc:
                self._drop_if_broken()
                raise StorageError("read", _detail(exc)) from exc

    def _drop_if_broken(self) -> None:
        if self._conn is not None and (self._conn.closed or self._conn.broken):
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PostgresStorage(QueueReads):
    """:class:`~proxy.storage.interface.Storage` in a PostgreSQL database (blocking; see the module)."""

    def __init__(self, url: str, *, keep: int = TX_MEMORY) -> None:
        self.location = redact_url(url)
        self.keep = keep
        self._queue = _Link(url)
        self._mirrors = _Link(url)
        self._leases = _Link(url)
        try:
            with self._queue.transaction("open", durable=True) as cursor:
                # Two processes creating the schema at once would collide on the catalog.
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
                cursor.execute(_SCHEMA)
        except StorageError as exc:
            self.close()
            raise StorageUnusable(self.location, exc.detail, key="[store] url") from exc

    def close(self) -> None:
        self._queue.close()
        self._mirrors.close()
        self._leases.close()

    # -- writes -------------------------------------------------------------------------

    def write(self, changes: Sequence[Change]) -> list[int | None]:
        """One transaction; deliveries alone without waiting for the WAL flush (module docstring)."""
        if not changes:
            return []
        durable = not all(type(change) is Delivered for change in changes)
        results: list[int | None] = []
        with self._queue.transaction(write_operation(changes), durable=durable) as cursor:
            if any(type(change) is Append for change in changes):
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
            for run in change_runs(changes):
                results += _apply(cursor, run)
        return results

    # -- reads --------------------------------------------------------------------------

    def _rows(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        """A query of :class:`QueueReads` (``?`` placeholders become psycopg's ``%s``)."""
        query = sql.replace("?", "%s")

        def run(cursor: psycopg.Cursor[tuple[object, ...]]) -> list[tuple[object, ...]]:
            return cursor.execute(query, args).fetchall()

        return self._queue.read(run)

    def sessions(self, since: str | None, until: str | None) -> list[SessionRecord]:
        return self._queue.read(lambda cursor: _sessions(cursor, since, until))

    def recent_sessions(self, charger: str | None, before: int | None, per_charger: int | None,
                        limit: int) -> list[SessionSummary]:
        params = {"charger": charger, "before": before, "per_charger": per_charger, "limit": limit}
        return self._queue.read(lambda cursor: session_log.summaries(
            cursor.execute(_RECENT, params).fetchall()))

    # -- secondaries' mirrors ------------------------------------------------------------

    def write_mirrors(self, records: Sequence[tuple[str, MirrorRecord]]) -> None:
        if not records:
            return
        with self._mirrors.transaction("mirror", durable=False) as cursor:
            for charger, record in records:
                _mirror(cursor, charger, record, self.keep)

    def restore_mirrors(self) -> dict[tuple[str, str], RestoredMirror]:
        return self._mirrors.read(_restore)


    # -- charger leases (proxy.storage.leases.LeaseStore; the database's clock only) ----------

    def acquire(self, charger: str, owner: str, ttl: float) -> LeaseState:
        """Atomic: the row is locked by the upsert, so two processes never both get a live lease."""
        return self.acquire_many([charger], owner, ttl)[0]

    def acquire_many(self, chargers: Sequence[str], owner: str, ttl: float) -> list[LeaseState]:
        """One upsert for all, in sorted order (two processes lock rows in one order: no deadlock)."""
        if not chargers:
            return []
        with self._leases.transaction("lease", durable=True) as cursor:
            cursor.execute("INSERT INTO leases SELECT c, %s, clock_timestamp() + make_interval(secs => %s) "
                           "FROM unnest(%s::text[]) AS c ORDER BY c "
                           "ON CONFLICT (charger) DO UPDATE SET owner = excluded.owner, expires = excluded.expires "
                           "WHERE leases.owner = excluded.owner OR leases.expires <= clock_timestamp()",
                           (owner, ttl, sorted(set(chargers))))
            return _lease_states(cursor, chargers)

    def renew(self, chargers: Sequence[str], owner: str, ttl: float) -> list[LeaseState]:
        """One UPDATE of the rows still ``owner``'s, in sorted order (two processes lock rows in one order)."""
        if not chargers:
            return []
        with self._leases.transaction("lease", durable=True) as cursor:
            cursor.execute("UPDATE leases SET expires = clock_timestamp() + make_interval(secs => %s) WHERE charger IN "
                           "(SELECT charger FROM leases WHERE charger = ANY(%s) AND owner = %s ORDER BY charger "
                           "FOR UPDATE)", (ttl, sorted(set(chargers)), owner))
            return _lease_states(cursor, chargers)

    def release(self, charger: str, owner: str) -> None:
        with self._leases.transaction("lease", durable=True) as cursor:
            cursor.execute("DELETE FROM leases WHERE charger = %s AND owner = %s", (charger, owner))

    def release_all(self, owner: str) -> None:
        with self._leases.transaction("lease", durable=True) as cursor:
            cursor.execute("DELETE FROM leases WHERE owner = %s", (owner,))

    def reservations(self, site: str, owner: str) -> PostgresReservations:
        """The fuse reservations of ``site``, written as process ``owner`` (a connection of their own)."""
        return PostgresReservations(self._leases.url, site, owner, self.location)


class PostgresReservations:
    """:class:`~proxy.storage.interface.ReservationStore` shared by the processes of one site.

    A write of a charger's record whose live lease another process holds is
    left out (in the same statement, so atomically with the lease table): that
    process serves the charger and its records are the newer truth, so a late
    write of a process that served it before (a decrease recorded after the
    session ended) can never lower what the new server recorded.
    """

    def __init__(self, url: str, site: str, owner: str, location: str) -> None:
        self.site, self.owner, self.location = site, owner, location
        self._link = _Link(url)

    def load(self, chargers: Sequence[str] | None = None) -> dict[str, float | None]:
        def run(cursor: psycopg.Cursor[tuple[object, ...]]) -> list[tuple[object, ...]]:
            return cursor.execute("SELECT charger, amps FROM fuse_reservations WHERE site = %s "
                                  "AND (%s::text[] IS NULL OR charger = ANY(%s::text[]))",
                                  (self.site, chargers, chargers)).fetchall()

        chargers = None if chargers is None else list(chargers)
        return {str(charger): None if amps is None else float(amps)  # type: ignore[arg-type]
                for charger, amps in self._link.read(run)}

    def record(self, limits: Mapping[str, float | None]) -> None:
        if not limits:
            return
        chargers = sorted(limits)
        with self._link.transaction("reservation", durable=True) as cursor:  # an increase waits for it
            cursor.execute(
                "INSERT INTO fuse_reservations SELECT %s, t.c, t.a, %s, %s "
                "FROM unnest(%s::text[], %s::float8[]) AS t(c, a) WHERE NOT EXISTS (SELECT 1 FROM leases l "
                "WHERE l.charger = split_part(t.c, '#', 1) AND l.owner <> %s AND l.expires > clock_timestamp()) "
                "ORDER BY t.c "
                "ON CONFLICT (site, charger) DO UPDATE SET amps = excluded.amps, updated = excluded.updated, "
                "writer = excluded.writer",
                (self.site, time.time(), self.owner, chargers, [limits[c] for c in chargers], self.owner))

    def load_profiles(self, chargers: Sequence[str] | None = None) -> dict[str, str]:
        def run(cursor: psycopg.Cursor[tuple[object, ...]]) -> list[tuple[object, ...]]:
            return cursor.execute("SELECT charger, profiles FROM backend_profiles WHERE site = %s "
                                  "AND (%s::text[] IS NULL OR charger = ANY(%s::text[]))",
                                  (self.site, chargers, chargers)).fetchall()

        chargers = None if chargers is None else list(chargers)
        return {str(charger): str(text) for charger, text in self._link.read(run)}

    def record_profiles(self, profiles: Mapping[str, str | None]) -> None:
        if not profiles:
            return
        chargers = sorted(profiles)
        kept = [c for c in chargers if profiles[c] is not None]
        with self._link.transaction("profiles", durable=True) as cursor:
            cursor.execute(
                "DELETE FROM backend_profiles b WHERE b.site = %s AND b.charger = ANY(%s::text[]) "
                "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.charger = b.charger AND l.owner <> %s "
                "AND l.expires > clock_timestamp())",
                (self.site, [c for c in chargers if profiles[c] is None], self.owner))
            cursor.execute(
                "INSERT INTO backend_profiles SELECT %s, t.c, t.p, %s, %s "
                "FROM unnest(%s::text[], %s::text[]) AS t(c, p) WHERE NOT EXISTS (SELECT 1 FROM leases l "
                "WHERE l.charger = t.c AND l.owner <> %s AND l.expires > clock_timestamp()) "
                "ORDER BY t.c "
                "ON CONFLICT (site, charger) DO UPDATE SET profiles = excluded.profiles, updated = excluded.updated, "
                "writer = excluded.writer",
                (self.site, time.time(), self.owner, kept, [profiles[c] for c in kept], self.owner))

    def served_elsewhere(self) -> set[str]:
        def run(cursor: psycopg.Cursor[tuple[object, ...]]) -> list[tuple[object, ...]]:
            return cursor.execute("SELECT charger FROM leases WHERE owner <> %s AND expires > clock_timestamp()",
                                  (self.owner,)).fetchall()

        return {str(charger) for (charger,) in self._link.read(run)}

    def close(self) -> None:
        self._link.close()


def _lease_states(cursor: psycopg.Cursor[tuple[object, ...]], chargers: Sequence[str]) -> list[LeaseState]:
    """Each charger's lease as it stands, in the database's time (holder "" when nobody holds it)."""
    rows = cursor.execute("SELECT charger, owner, extract(epoch FROM expires - clock_timestamp()) FROM leases "
                          "WHERE charger = ANY(%s)", (list(chargers),)).fetchall()
    found = {str(row[0]): (str(row[1]), float(row[2])) for row in rows}  # type: ignore[arg-type]
    return [LeaseState(charger, *found.get(charger, ("", 0.0))) for charger in chargers]


def _apply(cursor: psycopg.Cursor[tuple[object, ...]], run: Sequence[Change]) -> list[int | None]:
    """One run of changes of one kind."""
    first = run[0]
    if isinstance(first, Append):
        return _append(cursor, run)  # type: ignore[arg-type]
    if isinstance(first, Journal):
        for change in run:
            _journal(cursor, change.event)  # type: ignore[union-attr]
        return [None] * len(run)
    if isinstance(first, LogRelayed):  # read in the store's thread (as SQLite does)
        for event in relayed_events([f for change in run for f in change.frames]):  # type: ignore[union-attr]
            _journal(cursor, event)
        return [None] * len(run)
    rows = [change.row for change in run]  # type: ignore[union-attr]
    if isinstance(first, MarkSent):
        cursor.execute("UPDATE frames SET attempts = attempts + 1 WHERE row = ANY(%s)", (rows,))
        return [None] * len(run)
    pairs = [(c.charger, c.local_tx, c.backend_tx) for c in run  # type: ignore[union-attr]
             if c.local_tx is not None and c.backend_tx is not None]  # type: ignore[union-attr]
    if pairs:
        cursor.executemany("INSERT INTO transactions VALUES (%s, %s, %s) ON CONFLICT (charger, local_tx) "
                           "DO UPDATE SET backend_tx = excluded.backend_tx", pairs)
    cursor.execute("DELETE FROM frames WHERE row = ANY(%s)", (rows,))
    return [None] * len(run)


def _append(cursor: psycopg.Cursor[tuple[object, ...]], run: Sequence[Append]) -> list[int | None]:
    # VALUES are numbered in list order under the advisory lock, so the sorted rows are the list's.
    now = time.time()
    values = [v for a in run for v in (a.charger, a.action, a.text, a.local_tx, now, a.subprotocol)]
    cursor.execute("INSERT INTO frames (charger, action, text, local_tx, created, subprotocol) VALUES "
                   + ",".join(["(%s, %s, %s, %s, %s, %s)"] * len(run)) + " RETURNING row", values)
    rows: list[int | None] = sorted(int(row) for (row,) in cursor.fetchall())  # type: ignore[call-overload]
    counters = [(a.charger, a.local_tx) for a in run if a.local_tx is not None]
    if counters:
        cursor.executemany("INSERT INTO counters VALUES (%s, %s) ON CONFLICT (charger) DO UPDATE "
                           "SET last_local_tx = LEAST(counters.last_local_tx, excluded.last_local_tx)", counters)
    return rows


#: session_log's status-page list, its ``:name`` parameters in psycopg's spelling.
_RECENT = re.sub(r":(\w+)", r"%(\1)s", session_log.RECENT)

#: session_log's per-kind updates, its ``:name`` parameters in psycopg's spelling.
_JOURNAL_UPDATE = {kind: re.sub(r":(\w+)", r"%(\1)s", sql) for kind, sql in session_log.UPDATE.items()}


def _journal(cursor: psycopg.Cursor[tuple[object, ...]], event: SessionEvent) -> None:
    """The session log's rules (:mod:`proxy.storage.session_log`): one event onto its transaction's record."""
    found = cursor.execute("SELECT id, start_msg FROM sessions WHERE charger = %s AND tx = %s "
                           "ORDER BY id DESC LIMIT 1", (event.charger, event.transaction)).fetchone()
    if found is not None and not (event.kind == "start" and found[1] not in (None, event.msg_id)):
        row = int(found[0])  # type: ignore[call-overload]
    else:
        created = cursor.execute("INSERT INTO sessions (charger, tx, first_seen) VALUES (%s, %s, %s) RETURNING id",
                                 (event.charger, event.transaction, event.at or session_log.now_utc())).fetchone()
        assert created is not None
        row = int(created[0])  # type: ignore[call-overload]
    values = {"id": row, "msg": event.msg_id, "connector": event.connector, "id_tag": event.id_tag,
              "at": event.at or session_log.now_utc(), "meter": event.meter_wh, "reason": event.reason}
    cursor.execute(f"UPDATE sessions SET {_JOURNAL_UPDATE[event.kind]} WHERE id = %(id)s", values)
    signed = [(row, event.msg_id, seq, text) for seq, text in enumerate(event.signed)]
    if event.signed_frame is not None:
        signed.append((row, event.msg_id, session_log.FRAME, event.signed_frame))
    signed += [(row, msg_id, session_log.FRAME, text) for msg_id, text in event.signed_frames]
    if signed:
        cursor.executemany("INSERT INTO session_signed (session, msg_id, seq, text) VALUES (%s, %s, %s, %s) "
                           "ON CONFLICT DO NOTHING", signed)
    if event.local_tx is not None:  # the proxy's own id: its counter must never hand it out again
        cursor.execute("INSERT INTO counters VALUES (%s, %s) ON CONFLICT (charger) DO UPDATE "
                       "SET last_local_tx = LEAST(counters.last_local_tx, excluded.last_local_tx)",
                       (event.charger, event.local_tx))


def _sessions(cursor: psycopg.Cursor[tuple[object, ...]], since: str | None,
              until: str | None) -> list[SessionRecord]:
    """Transactions whose start (or first frame) is in [since, until), as session_log.read answers them."""
    rows = cursor.execute(
        "SELECT s.id, s.charger, s.tx, connector, id_tag, started, stopped, meter_start, meter_stop, meter_last, "
        "reason, t.backend_tx FROM sessions s LEFT JOIN transactions t "
        "ON t.charger = s.charger AND CAST(t.local_tx AS TEXT) = s.tx "
        "WHERE (%(since)s::text IS NULL OR coalesce(started, first_seen) >= %(since)s) "
        "AND (%(until)s::text IS NULL OR coalesce(started, first_seen) < %(until)s) "
        "ORDER BY coalesce(started, first_seen), s.id", {"since": since, "until": until}).fetchall()
    stored: dict[int, list[tuple[int, str]]] = {}
    for session, seq, text in cursor.execute("SELECT session, seq, text FROM session_signed WHERE session = ANY(%s) "
                                             "ORDER BY n", ([r[0] for r in rows],)).fetchall():
        stored.setdefault(int(session), []).append((int(seq), str(text)))  # type: ignore[call-overload]
    return [SessionRecord(charger, tx, connector, id_tag, started, stopped, meter_start, meter_stop,  # type: ignore[arg-type]
                          reason, session_log.expand_signed(stored.get(int(row), [])),  # type: ignore[arg-type, call-overload]
                          backend_tx, meter_last)  # type: ignore[arg-type]
            for row, charger, tx, connector, id_tag, started, stopped, meter_start, meter_stop, meter_last, reason,
            backend_tx in rows]


def _mirror(cursor: psycopg.Cursor[tuple[object, ...]], charger: str, record: MirrorRecord, keep: int) -> None:
    """One mirror record; each is idempotent (upsert or delete), as docs/storage.md requires."""
    if isinstance(record, MirrorQueued):
        cursor.execute("INSERT INTO secondary_frames VALUES (%s, %s, %s, %s, %s) "
                       "ON CONFLICT (charger, upstream, seq) DO UPDATE SET action = excluded.action, "
                       "text = excluded.text", (charger, record.upstream, record.seq, record.action, record.text))
    elif isinstance(record, MirrorUnqueued):
        cursor.execute("DELETE FROM secondary_frames WHERE charger = %s AND upstream = %s AND seq = %s",
                       (charger, record.upstream, record.seq))
    elif isinstance(record, MirrorState):
        cursor.execute("INSERT INTO secondary_state VALUES (%s, %s, %s, %s) "
                       "ON CONFLICT (charger, upstream, connector) DO UPDATE SET text = excluded.text",
                       (charger, record.upstream, record.connector, record.text))
    elif isinstance(record, MirrorStartKnown):
        cursor.execute("INSERT INTO secondary_starts VALUES (%s, %s, %s, %s) "
                       "ON CONFLICT (charger, upstream, msg_id) DO UPDATE SET wallbox_tx = excluded.wallbox_tx",
                       (charger, record.upstream, record.msg_id, record.wallbox_tx))
    else:
        _pair(cursor, charger, record, keep)


def _pair(cursor: psycopg.Cursor[tuple[object, ...]], charger: str, record: TxMapped, keep: int) -> None:
    """A secondary's id pair: newest last (a sequence), only the newest ``keep`` per mirror kept."""
    key = (charger, record.upstream)
    cursor.execute("DELETE FROM secondary_starts WHERE charger = %s AND upstream = %s AND wallbox_tx = %s",
                   (*key, record.wallbox_tx))
    cursor.execute("INSERT INTO secondary_tx VALUES (%s, %s, %s, %s, nextval('secondary_tx_seq')) "
                   "ON CONFLICT (charger, upstream, wallbox_tx) DO UPDATE SET upstream_tx = excluded.upstream_tx, "
                   "seq = excluded.seq", (*key, record.wallbox_tx, record.upstream_tx))
    cursor.execute("DELETE FROM secondary_tx WHERE charger = %s AND upstream = %s AND seq <= "
                   "(SELECT seq FROM secondary_tx WHERE charger = %s AND upstream = %s "
                   "ORDER BY seq DESC LIMIT 1 OFFSET %s)", (*key, *key, keep))


def _restore(cursor: psycopg.Cursor[tuple[object, ...]]) -> dict[tuple[str, str], RestoredMirror]:
    found: dict[tuple[str, str], RestoredMirror] = {}

    def entry(charger: object, upstream: object) -> RestoredMirror:
        return found.setdefault((str(charger), str(upstream)), restored())

    for charger, upstream, wallbox_tx, upstream_tx in cursor.execute(
            "SELECT charger, upstream, wallbox_tx, upstream_tx FROM secondary_tx ORDER BY seq").fetchall():
        entry(charger, upstream).transactions[int(wallbox_tx)] = int(upstream_tx)  # type: ignore[call-overload]
    for charger, upstream, seq, action, text in cursor.execute(
            "SELECT charger, upstream, seq, action, text FROM secondary_frames ORDER BY seq").fetchall():
        entry(charger, upstream).queued.append((int(seq), str(action), str(text)))  # type: ignore[call-overload]
    for charger, upstream, connector, text in cursor.execute(
            "SELECT charger, upstream, connector, text FROM secondary_state").fetchall():
        entry(charger, upstream).state[int(connector)] = str(text)  # type: ignore[call-overload]
    for charger, upstream, msg_id, wallbox_tx in cursor.execute(
            "SELECT charger, upstream, msg_id, wallbox_tx FROM secondary_starts").fetchall():
        entry(charger, upstream).starts[str(msg_id)] = int(wallbox_tx)  # type: ignore[call-overload]
    return found


def _detail(exc: BaseException) -> str:
    """The error, first line only, without the URL's password (psycopg's messages may name the DSN)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redact_url(f"{type(exc).__name__}: {first}")[:300]
