"""Certificates the way charging-manager guides make them (issue 25), on both legs, over real TLS.

The PKI is made in the test by the guides' OpenSSL recipes (docs/certificates.md, left column):
an RSA 4096 root CA whose key is protected by a passphrase, RSA 2048 server and client keys,
UTF-8 subjects ("Tiefgarage Köln GmbH"). Each trust set-up of the issue's table connects; a
wrong pinned certificate, a pinned leaf for another host and an unpinned client are refused;
encrypted keys load with their passphrase and stop start-up naming the key without it.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from proxy.demo.peers import LoopThread, SimBackend
from tests.conftest import StartProxy, proxy_url
from tests.e2e.test_tls import client_ssl, config, outcome
from tests.peers import in_loop

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the guides' recipes need openssl")

CA_PASS = "ca-secret-Köln"
KEY_PASS = "server-key-secret"
SUBJECT = "/C=DE/O=Tiefgarage Köln GmbH"
#: Offline mode off: a backend leg that fails must show as a refusal, not be answered locally.
ONLINE_ONLY = "[offline]\nenabled = false\n"


@dataclass(frozen=True)
class GuidePki:
    dir: Path

    def __getattr__(self, name: str) -> str:
        """``pki.server_crt`` → the path of server.crt (as a string, for configs)."""
        stem, _, ext = name.rpartition("_")
        return str(self.dir / f"{stem.replace('_', '-')}.{ext}")


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=120)


def _leaf(pki: Path, name: str, cn: str, usage: str, *, sans: str = "", key_pass: str = "") -> None:
    """The guides' leaf recipe: RSA 2048 key, CSR, signed by the root CA with its passphrase."""
    key = ["-aes256", "-passout", f"pass:{key_pass}"] if key_pass else []
    _openssl(pki, "genrsa", *key, "-out", f"{name}.key", "2048")
    passin = ["-passin", f"pass:{key_pass}"] if key_pass else []
    _openssl(pki, "req", "-new", "-key", f"{name}.key", *passin, "-utf8", "-subj", f"{SUBJECT}/CN={cn}",
             "-out", f"{name}.csr")
    ext = f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n" + (f"subjectAltName={sans}\n" if sans else "")
    (pki / f"{name}.ext").write_text(ext)
    _openssl(pki, "x509", "-req", "-in", f"{name}.csr", "-CA", "rootCA.crt", "-CAkey", "rootCA.key",
             "-passin", f"pass:{CA_PASS}", "-CAcreateserial", "-out", f"{name}.crt", "-days", "825", "-sha256",
             "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuidePki]:
    root = tmp_path_factory.mktemp("guide-pki")
    _openssl(root, "genrsa", "-aes256", "-passout", f"pass:{CA_PASS}", "-out", "rootCA.key", "4096")
    _openssl(root, "req", "-x509", "-new", "-key", "rootCA.key", "-passin", f"pass:{CA_PASS}", "-sha256",
             "-days", "3650", "-utf8", "-subj", f"{SUBJECT}/CN=Tiefgarage Köln Root CA", "-out", "rootCA.crt")
    _leaf(root, "server", "127.0.0.1", "serverAuth", sans="IP:127.0.0.1,DNS:localhost")
    _leaf(root, "other-server", "127.0.0.1", "serverAuth", sans="IP:127.0.0.1")
    _leaf(root, "elsewhere", "backend.example", "serverAuth", sans="DNS:backend.example")
    _leaf(root, "server-enc", "127.0.0.1", "serverAuth", sans="IP:127.0.0.1", key_pass=KEY_PASS)
    _leaf(root, "client", "CP1", "clientAuth")
    _leaf(root, "client2", "CP1", "clientAuth")
    _leaf(root, "client-cp2", "CP2", "clientAuth")
    _leaf(root, "client-enc", "CP1", "clientAuth", key_pass=KEY_PASS)
    yield GuidePki(root)


def backend_context(pki: GuidePki, cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key, password=KEY_PASS)
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    return context


async def tls_backend(peers: LoopThread, context: ssl.SSLContext) -> SimBackend:
    backend = SimBackend(ssl=context)
    await in_loop(peers, backend.start())
    return backend


def test_the_recipes_made_what_the_guides_describe(pki: GuidePki) -> None:
    root = x509.load_pem_x509_certificate(Path(pki.rootCA_crt).read_bytes())
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Tiefgarage Köln GmbH"
    assert root.public_key().key_size == 4096  # type: ignore[union-attr]
    assert b"ENCRYPTED" in Path(pki.rootCA_key).read_bytes()
    server = x509.load_pem_x509_certificate(Path(pki.server_crt).read_bytes())
    assert server.public_key().key_size == 2048 and server.issuer == root.subject  # type: ignore[union-attr]


@pytest.mark.parametrize("trust", ["root CA", "pinned leaf"])
async def test_backend_trusted_through_its_root_or_its_own_certificate(
        peers: LoopThread, start_proxy: StartProxy, pki: GuidePki, trust: str) -> None:
    backend = await tls_backend(peers, backend_context(pki, pki.server_crt, pki.server_key))
    anchor = pki.rootCA_crt if trust == "root CA" else pki.server_crt
    server = await start_proxy(config(backend, "wss", backend_extra=f'ca = ["{anchor}"]') + ONLINE_ONLY)
    assert await outcome(peers, proxy_url(server, "CP1"), "CP1") == "ok"
    assert "CP1" in backend.handlers  # through the backend, not answered offline
    await in_loop(peers, backend.stop())


@pytest.mark.parametrize("pinned,presented,why", [
    ("other-server", "server", "another leaf of the same CA is pinned"),
    ("elsewhere", "elsewhere", "the pinned leaf names another host"),
])
async def test_a_wrong_pinned_backend_certificate_is_refused(
        peers: LoopThread, start_proxy: StartProxy, pki: GuidePki, pinned: str, presented: str, why: str) -> None:
    backend = await tls_backend(peers, backend_context(pki, str(pki.dir / f"{presented}.crt"),
                                                       str(pki.dir / f"{presented}.key")))
    text = config(backend, "wss", backend_extra=f'ca = ["{pki.dir / (pinned + ".crt")}"]') + ONLINE_ONLY
    with capture_logs() as logs:
        server = await start_proxy(text)
        assert await outcome(peers, proxy_url(server, "CP1"), "CP1") == "InvalidStatus", why
    failure = [e for e in logs if e["event"] == "upstream_unavailable"][0]
    assert "CERTIFICATE_VERIFY_FAILED" in failure["reason"], why
    assert "CP1" not in backend.handlers
    await in_loop(peers, backend.stop())


@pytest.mark.parametrize("trust", ["root CA", "pinned client certificate"])
async def test_wallbox_certificate_accepted_through_the_root_or_itself(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy, pki: GuidePki, trust: str) -> None:
    anchor = pki.rootCA_crt if trust == "root CA" else pki.client_crt
    server_toml = f'tls = "on"\ncert = "{pki.server_crt}"\nkey = "{pki.server_key}"\nclient_ca = ["{anchor}"]'
    server = await start_proxy(config(backend, server=server_toml))
    url = proxy_url(server, "CP1", "wss")
    assert await outcome(peers, url, "CP1", ssl=client_ssl(pki.rootCA_crt, (pki.client_crt, pki.client_key))) == "ok"
    other = await outcome(peers, url, "CP1", ssl=client_ssl(pki.rootCA_crt, (pki.client2_crt, pki.client2_key)))
    assert (other == "ok") == (trust == "root CA")  # a pinned certificate admits that certificate only
    # the CN rule is unchanged: CP2's certificate (trusted through the root) does not open CP1
    if trust == "root CA":
        assert await outcome(peers, url, "CP1",
                             ssl=client_ssl(pki.rootCA_crt, (pki.client_cp2_crt, pki.client_cp2_key))) == "InvalidStatus"


async def test_encrypted_server_and_client_keys_load_with_their_passphrases(
        peers: LoopThread, start_proxy: StartProxy, pki: GuidePki, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    backend = await tls_backend(peers, backend_context(pki, pki.server_crt, pki.server_key, client_ca=pki.rootCA_crt))
    monkeypatch.setenv("SERVER_KEY_PASSPHRASE", KEY_PASS)
    (tmp_path / "client.pass").write_text(KEY_PASS + "\n")
    server_toml = (f'tls = "on"\ncert = "{pki.server_enc_crt}"\nkey = "{pki.server_enc_key}"\n'
                   'key_password_env = "SERVER_KEY_PASSPHRASE"')
    extra = (f'ca = ["{pki.rootCA_crt}"]\nclient_cert = "{pki.client_enc_crt}"\nclient_key = "{pki.client_enc_key}"\n'
             f'client_key_password_file = "{tmp_path / "client.pass"}"')
    server = await start_proxy(config(backend, "wss", server=server_toml, backend_extra=extra) + ONLINE_ONLY)
    assert await outcome(peers, proxy_url(server, "CP1", "wss"), "CP1", ssl=client_ssl(pki.rootCA_crt)) == "ok"
    assert "CP1" in backend.handlers  # through the backend that requires the proxy's client certificate
    await in_loop(peers, backend.stop())


def _site(tmp_path: Path, server: str, backend: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(f'[server]\nlisten = "127.0.0.1:0"\n{server}\n[metrics]\nlisten = ""\n'
                    f'[offline]\ndata_dir = "{tmp_path / "data"}"\n[backend]\n{backend}\n'
                    '[[chargers]]\nid = "CP1"\npassword = "0123456789abcdef0123"\n', encoding="utf-8")
    return path


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("passphrase,message", [
    ("", "key is encrypted: set its passphrase"),
    ('key_password = "not-the-passphrase"', "wrong passphrase for this encrypted key"),
])
def test_an_encrypted_key_without_its_passphrase_stops_start_up_naming_the_key(
        pki: GuidePki, tmp_path: Path, passphrase: str, message: str) -> None:
    server = f'tls = "on"\ncert = "{pki.server_enc_crt}"\nkey = "{pki.server_enc_key}"\n{passphrase}'
    site = _site(tmp_path, server, 'url = "ws://127.0.0.1:9/ocpp"')
    for command in (["check-config", str(site)], ["run", "--config", str(site)]):
        result = _cli(*command)
        assert result.returncode != 0, command
        assert f"{pki.server_enc_key}: {message}" in result.stderr, (command, result.stderr)
    client = (f'url = "wss://127.0.0.1:9/ocpp"\nca = ["{pki.rootCA_crt}"]\nclient_cert = "{pki.client_enc_crt}"\n'
              f'client_key = "{pki.client_enc_key}"\n' + passphrase.replace("key_password", "client_key_password"))
    result = _cli("check-config", str(_site(tmp_path, "", client)))
    assert result.returncode == 2 and f"{pki.client_enc_key}: {message}" in result.stderr, result.stderr


async def test_verify_false_is_an_explicit_opt_in_warned_at_every_start(
        peers: LoopThread, start_proxy: StartProxy, pki: GuidePki, tmp_path: Path) -> None:
    backend = await tls_backend(peers, backend_context(pki, pki.server_crt, pki.server_key))
    refused = await start_proxy(config(backend, "wss") + ONLINE_ONLY)
    assert await outcome(peers, proxy_url(refused, "CP1"), "CP1") == "InvalidStatus"  # default: verified
    for _ in range(2):
        with capture_logs() as logs:
            server = await start_proxy(config(backend, "wss", backend_extra="verify = false") + ONLINE_ONLY)
        warned = [e for e in logs if e["event"] == "tls_verify_disabled"]
        assert len(warned) == 1 and warned[0]["log_level"] == "warning"
        assert await outcome(peers, proxy_url(server, "CP1"), "CP1") == "ok"
        assert "CP1" in backend.handlers
    site = _site(tmp_path, "", 'url = "wss://127.0.0.1:9/ocpp"\nverify = false')
    checked = await trio.to_thread.run_sync(_cli, "check-config", str(site))
    assert checked.returncode == 0 and "backend.verify: verify = false" in checked.stderr, checked.stderr
    await in_loop(peers, backend.stop())


def test_certs_cli_signs_with_the_guides_encrypted_root_ca(pki: GuidePki, tmp_path: Path) -> None:
    """The right column of docs/certificates.md next to the left: `certs client` with the recipe's CA."""
    site = tmp_path / "site-ca"
    site.mkdir()
    shutil.copy(pki.rootCA_crt, site / "ca.crt")
    shutil.copy(pki.rootCA_key, site / "ca.key")
    without = _cli("certs", "client", "--dir", str(site), "--id", "CP9")
    assert without.returncode == 2 and f"{site / 'ca.key'}: key is encrypted" in without.stderr
    made = _cli("certs", "client", "--dir", str(site), "--id", "CP9", "--ca-password-env", "CA_PASS",
                env={"CA_PASS": CA_PASS})
    assert made.returncode == 0, made.stderr
    verified = subprocess.run(["openssl", "verify", "-CAfile", pki.rootCA_crt, str(site / "CP9.crt")],
                              capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and "OK" in verified.stdout
