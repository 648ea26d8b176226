"""Per-wallbox routing and CALL arbitration (sans-IO).

A :class:`Session` sits between one wallbox and one or more upstreams (the
first is the *primary*, whose answers reach the wallbox; any others are
secondaries that get copies). It takes frames and the current time and returns
actions: texts to send to a leg, answers to the proxy's own CALLs, and
observations for the limit engine and metrics. It owns no sockets and no
clock, so every routing rule is testable by feeding strings.

Rules it enforces:

* Frames are forwarded as the text received. The only edit ever made here is
  the message id on the wallbox leg, for CALLs whose id could collide
  (a secondary's, or a primary id inside the proxy's reserved namespace); the
  answer gets its original id back. Action-specific rewrites (charging profile
  clamping, transaction id mapping) are plugged in via ``rewriters`` and run
  only for the actions registered there.
* The proxy and secondaries have at most one CALL outstanding on the wallbox,
  and never while another origin has one: their CALLs wait in FIFO order until
  the slot is free or the outstanding CALL times out. The primary's own
  pipelining (a backend that does not wait for answers) is left as it was:
  holding its second CALL behind its first would change what it sees.
* Answers to the proxy's CALLs (ids ``ocpp-proxy:<n>``) are consumed here.
* Secondaries with a :class:`~proxy.core.mirror.Mirror` (``mirrors``) get their
  copies through it (own queue, own transaction ids, replay on reconnect:
  ``secondary_up`` / ``secondary_down``), and their answers go to it. CALLs
  from any upstream are judged by ``policy`` (:mod:`proxy.core.policy`) before they
  may reach the wallbox.

The listener contract (docs/design.md): a session is whole when constructed
(upstreams, mirrors, policy, offline responder). What anyone outside may ask of
it afterwards goes through one API, :meth:`Session.tap`: a :class:`Tap` names
the actions to report as :class:`Observed` and the rewriters for actions whose
CALL text it edits. Nothing else of a session is assigned from outside.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Literal

from proxy.core.offline import (
    BACKEND_TRANSACTION_ACTIONS,
    LEARNING_ACTIONS,
    TRANSACTION_ACTIONS,
    OfflineResponder,
    map_transaction,
)
from proxy.messages.ocppj import (
    MAX_ID_LENGTH,
    Frame,
    MessageType,
    build_call,
    build_error,
    classify,
    replace_id,
    strict_problem,
)
from proxy.core.mirror import (
    Mirror,
    MirrorCompleted,
    MirrorDropped,
    MirrorEvent,
    MirrorQueued,
    MirrorSend,
    MirrorStartKnown,
    MirrorState,
    MirrorUnqueued,
    TxMapped,
    transaction_id,
)
from proxy.core.policy import CommandPolicy, Mode
from proxy.core.sessionlog import SessionEvent, journaled
from proxy.core.sessionlog import events as session_events
from proxy.messages.versions import OcppVersion, format_violation


class Leg(StrEnum):
    """The fixed names of a session's legs and CALL origins.

    Secondary upstreams are named by the configuration (``[backends.NAME]``,
    which may not be one of these), so a *side* (:data:`Side`) is a ``Leg`` or
    such a name. Members are ``str``: they compare, hash and log as their value.
    """

    WALLBOX = "wallbox"
    #: The proxy's own CALLs (load management, virtual charge points).
    PROXY = "proxy"
    #: The billing backend, whose answers reach the wallbox.
    PRIMARY = "primary"
    #: Stored CALLs replayed to the primary after an outage.
    REPLAY = "replay"


#: A leg of a session: ``Leg.WALLBOX``, ``Leg.PRIMARY`` or a secondary's configured name.
Side = str

WALLBOX = Leg.WALLBOX
PROXY = Leg.PROXY
PRIMARY = Leg.PRIMARY
REPLAY = Leg.REPLAY

#: Why a proxy CALL got no answer.
FailReason = Literal["timeout", "session closed"]

#: Message ids of the proxy's own CALLs on the wallbox leg (≤ 36 characters).
ID_PREFIX = "ocpp-proxy:"

#: How many timed-out CALLs are remembered so a late answer is still routed.
_LATE_MEMORY = 64

_CALL = MessageType.CALL
_NEVER = float("inf")
#: Origins of the CALLs the primary owes answers to (a wallbox's, a replayed one).
_OWED = (Leg.WALLBOX, Leg.REPLAY)

#: Rewriter(source, destination, frame) → text to send (``frame.text`` = unchanged).
#: A rewriter changes payload fields only, never the ``[type, "id", "Action"`` prefix.
Rewriter = Callable[[Side, Side, Frame], str]


@dataclass(frozen=True, slots=True)
class Tap:
    """What one listener asks of a session: the only way anything outside changes what a session reports or sends.

    ``observe``: actions whose frames (and the answers to them) are reported as
    :class:`Observed`. ``rewriters``: per action, how a CALL's text changes on
    its way (see :data:`Rewriter`); two taps may not rewrite the same action.
    """

    observe: frozenset[str] = frozenset()
    rewriters: Mapping[str, Rewriter] = field(default_factory=dict)


# --- actions -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ToWallbox:
    text: str


@dataclass(frozen=True, slots=True)
class ToUpstream:
    name: Side
    text: str


@dataclass(frozen=True, slots=True)
class ProxyAnswer:
    """The wallbox answered one of the proxy's CALLs (CALLRESULT or CALLERROR)."""

    msg_id: str
    action: str
    frame: Frame


