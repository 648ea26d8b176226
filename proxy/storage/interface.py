"""The one storage interface of the proxy's durable state (typed, backend-neutral).

Everything the proxy must not lose goes through :class:`Storage`: the offline
queue of each charger's primary, the transaction-id map of its replays, its
local transaction-id counter, its secondaries' mirrors and the session log
(every charger's transactions, :mod:`proxy.core.sessionlog`). SQLite implements it
(:class:`proxy.storage.offline_queue.SqliteStorage`), and PostgreSQL
(:class:`proxy.storage.postgres.PostgresStorage`, several proxies sharing one
database) the same methods with the same guarantees. Further parts, each a
narrow protocol of its own so their writers never wait for each other: the
fuse reservations (:class:`ReservationStore`, below) and the leases
(:class:`proxy.storage.leases.LeaseStore`). What each method guarantees is in
``docs/storage.md``; the short form is in each docstring here.

Rules every implementation follows:

* **Durable before return.** A write method returns only once its changes
  survive a crash of the process (``kill -9``) and, for :meth:`Storage.write`,
  a power cut. A write method that raises changed nothing.
* **One transaction per call.** :meth:`Storage.write` applies a whole batch or
  nothing, so callers group many frames into one commit (group commit).
* **Errors are** :class:`StorageError` **only** (disk full, I/O error, a lost
  database connection), so the trio layer needs to know one exception type.
* **Idempotent deliveries, marks and journal entries.** Applying a
  :class:`Delivered`, a :class:`MarkSent`, a :class:`Journal` or a :class:`LogRelayed` twice has the
  effect of applying it once, so a caller may retry any write whose outcome it
  does not know (and a wallbox's retransmitted frame is logged once).
* **Order.** :meth:`Storage.pending` returns a charger's frames in the order
  their :class:`Append` calls were committed (and, within one batch, listed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from proxy.core.mirror import MirrorQueued, MirrorStartKnown, MirrorState, MirrorUnqueued, TxMapped
from proxy.core.offline import Stored
from proxy.core.sessionlog import Relayed, SessionEvent, SessionRecord, SessionSummary

#: One change to a secondary's mirror (see :mod:`proxy.core.mirror`).
MirrorRecord = TxMapped | MirrorQueued | MirrorUnqueued | MirrorState | MirrorStartKnown


class StorageError(Exception):
    """The store could not do what was asked (disk full, I/O error, database gone).

    ``operation`` names the call for logs and metrics (``append``, ``mark``,
    ``deliver``, ``journal``, ``read``, ``mirror``, ``open``).
    """

    def __init__(self, operation: str, detail: str) -> None:
        super().__init__(f"{operation}: {detail}")
        self.operation = operation
        self.detail = detail


class StorageUnusable(StorageError):
    """The store cannot be opened at start-up; names the file (or the URL, password cut) and its config key."""

    def __init__(self, path: Path | str, detail: str, key: str = "[offline] data_dir") -> None:
        super().__init__("open", detail)
        self.path = path
        self.key = key


@dataclass(frozen=True, slots=True)
class Append:
    """Queue one CALL answered locally (exact text); ``local_tx``: the id its local answer handed out."""

    charger: str
    action: str
    text: str
    local_tx: int | None = None
    #: The WebSocket subprotocol the wallbox spoke (a drain without it opens the upstream with this one).
    subprotocol: str | None = None


@dataclass(frozen=True, slots=True)
class MarkSent:
    """The queued frame ``row`` is about to be sent to the backend (replay)."""

    row: int


@dataclass(frozen=True, slots=True)
class Delivered:
    """The backend answered the replayed frame ``row``: forget it, and record ``local_tx`` → ``backend_tx``."""

    row: int
    charger: str
    local_tx: int | None = None
    backend_tx: int | None = None


@dataclass(frozen=True, slots=True)
class Journal:
    """Record one change to a transaction in the session log (docs/standalone.md); idempotent."""

    event: SessionEvent


@dataclass(frozen=True, slots=True)
class LogRelayed:
    """Relayed frames (the backend answered them) to read into the session log; idempotent like Journal.

    The store reads them (:func:`proxy.core.sessionlog.relayed_events`) in
    its own thread as part of the write, so the event loop only hands over
    the references it kept (docs/standalone.md, "What the log costs").
    Consecutive ones in a batch are read as one, in order.
    """

    frames: Sequence[Relayed]


#: One change in a :meth:`Storage.write` batch.
Change = Append | MarkSent | Delivered | Journal | LogRelayed


@dataclass
class RestoredMirror:
    """One mirror's stored part: id pairs (oldest first), queued frames, replay state."""

    transactions: dict[int, int]
    queued: list[tuple[int, str, str]]
    state: dict[int, str]
    #: Queued StartTransactions whose wallbox id is known: msg id → wallbox transactionId.
    starts: dict[str, int]


