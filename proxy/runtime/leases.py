"""The charger and site leases of the running proxy (trio): take, renew, lose, release (docs/cluster.md).

Several proxy processes on one database (``[store] url``) must never serve one
charger at the same time. :class:`LeaseKeeper` takes a charger's lease when a
wallbox (or an unattended drain, or a virtual charge point) is about to be
served, renews every lease it holds in one transaction every third of the
lease's life, and releases it when the last holder of it in this process ends.
What to do with each answer is :class:`proxy.core.lease.LeasePolicy`'s
decision; this layer adds the clock and the threads.

A lease that is lost (another process holds it, or renewals failed until
the rest of its life is too short for another try) ends its holders before it
runs out: each holder runs in a :class:`trio.CancelScope` that gets a deadline
(half the remaining life, at most ``grace``), and the server is told at once so
it closes the sessions gracefully meanwhile. The deadline is counted from the
moment the renewal was *sent* (the database counted the life from a later
instant), so the local deadline is never later than the database's.

With SQLite there is one process and no keeper: it serves every charger.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from proxy.core.lease import Close, LeasePolicy, LeaseState, Refuse, Serve
from proxy.storage.interface import StorageError
from proxy.storage.leases import LeaseStore

#: The holder named in a refusal when the store could not be asked (no process can know who serves it).
UNREACHABLE = "(store unreachable)"

#: Longest a lost lease's holders get to close gracefully before they are cancelled.
GRACE = 2.0


@dataclass
class _Asked:
    """One acquire waiting for its batch: the answer (None: the store failed, ``detail`` says why)."""

    key: str
    done: trio.Event = field(default_factory=trio.Event)
    state: LeaseState | None = None
    sent: float = 0.0
    detail: str = ""


@dataclass
class _Held:
    """One charger's lease in this process: its holders and until when (trio clock) it surely lasts."""

    until: float
    scopes: list[trio.CancelScope] = field(default_factory=list)
    lost: bool = False


