"""Start-up checks against the machine: what ``run`` would refuse, found before it binds a port.

:mod:`proxy.config` checks a file on its own (types, ranges, rules across keys). Whether it works
on *this* machine is a different question: are the certificate files readable, do the keys parse
and belong to their certificates, does each listen address resolve to an address of this host, can
the proxy create its data and certificate directories, is the queue database a database. ``check-config`` and ``run`` both ask it
here, so a file ``check-config`` accepts does not fail at start for any of these reasons (a port
already taken by another process is the one thing only binding can tell). Every problem names the
config key, the line and the value, like a schema error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from proxy.config import ChargerBase, Config, LineIndex, Problem, SecondarySettings, parse_listen
from proxy.ops.certs import CertificateProblem, check_pair, load_certificates
from proxy.storage.offline_queue import DB_NAME

#: The keys whose addresses the proxy binds at start.
LISTEN_KEYS = ("server.listen", "metrics.listen", "ems.modbus_listen")


def preflight(config: Config, index: LineIndex) -> list[Problem]:
    """Every problem ``run`` would hit at start-up, short of a port in use."""
    problems: list[Problem] = []
    for key, message in _findings(config):
        problems.append(Problem(key, message, index.find(key)))
    return problems


def _findings(config: Config) -> Iterator[tuple[str, str]]:
    for key in LISTEN_KEYS:
        value = listen_value(config, key)
        if value:
            message = address_problem(value)
            if message:
                yield key, message
    yield from _server_tls(config)
    yield from _upstream_files(config)
    yield from _directories(config)


def listen_value(config: Config, key: str) -> str:
    section, _, name = key.partition(".")
    return str(getattr(getattr(config, section), name))


def address_problem(value: str) -> str | None:
    """Why ``value`` (HOST:PORT) cannot be listened on here: unresolvable, or not this host's."""
    host, _ = parse_listen(value)
    try:
        infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"host {host!r} does not resolve ({exc.strerror})"
    for family, kind, proto, _, address in infos:
        try:  # port 0: asks the kernel whether the address is ours, without taking the configured port
            with socket.socket(family, kind, proto) as probe:
                probe.bind(address[:2] if family == socket.AF_INET else address)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{address[0]} is not an address of this machine"
            if exc.errno == errno.EAFNOSUPPORT:
                continue
            return f"cannot listen on {address[0]}: {exc.strerror}"
    return None


def _server_tls(config: Config) -> Iterator[tuple[str, str]]:
    server = config.server
    if server.tls == "off":
        return
    if server.cert:
        yield from _pair("server.cert", "server.key", server.cert, server.key, server.key_password)
    else:
        certs = Path(server.certs_dir)
        cert, key = certs / "server.crt", certs / "server.key"
        if cert.exists() and key.exists():
            yield from _pair("server.certs_dir", "server.certs_dir", str(cert), str(key))
        else:  # created on first start
            yield from _directory("server.certs_dir", certs, "for the self-signed certificate")
    yield from _cas("server.client_ca", server.client_ca)


def _upstream_files(config: Config) -> Iterator[tuple[str, str]]:
    backend = config.backend
    yield from _cas("backend.ca", backend.ca)
    if backend.client_cert:
        yield from _pair("backend.client_cert", "backend.client_key", backend.client_cert,
                         backend.client_key or backend.client_cert, backend.client_key_password)
    for entry, charger in config.charger_entries():
        yield from _charger_files(entry, charger, backend.client_key_password)
    for name, settings in config.backends.items():
        yield from _secondary_files(f"backends.{name}", settings)


def _charger_files(entry: str, charger: ChargerBase, backend_password: str) -> Iterator[tuple[str, str]]:
    yield from _cas(f"{entry}.upstream_ca", charger.upstream_ca)
    if charger.upstream_client_cert:
        yield from _pair(f"{entry}.upstream_client_cert", f"{entry}.upstream_client_key",
                         charger.upstream_client_cert, charger.upstream_client_key or charger.upstream_client_cert,
                         charger.upstream_client_key_password or backend_password)
    for j, inline in enumerate(charger.secondary):
        yield from _secondary_files(f"{entry}.secondary[{j}]", inline)


def _secondary_files(key: str, settings: SecondarySettings) -> Iterator[tuple[str, str]]:
    yield from _cas(f"{key}.ca", settings.ca)
    if settings.client_cert:
        yield from _pair(f"{key}.client_cert", f"{key}.client_key", settings.client_cert,
                         settings.client_key or settings.client_cert, settings.client_key_password)


def _pair(cert_key: str, key_key: str, cert: str, key: str, password: str = "") -> Iterator[tuple[str, str]]:
    """A certificate and its private key: readable, PEM, matching, in their validity period; an
    encrypted key opens with its passphrase."""
    try:
        check_pair(Path(cert), Path(key), password)
    except CertificateProblem as problem:
        yield (key_key if problem.path == key and cert != key else cert_key), str(problem)


def _cas(key: str, paths: list[str]) -> Iterator[tuple[str, str]]:
    for i, path in enumerate(paths):
        try:
            load_certificates(Path(path))
        except CertificateProblem as problem:
            yield f"{key}[{i}]", str(problem)


def _directories(config: Config) -> Iterator[tuple[str, str]]:
    """The data directory is used by the offline queue, the secondaries' store, the session log and
    Modbus wallboxes."""
    if config.offline.enabled or config.backends or config.modbus_chargers or config.session_log_on() or any(
            charger.secondary for charger in config.chargers):
        data = Path(config.offline.data_dir)
        yield from _directory("offline.data_dir", data, "for the offline queue")
        message = database_problem(data / DB_NAME)
        if message:
            yield "offline.data_dir", f"{data / DB_NAME}: {message}"


def database_problem(path: Path) -> str | None:
    """Why the queue database the proxy would open cannot be used (read only: nothing is changed)."""
    if not path.exists():
        return None
    if not os.access(path, os.R_OK | os.W_OK):
        return f"not readable and writable by this user (uid {os.getuid()})"
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        return (f"cannot be used ({exc}); move it away to start with an empty queue "
                "(its frames are then not replayed)")
    return None


def _directory(key: str, path: Path, purpose: str) -> Iterator[tuple[str, str]]:
    message = directory_problem(path)
    if message:
        yield key, f"{path} {message} ({purpose})"


def directory_problem(path: Path) -> str | None:
    """Why the proxy could not create files in ``path`` (creating it first if need be), or None.

    Said as the rest of a sentence about ``path``: "is not a directory", "cannot be created: / is on a
    read-only file system" (``ProtectSystem=strict`` without a writable path for it).
    """
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return "is not a directory" if probe == path else f"cannot be created: {probe} is not a directory"
    if os.access(probe, os.W_OK | os.X_OK):
        return None
    why = "on a read-only file system" if os.statvfs(probe).f_flag & os.ST_RDONLY \
        else f"not writable by this user (uid {os.getuid()})"
    return f"is {why}" if probe == path else f"cannot be created: {probe} is {why}"
