"""Secondaries' transaction ids survive a restart of the proxy."""

from __future__ import annotations

from pathlib import Path

from proxy.mirror import Mirror
from proxy.txmap import TxMapStore


def test_pairs_survive_reopening_and_stay_bounded(tmp_path: Path) -> None:
    path = tmp_path / "state" / "proxy.db"
    store = TxMapStore(path, keep=3)
    for n in range(5):
        store.put("CP1", "ems", 1000 + n, 500 + n)
    store.put("CP1", "ha", 1000, 9)
    store.put("CP1", "ems", 1002, 777)  # a re-mapped id replaces the old pair and becomes the newest
    store.close()

    reopened = TxMapStore(path, keep=3)
    assert reopened.load("CP1", "ems") == {1003: 503, 1004: 504, 1002: 777}
    assert list(reopened.load("CP1", "ems")) == [1003, 1004, 1002]  # oldest first
    assert reopened.load("CP1", "ha") == {1000: 9}
    assert reopened.load("CP2", "ems") == {}
    # A mirror built from the store continues the transaction with the secondary's id.
    mirror = Mirror("ems", transactions=reopened.load("CP1", "ems"))
    assert mirror.transactions()[1004] == 504
    reopened.close()