class LeaseKeeper:
    """Leases of this process (``policy.me``) in ``store``; ``on_lost(key, reason)``: close that charger now."""

    def __init__(self, store: LeaseStore, policy: LeasePolicy, *, log: Any,
                 on_lost: Callable[[str, str], None] = lambda key, reason: None) -> None:
        self.store = store
        self.policy = policy
        self.log = log
        self.on_lost = on_lost
        self._held: dict[str, _Held] = {}
        #: Per key while a take or a release of it runs: one at a time, so a release of a holder that
        #: just ended never deletes the row a new holder in this process has just renewed.
        self._locks: dict[str, trio.Lock] = {}
        #: Acquires waiting for the next batch, and whether a task is taking one (group commit).
        self._asked: list[_Asked] = []
        self._taking = False
        #: Counted for metrics and tests.
        self.refused = 0
        self.lost = 0

    @property
    def me(self) -> str:
        return self.policy.me

    def holds(self, key: str) -> bool:
        held = self._held.get(key)
        return held is not None and not held.lost

    def held(self) -> list[str]:
        return sorted(key for key, held in self._held.items() if not held.lost)

    # -- holding ------------------------------------------------------------------------------

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[Refuse | None]:
        """Hold ``key``'s lease for the block; yields the refusal instead when another process holds it.

        A store that cannot be asked refuses too (the process cannot know who serves the
        charger). The block is cancelled if the lease is lost while it runs.
        """
        scope = trio.CancelScope()
        async with self._one_at_a_time(key):
            decision = await self._acquire(key)
            if isinstance(decision, Serve):
                held = self._held[key]
                held.scopes.append(scope)
        if isinstance(decision, Refuse):
            self.refused += 1
            yield decision
            return
        try:
            with scope:
                yield None
        finally:
            held.scopes.remove(scope)
            with trio.CancelScope(shield=True):
                async with self._one_at_a_time(key):
                    if not held.scopes and self._held.get(key) is held:
                        del self._held[key]
                        with trio.move_on_after(GRACE * 2):
                            await self._release(key)

    @asynccontextmanager
    async def _one_at_a_time(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0 and self._locks.get(key) is lock:
                del self._locks[key]

    async def _acquire(self, key: str) -> Serve | Refuse:
        asked = _Asked(key)
        self._asked.append(asked)
        if not self._taking:
            await self._take_batches()
        await asked.done.wait()
        state, sent = asked.state, asked.sent
        if state is None:
            self.log.error("lease_unavailable", key=key, error=asked.detail)
            return Refuse(UNREACHABLE, self.policy.renew_every)
        decision = self.policy.on_acquire(state)
        if isinstance(decision, Serve):
            held = self._held.get(key)
            if held is None or held.lost:
                held = self._held[key] = _Held(sent + state.remaining)  # a lost one's holders end on their own
            held.until = max(held.until, sent + state.remaining)
        return decision

    async def _take_batches(self) -> None:
        """Group commit: every acquire that arrives while one transaction runs goes into the next one, so a
        crowd of wallboxes reconnecting at once costs a few commits, not one each. Shielded: the waiters of
        a batch must get its answer even if the handshake that happened to run it is cancelled."""
        self._taking = True
        try:
            with trio.CancelScope(shield=True):
                while self._asked:
                    batch, self._asked = self._asked, []
                    await self._take_batch(batch)
        finally:
            self._taking = False

    async def _take_batch(self, batch: list[_Asked]) -> None:
        sent = trio.current_time()
        states: list[LeaseState | None] = [None] * len(batch)
        detail = "lease batch failed"
        try:
            states[:] = await trio.to_thread.run_sync(self.store.acquire_many, [a.key for a in batch],
                                                      self.me, self.policy.ttl)
        except StorageError as exc:
            detail = exc.detail
        finally:  # whatever happened, no handshake is left waiting
            for asked, state in zip(batch, states):
                asked.state, asked.sent, asked.detail = state, sent, detail
                asked.done.set()

    async def _release(self, key: str) -> None:
        try:
            await trio.to_thread.run_sync(self.store.release, key, self.me)
        except StorageError as exc:  # it runs out by itself
            self.log.warning("lease_not_released", key=key, error=exc.detail,
                             consequence=f"another process serves it after {self.policy.ttl:g} s")

    async def release_all(self) -> None:
        """At the end of a drain (SIGTERM): give up every lease this process holds, so others take over at once."""
        with trio.CancelScope(shield=True), trio.move_on_after(GRACE * 2):
            try:
                await trio.to_thread.run_sync(self.store.release_all, self.me)
            except StorageError as exc:
                self.log.warning("lease_not_released", key="*", error=exc.detail,
                                 consequence=f"another process serves its chargers after {self.policy.ttl:g} s")

    # -- renewing -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew every held lease every third of its life; a failed renewal is tried again while it can land."""
        task_status.started()
        wait = self.policy.renew_every
        while True:
            await trio.sleep(wait)
            wait = await self.renew_now()

    async def renew_now(self) -> float:
        """One round of renewals; returns the seconds until the next."""
        keys = self.held()
        if not keys:
            return self.policy.renew_every
        renewing = {key: self._held[key] for key in keys}
        sent = trio.current_time()
        try:
            states = await trio.to_thread.run_sync(self.store.renew, keys, self.me, self.policy.ttl)
        except StorageError as exc:
            return self._renew_failed(keys, exc.detail)
        for state in states:
            self._renewed(state, renewing[state.charger], sent)
        return self.policy.renew_every

    def _renewed(self, state: LeaseState, held: _Held, sent: float) -> None:
        """``held``: the holding this renewal was sent for (a lease released and taken again meanwhile is
        another one, which its own acquire answered)."""
        if held.lost or self._held.get(state.charger) is not held:
            return
        decision = self.policy.on_renew(state)
        if isinstance(decision, Close):
            self._lose(state.charger, held, decision.reason, 0.0)
        else:
            held.until = sent + state.remaining

    def _renew_failed(self, keys: Sequence[str], detail: str) -> float:
        now = trio.current_time()
        wait = self.policy.renew_every
        self.log.error("lease_renewal_failed", leases=len(keys), error=detail)
        for key in keys:
            held = self._held.get(key)
            if held is None or held.lost:
                continue
            decision = self.policy.on_renew_failed(held.until - now)
            if isinstance(decision, Close):
                self._lose(key, held, decision.reason, held.until - now)
            else:
                wait = min(wait, decision.renew_in)
        return wait

    def _lose(self, key: str, held: _Held, reason: str, remaining: float) -> None:
        """The lease is going: tell the server (graceful close), and cancel the holders before it runs out."""
        held.lost = True
        self.lost += 1
        self.log.warning("lease_lost", key=key, reason=reason, remaining=round(max(remaining, 0.0), 3))
        deadline = trio.current_time() + min(GRACE, max(remaining, 0.0) / 2)
        for scope in held.scopes:
            scope.deadline = min(scope.deadline, deadline)
        self.on_lost(key, reason)
