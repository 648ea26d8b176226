"""TLS off/detect/on and security profiles 2 and 3 on both legs (issue 4).

Every certificate is created inside the test (proxy.ops.certs or the `certs` CLI);
every handshake is real, on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from ocpp.v16 import call
from structlog.testing import capture_logs

from proxy.ops import certs
from proxy.ops.logs import get_logger
from proxy.demo.peers import LoopThread, SimBackend, connect_wallbox
from tests.conftest import StartProxy, proxy_url
from tests.peers import in_loop


class Pki:
    """A private CA with server and client certificates in a directory."""

    def __init__(self, root: Path, name: str = "Test CA") -> None:
        self.dir = root
        self.ca = certs.create_ca({"CN": name, "O": "Tiefgarage Köln GmbH"})
        certs.write(self.ca, root / "ca.crt", root / "ca.key")

    @property
    def ca_file(self) -> str:
        return str(self.dir / "ca.crt")

    def server(self, name: str = "server") -> tuple[str, str]:
        issued = certs.create_server({"CN": "127.0.0.1"}, ["127.0.0.1", "localhost"], ca=self.ca)
        return self._write(issued, name)

    def client(self, cp_id: str, *, expired: bool = False, name: str | None = None) -> tuple[str, str]:
        now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30) if expired else None
        issued = certs.create_client(cp_id, self.ca, days=1 if expired else 30, now=now)
        return self._write(issued, name or cp_id)

    def _write(self, issued: certs.Issued, name: str) -> tuple[str, str]:
        cert, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        certs.write(issued, cert, key, overwrite=True)  # a test may issue for one id twice
        return str(cert), str(key)


def client_ssl(ca_file: str, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if cert:
        context.load_cert_chain(*cert)
    return context


async def outcome(peers: LoopThread, url: str, cp_id: str, **kwargs: Any) -> str:
    """'ok' after a Heartbeat round trip, else the exception's class name."""
    async def attempt() -> str:
        try:
            handle = await connect_wallbox(url, cp_id, **kwargs)
            await handle.wallbox.call(call.Heartbeat())
            await handle.close()
            return "ok"
        except Exception as exc:  # noqa: BLE001 - the test asserts on the refusal's kind
            return type(exc).__name__

    return await in_loop(peers, attempt())


def config(backend: SimBackend, scheme: str = "ws", server: str = "", backend_extra: str = "",
           chargers: tuple[str, ...] = ("CP1", "CP2")) -> str:
    entries = "".join(f'[[chargers]]\nid = "{cp}"\n' for cp in chargers)
    return (f'[server]\n{server}\n[backend]\nurl = "{scheme}://127.0.0.1:{backend.port}/ocpp"\n'
            f'connect_timeout = 5\n{backend_extra}\n{entries}')


async def test_detect_serves_plain_and_tls_on_one_port_at_once(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy, tmp_path: Path) -> None:
    server = await start_proxy(config(backend, server=f'tls = "detect"\ncerts_dir = "{tmp_path}"'))
    trust = client_ssl(str(tmp_path / "server.crt"))  # the self-signed certificate, pinned
    plain = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
    secure = await in_loop(peers, connect_wallbox(proxy_url(server, "CP2", "wss"), "CP2", ssl=trust))
    with trio.fail_after(5):
        await server.wait_sessions(2)
    for handle in (plain, secure):
        answer = await in_loop(peers, handle.wallbox.call(call.Heartbeat()))
        assert answer.current_time
    assert secure.websocket.transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    for handle in (plain, secure):
        await in_loop(peers, handle.close())


async def test_on_refuses_plain_and_off_refuses_tls(peers: LoopThread, backend: SimBackend,
                                                    start_proxy: StartProxy, tmp_path: Path) -> None:
    with capture_logs() as logs:
        tls_on = await start_proxy(config(backend, server=f'tls = "on"\ncerts_dir = "{tmp_path}"'))
        tls_off = await start_proxy(config(backend))
        assert await outcome(peers, proxy_url(tls_on, "CP1"), "CP1") != "ok"
        assert await outcome(peers, proxy_url(tls_off, "CP1", "wss"), "CP1",
                             ssl=client_ssl(str(tmp_path / "server.crt"))) != "ok"
        assert await outcome(peers, proxy_url(tls_on, "CP1", "wss"), "CP1",
                             ssl=client_ssl(str(tmp_path / "server.crt"))) == "ok"
    events = [e["event"] for e in logs]
    assert "plaintext_refused" in events and "tls_refused" in events
    assert all("peer" in e for e in logs if e["event"] in ("plaintext_refused", "tls_refused"))


async def test_self_signed_certificate_created_once_with_private_key(tmp_path: Path) -> None:
    from proxy.config import loads
    from proxy.wire.tls_listener import SecureLayer

    settings = loads(f'[server]\ntls = "on"\ncerts_dir = "{tmp_path}"').server
    with capture_logs() as logs:
        SecureLayer(settings, get_logger())
        first = (tmp_path / "server.crt").read_bytes()
        SecureLayer(settings, get_logger())
    assert (tmp_path / "server.crt").read_bytes() == first
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    created = [e["created"] for e in logs if e["event"] == "self_signed_certificate"]
    assert created == [True, False]
    fingerprints = {e["sha256"] for e in logs if e["event"] == "self_signed_certificate"}
    assert len(fingerprints) == 1 and len(fingerprints.pop()) == 95
    leaf = certs.load_certificates(tmp_path / "server.crt")[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)


