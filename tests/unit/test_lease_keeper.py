"""The lease keeper of the running proxy (proxy/runtime/leases.py) on a real SQLite lease store.

Short lease lives, real clocks: a holder whose renewals fail ends before its lease runs out
as the store counts it; a holder whose lease another process took ends at once; a lease held
twice in one process (a reconnect while the old session closes) is released by the last.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import trio
from structlog.testing import capture_logs

from proxy.core.lease import LeasePolicy, LeaseState
from proxy.ops.logs import get_logger
from proxy.runtime.leases import LeaseKeeper
from proxy.storage.leases import SqliteLeases
from tests.opskit import wait_until

#: Lease life: long enough that a loaded test machine (scheduling delays of a few hundred ms)
#: still ends the holder inside the margin the keeper leaves (half the remaining life).
TTL = 3.0


def expires(path: Path, key: str) -> float | None:
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT expires FROM leases WHERE charger = ?", (key,)).fetchone()
    return None if row is None else float(row[0])


async def test_failed_renewals_end_the_holder_before_the_lease_runs_out(tmp_path: Path) -> None:
    path = tmp_path / "leases.sqlite3"
    store = SqliteLeases(path)
    lost: list[tuple[str, str]] = []
    keeper = LeaseKeeper(store, LeasePolicy("proxy-a", TTL), log=get_logger(),
                         on_lost=lambda key, reason: lost.append((key, reason)))
    ended_at = 0.0
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keeper.run)
            async with keeper.hold("CP1") as refused:
                assert refused is None
                taken = expires(path, "CP1")
                assert taken is not None
                await wait_until(lambda: (expires(path, "CP1") or 0.0) > taken)  # the keeper renews it
                last = expires(path, "CP1")
                assert last is not None and last > time.time() + TTL / 3
                store._db.close()  # the database is gone from now on: every renewal fails
                with trio.fail_after(10):
                    await trio.sleep_forever()  # cancelled by the keeper
            ended_at = time.time()
            nursery.cancel_scope.cancel()
    assert lost and lost[0][0] == "CP1"
    assert ended_at < last, "the holder must end before its lease can be taken by another process"
    assert any(e["event"] == "lease_renewal_failed" for e in logs)
    assert any(e["event"] == "lease_lost" and e["key"] == "CP1" for e in logs)


async def test_a_lease_taken_over_ends_the_holder_at_once(tmp_path: Path) -> None:
    path = tmp_path / "leases.sqlite3"
    a = LeaseKeeper(SqliteLeases(path), LeasePolicy("proxy-a", TTL), log=get_logger())
    b = LeaseKeeper(SqliteLeases(path), LeasePolicy("proxy-b", TTL), log=get_logger())
    async with a.hold("CP1") as refused:
        assert refused is None
        async with b.hold("CP1") as other:
            assert other is not None and other.holder == "proxy-a" and 0 < other.retry_after <= TTL
        # proxy-a stalls (no renewals): its lease runs out and proxy-b takes it.
        with trio.fail_after(10):
            while True:
                async with b.hold("CP1") as other:
                    if other is None:
                        break
                await trio.sleep(0.05)
        async with b.hold("CP1") as mine:  # b still holds it while a notices
            assert mine is None
            started = trio.current_time()
            with trio.fail_after(10):
                await a.renew_now()  # proxy-a wakes up: finds proxy-b's lease
                await trio.sleep_forever()
    assert trio.current_time() - started < 0.5
    assert a.lost == 1 and b.refused >= 1


async def test_the_last_holder_in_a_process_releases(tmp_path: Path) -> None:
    path = tmp_path / "leases.sqlite3"
    a = LeaseKeeper(SqliteLeases(path), LeasePolicy("proxy-a", 30), log=get_logger())
    async with a.hold("CP1") as first:
        assert first is None
        async with a.hold("CP1") as second:  # a reconnect while the old session still closes
            assert second is None
        assert expires(path, "CP1") is not None and a.holds("CP1")
    assert expires(path, "CP1") is None and not a.holds("CP1")
    async with a.hold("CP2"), a.hold("CP3"):
        await a.release_all()  # SIGTERM: everything goes at once
        assert expires(path, "CP2") is None and expires(path, "CP3") is None


async def test_a_holder_ending_never_releases_the_lease_of_the_one_that_replaced_it(tmp_path: Path) -> None:
    """A wallbox reconnects to the same process while its old session ends: the old session's release and
    the new session's take run at once; the lease must stay this process's (never free for another)."""
    path = tmp_path / "leases.sqlite3"
    a = LeaseKeeper(SqliteLeases(path), LeasePolicy("proxy-a", 30), log=get_logger())
    b = LeaseKeeper(SqliteLeases(path), LeasePolicy("proxy-b", 30), log=get_logger())
    for _ in range(20):  # the two orders of the release and the take in their threads
        old_ends = trio.Event()

        async def old_session() -> None:
            async with a.hold("CP1") as refused:
                assert refused is None
                await old_ends.wait()

        async def new_session(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with a.hold("CP1") as refused:
                assert refused is None
                task_status.started()
                await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(old_session)
            await wait_until(lambda: a.holds("CP1"))
            old_ends.set()
            await nursery.start(new_session)
            await wait_until(lambda: not a._locks)  # the old session's release is done (or was skipped)
            async with b.hold("CP1") as other:
                assert other is not None and other.holder == "proxy-a"
            nursery.cancel_scope.cancel()
        await wait_until(lambda: expires(path, "CP1") is None)  # the last holder released it


class CountingLeases(SqliteLeases):
    """The SQLite lease store, counting its transactions of acquires."""

    batches: list[int] = []

    def acquire_many(self, chargers: Sequence[str], owner: str, ttl: float) -> list[LeaseState]:
        self.batches.append(len(chargers))
        return super().acquire_many(chargers, owner, ttl)


async def test_wallboxes_arriving_together_share_a_few_transactions(tmp_path: Path) -> None:
    store = CountingLeases(tmp_path / "leases.sqlite3")
    store.batches = []
    a = LeaseKeeper(store, LeasePolicy("proxy-a", 30), log=get_logger())
    b = LeaseKeeper(SqliteLeases(tmp_path / "leases.sqlite3"), LeasePolicy("proxy-b", 30), log=get_logger())
    async with b.hold("CP7") as refused:  # one of them is served elsewhere
        assert refused is None
        answers: dict[str, bool] = {}
        async with trio.open_nursery() as nursery:
            for n in range(50):
                async def one(key: str = f"CP{n}") -> None:
                    async with a.hold(key) as other:
                        answers[key] = other is None
                nursery.start_soon(one)
    assert answers == {f"CP{n}": n != 7 for n in range(50)}
    assert sum(store.batches) == 50 and len(store.batches) <= 5, store.batches
