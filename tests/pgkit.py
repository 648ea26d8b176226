"""A real PostgreSQL server for tests, from the ``pgserver`` wheel (in the ``test`` extra).

The wheel ships the server binaries, so nothing but ``pip install -e '.[test]'`` is needed
on a fresh machine. It listens on a Unix socket in its data directory only (no TCP port).
PostgreSQL refuses to run as root; run as root, the wheel creates the system user
``pgserver`` and starts the server as that user.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg


class PgCluster:
    """One running server; :meth:`database` makes an empty database per test."""

    def __init__(self) -> None:
        # Its own directory, not pytest's: as root the wheel opens every parent directory to
        # the ``pgserver`` user, and removes the data directory when stopped.
        self.root = Path(tempfile.mkdtemp(prefix="ocpp-proxy-pg-"))
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (CI)
            warnings.simplefilter("ignore")
            from pgserver.postgres_server import get_server

            self._server = get_server(self.root / "pgdata", cleanup_mode="delete")
        self.url = self._server.get_uri()
        self._names = itertools.count(1)

    def stop(self) -> None:
        self._server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)

    def database(self) -> str:
        """A URL to a new, empty database on this server."""
        name = f"t{next(self._names)}"
        with psycopg.connect(self.url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name}")  # a server reused from an earlier run
            admin.execute(f"CREATE DATABASE {name}")
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path=f"/{name}"))

    def terminate_connections(self, url: str) -> int:
        """Cut every connection to ``url``'s database (a database that restarts, as clients see it)."""
        name = urlsplit(url).path.lstrip("/")
        with psycopg.connect(self.url, autocommit=True) as admin:
            rows = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchall()
        return len(rows)