async def test_sp2_upstream_trusts_only_configured_ca(peers: LoopThread, start_proxy: StartProxy,
                                                      tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    pki = Pki(tmp_path / "pki")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*pki.server())
    backend = SimBackend(ssl=context)
    await in_loop(peers, backend.start())
    trusted = await start_proxy(config(backend, "wss", backend_extra=f'ca = ["{pki.ca_file}"]\npassword = "pw-sp2"'))
    assert await outcome(peers, proxy_url(trusted, "CP1"), "CP1") == "ok"
    assert backend.headers["CP1"]["authorization"].startswith("Basic ")
    with capture_logs() as logs:  # offline mode off: the wallbox is refused, not served offline
        untrusted = await start_proxy(config(backend, "wss") + "[offline]\nenabled = false\n")
        assert await outcome(peers, proxy_url(untrusted, "CP2"), "CP2") == "InvalidStatus"
    failure = [e for e in logs if e["event"] == "upstream_unavailable"][0]
    assert "CERTIFICATE_VERIFY_FAILED" in failure["reason"] and failure["status"] == 502
    await in_loop(peers, backend.stop())


async def test_sp3_wallbox_client_certificates(peers: LoopThread, backend: SimBackend,
                                               start_proxy: StartProxy, tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    (tmp_path / "other").mkdir()
    pki, stranger = Pki(tmp_path / "pki"), Pki(tmp_path / "other", "Other CA")
    cert, key = pki.server()
    server_toml = f'tls = "on"\ncert = "{cert}"\nkey = "{key}"\nclient_ca = ["{pki.ca_file}"]'
    with capture_logs() as logs:
        server = await start_proxy(config(backend, server=server_toml))
        url = proxy_url(server, "CP1", "wss")
        assert await outcome(peers, url, "CP1", ssl=client_ssl(pki.ca_file, pki.client("CP1"))) == "ok"
        assert await outcome(peers, url, "CP1", ssl=client_ssl(pki.ca_file)) != "ok"
        assert await outcome(peers, url, "CP1", ssl=client_ssl(pki.ca_file, stranger.client("CP1"))) != "ok"
        assert await outcome(peers, url, "CP1",
                             ssl=client_ssl(pki.ca_file, pki.client("CP1", expired=True, name="old"))) != "ok"
        assert await outcome(peers, url, "CP1", ssl=client_ssl(pki.ca_file, pki.client("CP2"))) == "InvalidStatus"
    failures = [e for e in logs if e["event"] == "tls_handshake_failed"]
    assert len(failures) == 3 and all(e["peer"].startswith("127.0.0.1:") for e in failures)
    reasons = " ".join(e["reason"] for e in failures).upper()
    assert "CERTIFICATE" in reasons
    mismatch = [e for e in logs if e["event"] == "handshake_refused"]
    assert mismatch[0]["status"] == 403 and mismatch[0]["reason"] == "certificate_cn_mismatch"
    assert sorted(backend.handlers) == ["CP1"]  # refused wallboxes never reached the backend
    # the server keeps serving after every failed handshake
    assert await outcome(peers, proxy_url(server, "CP2", "wss"), "CP2",
                         ssl=client_ssl(pki.ca_file, pki.client("CP2"))) == "ok"


async def test_sp3_backend_accepts_proxy_certificate_made_by_certs_cli(
        peers: LoopThread, start_proxy: StartProxy, tmp_path: Path) -> None:
    pki = tmp_path / "cli-pki"

    def cli(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "proxy", "certs", *args, "--dir", str(pki)],
                       check=True, capture_output=True, timeout=60)

    await trio.to_thread.run_sync(cli, "init-ca", "--O", "Tiefgarage Köln GmbH")
    await trio.to_thread.run_sync(cli, "server", "--san", "127.0.0.1")
    await trio.to_thread.run_sync(cli, "client", "--id", "CP1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(pki / "ca.crt"))
    backend = SimBackend(ssl=context)
    await in_loop(peers, backend.start())
    extra = f'ca = ["{pki / "ca.crt"}"]\nclient_cert = "{pki / "CP1.crt"}"\nclient_key = "{pki / "CP1.key"}"'
    server = await start_proxy(config(backend, "wss", backend_extra=extra))
    assert await outcome(peers, proxy_url(server, "CP1"), "CP1") == "ok"
    without = await start_proxy(config(backend, "wss", backend_extra=f'ca = ["{pki / "ca.crt"}"]')
                                + "[offline]\nenabled = false\n")
    assert await outcome(peers, proxy_url(without, "CP2"), "CP2") == "InvalidStatus"
    await in_loop(peers, backend.stop())
