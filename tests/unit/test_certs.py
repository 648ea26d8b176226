"""Certificate creation and the start-up checks that name the file and the reason."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.ops import certs
from proxy.config import loads
from proxy.runtime.server import ProxyServer


def test_certs_cli_output_verifies(tmp_path: Path) -> None:
    subject = tmp_path / "subject.toml"
    subject.write_text('O = "Tiefgarage Köln GmbH"\nC = "DE"\nL = "Köln"\n', encoding="utf-8")
    for args in (["init-ca", "--subject", str(subject)], ["server", "--san", "gw.example", "--san", "192.0.2.7"],
                 ["client", "--id", "DE*ABC*E123"]):
        result = subprocess.run([sys.executable, "-m", "proxy", "certs", *args, "--dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "SHA-256 fingerprint" in result.stdout
    ca = certs.load_certificates(tmp_path / "ca.crt")[0]
    server = certs.load_certificates(tmp_path / "server.crt")[0]
    client = certs.load_certificates(tmp_path / "DE*ABC*E123.crt")[0]
    assert ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Tiefgarage Köln GmbH"
    assert ca.subject.get_attributes_for_oid(NameOID.LOCALITY_NAME)[0].value == "Köln"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "DE*ABC*E123"
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["gw.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    for key in ("ca.key", "server.key", "DE*ABC*E123.key"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600
    certs.check_pair(tmp_path / "server.crt", tmp_path / "server.key")


def test_check_pair_names_file_and_reason(tmp_path: Path) -> None:
    ca = certs.create_ca({"CN": "CA"})
    good = certs.create_server({"CN": "a"}, ["a"], ca=ca)
    other = certs.create_server({"CN": "b"}, ["b"], ca=ca)
    certs.write(good, tmp_path / "good.crt", tmp_path / "good.key")
    certs.write(other, tmp_path / "other.crt", tmp_path / "other.key")
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    certs.write(certs.create_server({"CN": "old"}, [], days=1, now=past), tmp_path / "old.crt", tmp_path / "old.key")
    (tmp_path / "junk.crt").write_text("hello")

    def why(cert: str, key: str) -> str:
        with pytest.raises(certs.CertificateProblem) as info:
            certs.check_pair(tmp_path / cert, tmp_path / key)
        return str(info.value)

    assert why("good.crt", "other.key") == (f"{tmp_path}/other.key: private key does not belong to the "
                                            f"certificate in {tmp_path}/good.crt")
    assert why("old.crt", "old.key").startswith(f"{tmp_path}/old.crt: certificate expired on ")
    assert why("junk.crt", "good.key") == f"{tmp_path}/junk.crt: not a PEM certificate"
    assert why("missing.crt", "good.key").startswith(f"{tmp_path}/missing.crt: cannot read")


async def test_proxy_refuses_to_start_with_a_bad_certificate(tmp_path: Path) -> None:
    ca = certs.create_ca({"CN": "CA"})
    certs.write(certs.create_server({"CN": "a"}, ["a"], ca=ca), tmp_path / "a.crt", tmp_path / "a.key")
    certs.write(certs.create_server({"CN": "b"}, ["b"], ca=ca), tmp_path / "b.crt", tmp_path / "b.key")
    config = loads(f'[server]\nlisten = "127.0.0.1:0"\ntls = "on"\ncert = "{tmp_path}/a.crt"\n'
                   f'key = "{tmp_path}/b.key"\n')
    with pytest.raises(certs.CertificateProblem) as info:
        await ProxyServer(config).serve()
    assert info.value.path == f"{tmp_path}/b.key"
