"""Charger leases: exactly one process serves a charger (issue 22, work in progress).

The decision (proxy.core.lease) without I/O, then the store with two clients of one
database, as two proxy processes: on SQLite (one file) and on a real PostgreSQL server.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import trio

from proxy.core.lease import Close, LeasePolicy, LeaseState, Refuse, Serve
from proxy.storage.interface import StorageError
from proxy.storage.leases import LeaseStore, SqliteLeases
from proxy.storage.postgres import PostgresStorage

# --- the decision ------------------------------------------------------------------------------


def test_the_holder_serves_and_renews_every_third_of_the_lease() -> None:
    policy = LeasePolicy("proxy-a", ttl=15)
    assert policy.on_acquire(LeaseState("CP1", "proxy-a", 15)) == Serve(5)
    assert policy.on_renew(LeaseState("CP1", "proxy-a", 15)) == Serve(5)


def test_another_holder_means_refuse_until_its_lease_runs_out() -> None:
    policy = LeasePolicy("proxy-b", ttl=15)
    assert policy.on_acquire(LeaseState("CP1", "proxy-a", 9.5)) == Refuse("proxy-a", 9.5)
    # A renewal that finds the lease taken over closes the session: never two servers at once.
    assert isinstance(policy.on_renew(LeaseState("CP1", "proxy-a", 14)), Close)
    # Our own lease already run out (a stalled process): not served, even if the row still names us.
    assert isinstance(policy.on_acquire(LeaseState("CP1", "proxy-b", -0.1)), Refuse)
    assert isinstance(policy.on_renew(LeaseState("CP1", "proxy-b", 0.0)), Close)


def test_a_failed_renewal_closes_before_the_lease_can_run_out() -> None:
    policy = LeasePolicy("proxy-a", ttl=15)
    assert policy.on_renew_failed(12) == Serve(5)  # room for another try
    assert policy.on_renew_failed(7) == Serve(2)  # the next try still lands before 5 s remain
    assert isinstance(policy.on_renew_failed(5), Close)
    with pytest.raises(ValueError):
        LeasePolicy("", ttl=15)


# --- the store, two clients ----------------------------------------------------------------------

Opener = Callable[[], LeaseStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_leases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    opened: list[SqliteLeases | PostgresStorage] = []

    def sqlite() -> LeaseStore:
        opened.append(SqliteLeases(tmp_path / "leases.sqlite3"))
        return opened[-1]

    def postgres() -> LeaseStore:
        opened.append(PostgresStorage(url))
        return opened[-1]

    if request.param == "postgres":
        url = cast(str, request.getfixturevalue("pg_url"))
    yield sqlite if request.param == "sqlite" else postgres
    for store in opened:
        store.close()


def test_a_second_process_is_refused_until_the_first_releases(open_leases: Opener) -> None:
    a, b = open_leases(), open_leases()
    pa, pb = LeasePolicy("proxy-a", ttl=30), LeasePolicy("proxy-b", ttl=30)
    assert pa.on_acquire(a.acquire("CP1", "proxy-a", 30)) == Serve(10)
    refused = pb.on_acquire(b.acquire("CP1", "proxy-b", 30))
    assert isinstance(refused, Refuse) and refused.holder == "proxy-a" and 25 < refused.retry_after <= 30
    assert isinstance(pb.on_acquire(b.acquire("CP2", "proxy-b", 30)), Serve)  # other chargers are free
    assert pa.on_renew(a.acquire("CP1", "proxy-a", 30)) == Serve(10)
    b.release("CP1", "proxy-b")  # not its lease: nothing happens
    assert isinstance(pb.on_acquire(b.acquire("CP1", "proxy-b", 30)), Refuse)
    a.release("CP1", "proxy-a")  # the wallbox left proxy-a
    assert pb.on_acquire(b.acquire("CP1", "proxy-b", 30)) == Serve(10)
    assert isinstance(pa.on_renew(a.acquire("CP1", "proxy-a", 30)), Close)  # a stale session of a stops


async def test_an_expired_lease_is_taken_over(open_leases: Opener) -> None:
    a, b = open_leases(), open_leases()
    ttl = 0.5
    taken = time.monotonic()
    assert a.acquire("CP1", "proxy-a", ttl).holder == "proxy-a"  # proxy-a then dies without releasing
    assert b.acquire("CP1", "proxy-b", ttl).holder == "proxy-a"
    with trio.fail_after(10):
        while (state := b.acquire("CP1", "proxy-b", ttl)).holder != "proxy-b":
            await trio.sleep(max(state.remaining, 0.01))  # the lease says how long is left
    assert time.monotonic() - taken >= ttl * 0.9


def test_two_processes_racing_for_the_same_chargers_never_both_win(open_leases: Opener) -> None:
    chargers = [f"CP{n}" for n in range(25)]
    won: dict[str, list[str]] = {charger: [] for charger in chargers}
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def race(name: str) -> None:
        store = open_leases()
        try:
            start.wait(10)
            for charger in chargers:
                if store.acquire(charger, name, 30).holder == name:
                    won[charger].append(name)
        except BaseException as exc:  # reported in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=race, args=(name,)) for name in ("proxy-a", "proxy-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures
    assert all(len(winners) == 1 for winners in won.values()), won


def test_renewing_many_at_once_keeps_only_what_is_still_ours(open_leases: Opener) -> None:
    a, b = open_leases(), open_leases()
    for charger in ("CP1", "CP2", "CP3"):
        assert a.acquire(charger, "proxy-a", 30).holder == "proxy-a"
    assert b.acquire("CP4", "proxy-b", 30).holder == "proxy-b"
    states = a.renew(["CP3", "CP1", "CP4", "CP2"], "proxy-a", 30)  # CP4 is proxy-b's: kept by proxy-b
    assert [(s.charger, s.holder) for s in states] == [("CP3", "proxy-a"), ("CP1", "proxy-a"),
                                                        ("CP4", "proxy-b"), ("CP2", "proxy-a")]
    assert all(25 < s.remaining <= 30 for s in states)
    a.release_all("proxy-a")  # a process that stops
    # A renewal never takes a lease: released ones stay free (holder ""), proxy-b's own is extended.
    assert [s.holder for s in b.renew(["CP1", "CP2", "CP3", "CP4"], "proxy-b", 30)] == ["", "", "", "proxy-b"]
    assert a.acquire("CP1", "proxy-a", 30).holder == "proxy-a"
    assert a.renew([], "proxy-a", 30) == []


# --- SQLite: a new file that another connection writes -----------------------------------------


def test_opening_while_another_connection_writes_the_new_file_waits_for_it(tmp_path: Path) -> None:
    """The cause of a flaky race above: two processes opening a new lease file at once each switch it
    to WAL, an upgrade to the write lock that SQLite fails at once ("database is locked") while the
    other writes, busy timeout or not. The store tries again until the other one is done."""
    path = tmp_path / "leases.sqlite3"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the other process, in the middle of its own switch
    waits: list[float] = []

    def pause(seconds: float) -> None:  # the store's clock: the other writer commits while it waits
        waits.append(seconds)
        if other.in_transaction:
            other.execute("COMMIT")

    store = SqliteLeases(path, pause=pause)
    try:
        assert waits, "the store never met the other connection's lock"
        assert store._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert store.acquire("CP1", "proxy-a", 30).holder == "proxy-a"
    finally:
        store.close()
        other.close()


def test_a_new_file_locked_beyond_the_busy_timeout_fails_with_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "leases.sqlite3"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # and never commits
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match="database is locked"):
            SqliteLeases(path, timeout=0.2)
        assert time.monotonic() - started >= 0.2  # it waited for the timeout, not less
    finally:
        other.close()
