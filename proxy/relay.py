"""The nursery that joins one wallbox, its upstream(s) and its Session (trio).

:class:`PairedSession` moves text between WebSocket connections and the
sans-IO :class:`~proxy.session.Session`, runs the session's timers and the
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

from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from trio_websocket import ConnectionClosed

from proxy import closecodes
from proxy.frames import Frame
from proxy.handshake import Refuse
from proxy.session import (
    WALLBOX,
    Action,
    Malformed,
    ProxyAnswer,
    ProxyCallFailed,
    Session,
    ToUpstream,
    ToWallbox,
)

#: Frames queued towards one connection before the producing pump waits.
OUTBOX_LIMIT = 64


class Connection(Protocol):
    """What the relay needs of a WebSocket (trio-websocket's connection fits)."""

    async def get_message(self) -> str | bytes: ...
    async def send_message(self, message: str | bytes) -> None: ...
    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...
    async def ping(self, payload: bytes | None = None) -> None: ...


class Listener:
    """Receives what happens in sessions: metrics, limit engine, tests.

    Methods are called synchronously from the session's tasks and must not
    block; they are no-ops here so a listener overrides only what it needs.
    """

    def session_opened(self, paired: PairedSession) -> None: ...
    def session_closed(self, paired: PairedSession, side: str, code: int, reason: str) -> None: ...
    def frame_received(self, paired: PairedSession, source: str, frame: Frame, size: int) -> None: ...
    def action(self, paired: PairedSession, action: Action) -> None: ...
    def handshake_refused(self, refusal: Refuse) -> None: ...
    def frame_rejected(self, paired: PairedSession, side: str, code: int, reason: str) -> None: ...
    def upstream_changed(self, paired: PairedSession, name: str, up: bool, detail: str) -> None:
        """A secondary upstream connected (``up``) or was lost (``detail`` says why)."""


class Link(Protocol):
    """A secondary upstream's connection, owned by its paired session (see proxy/secondary.py).

    It reconnects on its own and never ends the pair; what it sends comes
    from ``put`` and is written by its own task, so a slow or dead secondary
    never holds up the wallbox's or the primary's pumps.
    """

    def put(self, text: str) -> None: ...
    async def run(self, paired: PairedSession) -> None: ...
    async def close(self, code: int, reason: str) -> None: ...


@dataclass(frozen=True)
class SessionSettings:
    max_message_bytes: int = 1_048_576
    ping_interval: float = 30.0
    close_timeout: float = 5.0


class _Violation(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Outbox:
    """Ordered, bounded sending to one connection from several tasks."""

    def __init__(self, connection: Connection, limit: int = OUTBOX_LIMIT) -> None:
        self.connection = connection
        self.limit = limit
        self.closed = False
        self._queue: deque[str] = deque()
        self._sending = False
        self._space = trio.Event()

    def put(self, text: str) -> None:
        if not self.closed:
            self._queue.append(text)

    async def flush(self) -> None:
        """Write queued frames, or wait for room if another task is writing."""
        if self._sending:
            while len(self._queue) > self.limit and not self.closed:
                await self._space.wait()
            return
        self._sending = True
        try:
            while self._queue:
                await self.connection.send_message(self._queue.popleft())
                if len(self._queue) <= self.limit:
                    self._wake()
        except ConnectionClosed:
            self.closed = True  # the leg's reader sees the close and ends the pair
            self._queue.clear()
        finally:
            self._sending = False
            self._wake()

    def _wake(self) -> None:
        self._space.set()
        self._space = trio.Event()


class PairedSession:
    def __init__(self, charger_id: str, session: Session, wallbox: Connection,
                 upstreams: dict[str, Connection], *, log: Any,
                 settings: SessionSettings = SessionSettings(),
                 listeners: Sequence[Listener] = (), links: Mapping[str, Link] | None = None) -> None:
        self.charger_id = charger_id
        self.session = session
        self.wallbox = wallbox
        self.upstreams = upstreams
        self.log = log
        self.settings = settings
        self.listeners = list(listeners)
        #: Secondary upstreams by name; ``upstreams`` holds the legs whose close ends the pair.
        self.links = dict(links or {})
        self._wallbox_out = Outbox(wallbox)
        self._upstream_out = {name: Outbox(conn) for name, conn in upstreams.items()}
        self._waiters: dict[str, tuple[trio.Event, list[Frame | str]]] = {}
        self._timer_wake = trio.Event()
        self._armed: float | None = None
        self._ending = False
        self._cancel: trio.CancelScope | None = None
        self.closed = trio.Event()
        self.close_info: tuple[str, int, str] | None = None

    # -- lifetime ---------------------------------------------------------------

    async def run(self) -> None:
        """Relay until one leg closes; returns after every leg is closed."""
        for listener in self.listeners:
            listener.session_opened(self)
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                nursery.start_soon(self._guard, WALLBOX, self._pump_wallbox)
                for name in self.upstreams:
                    nursery.start_soon(self._guard, name, self._pump_upstream, name)
                nursery.start_soon(self._run_timers)
                for link in self.links.values():
                    nursery.start_soon(link.run, self)
                if self.settings.ping_interval > 0:
                    nursery.start_soon(self._run_pings)
        finally:
            self._finish()

    async def shutdown(self, code: int, reason: str) -> None:
        """Close every leg with ``code`` (proxy stopping, charger replaced)."""
        await self._end("proxy", code, reason, mirror=False, close_all=True)

    def _finish(self) -> None:
        for action in self.session.close():
            self._notify(action)
        for event, box in self._waiters.values():
            box.append("session closed")
            event.set()
        side, code, reason = self.close_info or ("proxy", closecodes.GOING_AWAY, "")
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

    async def _guard(self, side: str, pump: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await pump(*args)
        except ConnectionClosed as exc:
            code = int(exc.reason.code) if exc.reason else 1006
            reason = (exc.reason.reason if exc.reason else None) or ""
            if code == closecodes.MESSAGE_TOO_BIG and reason.startswith("Exceeded maximum"):
                await self._violation(side, _Violation(code, reason))
            else:
                await self._end(side, code, reason, mirror=True)
        except _Violation as exc:
            await self._violation(side, exc)

    async def _pump_wallbox(self) -> None:
        get, receive = self.wallbox.get_message, self.session.from_wallbox
        while True:
            text = self._check(await get())
            self._handle(WALLBOX, receive(text, trio.current_time()))
            await self._flush()

    async def _pump_upstream(self, name: str) -> None:
        get, receive = self.upstreams[name].get_message, self.session.from_upstream
        while True:
            text = self._check(await get())
            self._handle(name, receive(name, text, trio.current_time()))
            await self._flush()

    def _check(self, message: str | bytes) -> str:
        if not isinstance(message, str):
            raise _Violation(closecodes.UNSUPPORTED_DATA, "binary frames are not OCPP-J")
        limit = self.settings.max_message_bytes
        # trio-websocket limits characters; a UTF-8 frame can be up to 4x longer in bytes.
        if len(message) * 4 > limit and len(message.encode("utf-8")) > limit:
            raise _Violation(closecodes.MESSAGE_TOO_BIG, f"frame over {limit} bytes")
        return message

    def _handle(self, source: str, actions: list[Action]) -> None:
        if self.listeners:
            frame = self.session.last_frame
            if frame is not None:
                for listener in self.listeners:
                    listener.frame_received(self, source, frame, len(frame.text))
        self._dispatch(actions)

    async def _execute(self, actions: list[Action]) -> None:
        self._dispatch(actions)
        await self._flush()

    def _dispatch(self, actions: list[Action]) -> None:
        for action in actions:
            kind = type(action)
            if kind is ToWallbox:
                self._wallbox_out.put(action.text)  # type: ignore[union-attr]
            elif kind is ToUpstream:
                outbox = self._upstream_out.get(action.name)  # type: ignore[union-attr]
                if outbox is not None:
                    outbox.put(action.text)  # type: ignore[union-attr]
                elif action.name in self.links:  # type: ignore[union-attr]
                    self.links[action.name].put(action.text)  # type: ignore[union-attr]
            else:
                self._notify(action)
        deadline = self.session.next_deadline()
        if deadline is not None and (self._armed is None or deadline < self._armed):
            self._timer_wake.set()

    async def _flush(self) -> None:
        await self._wallbox_out.flush()
        for outbox in self._upstream_out.values():
            await outbox.flush()

    def _notify(self, action: Action) -> None:
        if isinstance(action, (ProxyAnswer, ProxyCallFailed)):
            waiter = self._waiters.get(action.msg_id)
            if waiter is not None:
                waiter[1].append(action.frame if isinstance(action, ProxyAnswer) else action.reason)
                waiter[0].set()
        elif isinstance(action, Malformed):
            self.log.warning("malformed_frame", source=action.source, problem=action.problem,
                             dropped=action.dropped, head=action.frame.text[:200])
        for listener in self.listeners:
            listener.action(self, action)

    # -- secondaries (called by their links) ----------------------------------------------

    async def secondary_opened(self, name: str) -> None:
        """Its connection is open: the session replays what it missed."""
        for listener in self.listeners:
            listener.upstream_changed(self, name, True, "")
        await self._execute(self.session.secondary_up(name, trio.current_time()))

    def secondary_closed(self, name: str, detail: str) -> None:
        self.session.secondary_down(name)
        for listener in self.listeners:
            listener.upstream_changed(self, name, False, detail)

    async def secondary_frame(self, name: str, message: str | bytes) -> tuple[int, str] | None:
        """A frame from a secondary; a violation is returned (the link closes that leg alone)."""
        try:
            text = self._check(message)
        except _Violation as exc:
            for listener in self.listeners:
                listener.frame_rejected(self, name, exc.code, exc.reason)
            return exc.code, exc.reason
        self._handle(name, self.session.from_upstream(name, text, trio.current_time()))
        await self._flush()
        return None

    # -- timers ---------------------------------------------------------------------

    async def _run_timers(self) -> None:
        while True:
            self._armed = self.session.next_deadline()
            with trio.move_on_at(self._armed if self._armed is not None else float("inf")):
                await self._timer_wake.wait()
                self._timer_wake = trio.Event()
                continue
            await self._execute(self.session.poll(trio.current_time()))

    async def _run_pings(self) -> None:
        interval = self.settings.ping_interval
        legs: dict[str, Connection] = {WALLBOX: self.wallbox, **self.upstreams}
        while True:
            await trio.sleep(interval)
            async with trio.open_nursery() as nursery:
                for side, connection in legs.items():
                    nursery.start_soon(self._ping, side, connection, interval)

    async def _ping(self, side: str, connection: Connection, timeout: float) -> None:
        with trio.move_on_after(timeout) as scope:
            try:
                await connection.ping()
            except ConnectionClosed:
                return  # the reader task reports the close
        if scope.cancelled_caught:
            self.log.warning("ping_timeout", side=side, seconds=timeout)
            await self._end(side, 1006, "no pong", mirror=True, dead=True)

    # -- teardown -----------------------------------------------------------------------

    async def _violation(self, side: str, exc: _Violation) -> None:
        self.log.warning("frame_refused", side=side, code=exc.code, reason=exc.reason)
        for listener in self.listeners:
            listener.frame_rejected(self, side, exc.code, exc.reason)
        connection = self._leg(side)
        with trio.move_on_after(self.settings.close_timeout):
            await connection.aclose(exc.code, exc.reason)
        code, reason = closecodes.after_violation(side, exc.code)
        await self._end(side, exc.code, exc.reason, mirror=False, other=(code, reason))

    async def _end(self, side: str, code: int, reason: str, *, mirror: bool, close_all: bool = False,
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
            with trio.CancelScope() as drop:
                drop.cancel()  # a cancelled aclose still closes the socket
                await self._leg(side).aclose(closecodes.GOING_AWAY, reason)
        out_code, out_reason = (closecodes.mirror(code, reason, side) if mirror
                                else other or (code, closecodes.truncate(reason)))
        legs = {WALLBOX: self.wallbox, **self.upstreams}
        with trio.move_on_after(self.settings.close_timeout):
            async with trio.open_nursery() as nursery:
                for name, connection in legs.items():
                    if close_all or name != side:
                        nursery.start_soon(connection.aclose, out_code, out_reason)
                for link in self.links.values():
                    nursery.start_soon(link.close, out_code, out_reason)
        if self._cancel is not None:
            self._cancel.cancel()

    def _leg(self, side: str) -> Connection:
        return self.wallbox if side == WALLBOX else self.upstreams[side]