@dataclass(frozen=True, slots=True)
class ProxyCallFailed:
    msg_id: str
    action: str
    reason: FailReason


@dataclass(frozen=True, slots=True)
class Malformed:
    source: Side
    frame: Frame
    problem: str
    dropped: bool


@dataclass(frozen=True, slots=True)
class Observed:
    """A frame whose action the session was asked to watch.

    For an answer, ``call`` is the CALL it answers, so a watcher can pair a
    SetChargingProfile with its Accepted/Rejected without keeping state.
    """

    source: Side
    frame: Frame
    action: str
    call: Frame | None = None


@dataclass(frozen=True, slots=True)
class CallCompleted:
    """Round trip of a CALL: ``leg`` is the side that answered it."""

    leg: Side
    action: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Policed:
    """A CALL from ``upstream`` was answered by the proxy (``mode`` answer or reject), not forwarded."""

    upstream: Side
    action: str
    mode: Mode


@dataclass(frozen=True, slots=True)
class Persist:
    """Store a CALL answered locally; send ``answer`` to the wallbox only once it is committed."""

    action: str
    text: str
    msg_id: str
    answer: str
    local_transaction_id: int | None = None


@dataclass(frozen=True, slots=True)
class LogSession:
    """Commit ``events`` to the session log, then send ``answer`` (if any) to the wallbox.

    ``required``: the log is the only record (a standalone charger): if it
    cannot be written the wallbox gets a CALLERROR instead of ``answer`` and
    retries. Otherwise the backend (or the offline queue) holds the data and the
    answer goes out anyway.
    """

    events: tuple[SessionEvent, ...]
    msg_id: str
    answer: str | None
    required: bool = False

    @property
    def wait(self) -> bool:
        """Commit before answering: always where the log is the record; with a backend for a transaction's
        start and stop (one commit each). Meter values of a charger with a backend (the backend has them)
        are written behind, so the relay's per-frame latency holds no fsync (docs/standalone.md)."""
        return self.required or any(event.kind != "meter" for event in self.events)


@dataclass(slots=True)
class LogLater:
    """Log a relayed transaction frame (``call`` answered by the backend's ``answer``), off the relay's path.

    The answer has already gone to the wallbox (its own :class:`ToWallbox`):
    with a backend, the backend is the authority, so nothing waits for the
    log. Nothing is parsed here either: the store reads the frames into
    :class:`SessionEvent` s in its next batch (docs/standalone.md).
    Not changed once made, but not ``frozen``: one is made per relayed
    transaction frame, and a frozen dataclass's ``__init__`` costs 3.5 times
    as much (0.55 against 0.15 µs).
    """

    charger: str
    version: OcppVersion
    call: Frame
    answer: Frame


@dataclass(frozen=True, slots=True)
class UpstreamUnresponsive:
    """The primary left the CALL ``msg_id`` unanswered for ``seconds`` (``upstream_call_timeout``)."""

    name: str
    action: str
    msg_id: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Replayed:
    """The primary answered a replayed CALL (consumed, never forwarded)."""

    call: Frame
    answer: Frame


