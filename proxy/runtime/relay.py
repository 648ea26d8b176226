"""The nursery that joins one wallbox, its upstream(s) and its Session (trio).

:class:`PairedSession` moves text between WebSocket connections and the
sans-IO :class:`~proxy.core.session.Session`, runs the session's timers and the
pings, and tears the pair down together: when one leg closes, the others are
closed with the mirrored code (``closecodes``) and the nursery exits, so no
task or socket outlives the pair.

Sends go through one :class:`Outbox` per connection: actions are queued
synchronously in the order the session produced them and written by one task
at a time, so two pumps can never reorder frames towards a leg. The outbox is
bounded; a pump that would overfill it waits, which is how a slow peer pushes
back on a fast one.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import trio

from proxy.wire import closecodes
from proxy.wire.errors import ConnectionClosed, MessageTooBig, SendTimeout
from proxy.core.backoff import Backoff
from proxy.messages.ocppj import Frame, MessageType, build_error, classify
from proxy.core.admission import Refuse
from proxy.core.offline import (
    TRANSACTION_ACTIONS,
    InFlight,
    Stored,
    in_flight_policy,
    map_transaction,
    replay_plan,
    started_transaction,
)
from proxy.storage.interface import Append, Journal, StorageError
from proxy.storage.offline_queue import AsyncQueue, Ticket
from proxy.runtime.upstream import UpstreamUnavailable
from proxy.core.session import (
    PROXY,
    WALLBOX,
    Action,
    CallCompleted,
    LogLater,
    LogSession,
    Malformed,
    Persist,
    Replayed,
    UpstreamUnresponsive,
    ProxyAnswer,
    ProxyCallFailed,
    Session,
    Side,
    ToUpstream,
    ToWallbox,
)

#: Why the proxy ended an upstream connection that stopped working: a send blocked for
#: ``stall_timeout``, a CALL unanswered for ``call_timeout``, a ping unanswered.
GiveUp = Literal["stall", "call_timeout", "ping_timeout"]

_perf_counter = time.perf_counter

#: A frame whose actions are all of these is written first and reported after (PairedSession._relay_now).
_PLAIN = frozenset({ToUpstream, ToWallbox, CallCompleted, LogLater})

#: Frames queued towards one connection before the producing pump waits.
OUTBOX_LIMIT = 64
#: A wallbox's frames read ahead while earlier ones commit, before its pump waits.
PIPELINE_LIMIT = 64


class Connection(Protocol):
    """What the relay needs of a WebSocket (:mod:`proxy.wire.connection`, :mod:`proxy.wire.local`)."""

    async def get_message(self) -> str | bytes: ...
    async def send_message(self, message: str | bytes) -> None: ...
    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...
    async def ping(self, payload: bytes | None = None) -> None: ...


class Listener:
    """Receives what happens in sessions: metrics, limit engine, secondaries' store, tests.

    The contract (docs/design.md): methods are called synchronously from the
    session's tasks and must not block; they are no-ops here so a listener
    overrides only what it needs. A listener reads a session and may call
    :meth:`PairedSession.request` / :meth:`PairedSession.call_wallbox`; what it
    wants a session to report or rewrite it registers with
    ``paired.session.tap(owner, Tap(...))`` (:class:`proxy.core.session.Tap`),
    never by assigning to the session. Sides are :data:`proxy.core.session.Side`
    (a :class:`~proxy.core.session.Leg` or a secondary's name); ``session_closed``
    gets ``Leg.PROXY`` when the proxy ended the pair (shutdown, replacement).
    """

    #: The action types :meth:`action` wants (exact types); None: every one. The relay calls
    #: :meth:`action` only for these, and :meth:`frame_received` only where a listener overrides it:
    #: most actions (a forwarded CALL's CallCompleted) concern one listener of several.
    actions: ClassVar[frozenset[type] | None] = None

    def session_opened(self, paired: PairedSession) -> None: ...
    def session_closed(self, paired: PairedSession, side: Side, code: int, reason: str) -> None: ...
    def frame_received(self, paired: PairedSession, source: Side, frame: Frame, size: int) -> None: ...
    def action(self, paired: PairedSession, action: Action) -> None: ...
    def handshake_refused(self, refusal: Refuse) -> None: ...
    def frame_rejected(self, paired: PairedSession, side: Side, code: int, reason: str) -> None: ...
    def upstream_state(self, paired: PairedSession, name: Side, up: bool, reason: str) -> None: ...
    def queue_depth(self, paired: PairedSession, depth: int) -> None: ...
    def replay_resent(self, paired: PairedSession, action: str) -> None: ...
    def storage_error(self, operation: str, detail: str) -> None: ...
    def upstream_given_up(self, paired: PairedSession, name: Side, kind: GiveUp) -> None: ...
    def modbus_wallbox(self, charger: str, up: bool) -> None: ...

class Listeners(tuple[Listener, ...]):
    """A pair's listeners, with what each one wants worked out once and shared by every pair.

    Iterates as the listeners; :attr:`frames` are the ``frame_received`` methods of those that
    override it, :meth:`for_action` the ``action`` methods that want an action type.
    """

    frames: tuple[Callable[[PairedSession, Side, Frame, int], None], ...]
    _by_type: dict[type, tuple[Callable[[PairedSession, Action], None], ...]]

    def __new__(cls, listeners: Iterable[Listener] = ()) -> Listeners:
        self = super().__new__(cls, listeners)
        self.frames = tuple(lst.frame_received for lst in self
                            if type(lst).frame_received is not Listener.frame_received)
        self._by_type = {}
        return self

    def for_action(self, kind: type) -> tuple[Callable[[PairedSession, Action], None], ...]:
        found = self._by_type.get(kind)
        if found is None:
            found = self._by_type[kind] = tuple(
                lst.action for lst in self
                if type(lst).action is not Listener.action and (lst.actions is None or kind in lst.actions))
        return found


#: Opens one upstream connection for the duration of a block (raises UpstreamUnavailable).
Connector = Callable[[], AbstractAsyncContextManager[Any]]


@dataclass(frozen=True)
class SessionSettings:
    max_message_bytes: int = 1_048_576
    ping_interval: float = 30.0
    close_timeout: float = 5.0
    call_timeout: float = 30.0
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    #: An upstream send blocked (or a ping unanswered) this long: the upstream is lost.
    stall_timeout: float = 10.0


@dataclass(slots=True)
class _Step:
    """A wallbox frame's actions read ahead; ``tickets[i]``: the commit of ``actions[i]`` (None: nothing to commit)."""

    actions: list[Action]
    tickets: list[list[Ticket] | StorageError | None]




class _Violation(Exception):
    """A leg broke the rules (a frame the relay refuses): closed with ``code``, the pair told why."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason

    @staticmethod
    def of(exc: _Violation | MessageTooBig) -> _Violation:
        """The wire refused a message over the size limit (a 1009 this side sent, not the peer)."""
        return exc if isinstance(exc, _Violation) else _Violation(exc.reason.code, exc.reason.reason or "")


class Outbox:
    """Ordered, bounded sending to one connection from several tasks.

    With ``stall_timeout``, a send that blocks that long (the peer stopped
    reading and the socket buffers are full) closes the outbox, drops what is
    queued and calls ``on_stall``: an upstream that does not read must not
    hold the wallbox's pump (and with it the wallbox) hostage. A connection
    with a ``send_timeout`` (:class:`~proxy.wire.connection.WsConnection`) is
    given the timeout and bounds only a send that has to wait; others get a
    cancel scope around each send.
    """

    # Two per pair, alive as long as the pair: no instance dict.
    __slots__ = ("connection", "limit", "stall_timeout", "on_stall", "name", "closed", "_queue", "_sending",
                 "_space")

    def __init__(self, connection: Connection, limit: int = OUTBOX_LIMIT, *, stall_timeout: float | None = None,
                 on_stall: Callable[[str], None] | None = None, name: str = "") -> None:
        """``on_stall`` is called with ``name`` (the upstream's) when a send stalls."""
        self.connection = connection
        self.limit = limit
        self.stall_timeout = stall_timeout
        self.on_stall = on_stall
        self.name = name
        if stall_timeout is not None and hasattr(connection, "send_timeout"):
            # The connection bounds only a send that waits (SendTimeout): no cancel scope per frame.
            connection.send_timeout = stall_timeout
            self.stall_timeout = None
        self.closed = False
        self._queue: list[str] = []  # short; an empty deque would cost 760 bytes per leg
        self._sending = False
        #: Set when there is room again; made only when a producer has to wait for room, so an
        #: idle pair holds no Event here (about 200 bytes each).
        self._space: trio.Event | None = None

    @property
    def pending(self) -> int:
        return len(self._queue)

    def put(self, text: str) -> None:
        if not self.closed:
            self._queue.append(text)

    async def flush(self) -> None:
        """Write queued frames, or wait for room if another task is writing."""
        if self._sending:
            while len(self._queue) > self.limit and not self.closed:
                if self._space is None:
                    self._space = trio.Event()
                await self._space.wait()
            return
        self._sending = True
        queue, send = self._queue, self.connection.send_message
        try:
            while queue:
                if self.stall_timeout is None:
                    await send(queue.pop(0))
                else:
                    with trio.move_on_after(self.stall_timeout) as scope:
                        await send(queue.pop(0))
                    if scope.cancelled_caught:
                        self._stalled()
                        return
                if self._space is not None and len(queue) <= self.limit:
                    self._wake()
        except SendTimeout:
            self._stalled()
        except ConnectionClosed:
            self.closed = True  # the leg's reader sees the close and ends the pair
            queue.clear()
        finally:
            self._sending = False
            if self._space is not None:
                self._wake()

    def _stalled(self) -> None:
        self.closed = True
        self._queue.clear()
        if self.on_stall is not None:
            self.on_stall(self.name)

    def _wake(self) -> None:
        """Wake the producers waiting for room; one that still finds it full makes a new Event."""
        space, self._space = self._space, None
        if space is not None:
            space.set()


class PairedSession:
    """One wallbox's paired session: its legs, its sans-IO Session, its tasks (see the module docstring)."""

    # One per connected wallbox, for as long as it stays: no instance dict. (An instance dict
    # of 30 or more attributes stops sharing its keys with the class's other instances and
    # costs about 1.6 KiB instead of 0.3.) A new attribute must be named here.
    __slots__ = ("charger_id", "session", "wallbox", "upstream_names", "upstreams", "log", "settings",
                 "listeners", "reconnect", "queue", "queued", "subprotocol", "drain", "_replaying",
                 "upstream_connects", "_wallbox_out", "_upstream_out", "_given_up", "_ending_soon",
                 "_handing_over", "_replay_busy", "_replay_idle", "_nursery", "_replay_waiters", "_waiters",
                 "_timer", "_next_ping", "_ending", "_cancel", "closed", "close_info", "_upstream_outboxes",
                 "_wake_at", "_read_at", "_committed_at", "_steps", "_answering", "_step_added", "_steps_done",
                 "_step_done")

    def __init__(self, charger_id: str, session: Session, wallbox: Connection,
                 upstreams: dict[str, Connection | None], *, log: Any,
                 settings: SessionSettings = SessionSettings(),
                 listeners: Sequence[Listener] = (),
                 reconnect: dict[str, Connector] | None = None,
                 queue: AsyncQueue | None = None, queued: int = 0, subprotocol: str | None = None,
                 drain: bool = False) -> None:
        """``upstreams``: the open connection per upstream name, None for one that is down.

        With ``reconnect`` (offline mode), a lost upstream is reopened with
        backoff while the wallbox stays; without it, losing one ends the pair.
        ``subprotocol``: what the wallbox speaks (stored with its queued frames).
        ``drain``: the wallbox is absent (``wallbox`` is a stand-in); the pair
        exists to deliver the charger's queues and closes itself (1000) once the
        primary's queue and every secondary's are empty (docs/offline.md).
        """
        self.charger_id = charger_id
        self.session = session
        self.wallbox = wallbox
        self.upstream_names = list(upstreams)
        #: The upstreams connected right now.
        self.upstreams: dict[str, Connection] = {n: c for n, c in upstreams.items() if c is not None}
        self.log = log
        self.settings = settings
        # Shared with every pair of the same listeners (the server passes one Listeners).
        self.listeners = listeners if type(listeners) is Listeners else Listeners(listeners)
        self.reconnect = reconnect or {}
        self.queue = queue
        #: Frames of this charger in the offline queue (kept exact: the replay decision uses it).
        self.queued = queued
        self.subprotocol = subprotocol
        self.drain = drain
        self._replaying = False
        #: How often each upstream was connected in this session (1 = the first time).
        self.upstream_connects: dict[str, int] = {}
        self._wallbox_out = Outbox(wallbox)
        self._upstream_out = {name: self._outbox(name, conn) for name, conn in self.upstreams.items()}
        #: ``_upstream_out``'s outboxes, for the flush after every frame (no list built per frame).
        self._upstream_outboxes = tuple(self._upstream_out.values())
        #: Why the proxy gave an upstream up (stall, unanswered CALL), for the log of its loss.
        self._given_up: dict[str, str] = {}
        self._ending_soon = False
        self._handing_over = False
        self._replay_busy = False
        #: Set when a replayed frame or a held secondary's frame is answered (hand_over waits for
        #: it); made only when someone waits.
        self._replay_idle: trio.Event | None = None
        self._read_at = self._committed_at = 0.0
        #: Wallbox frames read ahead, oldest first, whose commits are under way (_pipeline).
        self._steps: list[_Step] = []
        self._answering = False
        # Events only while a task waits on them (most pairs never pipeline): the answering task
        # for the next frame, a reader or the replay for the next step answered.
        self._step_added: trio.Event | None = None
        self._steps_done = 0
        self._step_done: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._replay_waiters: dict[str, tuple[trio.Event, list[Frame]]] = {}
        self._waiters: dict[str, tuple[trio.Event, list[Frame | str]]] = {}
        # The timer task sleeps in this scope; a new earlier deadline moves the
        # scope's deadline instead of waking the task (no task switch per frame).
        self._timer = trio.CancelScope()
        #: The timer's deadline, compared after every dispatch (the scope's property is a call).
        self._wake_at = float("inf")
        self._next_ping = float("inf")
        self._ending = False
        self._cancel: trio.CancelScope | None = None
        self.closed = trio.Event()
        self.close_info: tuple[Side, int, str] | None = None

    # -- lifetime ---------------------------------------------------------------

    async def run(self) -> None:
        """Relay until one leg closes; returns after every leg is closed."""
        for listener in self.listeners:
            listener.session_opened(self)
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                self._nursery = nursery
                # Each link has told the session whether its upstream is up (and replaying) before
                # the wallbox's first frame is read: a live CALL must never overtake the queue.
                for name in self.upstream_names:
                    await nursery.start(self._link, name)
                nursery.start_soon(self._run_timers, nursery)
                # The wallbox's pump runs in this task, the nursery's body: a task of its own would
                # cost every idle pair about 1 KiB. Cancelled with the nursery, like its children.
                await self._guard(WALLBOX, self._pump_wallbox)
        finally:
            self._finish()

    async def shutdown(self, code: int, reason: str) -> None:
        """Close every leg with ``code`` (proxy stopping, charger replaced)."""
        await self._end(PROXY, code, reason, mirror=False, close_all=True)

    async def hand_over(self, code: int, reason: str) -> None:
        """Close after the replayed frame in flight is answered and committed (bounded by call_timeout).

        A drain hands the queue to the wallbox's own session this way, so the
        new session never re-sends a frame the backend is answering right now.
        """
        self._handing_over = True
        mirrors = list(self.session.mirrors.values())
        for mirror in mirrors:
            mirror.hold(self.session)
        with trio.move_on_after(self.settings.call_timeout):
            while self._replay_busy or any(mirror.busy for mirror in mirrors):
                if self._replay_idle is None:
                    self._replay_idle = trio.Event()
                await self._replay_idle.wait()
        await self.shutdown(code, reason)

    def _finish(self) -> None:
        for action in self.session.close():
            self._notify(action)
        for event, box in self._waiters.values():
            box.append("session closed")
            event.set()
        side, code, reason = self.close_info or (PROXY, closecodes.GOING_AWAY, "")
        for listener in self.listeners:
            listener.session_closed(self, side, code, reason)
        self.closed.set()

    # -- proxy CALLs --------------------------------------------------------------

    async def call_wallbox(self, action: str, payload: dict[str, Any]) -> str:
        """Queue a proxy CALL; its answer arrives as a ProxyAnswer action."""
        msg_id, actions = self.session.proxy_call(action, payload, trio.current_time())
        await self._execute(actions)
        return msg_id

    async def request(self, action: str, payload: dict[str, Any]) -> Frame:
        """Proxy CALL and wait for its answer; raises RuntimeError on timeout or close."""
        event, box = trio.Event(), list[Frame | str]()
        msg_id, actions = self.session.proxy_call(action, payload, trio.current_time())
        self._waiters[msg_id] = (event, box)
        try:
            await self._execute(actions)
            await event.wait()
        finally:
            self._waiters.pop(msg_id, None)
        result = box[0]
        if isinstance(result, str):
            raise RuntimeError(f"{action} {msg_id}: {result}")
        return result

    # -- pumps ------------------------------------------------------------------------

    async def _guard(self, side: Side, pump: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await pump(*args)
        except (_Violation, MessageTooBig) as exc:
            await self._violation(side, _Violation.of(exc))
        except ConnectionClosed as exc:
            await self._end(side, exc.reason.code, exc.reason.reason or "", mirror=True)

    async def _pump_wallbox(self) -> None:
        get, receive = self.wallbox.get_message, self.session.from_wallbox
        steps = self._steps
        # Per frame: the run's clock itself (trio.current_time() is two calls more); a text
        # under a quarter of the limit cannot be over it in UTF-8, so _check is for the others.
        now, quarter = trio.lowlevel.current_clock().current_time, self.settings.max_message_bytes // 4
        action: Action | None  # the loop's: cleared with the frame below
        while True:
            message = await get()
            text = message if type(message) is str and len(message) <= quarter else self._check(message)
            self._read_at = _perf_counter()
            actions = receive(text, now())
            # (Loops, not any() over a generator: this runs for every frame.) A frame behind others
            # still committing is pipelined too, whatever its actions: it must not overtake them.
            pipelined = bool(steps)
            plain = not pipelined
            if plain:
                for action in actions:
                    if type(action) not in _PLAIN:
                        plain = False
                        if type(action) is Persist or type(action) is LogSession:
                            pipelined = True
                            break
            if plain:
                await self._relay_now(WALLBOX, actions)
            elif pipelined:
                # Pipelined: the frame's change joins the next commit now and the next frame is read
                # while it commits; _answer_steps answers in order once each is committed.
                if self.listeners.frames:
                    self._received(WALLBOX, self.session.last_frame)
                await self._pipeline(actions)
            else:
                await self._relay(WALLBOX, actions)
            # Waiting for the next frame, possibly for hours: hold none of this one (its text, up
            # to max_message_bytes, its Frame, its actions).
            del message, text, actions
            action = None

    async def _pipeline(self, actions: list[Action]) -> None:
        """Enqueue ``actions``' commits now; the answering task dispatches them in order once committed."""
        steps = self._steps
        steps.append(_Step(actions, [self._enqueue(a) if isinstance(a, (Persist, LogSession)) else None
                                     for a in actions]))
        if self._step_added is not None:  # the answering task waits for a frame
            self._step_added.set()
        if not self._answering and self._nursery is not None:
            # Started at the first frame answered locally and kept for the pair's life (an online pair
            # never pays for it; starting one per frame cost more than the pipelining saved).
            self._answering = True
            self._nursery.start_soon(self._guard, WALLBOX, self._answer_steps)
        while len(steps) > PIPELINE_LIMIT:
            await self._wait_step()

    async def _answer_steps(self) -> None:
        """Dispatch pipelined frames' actions in the order the frames were read, each after its commit."""
        steps = self._steps
        while True:
            while not steps:
                self._step_added = trio.Event()
                await self._step_added.wait()
                self._step_added = None
            step = steps[0]
            start = 0
            for index, tickets in enumerate(step.tickets):
                if tickets is not None:
                    self._dispatch(step.actions[start:index])
                    await self._complete(step.actions[index], tickets)  # type: ignore[arg-type]
                    start = index + 1
            self._dispatch(step.actions[start:] if start else step.actions)
            steps.pop(0)
            self._steps_done += 1
            done, self._step_done = self._step_done, None
            if done is not None:
                done.set()
            await self._flush()
            if self._committed_at and self.queue is not None:
                self.queue.stats.add("commit_to_sent", time.perf_counter() - self._committed_at)
                self._committed_at = 0.0

    async def _steps_committed(self) -> None:
        """Wait until every frame pipelined so far is committed and answered (replay reads the queue after)."""
        target = self._steps_done + len(self._steps)
        while self._steps_done < target:
            await self._wait_step()

    async def _wait_step(self) -> None:
        """Until the answering task finishes its next step (an event only while someone waits for one)."""
        if self._step_done is None:
            self._step_done = trio.Event()
        await self._step_done.wait()

    async def _pump_upstream(self, name: Side, connection: Connection) -> None:
        get, receive = connection.get_message, self.session.from_upstream
        now, quarter = trio.lowlevel.current_clock().current_time, self.settings.max_message_bytes // 4
        action: Action | None  # the loop's: cleared with the frame below
        while True:
            message = await get()
            text = message if type(message) is str and len(message) <= quarter else self._check(message)
            actions = receive(name, text, now())
            for action in actions:
                if type(action) not in _PLAIN:
                    await self._relay(name, actions)
                    break
            else:
                await self._relay_now(name, actions)
            del message, text, actions  # as in _pump_wallbox: an idle pair holds no frame
            action = None
            if self.drain:
                self._check_drained()  # a secondary's answer may have emptied its queue
                if self._handing_over:  # a held secondary's last answer: hand_over may go on
                    self._wake_hand_over()

    def _wake_hand_over(self) -> None:
        """A replayed or held frame was answered: :meth:`hand_over`, if it waits, checks again."""
        idle, self._replay_idle = self._replay_idle, None
        if idle is not None:
            idle.set()

    def _check_drained(self) -> None:
        """A drain without the wallbox ends once every queue of the charger is empty."""
        if not self.drain or self._ending or self._ending_soon or self._nursery is None or self.queued \
                or self._replaying:
            return
        if any(mirror.depth for mirror in self.session.mirrors.values()):
            return
        self._ending_soon = True
        self.log.info("drain_finished")
        self._nursery.start_soon(functools.partial(self._end, "proxy", closecodes.NORMAL, "queue delivered",
                                                   mirror=False, close_all=True))

    # -- upstream links ----------------------------------------------------------------

    async def _link(self, name: Side, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """One upstream for the life of the pair: relay while connected, reopen while the wallbox stays.

        ``task_status.started()`` once the session knows this upstream's first state (up and
        replaying, or down), so :meth:`run` reads no wallbox frame before (docs/offline.md).
        """
        connection = self.upstreams.get(name)
        secondary = name != self.session.primary
        if connection is not None:
            replay = await self._attach(name, connection)
            task_status.started()
            if replay is not None:
                await self._serve(name, connection, replay)
        else:
            if not secondary:  # a secondary is opened here, without a first wait
                await self._lost(name, "unreachable when the wallbox connected")
            task_status.started()
        connector = self.reconnect.get(name)
        if connector is None:
            return
        backoff = Backoff(self.settings.reconnect_min, self.settings.reconnect_max)
        first = secondary and connection is None
        while not self._ending:  # the pair is closing: no new connection
            if not first:
                await trio.sleep(backoff.next_delay())
            first = False
            if self._ending:
                return
            try:
                async with connector() as connection:
                    backoff.reset()
                    self.log.info("upstream_reconnected", upstream=name)
                    await self._connected(name, connection)
            except UpstreamUnavailable as exc:
                self.log.info("upstream_retry_failed", upstream=name, reason=exc.reason)

    async def _connected(self, name: Side, connection: Connection) -> None:
        """Relay one upstream connection until it closes; replay stored CALLs first."""
        replay = await self._attach(name, connection)
        if replay is not None:
            await self._serve(name, connection, replay)

    async def _attach(self, name: Side, connection: Connection) -> bool | None:
        """Tell the session an upstream is up; whether its queue replays first (None: not used)."""
        if self._handing_over:  # a drain giving way to its wallbox opens nothing more
            return None
        self.upstreams[name] = connection
        self._upstream_out[name] = self._outbox(name, connection)
        self._upstream_outboxes = tuple(self._upstream_out.values())
        self.upstream_connects[name] = self.upstream_connects.get(name, 0) + 1
        # A frame still committing (pipelined) counts: replay must not leave it behind in the queue.
        replay = name == self.session.primary and (self.queued > 0 or bool(self._steps))
        self._replaying = self._replaying or replay
        self.session.upstream_up(name, replay=replay)
        self._tell_upstream(name, True, "")
        await self._execute(self.session.secondary_up(name, trio.current_time()))  # a secondary's backlog
        self._check_drained()
        return replay

    async def _serve(self, name: Side, connection: Connection, replay: bool) -> None:
        """Relay an attached upstream until it closes (replaying first), then end or mark it lost."""
        if replay:
            async with trio.open_nursery() as link:
                link.start_soon(self._replay)
                closed = await self._relay_upstream(name, connection)
                link.cancel_scope.cancel()
        else:  # no nursery (nor its cancel scope) kept for the life of every idle pair
            closed = await self._relay_upstream(name, connection)
        code, reason = closed or (closecodes.GOING_AWAY, "")
        if self._ending:
            # The pair is closing (not an outage): _end is closing this connection and needs its
            # reader, which lives in the connector's block, until the close handshake is done;
            # it cancels this task afterwards.
            await trio.sleep_forever()
        if name not in self.reconnect:
            await self._end(name, code, reason, mirror=True)
            return
        del self.upstreams[name]
        self._upstream_out.pop(name, None)
        self._upstream_outboxes = tuple(self._upstream_out.values())
        await self._lost(name, self._given_up.pop(name, "") or f"closed with {code} {reason}".strip())

    async def _relay_upstream(self, name: Side, connection: Connection) -> tuple[int, str] | None:
        """Pump one upstream connection until it closes or breaks the rules: the close code and reason."""
        try:
            await self._pump_upstream(name, connection)
        except (_Violation, MessageTooBig) as exc:
            violation = _Violation.of(exc)
            await self._violation(name, violation)  # ends the pair when offline mode is off
            return (violation.code, violation.reason)
        except ConnectionClosed as exc:
            return (exc.reason.code, exc.reason.reason or "")
        return None

    def _outbox(self, name: Side, connection: Connection) -> Outbox:
        return Outbox(connection, stall_timeout=self.settings.stall_timeout, on_stall=self._stalled, name=name)

    def _stalled(self, name: Side) -> None:
        """An upstream's send blocked for stall_timeout (a bound method per outbox, not a closure)."""
        self._give_up(name, "stall", f"not reading: a send blocked for {self.settings.stall_timeout:g} s")

    def _give_up(self, name: Side, kind: GiveUp, reason: str) -> None:
        """The proxy ends an upstream connection that stopped working (``kind``: stall, call_timeout,
        ping_timeout); its link sees the close, logs ``reason`` and reconnects (the wallbox stays).

        Without offline mode (no reconnect) the pair ends, as when the backend closes.
        """
        connection = self.upstreams.get(name)
        if connection is None or name in self._given_up or self._nursery is None:
            return
        self._given_up[name] = reason
        self.log.warning("upstream_given_up", upstream=name, kind=kind, reason=reason)
        for listener in self.listeners:
            listener.upstream_given_up(self, name, kind)
        self._nursery.start_soon(_drop, connection)

    async def _lost(self, name: Side, reason: str) -> None:
        self.log.warning("upstream_lost", upstream=name, reason=reason, offline=self.session.offline is not None)
        self._tell_upstream(name, False, reason)
        await self._execute(self.session.upstream_down(name, trio.current_time()))

    def _tell_upstream(self, name: Side, up: bool, reason: str) -> None:
        for listener in self.listeners:
            listener.upstream_state(self, name, up, reason)

    # -- offline queue ---------------------------------------------------------------------

    def _enqueue(self, action: Persist | LogSession) -> list[Ticket] | StorageError:
        """Put a locally answered CALL, or session-log entries, in the next commit (without waiting)."""
        queue = self.queue
        if queue is None:
            assert isinstance(action, LogSession)
            return StorageError("journal", "no store is open")
        if type(action) is Persist:
            queue.stats.add("read_to_enqueue", time.perf_counter() - self._read_at)
            return [queue.enqueue(Append(self.charger_id, action.action, action.text, action.local_transaction_id,
                                         self.subprotocol))]
        assert isinstance(action, LogSession)
        if action.wait:
            return [queue.enqueue(Journal(event)) for event in action.events]
        queue.journal_behind(action.events)
        return []

    async def _complete(self, action: Persist | LogSession, tickets: list[Ticket] | StorageError) -> None:
        """Once ``action``'s changes are committed, (only then) answer the wallbox; if they failed, refuse."""
        error = tickets if isinstance(tickets, StorageError) else None
        if self.queue is not None and not isinstance(tickets, StorageError):
            for ticket in tickets:
                error = error or (await self.queue.settled(ticket)).error
        if type(action) is Persist:
            self._persisted(action, error)
        else:
            self._logged(action, error)  # type: ignore[arg-type]

    def _persisted(self, action: Persist, error: StorageError | None) -> None:
        if error is not None:
            self.log.error("queue_write_failed", action=action.action, error=error.detail)
            self._wallbox_out.put(build_error(action.msg_id, "InternalError",
                                              "backend unreachable and the proxy could not store the frame"))
            return
        self._committed_at = time.perf_counter()
        self._set_queued(self.queued + 1)
        self._wallbox_out.put(action.answer)

    def _logged(self, action: LogSession, error: StorageError | None) -> None:
        """Session-log entries committed (or not): answer, or refuse where the log is the record (docs/standalone.md).

        Entries that need not wait (:attr:`LogSession.wait`) joined the next commit and the answer goes at once.
        """
        if error is not None:
            self.log.error("session_log_write_failed", transaction=action.events[0].transaction[:40],
                           error=error.detail, answered=not action.required)
            if action.required:
                self._wallbox_out.put(build_error(action.msg_id, "InternalError",
                                                  "the proxy could not record the transaction; try again"))
                return
        if action.answer is not None:
            self._wallbox_out.put(action.answer)

    def _set_queued(self, depth: int) -> None:
        self.queued = depth
        for listener in self.listeners:
            listener.queue_depth(self, depth)

    async def _replay(self) -> None:
        """Send stored CALLs to the primary, in order, one at a time, before live traffic."""
        assert self.queue is not None
        backoff = Backoff(self.settings.reconnect_min, self.settings.reconnect_max)
        while True:
            try:
                keep, drop = replay_plan(await self.queue.pending(self.charger_id))
            except StorageError as exc:  # unreadable for now: the wallbox stays answered locally
                self.log.error("replay_read_failed", error=exc.detail)
                await trio.sleep(backoff.next_delay())
                continue
            self._set_queued(len(keep) + len(drop))
            for entry in drop:
                await self.queue.delivered(entry.row, self.charger_id)
                self._set_queued(self.queued - 1)
            if not keep and not drop:
                if not self._steps:
                    break  # no await since pending() was read: nothing new can have been stored
                await self._steps_committed()  # frames read before the replay began, still committing
                continue
            for entry in keep:
                if self._handing_over:
                    return
                self._replay_busy = True
                try:
                    await self._replay_one(entry)
                finally:
                    self._replay_busy = False
                    self._wake_hand_over()
        self.session.replay_finished()
        self._replaying = False
        self.log.info("replay_finished")
        self._check_drained()

    async def _replay_one(self, entry: Stored) -> None:
        queue = self.queue
        assert queue is not None
        frame = classify(entry.text)
        text = entry.text
        if entry.action in TRANSACTION_ACTIONS:
            text = map_transaction(frame, self.session.transactions)
        msg_id = frame.msg_id or ""
        if entry.attempts and in_flight_policy(entry.action) == InFlight.RESEND:
            # Sent before without a committed answer: the backend may see it twice (docs/offline.md).
            self.log.warning("replay_possible_duplicate", action=entry.action, msg_id=msg_id,
                             attempts=entry.attempts, local_tx=entry.local_transaction_id)
            for listener in self.listeners:
                listener.replay_resent(self, entry.action)
        await queue.mark_sent(entry.row)  # durably, before it goes out
        while True:
            event, box = trio.Event(), list[Frame]()
            self._replay_waiters[msg_id] = (event, box)
            await self._execute(self.session.replay_call(frame, text, trio.current_time()))
            with trio.move_on_after(self.settings.call_timeout):
                await event.wait()
            self._replay_waiters.pop(msg_id, None)
            if box:
                break
            self.log.warning("replay_unanswered", action=entry.action, msg_id=msg_id)
        answer = box[0]
        backend_tx = None
        if answer.kind is MessageType.CALLERROR:
            self.log.warning("replay_refused", action=entry.action, msg_id=msg_id, error=answer.action)
        elif entry.action == "StartTransaction" and entry.local_transaction_id is not None:
            backend_tx = started_transaction(answer)
            if backend_tx is not None:
                self.session.transactions[entry.local_transaction_id] = backend_tx
        await queue.delivered(entry.row, self.charger_id, entry.local_transaction_id, backend_tx)
        self._set_queued(self.queued - 1)

    def _check(self, message: str | bytes) -> str:
        if not isinstance(message, str):
            raise _Violation(closecodes.UNSUPPORTED_DATA, "binary frames are not OCPP-J")
        limit = self.settings.max_message_bytes
        # The wire parser limits bytes already; an in-process leg (wire.local) does not.
        if len(message) * 4 > limit and len(message.encode("utf-8")) > limit:
            raise _Violation(closecodes.MESSAGE_TOO_BIG, f"frame over {limit} bytes")
        return message

    async def _relay(self, source: Side, actions: list[Action]) -> None:
        """A frame received from ``source``: tell the listeners, dispatch its actions, write what they queued.

        For a frame with more than sends and reports among its actions (a commit, an observed frame,
        a mirror's queue, a proxy CALL's answer): the reports keep their place among the actions.
        One coroutine per frame (a coroutine call costs more than a plain one): the dispatch is
        synchronous unless something must be committed first, and the flush of an empty outbox is
        skipped without a call.
        """
        if self.listeners.frames:
            self._received(source, self.session.last_frame)
        stop = self._dispatch(actions)
        if stop >= 0:
            await self._dispatch_from(actions, stop)
        # _flush, inline: one coroutine less per frame.
        if self._wallbox_out._queue:
            await self._wallbox_out.flush()
        for outbox in self._upstream_outboxes:  # a tuple: a link may (re)connect meanwhile
            if outbox._queue:
                await outbox.flush()

    async def _relay_now(self, source: Side, actions: list[Action]) -> None:
        """A frame whose actions are all :data:`_PLAIN` (nearly every frame of an online pair): write its
        sends, then report it: the listeners, CallCompleted, LogLater, the next deadline.

        At one wallbox every frame wakes the process from idle with cold caches, and the round trip
        waits only for what runs before the bytes are written; the reports (metrics, the session
        log's keep) go after, while the peer works on the frame. They go in this same step, before
        the next frame of ``source`` is read; which listeners see them after the write is said in
        docs/design.md. (A send that has to wait for the peer delays them with it.)
        """
        frame = self.session.last_frame  # another pump may classify a frame while the flush waits
        for action in actions:
            if type(action) is ToUpstream or type(action) is ToWallbox:
                self._put(action)
        if self._wallbox_out._queue:  # _flush, inline as in _relay
            await self._wallbox_out.flush()
        for outbox in self._upstream_outboxes:
            if outbox._queue:
                await outbox.flush()
        if self.listeners.frames:
            self._received(source, frame)
        for action in actions:
            if type(action) is CallCompleted:
                self._notify(action)
            elif type(action) is LogLater and self.queue is not None:
                self.queue.log_later(action.charger, action.version, action.call, action.answer)
        deadline = self.session.next_deadline()
        if deadline is not None and deadline < self._wake_at:
            self._wake_at = self._timer.deadline = deadline

    def _received(self, source: Side, frame: Frame | None) -> None:
        """Tell the frame listeners about ``frame`` (the session's last classified one, taken by the caller)."""
        if frame is not None:
            for frame_received in self.listeners.frames:
                frame_received(self, source, frame, len(frame.text))

    async def _execute(self, actions: list[Action]) -> None:
        await self._dispatch_all(actions)
        await self._flush()

    async def _dispatch_all(self, actions: list[Action]) -> None:
        """Dispatch in order; a Persist or LogSession is committed before anything after it is queued."""
        stop = self._dispatch(actions)
        if stop >= 0:
            await self._dispatch_from(actions, stop)

    async def _dispatch_from(self, actions: list[Action], stop: int) -> None:
        """The rest of :meth:`_dispatch_all` from the Persist or LogSession at ``stop``."""
        while stop >= 0:
            action = actions[stop]
            if isinstance(action, (Persist, LogSession)):
                await self._complete(action, self._enqueue(action))
            stop = self._dispatch(actions, stop + 1)

    def _dispatch(self, actions: list[Action], start: int = 0) -> int:
        """Queue sends and notify from ``actions[start:]`` up to a Persist or LogSession: its index, else -1.

        Per frame: exact-type checks (mypy narrows them) instead of class patterns, which cost an
        isinstance call and a list per match; one pass, no slices.
        """
        index = start
        for action in actions if not start else actions[start:]:
            if type(action) is ToUpstream or type(action) is ToWallbox:
                self._put(action)
            elif type(action) is Persist or type(action) is LogSession:
                break
            elif type(action) is LogLater:
                if self.queue is not None:  # kept for the session log's next batch; nothing waits for it
                    self.queue.log_later(action.charger, action.version, action.call, action.answer)
            else:
                self._notify(action)
            index += 1
        else:
            index = -1
        deadline = self.session.next_deadline()
        if deadline is not None and deadline < self._wake_at:
            self._wake_at = self._timer.deadline = deadline
        return index

    def _put(self, send: ToUpstream | ToWallbox) -> None:
        """Queue a send on its leg's outbox (an upstream that is not connected gets nothing)."""
        if type(send) is ToUpstream:
            outbox = self._upstream_out.get(send.name)
            if outbox is not None:
                outbox.put(send.text)
        else:
            self._wallbox_out.put(send.text)

    async def _flush(self) -> None:
        # An empty outbox has nothing to write or wait for: skip the call.
        if self._wallbox_out._queue:
            await self._wallbox_out.flush()
        for outbox in self._upstream_outboxes:  # a tuple: a link may (re)connect meanwhile
            if outbox._queue:
                await outbox.flush()

    def _notify(self, action: Action) -> None:
        kind = type(action)
        if kind is not CallCompleted:  # every answered CALL: nothing for the pair itself to do
            match action:
                case Replayed(call=call, answer=answer):
                    self._wake(self._replay_waiters.get(call.msg_id or ""), answer)
                case ProxyAnswer(msg_id=msg_id, frame=frame):
                    self._wake(self._waiters.get(msg_id), frame)
                case ProxyCallFailed(msg_id=msg_id, reason=reason):
                    self._wake(self._waiters.get(msg_id), reason)
                case UpstreamUnresponsive():
                    self._unresponsive(action)
                case Malformed(source=source, frame=frame, problem=problem, dropped=dropped):
                    self.log.warning("malformed_frame", source=source, problem=problem, dropped=dropped,
                                     head=frame.text[:200])
        listeners = self.listeners
        for action_listener in listeners._by_type.get(kind) or listeners.for_action(kind):
            action_listener(self, action)

    @staticmethod
    def _wake(waiter: tuple[trio.Event, list[Any]] | None, result: Frame | str) -> None:
        """Hand ``result`` to the task waiting in :meth:`request` or :meth:`_replay_one`, if any."""
        if waiter is not None:
            waiter[1].append(result)
            waiter[0].set()

    def _unresponsive(self, action: UpstreamUnresponsive) -> None:
        reason = f"{action.action} {action.msg_id!r} unanswered for {action.seconds:.1f} s"
        if action.name in self.reconnect:  # offline mode: answer locally now, reconnect
            self._give_up(action.name, "call_timeout", reason)
        else:  # a strict pair: the wallbox decides (it retries or reconnects); said, counted
            self.log.warning("upstream_call_unanswered", upstream=action.name, reason=reason)
            for listener in self.listeners:
                listener.upstream_given_up(self, action.name, "call_timeout")

    # -- timers ---------------------------------------------------------------------

    async def _run_timers(self, nursery: trio.Nursery) -> None:
        """Session deadlines and ping rounds, in one sleeping task per pair.

        (A second task just for pings cost about 2 KiB per idle pair.) A ping
        round runs as its own short task; the next one is due ``ping_interval``
        after it ended, as before.
        """
        interval = self.settings.ping_interval
        self._next_ping = trio.current_time() + interval if interval > 0 else float("inf")
        while True:
            deadline = self.session.next_deadline()
            wake = self._next_ping if deadline is None else min(deadline, self._next_ping)
            self._wake_at = wake
            with trio.CancelScope(deadline=wake) as self._timer:
                await trio.sleep_forever()
            now = trio.current_time()
            if now >= self._next_ping:
                self._next_ping = float("inf")  # until this round is over
                nursery.start_soon(self._ping_round, interval)
            await self._execute(self.session.poll(now))

    async def _ping_round(self, interval: float) -> None:
        legs: dict[str, Connection] = {WALLBOX: self.wallbox, **self.upstreams}
        async with trio.open_nursery() as nursery:
            for side, connection in legs.items():
                # An upstream that does not answer a ping within stall_timeout is not reading.
                wait = interval if side == WALLBOX else min(interval, self.settings.stall_timeout)
                nursery.start_soon(self._ping, side, connection, wait)
        self._next_ping = trio.current_time() + interval
        if self._next_ping < self._wake_at:
            self._wake_at = self._timer.deadline = self._next_ping

    async def _ping(self, side: Side, connection: Connection, timeout: float) -> None:
        with trio.move_on_after(timeout) as scope:
            try:
                await connection.ping()
            except ConnectionClosed:
                return  # the reader task reports the close
        if not scope.cancelled_caught:
            return
        self.log.warning("ping_timeout", side=side, seconds=timeout)
        if side in self.reconnect:  # a dead upstream is dropped and reopened; the wallbox stays
            self._give_up(side, "ping_timeout", f"no pong within {timeout:g} s")
            return
        await self._end(side, 1006, "no pong", mirror=True, dead=True)

    # -- teardown -----------------------------------------------------------------------

    async def _violation(self, side: Side, exc: _Violation) -> None:
        self.log.warning("frame_refused", side=side, code=exc.code, reason=exc.reason)
        for listener in self.listeners:
            listener.frame_rejected(self, side, exc.code, exc.reason)
        connection = self._leg(side)
        with trio.move_on_after(self.settings.close_timeout):
            await connection.aclose(exc.code, exc.reason)
        if side not in (WALLBOX, self.session.primary):
            return  # a secondary misbehaved: only its leg closes (and is reopened)
        code, reason = closecodes.after_violation(side, exc.code)
        await self._end(side, exc.code, exc.reason, mirror=False, other=(code, reason))

    async def _end(self, side: Side, code: int, reason: str, *, mirror: bool, close_all: bool = False,
                   other: tuple[int, str] | None = None, dead: bool = False) -> None:
        """First close wins: log it, close the remaining legs, cancel the pair's tasks.

        ``dead``: ``side`` stopped answering; its socket is dropped without
        waiting for a close handshake that will never come.
        """
        if self._ending:
            return
        self._ending = True
        self.close_info = (side, code, reason)
        self.log.info("session_closing", closed_by=side, code=code, reason=reason)
        if dead:
            await _drop(self._leg(side))
        out_code, out_reason = (closecodes.mirror(code, reason, side) if mirror
                                else other or (code, closecodes.truncate(reason)))
        legs = {WALLBOX: self.wallbox, **self.upstreams}
        with trio.move_on_after(self.settings.close_timeout):
            async with trio.open_nursery() as nursery:
                for name, connection in legs.items():
                    if close_all or name != side:
                        nursery.start_soon(connection.aclose, out_code, out_reason)
        if self._cancel is not None:
            self._cancel.cancel()

    def _leg(self, side: Side) -> Connection:
        return self.wallbox if side == WALLBOX else self.upstreams[side]


async def _drop(connection: Connection) -> None:
    """Close a connection whose peer stopped answering, without waiting for a close handshake."""
    with trio.CancelScope() as scope:
        scope.cancel()  # a cancelled aclose still closes the socket
        await connection.aclose(closecodes.GOING_AWAY, "no pong")
