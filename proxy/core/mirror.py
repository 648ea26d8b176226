"""A secondary upstream's copy of one wallbox's messages (sans-IO).

A *secondary* (an EMS, Home Assistant, a kWh reporting service) gets copies
of the wallbox's CALLs while the primary backend owns the wallbox. It must
never slow the primary or the wallbox down, and it must still see a history it
can make sense of. A :class:`Mirror` holds what that takes, for one secondary
of one wallbox, and lives as long as the proxy (across wallbox reconnects):

* **Its own queue**, sent one CALL at a time in arrival order. The wallbox's
  pace is set by the primary alone; a slow or unreachable secondary only
  makes this queue longer. The queue is bounded (frames and bytes); when full,
  the oldest frame that is not a transaction message goes first.
* **Its own transaction ids.** The secondary answers StartTransaction with an
  id of its own; the mirror pairs it with the wallbox's id (from the primary's
  answer) and substitutes it in later MeterValues and StopTransaction copies,
  editing only that number (signed meter data stays byte-identical). CALLs
  from the secondary that name a transaction (RemoteStopTransaction, a
  TxProfile) get the wallbox's id back. Pairs are reported as
  :class:`TxMapped` so the caller can persist them.
* **The wallbox's state for a (re)connect.** The last BootNotification and the
  last StatusNotification per connector that the secondary acknowledged are
  sent again, with fresh message ids, before the queue is replayed, so a
  secondary that comes back (or connects for the first time after the
  wallbox booted) knows what it is talking to.
* **Throttled replay:** at most ``replay_rate`` frames per second.

Frames the secondary does not get (not in ``forward_actions``) are filtered
here, and retransmissions by the wallbox (same id, same text) are sent once.
Heartbeats are only copied when they can go out at once: queued, they would
tell a secondary nothing.
"""

from __future__ import annotations

import functools
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from proxy.messages.ocppj import Frame, build_error, classify, replace_id
from proxy.messages.jsonspan import integer_at, integer_span, remove_member, replace_value
from proxy.core.offline import started_transaction

#: Message ids of the mirror's own replays (BootNotification, StatusNotification).
REPLAY_PREFIX = "ocpp-proxy:r"

#: Transaction id pairs kept in memory per mirror (the store keeps as many).
TX_MEMORY = 512
#: Recently offered message ids remembered to recognise retransmissions.
_SEEN_MEMORY = 64
#: StartTransactions waiting for the second half of their id pair.
_STARTS_MEMORY = 1024

_TX_PATH: dict[str, tuple[str | int, ...]] = {
    "MeterValues": (3, "transactionId"),
    "StopTransaction": (3, "transactionId"),
}
#: Where a secondary's CALLs towards the wallbox name a transaction.
_INBOUND_TX_PATH: dict[str, tuple[str | int, ...]] = {
    "RemoteStopTransaction": (3, "transactionId"),
    "SetChargingProfile": (3, "csChargingProfiles", "transactionId"),
}


# --- events -------------------------------------------------------------------------

#: Why a secondary will never get a frame: its queue overflowed, it never answered the
#: frame, or the frame names a transaction it never learnt.
DropReason = Literal["queue_full", "unanswered", "unknown_transaction"]


@dataclass(frozen=True, slots=True)
class MirrorSend:
    text: str


@dataclass(frozen=True, slots=True)
class MirrorCompleted:
    action: str
    seconds: float


@dataclass(frozen=True, slots=True)
class MirrorDropped:
    """A frame this secondary will never receive, and why."""

    upstream: str
    action: str
    reason: DropReason


@dataclass(frozen=True, slots=True)
class TxMapped:
    """The secondary knows the wallbox's transaction ``wallbox_tx`` as ``upstream_tx``."""

    upstream: str
    wallbox_tx: int
    upstream_tx: int


@dataclass(frozen=True, slots=True)
class MirrorQueued:
    """A frame entered the queue (for a durable copy; ``seq`` orders a secondary's frames)."""

    upstream: str
    seq: int
    action: str
    text: str


@dataclass(frozen=True, slots=True)
class MirrorUnqueued:
    """The frame ``seq`` left the queue for good (acknowledged or dropped)."""

    upstream: str
    seq: int


@dataclass(frozen=True, slots=True)
class MirrorState:
    """What a reconnect replays changed: the last BootNotification (connector -1) or a connector's status."""

    upstream: str
    connector: int
    text: str


@dataclass(frozen=True, slots=True)
class MirrorStartKnown:
    """The wallbox's id for the queued StartTransaction ``msg_id`` (kept until the pair is complete)."""

    upstream: str
    msg_id: str
    wallbox_tx: int


