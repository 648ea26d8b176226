"""Test support: Debian's HAProxy in front of proxy processes on loopback, configured by deploy/haproxy.cfg.

:func:`ensure_haproxy` finds ``haproxy``; on a fresh machine (as root, with apt-get) it installs
Debian's package once (:mod:`tests.debian`), and where it cannot it fails naming what to install.

:func:`render` turns the shipped configuration into a test's: the same routing, checks, timeouts
and TLS rules, with loopback ports, the test's servers and the test's certificate files. Every
substitution must match exactly as often as expected, so a change of deploy/haproxy.cfg that the
tests would no longer exercise fails here instead of being silently skipped.

:class:`Haproxy` runs it in the foreground (``-db``) and reads its state from the CSV stats page.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.debian import ensure_program
from tests.opskit import free_port, http_get, wait_until

ROOT = Path(__file__).resolve().parents[1]
DEPLOYED = ROOT / "deploy" / "haproxy.cfg"
INSTALL_HINT = ("the cluster tests need HAProxy 2.6+: install Debian's package "
                "(as root: apt-get update && apt-get install -y haproxy)")
#: The bind lines of deploy/haproxy.cfg, by the name a test uses for them.
BINDS = {"ws": "bind :19520", "wss_terminated": "bind :443 ", "wss_passthrough": "bind :19443", "stats": "bind :8404"}
BACKENDS = ("proxies_ws", "proxies_tls")


def find_haproxy() -> str | None:
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def ensure_haproxy() -> str:
    """HAProxy's path; installs Debian's ``haproxy`` when it is missing and we may."""
    return ensure_program("haproxy", find_haproxy, INSTALL_HINT)


@dataclass(frozen=True)
class Upstream:
    """One proxy process as HAProxy sees it: its wallbox port and its metrics port (the check)."""

    name: str
    port: int
    check_port: int


def _replace(text: str, old: str, new: str, count: int) -> str:
    found = text.count(old)
    assert found == count, f"deploy/haproxy.cfg: expected {count} x {old!r}, found {found}"
    return text.replace(old, new)


def render(upstreams: Sequence[Upstream], ports: dict[str, int], etc: Path, template: str | None = None) -> str:
    """deploy/haproxy.cfg with loopback ports, ``upstreams`` as the servers, files under ``etc``."""
    text = DEPLOYED.read_text() if template is None else template
    for name, bind in BINDS.items():
        text = _replace(text, bind, f"bind 127.0.0.1:{ports[name]}" + (" " if bind.endswith(" ") else ""), 1)
    assert text.count("/etc/haproxy/") >= 3, "deploy/haproxy.cfg: the map and certificate paths changed"
    text = text.replace("/etc/haproxy/", f"{etc}/")
    servers = "".join(f"    server {u.name} 127.0.0.1:{u.port} port {u.check_port}\n" for u in upstreams)
    shipped = re.findall(r"^    server proxy\d+ \S+\n", text, flags=re.MULTILINE)
    assert len(shipped) == 2 * len(BACKENDS), f"deploy/haproxy.cfg: servers changed: {shipped}"
    text = re.sub(r"(?:^    server proxy\d+ \S+\n)+", servers, text, flags=re.MULTILINE)
    return text


@dataclass
class Haproxy:
    """A running ``haproxy -db`` and the ports it listens on."""

    process: trio.Process
    ports: dict[str, int]
    config: Path
    log: Path
    upstreams: list[Upstream] = field(default_factory=list)

    def url(self, charger: str, way: str = "ws") -> str:
        scheme = "ws" if way == "ws" else "wss"
        return f"{scheme}://127.0.0.1:{self.ports[way]}/ocpp/{charger}"

    async def states(self, backend: str = "proxies_ws") -> dict[str, str]:
        """Each server's status in ``backend`` as HAProxy sees it (``UP``, ``DOWN``, ``UP 1/2`` ...)."""
        reply = await http_get(stats_url(self.ports))
        assert reply.status == 200, reply
        return server_states(reply.body, backend)

    async def wait_states(self, wanted: dict[str, str], backend: str = "proxies_ws", timeout: float = 20) -> None:
        """Wait until HAProxy's checks have brought each named server to its wanted state."""
        async def reached() -> bool:
            states = await self.states(backend)
            return all(states.get(name) == state for name, state in wanted.items())

        await wait_until(reached, timeout=timeout, interval=0.1)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def stats_url(ports: dict[str, int]) -> str:
    return f"http://127.0.0.1:{ports['stats']}/stats;csv"


