"""Secondary upstreams of a wallbox (trio): their connections, and what outlives a session.

:class:`SecondaryLink` is one secondary's connection for one paired session.
It is deliberately unlike the primary leg: it connects after the wallbox was
admitted, reconnects with exponential backoff and jitter while the wallbox
stays, is written by its own task (so a slow or dead secondary never makes the
wallbox's or the primary's pump wait), and its loss never ends the pair. What
the secondary is owed while it is away is kept by its
:class:`~proxy.mirror.Mirror` (sans-IO), which the session feeds.

:class:`Secondaries` is the server's part: one Mirror per (charger,
secondary) for the life of the proxy, so a wallbox that reconnects does not
lose what its secondaries have not received yet; the transaction id store
(:mod:`proxy.txmap`); and the :class:`~proxy.relay.Listener` that persists
new id pairs and logs what secondaries miss or are refused.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from proxy.config import Config, ChargerSettings, SecondaryTarget
from proxy.mirror import Mirror, MirrorDropped, TxMapped
from proxy.policy import CommandPolicy
from proxy.relay import Listener, PairedSession, SessionSettings
from proxy.session import PRIMARY, Action, Policed
from proxy.txmap import TxMapStore
from proxy.upstream import UpstreamUnavailable, open_upstream

#: Frames waiting to be written to one secondary before it counts as stalled
#: (its CALL copies are one at a time; this is answers to its own CALLs).
LINK_LIMIT = 256


def backoff(previous: float, minimum: float, maximum: float) -> float:
    """Next base delay: doubles from ``minimum`` up to ``maximum``."""
    return minimum if previous <= 0 else min(maximum, previous * 2)


def jittered(delay: float, rng: Callable[[], float] = random.random) -> float:
    """Between half and all of ``delay``, so many links do not retry in step."""
    return delay * (0.5 + rng() / 2)


class SecondaryLink:
    def __init__(self, target: SecondaryTarget, subprotocol: str | None, settings: SessionSettings,
                 log: Any) -> None:
        self.name = target.name
        self.target = target.target
        self.subprotocols = [subprotocol] if subprotocol else []
        self.settings = settings
        self.reconnect_min = target.settings.reconnect_min
        self.reconnect_max = target.settings.reconnect_max
        self.log = log.bind(upstream=target.name)
        self.connection: WebSocketConnection | None = None
        self._closing = False
        self._out: deque[str] = deque()
        self._wake = trio.Event()

    def put(self, text: str) -> None:
        """Queue a frame; while disconnected there is nobody to send it to (the Mirror keeps CALLs)."""
        if self.connection is None:
            return
        self._out.append(text)
        self._wake.set()

    async def close(self, code: int, reason: str) -> None:
        """The pair ends: close like the primary leg does, and do not reconnect."""
        self._closing = True
        connection = self.connection
        if connection is not None:
            with trio.move_on_after(self.settings.close_timeout):
                await connection.aclose(code, reason)

    async def run(self, paired: PairedSession) -> None:
        """Connect, relay, reconnect; until the paired session cancels it."""
        delay = 0.0
        while True:
            try:
                detail = await self._connected(paired)
                delay = 0.0  # it was up: start over from the shortest wait
                event = "secondary_closed"
            except UpstreamUnavailable as exc:
                detail, event = exc.reason, "secondary_unavailable"
                for listener in paired.listeners:
                    listener.upstream_changed(paired, self.name, False, detail)
            if self._closing:
                return
            delay = backoff(delay, self.reconnect_min, self.reconnect_max)
            wait = jittered(delay)
            self.log.warning(event, reason=detail, retry_in=round(wait, 3))
            await trio.sleep(wait)

    async def _connected(self, paired: PairedSession) -> str:
        """One connection, start to end; returns why it ended."""
        settings = self.settings
        async with open_upstream(self.target, self.subprotocols, max_message_size=settings.max_message_bytes,
                                 close_timeout=settings.close_timeout) as connection:
            self.connection = connection
            self._out.clear()
            self.log.info("secondary_connected", url=self.target.url, subprotocol=connection.subprotocol)
            detail = "cancelled"
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, connection)
                    if settings.ping_interval > 0:
                        nursery.start_soon(self._ping, connection)
                    await paired.secondary_opened(self.name)
                    detail = await self._read(connection, paired)
                    nursery.cancel_scope.cancel()
            finally:
                self.connection = None
                self._out.clear()
                paired.secondary_closed(self.name, detail)
        return detail

    async def _read(self, connection: WebSocketConnection, paired: PairedSession) -> str:
        while True:
            try:
                message = await connection.get_message()
            except ConnectionClosed as exc:
                if exc.reason is None:
                    return "closed 1006"
                return f"closed {exc.reason.code} {exc.reason.reason or ''}".strip()
            violation = await paired.secondary_frame(self.name, message)
            if violation is not None:
                self.log.warning("frame_refused", side=self.name, code=violation[0], reason=violation[1])
                with trio.move_on_after(self.settings.close_timeout):
                    await connection.aclose(*violation)
                return f"refused: {violation[1]}"
            if len(self._out) > LINK_LIMIT:
                self.log.warning("secondary_stalled", queued=len(self._out))
                await _drop(connection)
                return "not reading"

    async def _write(self, connection: WebSocketConnection) -> None:
        while True:
            if not self._out:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            try:
                await connection.send_message(self._out.popleft())
            except ConnectionClosed:
                return  # the reader reports it

    async def _ping(self, connection: WebSocketConnection) -> None:
        interval = self.settings.ping_interval
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as scope:
                try:
                    await connection.ping()
                except ConnectionClosed:
                    return
            if scope.cancelled_caught:
                self.log.warning("ping_timeout", side=self.name, seconds=interval)
                await _drop(connection)
                return


async def _drop(connection: WebSocketConnection) -> None:
    """Close a dead connection without waiting for a handshake that will not come."""
    with trio.CancelScope() as scope:
        scope.cancel()
        await connection.aclose(1001, "no answer")


class Secondaries:
    """What the server keeps for secondaries across sessions: mirrors, the id store, their listener."""

    def __init__(self, config: Config, log: Any) -> None:
        self.config = config
        self.log = log
        self.mirrors: dict[tuple[str, str], Mirror] = {}
        self.store: TxMapStore | None = None
        self.listener = SecondaryListener(self)

    @property
    def configured(self) -> bool:
        return any(self.config.secondaries_for(c) for c in self.config.chargers)

    def open(self) -> None:
        """Open the id store at start-up (a bad path stops the proxy here, not mid-transaction)."""
        if self.configured and self.store is None:
            self.store = TxMapStore(self.config.server.state_db)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def targets(self, charger: ChargerSettings) -> list[SecondaryTarget]:
        return self.config.secondaries_for(charger)

    def policy(self, charger: ChargerSettings) -> CommandPolicy:
        tables = {PRIMARY: self.config.primary_policy(charger)}
        tables.update({t.name: t.settings.policy for t in self.targets(charger)})
        return CommandPolicy(PRIMARY, tables)

    def mirror(self, charger: ChargerSettings, target: SecondaryTarget) -> Mirror:
        key = (charger.id, target.name)
        mirror = self.mirrors.get(key)
        if mirror is None:
            known = self.store.load(charger.id, target.name) if self.store is not None else {}
            mirror = self.mirrors[key] = Mirror(
                target.name, forward_actions=target.forward_actions, queue_limit=target.settings.queue_limit,
                call_timeout=self.config.server.call_timeout, replay_rate=target.settings.replay_rate,
                transactions=known)
        return mirror

    def links(self, charger: ChargerSettings, subprotocol: str | None, settings: SessionSettings,
              log: Any) -> dict[str, SecondaryLink]:
        return {t.name: SecondaryLink(t, subprotocol, settings, log) for t in self.targets(charger)}


class SecondaryListener(Listener):
    """Persists transaction id pairs; logs frames a secondary will not get and refused commands."""

    def __init__(self, secondaries: Secondaries) -> None:
        self.secondaries = secondaries

    def action(self, paired: PairedSession, action: Action) -> None:
        kind = type(action)
        if kind is TxMapped:
            mapped: TxMapped = action  # type: ignore[assignment]
            store = self.secondaries.store
            if store is not None:
                store.put(paired.charger_id, mapped.upstream, mapped.wallbox_tx, mapped.upstream_tx)
            paired.log.info("secondary_transaction", upstream=mapped.upstream, wallbox_tx=mapped.wallbox_tx,
                            upstream_tx=mapped.upstream_tx)
        elif kind is MirrorDropped:
            dropped: MirrorDropped = action  # type: ignore[assignment]
            paired.log.warning("secondary_frame_dropped", upstream=dropped.upstream, action=dropped.action,
                               reason=dropped.reason)
        elif kind is Policed:
            policed: Policed = action  # type: ignore[assignment]
            paired.log.info("command_refused" if policed.mode == "reject" else "command_answered",
                            upstream=policed.upstream, action=policed.action)