MirrorEvent = (MirrorSend | MirrorCompleted | MirrorDropped | TxMapped | MirrorQueued | MirrorUnqueued
               | MirrorState | MirrorStartKnown)
#: Connector key of the BootNotification in :class:`MirrorState`.
BOOT = -1


# --- state ------------------------------------------------------------------------

@dataclass(slots=True)
class _Item:
    msg_id: str
    action: str
    text: str
    replay: bool = False
    attempts: int = 0
    seq: int = 0

    @property
    def transactional(self) -> bool:
        """Lost, it would break the secondary's transaction history."""
        return self.action in ("StartTransaction", "StopTransaction", "TransactionEvent") or (  # 2.x: TransactionEvent
            self.action == "MeterValues" and '"transactionId"' in self.text)


@dataclass(slots=True)
class _Start:
    """Both halves of a transaction id pair; None until known (``refused``: the secondary has none)."""

    wallbox_tx: int | None = None
    upstream_tx: int | None = None
    refused: bool = False


class Mirror:
    def __init__(self, name: str, *, forward_actions: frozenset[str] | None = None,
                 queue_limit: int = 1000, queue_bytes: int = 8 * 1024 * 1024,
                 call_timeout: float = 30.0, replay_rate: float = 50.0, max_attempts: int = 3,
                 transactions: Mapping[int, int] | None = None,
                 queued: Sequence[tuple[int, str, str]] = (), state: Mapping[int, str] | None = None,
                 starts: Mapping[str, int] | None = None) -> None:
        """``transactions``, ``queued`` (seq, action, text), ``state`` and ``starts`` restore a stored mirror."""
        self.name = name
        #: Wallbox CALL actions this secondary gets; None: all.
        self.forward_actions = forward_actions
        self.queue_limit = queue_limit
        self.queue_bytes = queue_bytes
        self.call_timeout = call_timeout
        self.interval = 1.0 / replay_rate if replay_rate > 0 else 0.0
        self.max_attempts = max_attempts
        self.up = False
        self._owner: object = None
        self._held = False
        self._queue: deque[_Item] = deque()
        self._bytes = 0
        self._outstanding: _Item | None = None
        self._sent_at = 0.0
        self._next_send = float("-inf")
        #: wallbox transactionId → this secondary's (None: it refused or never got the Start).
        self._tx: OrderedDict[int, int | None] = OrderedDict((w, u) for w, u in (transactions or {}).items())
        self._starts: OrderedDict[str, _Start] = OrderedDict()
        self._boot: _Item | None = None
        self._status: dict[int, _Item] = {}
        #: msg id → (text, when offered): retransmissions come within the wallbox's own timeout.
        self._seen: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._sent_text = ""
        self._seq = 0
        self._queue.extend(_Item(classify(text).msg_id or "", action, text, seq=seq) for seq, action, text in queued)
        self._bytes = sum(len(item.text) for item in self._queue)
        self._item_seq = max((seq for seq, _, _ in queued), default=0)
        for item in self._queue:
            if item.action == "StartTransaction":
                self._starts[item.msg_id] = _Start(wallbox_tx=(starts or {}).get(item.msg_id))
        for connector, text in (state or {}).items():
            item = _Item(classify(text).msg_id or "", "BootNotification" if connector == BOOT else "StatusNotification",
                         text)
            if connector == BOOT:
                self._boot = item
            else:
                self._status[connector] = item

    # -- introspection ---------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Frames waiting for this secondary, the one in flight included."""
        return len(self._queue) + (self._outstanding is not None)

    def transactions(self) -> dict[int, int | None]:
        return dict(self._tx)

    # -- inputs ------------------------------------------------------------------------

    def offer(self, frame: Frame, now: float) -> list[MirrorEvent]:
        """A CALL from the wallbox (already forwarded to the primary)."""
        action, msg_id = frame.action or "", frame.msg_id or ""
        if self.forward_actions is not None and action not in self.forward_actions:
            return []
        seen = self._seen.get(msg_id)
        if seen is not None and seen[0] == frame.text and now - seen[1] < 2 * self.call_timeout:
            return []  # the wallbox retransmitted a CALL this secondary already has
        self._seen[msg_id] = (frame.text, now)
        self._seen.move_to_end(msg_id)
        while len(self._seen) > _SEEN_MEMORY:
            self._seen.popitem(last=False)
        if action == "Heartbeat" and not self._idle(now):
            return []
        if action == "StartTransaction":
            self._starts[msg_id] = _Start()
            while len(self._starts) > _STARTS_MEMORY:
                self._starts.popitem(last=False)
        self._item_seq += 1
        self._queue.append(_Item(msg_id, action, frame.text, seq=self._item_seq))
        self._bytes += len(frame.text)
        events: list[MirrorEvent] = []
        if action != "Heartbeat":  # sent at once or not at all: nothing to keep
            events.append(MirrorQueued(self.name, self._item_seq, action, frame.text))
        return events + self._evict() + self._pump(now)

    def wallbox_transaction(self, msg_id: str, wallbox_tx: int) -> list[MirrorEvent]:
        """The wallbox was told ``wallbox_tx`` for its StartTransaction ``msg_id``."""
        start = self._starts.get(msg_id)
        if start is None:
            return []
        start.wallbox_tx = wallbox_tx
        return self._pair(msg_id, start) or [MirrorStartKnown(self.name, msg_id, wallbox_tx)]

    def from_upstream(self, frame: Frame, now: float) -> list[MirrorEvent]:
        """An answer from the secondary; anything but the answer to the CALL in flight is stale."""
        item = self._outstanding
        if item is None or frame.msg_id != item.msg_id:
            return []
        self._outstanding = None
        events: list[MirrorEvent] = [MirrorCompleted(item.action, now - self._sent_at)]
        if item.action == "StartTransaction":
            events += self._started(item, frame)
        events += self._delivered(item)
        return events + self._pump(now)

    def link_up(self, now: float, owner: object = None) -> list[MirrorEvent]:
        """The secondary's connection is open: its last known state first, then the queue.

        ``owner`` is the session whose connection this is. A wallbox that
        reconnects gets a new session while the old one is still closing; the
        new owner takes over and the old one's ``link_down`` is ignored.
        """
        if self.up and owner is self._owner:
            return self._pump(now)
        if self.up:
            self.link_down(self._owner)
        self.up, self._owner, self._held = True, owner, False
        replay = [self._replay_item(item) for item in self._snapshot()]
        self._queue.extendleft(reversed(replay))
        self._bytes += sum(len(item.text) for item in replay)
        return self._pump(now)

    def link_down(self, owner: object = None) -> None:
        """The connection is gone: the CALL in flight goes back to the front of the queue."""
        if owner is not self._owner:
            return
        self.up = False
        if self._outstanding is not None and not self._outstanding.replay:
            self._queue.appendleft(self._outstanding)
        self._outstanding = None
        kept = [item for item in self._queue if not item.replay and item.action != "Heartbeat"]
        self._queue = deque(kept)
        self._bytes = sum(len(item.text) for item in kept)
        self._next_send = float("-inf")

    def poll(self, now: float) -> list[MirrorEvent]:
        """Retry a CALL the secondary did not answer; give up after ``max_attempts``."""
        events: list[MirrorEvent] = []
        item = self._outstanding
        if item is not None and now - self._sent_at >= self.call_timeout:
            item.attempts += 1
            if item.attempts < self.max_attempts:
                self._sent_at = now
                return [MirrorSend(self._sent_text)]
            self._outstanding = None
            events.append(MirrorDropped(self.name, item.action, "unanswered"))
            if item.action == "StartTransaction":
                events += self._refused(item.msg_id)
            events += self._delivered(item)
        return events + self._pump(now)

    def next_deadline(self) -> float | None:
        if self._outstanding is not None:
            return self._sent_at + self.call_timeout
        if self.up and self._queue and not self._held:
            return self._next_send
        return None

    @property
    def busy(self) -> bool:
        """A CALL is out and unanswered."""
        return self._outstanding is not None

    def hold(self, owner: object = None) -> None:
        """Send nothing new for ``owner`` (the CALL out may still be answered), until the next link_up.

        A drain without the wallbox hands the mirror over to the wallbox's session this way,
        so the new session does not send again what the drain has just sent.
        """
        if owner is self._owner:
            self._held = True

    # -- CALLs from the secondary --------------------------------------------------------

    def inbound(self, frame: Frame) -> tuple[str, str | None]:
        """(text for the wallbox, None) with the wallbox's transactionId, or ("", CALLERROR)."""
        path = _INBOUND_TX_PATH.get(frame.action or "")
        if path is None:
            return frame.text, None
        upstream_tx = integer_at(frame.text, path)
        if upstream_tx is None:
            return frame.text, None
        for wallbox_tx, mapped in reversed(self._tx.items()):
            if mapped == upstream_tx:
                edited = replace_value(frame.text, path, str(wallbox_tx))
                return (frame.text if edited is None else edited), None
        return "", build_error(frame.msg_id or "", "PropertyConstraintViolation",
                               f"ocpp-proxy: transactionId {upstream_tx} is not a transaction of this charge point")

    # -- sending ---------------------------------------------------------------------------

    def _idle(self, now: float) -> bool:
        return self.up and self._outstanding is None and not self._queue and now >= self._next_send

    def _pump(self, now: float) -> list[MirrorEvent]:
        events: list[MirrorEvent] = []
        while self.up and not self._held and self._outstanding is None and self._queue and now >= self._next_send:
            item = self._queue.popleft()
            self._bytes -= len(item.text)
            text = self._outgoing(item)
            if text is None:
                events += [MirrorDropped(self.name, item.action, "unknown_transaction"),
                           MirrorUnqueued(self.name, item.seq)]
                continue
            self._outstanding, self._sent_text = item, text
            self._sent_at = now
            self._next_send = now + self.interval
            events.append(MirrorSend(text))
        return events

    def _outgoing(self, item: _Item) -> str | None:
        """The text this secondary gets: its own transactionId, or None if it cannot be told."""
        path = _TX_PATH.get(item.action)
        if path is None:
            return item.text
        found = _transaction_span(item.text, path)
        if found is None:
            return item.text
        wallbox_tx, (start, end) = found
        upstream_tx = self._tx.get(wallbox_tx)
        if upstream_tx is not None:
            return item.text[:start] + str(upstream_tx) + item.text[end:]
        if item.action == "StopTransaction":
            return None  # a transaction this secondary never saw start
        # Meter values of a transaction it does not know: still meter values of the connector.
        return remove_member(item.text, path) or item.text

    def _evict(self) -> list[MirrorEvent]:
        events: list[MirrorEvent] = []
        while len(self._queue) > self.queue_limit or (self._bytes > self.queue_bytes and len(self._queue) > 1):
            victim = next((item for item in self._queue if not item.transactional), self._queue[0])
            self._queue.remove(victim)
            self._bytes -= len(victim.text)
            events.append(MirrorDropped(self.name, victim.action, "queue_full"))
            if victim.action == "StartTransaction":
                events += self._refused(victim.msg_id)
            events += self._delivered(victim)  # its state (Boot, Status) still reaches the secondary on replay
        return events

    # -- state ---------------------------------------------------------------------------------

    def _delivered(self, item: _Item) -> list[MirrorEvent]:
        """``item`` left the queue: it is part of what a reconnecting secondary is told first."""
        if item.replay:
            return []
        events: list[MirrorEvent] = [] if item.action == "Heartbeat" else [MirrorUnqueued(self.name, item.seq)]
        if item.action == "BootNotification":
            self._boot = item
            events.append(MirrorState(self.name, BOOT, item.text))
        elif item.action == "StatusNotification":
            connector = integer_at(item.text, (3, "connectorId"))
            if connector is not None and connector >= 0:
                self._status[connector] = item
                events.append(MirrorState(self.name, connector, item.text))
        return events

    def _snapshot(self) -> list[_Item]:
        items = [] if self._boot is None else [self._boot]
        return items + [self._status[c] for c in sorted(self._status)]

    def _replay_item(self, item: _Item) -> _Item:
        self._seq += 1
        msg_id = f"{REPLAY_PREFIX}{self._seq}"
        return _Item(msg_id, item.action, replace_id(classify(item.text), msg_id), replay=True)

    def _started(self, item: _Item, answer: Frame) -> list[MirrorEvent]:
        upstream_tx = transaction_id(answer)
        if upstream_tx is None:
            return self._refused(item.msg_id)
        start = self._starts.get(item.msg_id)
        if start is None:
            return []
        start.upstream_tx = upstream_tx
        return self._pair(item.msg_id, start)

    def _refused(self, msg_id: str) -> list[MirrorEvent]:
        start = self._starts.get(msg_id)
        if start is None:
            return []
        start.refused = True
        return self._pair(msg_id, start)

    def _pair(self, msg_id: str, start: _Start) -> list[MirrorEvent]:
        if start.wallbox_tx is None or (start.upstream_tx is None and not start.refused):
            return []
        del self._starts[msg_id]
        self._tx[start.wallbox_tx] = start.upstream_tx
        self._tx.move_to_end(start.wallbox_tx)
        while len(self._tx) > TX_MEMORY:
            self._tx.popitem(last=False)
        if start.upstream_tx is None:
            return []
        return [TxMapped(self.name, start.wallbox_tx, start.upstream_tx)]


@functools.lru_cache(maxsize=8)
def _transaction_span(text: str, path: tuple[str | int, ...]) -> tuple[int, tuple[int, int]] | None:
    """Cached: every secondary of a wallbox looks up the same frame, usually right after another."""
    return integer_span(text, path)


def transaction_id(answer: Frame) -> int | None:
    """transactionId of a StartTransaction CALLRESULT (None for a CALLERROR or garbage)."""
    return started_transaction(answer)
