"""Secondary upstreams of a wallbox: what outlives a session, and how they are opened.

A secondary's connection is an upstream link of its paired session like the
primary's (:meth:`proxy.runtime.relay.PairedSession._link`): opened after the wallbox
was admitted, reopened with backoff while the wallbox stays, and its loss
never ends the pair. Its frames go through its :class:`~proxy.core.mirror.Mirror`
(sans-IO), which keeps what it is owed while it is away or slow.

:class:`Secondaries` is the server's part: one Mirror per (charger,
secondary) for the life of the proxy, so a wallbox that reconnects does not
lose what its secondaries have not received yet; their durable copy
(:mod:`proxy.storage.secondary_store`, in the offline queue's SQLite file), restored at
start-up and written behind the sessions by :meth:`Secondaries.run` so no
wallbox or primary frame waits for a disk; and the
:class:`~proxy.runtime.relay.Listener` that feeds that writer and logs what
secondaries miss or are refused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import trio

from proxy.config import ChargerBase, Config, SecondaryTarget
from proxy.ops.logs import get_logger
from proxy.core.mirror import (
    Mirror,
    MirrorDropped,
    MirrorQueued,
    MirrorStartKnown,
    MirrorState,
    MirrorUnqueued,
    TxMapped,
)
from proxy.core.backoff import Backoff
from proxy.storage.interface import MirrorRecord as Record
from proxy.storage.interface import RestoredMirror, Storage, StorageError
from proxy.storage.secondary_store import restored
from proxy.core.policy import REJECT, CommandPolicy
from proxy.runtime.relay import Listener, PairedSession
from proxy.core.session import PRIMARY, Action, Policed, Side
from proxy.runtime.upstream import open_upstream

#: Records kept for a retry while the store fails; beyond it the oldest are given up (logged).
RETRY_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class Routing:
    """A session's upstreams (the primary first), the secondaries' mirrors and the command policy."""

    upstreams: tuple[Side, ...]
    mirrors: dict[Side, Mirror]
    policy: CommandPolicy


class Secondaries:
    """What the server keeps for secondaries across sessions: mirrors, the id store, their listener."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.mirrors: dict[tuple[str, str], Mirror] = {}
        self.store: Storage | None = None
        self.listener = SecondaryListener(self)
        #: Called with (operation, detail) when a write fails, with an empty detail when a retry succeeds.
        self.on_error: Callable[[str, str], None] | None = None
        self._restored: dict[tuple[str, str], RestoredMirror] = {}
        self._pending: list[tuple[str, Record]] = []
        #: Records whose write failed, retried (in order, before newer ones) with backoff.
        self._failed: list[tuple[str, Record]] = []
        self._wake = trio.Event()
        self._writing = False
        self._progress = trio.Event()
        self._failed_before = 0

    @property
    def configured(self) -> bool:
        return any(self.config.secondaries_for(c) for c in self.config.all_chargers)

    def open(self, storage: Storage) -> None:
        """Use ``storage`` and read it at start-up (an unreadable store stops the proxy here)."""
        if self.configured and self.store is None:
            self.store = storage
            self._restored = storage.restore_mirrors()

    @property
    def backlog(self) -> dict[str, int]:
        """Frames waiting per charger, summed over its secondaries (what a drain without the wallbox sends)."""
        found: dict[str, int] = {}
        for (charger, _), mirror in self.mirrors.items():
            if mirror.depth:
                found[charger] = found.get(charger, 0) + mirror.depth
        for (charger, _), stored in self._restored.items():
            if stored.queued:
                found[charger] = found.get(charger, 0) + len(stored.queued)
        return found

    def record(self, charger: str, record: Record) -> None:
        """Queue a change for the writer (called from sessions; never blocks)."""
        if self.store is not None:
            self._pending.append((charger, record))
            self._wake.set()

    async def run(self) -> None:
        """The writer: applies recorded changes in order, in a worker thread, until cancelled.

        A batch that fails is written record by record: what can be written
        is, the rest is kept and retried with backoff before newer records
        (every record is idempotent), so a full disk delays durability but
        loses nothing while the process lives.
        """
        backoff = Backoff(0.5, 30.0)
        try:
            while True:
                if self._failed:
                    with trio.move_on_after(backoff.next_delay()):
                        await self._wake.wait()  # new records: retry with them
                else:
                    await self._wake.wait()
                self._wake = trio.Event()
                batch, self._pending = self._failed + self._pending, []
                self._failed = []
                self._writing = True
                try:
                    if self.store is not None and batch:
                        try:
                            await trio.to_thread.run_sync(self._write, batch)
                        except trio.Cancelled:  # (shutdown) before the thread ran: flush() below writes them
                            self._pending[:0] = batch
                            raise
                    if not self._failed:
                        backoff.reset()
                finally:
                    self._writing = False
                    self._progress.set()
                    self._progress = trio.Event()
        finally:
            self.flush()

    def _write(self, batch: list[tuple[str, Record]]) -> None:
        """One transaction for the batch; after a failure, one per record (worker thread)."""
        assert self.store is not None
        retried = bool(self._failed_before)
        try:
            self.store.write_mirrors(batch)
        except StorageError as exc:
            self._report(exc, len(batch))
            for record in batch:
                try:
                    self.store.write_mirrors([record])
                except StorageError:
                    self._failed.append(record)
            if len(self._failed) > RETRY_LIMIT:
                given_up = len(self._failed) - RETRY_LIMIT
                del self._failed[:given_up]
                get_logger().error("secondary_store_gave_up", records=given_up)
        self._failed_before = len(self._failed)
        if retried and not self._failed and self.on_error is not None:
            self.on_error("mirror", "")

    def _report(self, exc: StorageError, records: int) -> None:
        get_logger().error("secondary_store_failed", error=exc.detail, records=records)
        if self.on_error is not None:
            self.on_error(exc.operation, exc.detail)

    async def written(self) -> None:
        """Wait until everything recorded so far was tried once (needs :meth:`run` running)."""
        while self._pending or self._writing:
            await self._progress.wait()

    async def settled(self) -> None:
        """Wait until everything recorded so far is in the store, retries included (tests)."""
        while self._pending or self._writing or self._failed:
            await self._progress.wait()

    def flush(self) -> None:
        """Write what is still pending (shutdown); synchronous."""
        batch, self._pending = self._failed + self._pending, []
        self._failed = []
        if self.store is not None and batch:
            self._write(batch)

    def close(self) -> None:
        """Write what is pending; the store itself is closed by its owner (the server)."""
        self.flush()
        self.store = None

    def routing(self, charger: ChargerBase) -> Routing:
        """What a new session of ``charger`` is built with: its upstreams, their mirrors, the command policy."""
        targets = self.config.secondaries_for(charger)
        tables = {PRIMARY: self.config.primary_policy(charger), **{t.name: t.settings.policy for t in targets}}
        return Routing(upstreams=(PRIMARY, *(t.name for t in targets)),
                       mirrors={t.name: self._mirror(charger, t) for t in targets},
                       policy=CommandPolicy(PRIMARY, tables))

    def connectors(self, charger: ChargerBase,
                   subprotocol: str | None) -> dict[str, Callable[[], AbstractAsyncContextManager[Any]]]:
        """How each secondary is opened: its own URL, identity and TLS, the wallbox's subprotocol."""
        server = self.config.server
        offered = [subprotocol] if subprotocol else []
        return {t.name: functools.partial(open_upstream, t.target, offered,
                                          max_message_size=server.max_message_bytes,
                                          close_timeout=server.close_timeout)
                for t in self.config.secondaries_for(charger)}

    def _mirror(self, charger: ChargerBase, target: SecondaryTarget) -> Mirror:
        key = (charger.id, target.name)
        mirror = self.mirrors.get(key)
        if mirror is None:
            stored = self._restored.pop(key, restored())
            mirror = self.mirrors[key] = Mirror(
                target.name, forward_actions=target.forward_actions, queue_limit=target.settings.queue_limit,
                call_timeout=self.config.server.call_timeout, replay_rate=target.settings.replay_rate,
                transactions=stored.transactions, queued=stored.queued, state=stored.state, starts=stored.starts)
        return mirror