class Storage(Protocol):
    """Durable state of the proxy. Blocking calls: the trio layer runs them in a worker thread."""

    #: Where the data lives, for messages (a file path, a database URL without its password).
    location: str

    def write(self, changes: Sequence[Change]) -> list[int | None]:
        """Apply ``changes`` in order in one transaction, durable before return.

        A batch with an :class:`Append` or a :class:`MarkSent` survives a
        power cut once returned (fsync). A batch of :class:`Delivered` only
        survives a process crash; a power cut may undo it, and the frame is
        then sent again (it is marked, so that is reported as a possible
        duplicate): at-least-once holds either way.

        Returns, per change, the new row of an :class:`Append` (rows grow in
        commit order) and None for the others. :class:`Delivered` of a row
        that is gone and :class:`MarkSent` of a row that is gone do nothing.
        """
        ...

    def pending(self, charger: str) -> list[Stored]:
        """The charger's queued frames, oldest first, with how often each was marked sent."""
        ...

    def backlog(self) -> dict[str, int]:
        """Queued frames per charger, for every charger that has any (start-up: which queues to drain)."""
        ...

    def depth(self, charger: str) -> tuple[int, float | None]:
        """(queued frames, Unix time the oldest was stored; None when empty)."""
        ...

    def transactions(self, charger: str) -> dict[int, int]:
        """Local transaction id → the backend's, as recorded by :class:`Delivered`."""
        ...

    def last_local_tx(self, charger: str) -> int:
        """The lowest (negative) local transaction id ever appended for the charger; 0 if none."""
        ...

    def subprotocol(self, charger: str) -> str | None:
        """The subprotocol of the charger's newest queued frame (None: no frame, or not known)."""
        ...

    def sessions(self, since: str | None, until: str | None) -> list[SessionRecord]:
        """The session log's transactions started in [since, until) (UTC ``YYYY-MM-DDTHH:MM:SSZ``), oldest first."""
        ...

    def recent_sessions(self, charger: str | None, before: int | None, per_charger: int | None,
                        limit: int) -> list[SessionSummary]:
        """The newest records, newest first: of ``charger`` (None: all), numbered below ``before`` (None: any),
        at most ``per_charger`` of each charger (None: no such cap) and ``limit`` in all."""
        ...

    def write_mirrors(self, records: Sequence[tuple[str, MirrorRecord]]) -> None:
        """Apply (charger, record) pairs in order in one transaction; survives a process crash once returned."""
        ...

    def restore_mirrors(self) -> dict[tuple[str, str], RestoredMirror]:
        """Every mirror's stored part, by (charger, secondary name)."""
        ...

    def close(self) -> None:
        ...


class ReservationStore(Protocol):
    """A site's fuse reservations: per charger, the highest limit (A) it may be applying (docs/cluster.md), and the
    backend's charging profiles that may be on it (docs/load-management.md, "The backend's profiles over a
    restart").

    None: unknown (counts at its max_current). Durable before return, one
    transaction per call, :class:`StorageError` only. SQLite
    (:class:`proxy.storage.reservations.SqliteReservations`, one process) and
    PostgreSQL (:class:`proxy.storage.postgres.PostgresReservations`, shared by
    the processes of a site: a record of a charger whose lease another process
    holds is left to that process).
    """

    location: str

    def load(self, chargers: Sequence[str] | None = None) -> dict[str, float | None]:
        """The records (of ``chargers`` only, if given)."""
        ...

    def record(self, limits: Mapping[str, float | None]) -> None:
        """Write all of ``limits`` in one transaction; durable (fsync) before return."""
        ...

    def served_elsewhere(self) -> set[str]:
        """Chargers whose live lease another process holds: their records are that process's (SQLite: none)."""
        ...

    def load_profiles(self, chargers: Sequence[str] | None = None) -> dict[str, str]:
        """Per charger, the backend profiles that may be on it (text the load management wrote, JSON: see
        :func:`proxy.loadmgmt.profiles.encode_kept`; of ``chargers`` only, if given)."""
        ...

    def record_profiles(self, profiles: Mapping[str, str | None]) -> None:
        """Replace each charger's backend profiles (None: it has none) in one transaction; durable before return.
        Like :meth:`record`, PostgreSQL leaves a charger whose live lease another process holds to that process."""
        ...

    def close(self) -> None:
        ...


#: Most changes in one statement (SQLite allows 32 766 variables, PostgreSQL 65 535; an append takes 6).
_RUN = 1000


def change_runs(changes: Sequence[Change]) -> list[Sequence[Change]]:
    """Consecutive changes of one kind, in order, at most ``_RUN`` each."""
    runs: list[Sequence[Change]] = []
    start = 0
    for index in range(1, len(changes) + 1):
        if (index == len(changes) or type(changes[index]) is not type(changes[start])
                or index - start == _RUN):
            runs.append(changes[start:index])
            start = index
    return runs


def write_operation(changes: Sequence[Change]) -> str:
    kinds = {type(change) for change in changes}
    if Append in kinds:
        return "append"
    return "journal" if Journal in kinds or LogRelayed in kinds else "deliver" if Delivered in kinds else "mark"
