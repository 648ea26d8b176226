"""The fuse reservations behind the storage interface (ReservationStore), on SQLite and on PostgreSQL.

One contract for both: records survive a new client, a batch is one transaction, a subset can
be read; the same for the backend profiles that may be on each wallbox (``record_profiles``: a
charger's text replaced, None deletes it). Only PostgreSQL is shared by processes: there a record
of a charger whose live lease another process holds is left to that process, and
``served_elsewhere`` names those chargers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from proxy.storage.interface import ReservationStore
from proxy.storage.postgres import PostgresStorage
from proxy.storage.reservations import SqliteReservations

Opener = Callable[[str], ReservationStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    opened: list[ReservationStore | PostgresStorage] = []

    def sqlite(owner: str) -> ReservationStore:
        opened.append(SqliteReservations(tmp_path / "reservations.sqlite3"))
        return cast(ReservationStore, opened[-1])

    def postgres(owner: str) -> ReservationStore:
        storage = PostgresStorage(url)
        opened.append(storage)
        opened.append(storage.reservations("site-1", owner))
        return cast(ReservationStore, opened[-1])

    if request.param == "postgres":
        url = cast(str, request.getfixturevalue("pg_url"))
    yield sqlite if request.param == "sqlite" else postgres
    for store in opened:
        store.close()


def test_records_survive_a_new_client_and_read_in_part(open_store: Opener) -> None:
    store = open_store("proxy-a")
    assert store.load() == {}
    store.record({"CP1": 16.0, "CP2": None, "CP3": 6.5})
    store.record({"CP1": 10.0})
    again = open_store("proxy-a")
    assert again.load() == {"CP1": 10.0, "CP2": None, "CP3": 6.5}
    assert again.load(["CP2", "CP3", "CP9"]) == {"CP2": None, "CP3": 6.5}
    assert again.served_elsewhere() == set()
    store.record({})  # nothing to write: no transaction


def test_backend_profiles_survive_a_new_client_are_replaced_and_deleted(open_store: Opener) -> None:
    store = open_store("proxy-a")
    assert store.load_profiles() == {}
    store.record_profiles({"CP1": '[{"a":1}]', "CP2": "[]", "CP3": '[{"c":3}]'})
    store.record_profiles({"CP1": '[{"a":2}]', "CP2": None, "CP9": None})  # replaced, deleted, nothing to delete
    again = open_store("proxy-a")
    assert again.load_profiles() == {"CP1": '[{"a":2}]', "CP3": '[{"c":3}]'}
    assert again.load_profiles(["CP3", "CP2"]) == {"CP3": '[{"c":3}]'}
    assert again.load() == {}  # the reservations are a table of their own
    store.record_profiles({})  # nothing to write: no transaction


def test_a_record_of_a_charger_another_process_serves_is_left_to_it(pg_url: str) -> None:
    storage_a, storage_b = PostgresStorage(pg_url), PostgresStorage(pg_url)
    a, b = storage_a.reservations("site-1", "proxy-a"), storage_b.reservations("site-1", "proxy-b")
    other_site = storage_a.reservations("site-2", "proxy-a")
    try:
        a.record({"CP1": 16.0, "CP2": 16.0})
        assert storage_b.acquire("CP1", "proxy-b", 30).holder == "proxy-b"  # CP1 moved to proxy-b
        b.record({"CP1": 0.0})
        a.record({"CP1": 6.0, "CP2": 8.0})  # a late write of proxy-a (a decrease after its session ended)
        assert a.load() == {"CP1": 0.0, "CP2": 8.0}  # proxy-b's record stands
        assert a.served_elsewhere() == {"CP1"} and b.served_elsewhere() == set()
        assert other_site.load() == {}  # sites do not share records
        b.record_profiles({"CP1": "[1]"})
        a.record_profiles({"CP1": None, "CP2": "[2]"})  # proxy-a's late writes: CP1's is left to proxy-b
        assert a.load_profiles() == {"CP1": "[1]", "CP2": "[2]"} and other_site.load_profiles() == {}
        a.record_profiles({"CP1": "[3]"})
        assert b.load_profiles(["CP1"]) == {"CP1": "[1]"}
        storage_b.release("CP1", "proxy-b")
        a.record({"CP1": 6.0})  # nobody else serves it now
        assert b.load(["CP1"]) == {"CP1": 6.0}
        a.record_profiles({"CP1": None})
        assert b.load_profiles() == {"CP2": "[2]"}
    finally:
        for store in (a, b, other_site, storage_a, storage_b):
            store.close()