class SecondaryListener(Listener):
    """Hands mirror changes to the writer; logs new id pairs, frames a secondary will not get, refusals."""

    def __init__(self, secondaries: Secondaries) -> None:
        self.secondaries = secondaries

    #: What :meth:`action` records or logs (the relay calls it for these only).
    actions = frozenset({TxMapped, MirrorQueued, MirrorUnqueued, MirrorState, MirrorStartKnown, MirrorDropped,
                         Policed})

    def action(self, paired: PairedSession, action: Action) -> None:
        match action:
            case TxMapped(upstream=upstream, wallbox_tx=wallbox_tx, upstream_tx=upstream_tx):
                self.secondaries.record(paired.charger_id, action)
                paired.log.info("secondary_transaction", upstream=upstream, wallbox_tx=wallbox_tx,
                                upstream_tx=upstream_tx)
            case MirrorQueued() | MirrorUnqueued() | MirrorState() | MirrorStartKnown():
                self.secondaries.record(paired.charger_id, action)
            case MirrorDropped(upstream=upstream, action=name, reason=reason):
                paired.log.warning("secondary_frame_dropped", upstream=upstream, action=name, reason=reason)
            case Policed(upstream=upstream, action=name, mode=mode):
                paired.log.info("command_refused" if mode == REJECT else "command_answered",
                                upstream=upstream, action=name)