def server_states(stats_csv: str, backend: str) -> dict[str, str]:
    """Server → status in ``backend`` from HAProxy's CSV stats page."""
    rows = csv.DictReader(io.StringIO(stats_csv.lstrip("# ")))
    return {row["svname"]: row["status"] for row in rows
            if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")}


def check_config(text: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """``haproxy -c -f`` on ``text``."""
    path = directory / "haproxy-check.cfg"
    path.write_text(text)
    return subprocess.run([ensure_haproxy(), "-c", "-f", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)


@asynccontextmanager
async def running_haproxy(upstreams: Sequence[Upstream], etc: Path, chargers_map: str = "",
                          ways: Sequence[str] = ("ws",)) -> AsyncIterator[Haproxy]:
    """HAProxy with the shipped configuration on free loopback ports, until the block ends.

    ``etc`` must hold ``certs/server.pem`` and ``certs/chargers-ca.pem`` when ``wss_terminated``
    is among ``ways``; frontends not in ``ways`` listen on a free port all the same (the file is
    used whole). ``chargers_map``: the lines of chargers.map (charge point id, routing key).
    """
    binary = ensure_haproxy()
    ports = {name: free_port() for name in BINDS}
    (etc / "chargers.map").write_text(chargers_map)
    certs = etc / "certs"
    if not (certs / "server.pem").exists():
        raise AssertionError(f"{certs} needs server.pem and chargers-ca.pem (tests.haproxykit.write_certs)")
    config = etc / "haproxy.cfg"
    config.write_text(render(upstreams, ports, etc))
    log = etc / "haproxy.log"
    with log.open("wb") as output:
        process = await trio.lowlevel.open_process([binary, "-db", "-f", str(config)], stdout=output,
                                                   stderr=output)
    haproxy = Haproxy(process, ports, config, log, list(upstreams))
    try:
        async def stats_up() -> bool:
            assert process.poll() is None, f"haproxy exited {process.returncode}: {haproxy.log_text()[-2000:]}"
            try:
                await haproxy.states()
            except OSError:
                return False
            return True

        await wait_until(stats_up, timeout=20, interval=0.05)
        yield haproxy
    finally:
        if process.poll() is None:
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
        if process.poll() is None:
            process.kill()
            await process.wait()


def write_certs(etc: Path) -> Path:
    """A private CA, a server certificate for 127.0.0.1 and its key in one PEM (HAProxy's ``crt``),
    the CA as ``chargers-ca.pem``; returns the certs directory. Client certificates: :func:`client_cert`."""
    from proxy.ops import certs

    directory = etc / "certs"
    directory.mkdir(parents=True, exist_ok=True)
    ca = certs.create_ca({"CN": "Cluster test CA"})
    certs.write(ca, directory / "chargers-ca.pem", directory / "ca.key", overwrite=True)
    server = certs.create_server({"CN": "127.0.0.1"}, ["127.0.0.1", "localhost"], ca=ca)
    certs.write(server, directory / "server.crt", directory / "server.key", overwrite=True)
    (directory / "server.pem").write_text((directory / "server.crt").read_text()
                                          + (directory / "server.key").read_text())
    return directory


def client_cert(certs_dir: Path, cp_id: str, name: str | None = None, issuer: str = "ca") -> tuple[str, str]:
    """A client certificate with CN ``cp_id`` from the CA in ``certs_dir`` (``issuer``.key/pem)."""
    from proxy.ops import certs

    ca = certs.read_issued(certs_dir / "chargers-ca.pem", certs_dir / f"{issuer}.key")
    issued = certs.create_client(cp_id, ca, days=30)
    cert, key = certs_dir / f"{name or cp_id}.crt", certs_dir / f"{name or cp_id}.key"
    certs.write(issued, cert, key, overwrite=True)
    return str(cert), str(key)
