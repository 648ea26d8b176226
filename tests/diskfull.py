"""A real small filesystem that tests can fill up and free again (tmpfs, needs root).

The proxy's SQLite file lives on it, so "database or disk is full" comes from
the kernel through SQLite's real code path, not from an injected exception.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


class SmallDisk:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._filler = path / "filler"

    def fill(self, database: Path | None = None) -> None:
        """Take every free byte. With ``database``: first empty its WAL, so the next write must grow it."""
        if database is not None:
            with sqlite3.connect(database, timeout=10) as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (65536, 4096, 512, 1):  # big blocks first, then whatever is left
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)

    @property
    def available(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize


@contextmanager
def small_disk(path: Path, size_kb: int = 2048) -> Iterator[SmallDisk]:
    """A tmpfs of ``size_kb`` mounted at ``path`` for the block; skipped (with the reason) unless root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], check=True)
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