Action = (ToWallbox | ToUpstream | ProxyAnswer | ProxyCallFailed | Malformed | Observed | CallCompleted
          | Persist | Replayed | UpstreamUnresponsive | Policed | MirrorDropped | TxMapped | MirrorQueued | MirrorUnqueued | MirrorState
          | MirrorStartKnown | LogSession | LogLater)


# --- state -----------------------------------------------------------------------

@dataclass(slots=True)
class _Pending:
    origin: Side
    origin_id: str
    action: str
    sent_at: float
    call: Frame | None = None


@dataclass(slots=True)
class _Waiting:
    origin: Side
    frame: Frame
    text: str


#: The taps of a session nobody tapped (read only, so shared).
_NO_TAPS: Mapping[str, Tap] = MappingProxyType({})


@dataclass
class Session:
    charger_id: str
    upstreams: tuple[Side, ...] = (PRIMARY,)
    call_timeout: float = 30.0
    strict: bool = False
    #: What listeners ask of the session, by owner (:meth:`tap` adds and replaces them).
    taps: Mapping[str, Tap] = field(default_factory=dict)
    #: Who may send which command to the wallbox; None: every upstream's CALLs are forwarded.
    policy: CommandPolicy | None = None
    #: Secondaries whose copies go through a Mirror (the others get copies directly).
    mirrors: dict[str, Mirror] = field(default_factory=dict)
    #: Local answers while the primary is down; None: no offline mode (the pair closes instead).
    offline: OfflineResponder | None = None
    #: Local transactionId → the backend's, learned when replayed StartTransactions are answered (1.6 only).
    transactions: dict[int, int] = field(default_factory=dict)
    #: The OCPP version of everything the proxy originates or answers in this session (from the
    #: negotiated subprotocol); None: a subprotocol the proxy does not speak, relayed only.
    version: OcppVersion | None = OcppVersion.V16
    #: Seconds the primary may leave a wallbox (or replayed) CALL unanswered before the session
    #: reports it as :class:`UpstreamUnresponsive` (once per connection); None: never.
    upstream_call_timeout: float | None = None
    #: Record transactions in the session log (:class:`LogSession` actions; docs/standalone.md).
    journal: bool = False
    #: No backend: the proxy is the central system (``offline`` answers everything, nothing is queued).
    standalone: bool = False

    #: Actions whose frames (and answers) are reported as :class:`Observed` (the taps' union).
    observe: frozenset[str] = field(default=frozenset(), init=False)
    #: Per action: the one tap's rewriter for it.
    _rewriters: dict[str, Rewriter] = field(default_factory=dict, init=False)
    _to_wallbox: dict[str, _Pending] = field(default_factory=dict, init=False)
    #: CALLs waiting for the wallbox's one slot: short, and a list (56 bytes) where an empty
    #: deque costs 760 in every session.
    _waiting: list[_Waiting] = field(default_factory=list, init=False)
    _from_wallbox: dict[str, _Pending] = field(default_factory=dict, init=False)
    _late: OrderedDict[str, _Pending] = field(default_factory=OrderedDict, init=False)
    _seq: int = field(default=0, init=False)
    _down: set[str] = field(default_factory=set, init=False)
    _replaying: bool = field(default=False, init=False)
    _unresponsive: bool = field(default=False, init=False)  # reported for the primary's connection
    #: The frame most recently classified by from_wallbox/from_upstream
    #: (for metrics, without classifying twice).
    last_frame: Frame | None = field(default=None, init=False)
    #: ``upstreams[0]``, read on every frame (a property call costs more than the attribute).
    _primary: Side = field(default=PRIMARY, init=False)

    def __post_init__(self) -> None:
        self._primary = self.upstreams[0]
        if self.standalone:
            if self.offline is None:
                raise ValueError("a standalone session needs an offline responder: it answers every CALL")
            self._down.add(self.primary)  # for good: there is no primary connection to wait for
        taps, self.taps = self.taps, _NO_TAPS
        for owner, tap in taps.items():
            self.tap(owner, tap)

    @property
    def primary(self) -> Side:
        return self.upstreams[0]

    # -- the listener contract --------------------------------------------------------

    def tap(self, owner: str, tap: Tap | None) -> None:
        """Register (replace; None: remove) what ``owner`` observes and rewrites.

        Raises ValueError, leaving the taps as they were, when ``tap`` would
        rewrite an action another owner already rewrites: two edits of one
        frame would depend on their order.
        """
        taps = {name: t for name, t in self.taps.items() if name != owner}
        if tap is not None:
            for other, registered in taps.items():
                clash = registered.rewriters.keys() & tap.rewriters.keys()
                if clash:
                    raise ValueError(f"{owner} and {other} both rewrite {', '.join(sorted(clash))}")
            taps[owner] = tap
        self.taps = MappingProxyType(taps)
        self.observe = frozenset(action for t in taps.values() for action in t.observe)
        self._rewriters = {action: rewrite for t in taps.values() for action, rewrite in t.rewriters.items()}

    # -- inputs ---------------------------------------------------------------

    def from_wallbox(self, text: str, now: float) -> list[Action]:
        frame = self.last_frame = classify(text)
        # Per frame: a well-formed frame outside strict mode has nothing to report (no _inspect call).
        report = None if frame.problem is None and not self.strict else self._inspect(WALLBOX, frame)
        if report is not None and report.dropped:
            return self._refuse(report)
        kind = frame.kind
        if kind is _CALL:
            actions = self._wallbox_call(frame, now)
        elif kind is None:
            actions = [ToUpstream(self._primary, text)]
        else:
            actions = self._wallbox_answer(frame, now)
        return actions if report is None else [report, *actions]

    def from_upstream(self, name: Side, text: str, now: float) -> list[Action]:
        frame = self.last_frame = classify(text)
        report = None if frame.problem is None and not self.strict else self._inspect(name, frame)
        if report is not None and report.dropped:
            return self._refuse(report)
        kind = frame.kind
        if kind is _CALL:
            actions = self._upstream_call(name, frame, now)
        elif kind is None:
            actions = [ToWallbox(text)] if name == self._primary else []
        elif self.mirrors and name in self.mirrors:
            actions = self._mirrored(name, self.mirrors[name].from_upstream(frame, now))
        else:
            actions = self._upstream_answer(name, frame, now)
        return actions if report is None else [report, *actions]

    def proxy_call(self, action: str, payload: dict[str, object], now: float) -> tuple[str, list[Action]]:
        """Queue a CALL of the proxy's own towards the wallbox; returns its id."""
        msg_id = self._next_id()
        text = build_call(msg_id, action, payload)
        return msg_id, self._submit(PROXY, classify(text), text, now)

    def cancel_proxy_call(self, msg_id: str) -> bool:
        """Withdraw a proxy CALL that is still waiting (e.g. a superseded limit)."""
        for item in self._waiting:
            if item.origin == PROXY and item.frame.msg_id == msg_id:
                self._waiting.remove(item)
                return True
        return False

    def secondary_up(self, name: Side, now: float) -> list[Action]:
        """A mirrored secondary's connection opened: replay what it missed."""
        mirror = self.mirrors.get(name)
        return [] if mirror is None else self._mirrored(name, mirror.link_up(now, owner=self))

    def secondary_down(self, name: Side) -> None:
        mirror = self.mirrors.get(name)
        if mirror is not None:
            mirror.link_down(owner=self)

    def poll(self, now: float) -> list[Action]:
        """Expire CALLs that were not answered in time."""
        actions: list[Action] = []
        for name, mirror in self.mirrors.items():
            actions += self._mirrored(name, mirror.poll(now))
        for wire_id, pending in list(self._to_wallbox.items()):
            if now - pending.sent_at >= self.call_timeout:
                del self._to_wallbox[wire_id]
                self._remember_late(wire_id, pending)
                if pending.origin == PROXY:
                    actions.append(ProxyCallFailed(wire_id, pending.action, "timeout"))
        unanswered = self._unanswered(now)
        if unanswered is not None:
            actions.append(unanswered)
        for msg_id, pending in list(self._from_wallbox.items()):
            if now - pending.sent_at < 2 * self.call_timeout:
                break  # insertion order = age order
            del self._from_wallbox[msg_id]
        actions.extend(self._drain(now))
        return actions

    def _oldest_to_primary(self) -> tuple[str, _Pending] | None:
        """The oldest CALL the primary owes an answer (a wallbox's or a replayed one), while it is up."""
        if self.upstream_call_timeout is None or self._unresponsive or self._primary in self._down:
            return None
        for msg_id, pending in self._from_wallbox.items():  # insertion order = age order
            if pending.origin in _OWED:
                return msg_id, pending
        return None

    def _unanswered(self, now: float) -> UpstreamUnresponsive | None:
        oldest = self._oldest_to_primary()
        if oldest is None or self.upstream_call_timeout is None:
            return None
        msg_id, pending = oldest
        waited = now - pending.sent_at
        if waited < self.upstream_call_timeout:
            return None
        self._unresponsive = True
        return UpstreamUnresponsive(self.primary, pending.action, msg_id, waited)

    def next_deadline(self) -> float | None:
        """When :meth:`poll` has something to do next; None: nothing is due.

        Called after every dispatch (the relay moves its timer earlier when this is), so it
        builds nothing: one comparison per CALL outstanding on the wallbox (usually none or one),
        the oldest wallbox CALL (insertion order = age order), mirrors only where there are any.
        """
        best = _NEVER
        timeout = self.call_timeout
        if self._to_wallbox:
            for pending in self._to_wallbox.values():
                if pending.sent_at + timeout < best:
                    best = pending.sent_at + timeout
        from_wallbox = self._from_wallbox
        if from_wallbox:
            oldest = next(iter(from_wallbox.values()))
            if oldest.sent_at + 2 * timeout < best:
                best = oldest.sent_at + 2 * timeout
            upstream_timeout = self.upstream_call_timeout
            if upstream_timeout is not None:
                # The oldest CALL the primary owes: the oldest of all, unless it is of another origin.
                owed = oldest if oldest.origin in _OWED else None
                if owed is None or self._unresponsive or self._primary in self._down:
                    found = self._oldest_to_primary()
                    owed = None if found is None else found[1]
                if owed is not None and owed.sent_at + upstream_timeout < best:
                    best = owed.sent_at + upstream_timeout
        if self.mirrors:
            for mirror in self.mirrors.values():
                deadline = mirror.next_deadline()
                if deadline is not None and deadline < best:
                    best = deadline
        return None if best == _NEVER else best

    def close(self) -> list[Action]:
        """The session ends: every proxy CALL still open or waiting fails."""
        failed: list[Action] = [
            ProxyCallFailed(wire_id, p.action, "session closed")
            for wire_id, p in self._to_wallbox.items() if p.origin == PROXY
        ]
        failed += [ProxyCallFailed(w.frame.msg_id or "", w.frame.action or "", "session closed")
                   for w in self._waiting if w.origin == PROXY]
        self._to_wallbox.clear()
        self._waiting.clear()
        for mirror in self.mirrors.values():
            mirror.link_down(owner=self)
        return failed

    # -- upstream availability (offline mode) ---------------------------------------------

    def upstream_down(self, name: Side, now: float) -> list[Action]:
        """An upstream is gone. For the primary, CALLs it never answered are answered locally."""
        self._down.add(name)
        self.secondary_down(name)
        if name != self.primary or self.offline is None:
            return []
        actions: list[Action] = []
        for msg_id, pending in list(self._from_wallbox.items()):
            if pending.origin == WALLBOX and pending.call is not None:
                del self._from_wallbox[msg_id]
                local = self._answer_locally(pending.call)
                actions.extend(local + self._local_start(msg_id, local))
        return actions

    def upstream_up(self, name: Side, replay: bool = False) -> None:
        """An upstream is (back) up; ``replay``: stored CALLs go to it before live traffic."""
        self._down.discard(name)
        if name == self.primary:
            self._unresponsive = False
        if name == self.primary and self.offline is not None and replay:
            self._replaying = True

    def replay_call(self, frame: Frame, text: str, now: float) -> list[Action]:
        """Send one stored CALL to the primary; its answer comes back as :class:`Replayed`."""
        msg_id = frame.msg_id or ""
        self._from_wallbox[msg_id] = _Pending(REPLAY, msg_id, frame.action or "", now, frame)
        return [ToUpstream(self.primary, text)]

    def replay_finished(self) -> None:
        self._replaying = False

    @property
    def offline_mode(self) -> bool:
        """True while wallbox CALLs are answered locally (primary down, or its queue replaying)."""
        return self.offline is not None and (self._replaying or self._primary in self._down)

    # -- introspection (tests, metrics) -----------------------------------------------

    @property
    def wallbox_outstanding(self) -> int:
        return len(self._to_wallbox)

    @property
    def wallbox_waiting(self) -> int:
        return len(self._waiting)

    @property
    def upstream_outstanding(self) -> int:
        """Wallbox CALLs forwarded upstream and not yet answered."""
        return len(self._from_wallbox)

    # -- wallbox → upstreams ------------------------------------------------------------

    def _wallbox_call(self, frame: Frame, now: float) -> list[Action]:
        action = frame.action or ""
        msg_id = frame.msg_id or ""
        watched = action in self.observe
        actions: list[Action] = [Observed(WALLBOX, frame, action)] if watched else []
        if self.offline is not None and (self._replaying or self._primary in self._down):  # offline_mode
            local = self._answer_locally(frame)
            return local + self._mirror_copies(frame, now) + self._local_start(msg_id, local) + actions
        keep = frame if watched or self.offline is not None or self._journaled(frame) else None
        from_wallbox = self._from_wallbox
        if msg_id in from_wallbox:
            del from_wallbox[msg_id]  # a retransmission moves to the back
        from_wallbox[msg_id] = _Pending(WALLBOX, msg_id, action, now, keep)
        down, mirrors = self._down, self.mirrors
        if len(self.upstreams) == 1 and not mirrors and not self._rewriters and not self.transactions:
            # The common pair (one backend, nothing rewritten): the text as received, or nothing while it is down.
            sends: list[Action] = [] if self._primary in down else [ToUpstream(self._primary, frame.text)]
        else:
            sends = [ToUpstream(name, self._to_upstream_text(name, frame))
                     for name in self.upstreams if name not in down and name not in mirrors]
        if mirrors:
            sends += self._mirror_copies(frame, now)
        return sends + actions if actions else sends

    def _mirror_copies(self, frame: Frame, now: float) -> list[Action]:
        """Secondaries get their copies through their mirrors, whatever the primary's state."""
        actions: list[Action] = []
        for name, mirror in self.mirrors.items():
            text = self._to_upstream_text(name, frame)
            actions += self._mirrored(name, mirror.offer(frame if text is frame.text else classify(text), now))
        return actions

    def _from_upstream_text(self, name: Side, frame: Frame) -> str:
        text = self._rewrite(name, WALLBOX, frame)
        if self.transactions and frame.action in BACKEND_TRANSACTION_ACTIONS and name == self.primary:
            backend_to_local = {b: loc for loc, b in self.transactions.items()}
            rewritten = frame if text is frame.text else classify(text)  # map on top of a clamp
            mapped = map_transaction(rewritten, backend_to_local)  # the wallbox knows its local id
            if mapped is not rewritten.text:
                text = mapped
        return text

    def _to_upstream_text(self, name: Side, frame: Frame) -> str:
        text = self._rewrite(WALLBOX, name, frame)
        if self.transactions and frame.action in TRANSACTION_ACTIONS and name == self.primary:
            mapped = map_transaction(frame, self.transactions)  # a local id the backend now knows
            if mapped is not frame.text:
                text = mapped
        return text

    def _answer_locally(self, frame: Frame) -> list[Action]:
        assert self.offline is not None
        local = self.offline.answer(frame)
        logged = self._log_events(frame, classify(local.text)) if local.store and self._journaled(frame) else ()
        if self.standalone:  # nothing to replay to: the log is the record
            return [LogSession(logged, frame.msg_id or "", local.text, required=True) if logged
                    else ToWallbox(local.text)]
        if not local.store:
            return [ToWallbox(local.text)]
        persist = Persist(frame.action or "", frame.text, frame.msg_id or "", local.text, local.local_transaction_id)
        return [LogSession(logged, frame.msg_id or "", None), persist] if logged else [persist]

    def _journaled(self, frame: Frame) -> bool:
        return self.journal and journaled(frame)

    def _log_events(self, call: Frame, answer: Frame) -> tuple[SessionEvent, ...]:
        if not self._journaled(call) or self.version is None:
            return ()
        return tuple(e for e in session_events(self.charger_id, self.version, call, answer) if e.worth_writing)

    def _upstream_answer(self, name: Side, frame: Frame, now: float) -> list[Action]:
        msg_id = frame.msg_id or ""
        pending = self._from_wallbox.get(msg_id)
        primary = name == self._primary
        if pending is None:
            return [ToWallbox(frame.text)] if primary else []
        call = pending.call
        if call is None and not self.mirrors:  # the common case: nothing to learn, log, observe or mirror
            if primary:
                del self._from_wallbox[msg_id]
                return [ToWallbox(frame.text), CallCompleted(name, pending.action, now - pending.sent_at)]
            return [CallCompleted(name, pending.action, now - pending.sent_at)]
        if call is not None and pending.origin == REPLAY and primary:
            del self._from_wallbox[msg_id]
            self._learn(call, frame)
            return [CallCompleted(name, pending.action, now - pending.sent_at), Replayed(call, frame)]
        actions: list[Action] = []
        if primary:
            if call is not None:  # (kept for offline mode: a learning action, the session log, an observer)
                if self.offline is not None and call.action in LEARNING_ACTIONS:
                    self._learn(call, frame)
            actions.append(ToWallbox(frame.text))
            if call is not None and self.journal and self.version is not None and journaled(call):
                actions.append(LogLater(self.charger_id, self.version, call, frame))  # after the answer, unparsed
            del self._from_wallbox[msg_id]
            if pending.action == "StartTransaction" and self.mirrors:
                actions += self.wallbox_transaction(msg_id, frame)
        actions.append(CallCompleted(name, pending.action, now - pending.sent_at))
        if call is not None and primary and pending.action in self.observe:
            actions.append(Observed(name, frame, pending.action, call))
        return actions

    def wallbox_transaction(self, msg_id: str, answer: Frame) -> list[Action]:
        """The wallbox got ``answer`` to its StartTransaction ``msg_id``: tell the mirrors its id."""
        wallbox_tx = transaction_id(answer)
        return [] if wallbox_tx is None else self._tell_mirrors(msg_id, wallbox_tx)

    def _local_start(self, msg_id: str, local: list[Action]) -> list[Action]:
        """Offline: the id the proxy handed out is the wallbox's transactionId for the mirrors."""
        for action in local:
            if isinstance(action, Persist) and action.local_transaction_id is not None:
                return self._tell_mirrors(msg_id, action.local_transaction_id)
            if isinstance(action, LogSession) and action.required:  # standalone: no Persist
                for event in action.events:
                    if event.local_tx is not None:
                        return self._tell_mirrors(msg_id, event.local_tx)
        return []

    def _tell_mirrors(self, msg_id: str, wallbox_tx: int) -> list[Action]:
        actions: list[Action] = []
        for name, mirror in self.mirrors.items():
            actions += self._mirrored(name, mirror.wallbox_transaction(msg_id, wallbox_tx))
        return actions

    def _mirrored(self, name: Side, events: list[MirrorEvent]) -> list[Action]:
        actions: list[Action] = []
        for event in events:
            if isinstance(event, MirrorSend):
                actions.append(ToUpstream(name, event.text))
            elif isinstance(event, MirrorCompleted):
                actions.append(CallCompleted(name, event.action, event.seconds))
            else:
                actions.append(event)
        return actions

    def _local_list_answered(self, call: Frame, answer: Frame) -> None:
        """The wallbox took the backend's local list: its tokens count offline too (docs/offline.md)."""
        if self.offline is not None and answer.kind is MessageType.CALLRESULT \
                and '"Accepted"' in answer.text:  # SendLocalList answers carry only a status
            self.offline.learn(call, answer)

    def _learn(self, call: Frame, answer: Frame) -> None:
        if self.offline is not None and call.action in LEARNING_ACTIONS:
            self.offline.learn(call, answer)

    # -- upstreams / proxy → wallbox ------------------------------------------------------

    def _upstream_call(self, name: Side, frame: Frame, now: float) -> list[Action]:
        """Policy first (forward, answer or reject), then a mirrored secondary's transaction ids."""
        if self.policy is not None:
            decision = self.policy.decide(name, frame, self.version)
            if decision.reply is not None:
                return [Policed(name, frame.action or "", decision.mode), ToUpstream(name, decision.reply)]
        mirror = self.mirrors.get(name)
        if mirror is not None:
            text, error = mirror.inbound(frame)
            if error is not None:
                return [ToUpstream(name, error)]
            if text != frame.text:
                frame = classify(text)
        return self._submit(name, frame, self._from_upstream_text(name, frame), now)

    def _submit(self, origin: Side, frame: Frame, text: str, now: float) -> list[Action]:
        if not self._waiting and self._slot_free_for(origin):
            return self._send_to_wallbox(origin, frame, text, now)
        self._waiting.append(_Waiting(origin, frame, text))
        return []

    def _slot_free_for(self, origin: Side) -> bool:
        """Free slot: nothing outstanding, or only the primary's own pipelined CALLs."""
        if not self._to_wallbox:
            return True
        return origin == self.primary and all(p.origin == origin for p in self._to_wallbox.values())

    def _send_to_wallbox(self, origin: Side, frame: Frame, text: str, now: float) -> list[Action]:
        origin_id = frame.msg_id or ""
        wire_id = origin_id
        if origin != PROXY and self._needs_own_id(origin, origin_id):
            wire_id = self._next_id()
            text = replace_id(frame, wire_id, text)
        action = frame.action or ""
        watched = action in self.observe
        keep = watched or (action == "SendLocalList" and origin == self.primary and self.offline is not None)
        self._to_wallbox[wire_id] = _Pending(origin, origin_id, action, now, frame if keep else None)
        actions: list[Action] = [ToWallbox(text)]
        if watched and origin != PROXY:
            actions.append(Observed(origin, frame, action))
        return actions

    def _needs_own_id(self, origin: Side, origin_id: str) -> bool:
        return (origin != self.primary or origin_id.startswith(ID_PREFIX)
                or origin_id in self._to_wallbox)

    def _wallbox_answer(self, frame: Frame, now: float) -> list[Action]:
        wire_id = frame.msg_id or ""
        pending = self._to_wallbox.pop(wire_id, None) or self._late.pop(wire_id, None)
        if pending is None:
            return [ToUpstream(self.primary, frame.text)]
        actions: list[Action] = [CallCompleted(WALLBOX, pending.action, now - pending.sent_at)]
        if pending.origin == PROXY:
            actions.append(ProxyAnswer(wire_id, pending.action, frame))
        else:
            text = frame.text if wire_id == pending.origin_id else replace_id(frame, pending.origin_id)
            actions.append(ToUpstream(pending.origin, text))
        if pending.call is not None and pending.action == "SendLocalList":
            self._local_list_answered(pending.call, frame)
        if pending.call is not None and pending.action in self.observe:
            actions.append(Observed(WALLBOX, frame, pending.action, pending.call))
        actions.extend(self._drain(now))
        return actions

    def _drain(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while self._waiting and self._slot_free_for(self._waiting[0].origin):
            item = self._waiting.pop(0)
            actions.extend(self._send_to_wallbox(item.origin, item.frame, item.text, now))
        return actions

    # -- helpers ----------------------------------------------------------------------

    def _next_id(self) -> str:
        self._seq += 1
        return f"{ID_PREFIX}{self._seq}"

    def _remember_late(self, wire_id: str, pending: _Pending) -> None:
        self._late[wire_id] = pending
        while len(self._late) > _LATE_MEMORY:
            self._late.popitem(last=False)

    def _rewrite(self, source: Side, destination: Side, frame: Frame) -> str:
        rewriter = self._rewriters.get(frame.action or "")
        return frame.text if rewriter is None else rewriter(source, destination, frame)

    def _inspect(self, source: Side, frame: Frame) -> Malformed | None:
        """Report a frame with a problem; strict mode drops it (a full parse, off by default)."""
        if not self.strict and frame.problem is None:
            return None
        problem = strict_problem(frame) if self.strict else frame.problem
        return None if problem is None else Malformed(source, frame, problem, dropped=self.strict)

    def _refuse(self, report: Malformed) -> list[Action]:
        """Strict mode: answer a malformed CALL with a CALLERROR to its sender, forward nothing."""
        frame = report.frame
        actions: list[Action] = [report]
        if frame.kind is MessageType.CALL and frame.msg_id and len(frame.msg_id) <= MAX_ID_LENGTH:
            error = build_error(frame.msg_id, format_violation(self.version), report.problem[:200])
            actions.append(ToWallbox(error) if report.source == WALLBOX else ToUpstream(report.source, error))
        return actions
