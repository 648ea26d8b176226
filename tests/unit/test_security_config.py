"""check-config and the certs CLI at the door (issue 16): run as an operator runs them, as subprocesses."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.config import ConfigError, loads
from proxy.ops import logs as proxy_logs

PASSWORD = "0123456789abcdef0123"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60)


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "site.toml"
    path.write_text(text, encoding="utf-8")
    return cli("check-config", str(path))


def test_1_check_config_names_and_refuses_chargers_reachable_without_credentials(tmp_path: Path) -> None:
    base = '[backend]\nurl = "wss://backend.example/ocpp"\n'
    chargers = (f'[[chargers]]\nid = "LOCKED"\npassword = "{PASSWORD}"\n'
                '[[chargers]]\nid = "OPEN1"\n[[chargers]]\nid = "OPEN2"\n')
    refused = check(tmp_path, base + chargers)
    assert refused.returncode == 2
    assert "chargers[1]: charger 'OPEN1' is reachable without any credential" in refused.stderr
    assert "chargers[2]: charger 'OPEN2' is reachable without any credential" in refused.stderr
    assert "LOCKED" not in refused.stderr
    allowed = check(tmp_path, base + chargers.replace('id = "OPEN1"\n', 'id = "OPEN1"\nallow_unauthenticated = true\n')
                    .replace('id = "OPEN2"\n', 'id = "OPEN2"\nallow_unauthenticated = true\n'))
    assert allowed.returncode == 0, allowed.stderr
    assert "warning:" in allowed.stderr and "'OPEN1' is admitted without any credential" in allowed.stderr
    # with a [server] password or client certificates nothing is open
    assert check(tmp_path, f'[server]\npassword = "{PASSWORD}"\n' + base + chargers).returncode == 0
    loopback = check(tmp_path, '[server]\nlisten = "127.0.0.1:19520"\n' + base + chargers)
    assert loopback.returncode == 0 and "loopback only" in loopback.stderr
    # `run` applies the same rule before it listens
    (tmp_path / "site.toml").write_text(base + chargers, encoding="utf-8")
    ran = cli("run", "--config", str(tmp_path / "site.toml"))
    assert ran.returncode == 2 and "charger 'OPEN1' is reachable without any credential" in ran.stderr


def test_1_accept_unknown_without_any_credential_is_refused_unless_explicit(tmp_path: Path) -> None:
    base = ('[backend]\nurl = "wss://backend.example/ocpp"\n'
            f'[[chargers]]\nid = "LOCKED"\npassword = "{PASSWORD}"\n')
    refused = check(tmp_path, '[server]\naccept_unknown = true\n' + base)
    assert refused.returncode == 2
    assert "server.accept_unknown: any unknown charge point id would be admitted without a credential" in refused.stderr
    allowed = check(tmp_path, '[server]\naccept_unknown = true\nallow_unauthenticated_unknown = true\n' + base)
    assert allowed.returncode == 0, allowed.stderr
    assert "warning:" in allowed.stderr and "any unknown charge point id from the network" in allowed.stderr
    guarded = check(tmp_path, f'[server]\naccept_unknown = true\npassword = "{PASSWORD}"\n' + base)
    assert guarded.returncode == 0, guarded.stderr
    assert "unknown charge point id" not in guarded.stderr
    loopback = check(tmp_path, '[server]\nlisten = "127.0.0.1:19520"\naccept_unknown = true\n' + base)
    assert loopback.returncode == 0 and "from loopback is admitted without a credential" in loopback.stderr


def test_3_configured_ids_must_be_ocpp_ids(tmp_path: Path) -> None:
    text = (f'[server]\npassword = "{PASSWORD}"\n[backend]\nurl = "ws://b/ocpp"\n'
            '[[chargers]]\nid = "Wallbox 1"\n[[chargers]]\nid = ".."\n[[chargers]]\nid = "DE*ABC*E123"\n')
    result = check(tmp_path, text)
    assert result.returncode == 2
    assert "chargers[0].id: 'Wallbox 1' is not an OCPP charge point id" in result.stderr
    assert "chargers[1].id: '..' is not an OCPP charge point id" in result.stderr
    assert "chargers[2]" not in result.stderr


def test_5_userinfo_in_a_backend_url_is_refused_and_never_echoed(tmp_path: Path) -> None:
    text = (f'[server]\npassword = "{PASSWORD}"\n[backend]\nurl = "wss://user:s3cr3t@backend.example/ocpp"\n'
            '[backends.ems]\nurl = "ws://ems:hunter2@10.0.0.9/ocpp"\n[[chargers]]\nid = "CP1"\n')
    result = check(tmp_path, text)
    assert result.returncode == 2
    assert "backend.url: must not carry user:password@" in result.stderr
    assert "backends.ems.url: must not carry user:password@" in result.stderr
    assert "s3cr3t" not in result.stderr + result.stdout and "hunter2" not in result.stderr + result.stdout
    with pytest.raises(ConfigError) as caught:
        loads('[backend]\nurl = "ftp://user:s3cr3t@backend.example/ocpp"\n')
    assert "s3cr3t" not in str(caught.value) and "user:password@" in str(caught.value)


def test_5_url_userinfo_is_redacted_in_every_log_line() -> None:
    out = io.StringIO()
    proxy_logs.configure("info", "json", out)
    try:
        log = proxy_logs.get_logger()
        log.warning("upstream_unavailable", url="wss://user:s3cr3t@backend.example/ocpp/CP1",
                    reason="cannot connect to ws://a:b@h:1/x", nested=["wss://u:p4ss@x/y"])
    finally:
        structlog.reset_defaults()
    line = json.loads(out.getvalue())
    assert line["url"] == "wss://***@backend.example/ocpp/CP1"
    assert line["reason"] == "cannot connect to ws://***@h:1/x" and line["nested"] == ["wss://***@x/y"]
    assert "s3cr3t" not in out.getvalue() and "p4ss" not in out.getvalue()


def _cn(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_6_certs_cli_refuses_a_cn_other_than_the_id(tmp_path: Path) -> None:
    pki = str(tmp_path / "pki")
    assert cli("certs", "init-ca", "--dir", pki).returncode == 0
    other = cli("certs", "client", "--dir", pki, "--id", "CP_C", "--CN", "CP_A")
    assert other.returncode == 2 and "differs from --id" in other.stderr
    assert not (tmp_path / "pki" / "CP_C.crt").exists()
    subject = tmp_path / "subject.toml"
    subject.write_text('CN = "CP_A"\nO = "Tiefgarage Köln GmbH"\n', encoding="utf-8")
    from_file = cli("certs", "client", "--dir", pki, "--id", "CP_C", "--subject", str(subject))
    assert from_file.returncode == 2 and "subject file" in from_file.stderr
    subject.write_text('O = "Tiefgarage Köln GmbH"\n', encoding="utf-8")
    assert cli("certs", "client", "--dir", pki, "--id", "CP_C", "--subject", str(subject)).returncode == 0
    assert _cn(tmp_path / "pki" / "CP_C.crt") == "CP_C"
    forced = cli("certs", "client", "--dir", pki, "--id", "CP_D", "--CN", "CP_A", "--force-cn")
    assert forced.returncode == 0 and _cn(tmp_path / "pki" / "CP_D.crt") == "CP_A"


@pytest.mark.parametrize("listen", [":1502", "0.0.0.0:1502", "[::]:1502"])
def test_7_check_config_warns_when_ems_or_metrics_listen_everywhere_unguarded(tmp_path: Path, listen: str) -> None:
    base = f'[server]\npassword = "{PASSWORD}"\n[backend]\nurl = "ws://b/ocpp"\n[[chargers]]\nid = "CP1"\n'
    result = check(tmp_path, base + f'[ems]\nmodbus_listen = "{listen}"\nallow = []\n'
                   f'[metrics]\nlisten = "{listen.replace("1502", "9520")}"\n')
    assert result.returncode == 0, result.stderr
    assert "ems.modbus_listen" in result.stderr and "metrics.listen" in result.stderr
    assert result.stderr.count("listens on all addresses") == 2
    guarded = check(tmp_path, base + f'[ems]\nmodbus_listen = "{listen}"\n'  # default allow: loopback
                    f'[metrics]\nlisten = "{listen.replace("1502", "9520")}"\nallow = ["10.0.0.0/8"]\n')
    assert guarded.returncode == 0 and "warning" not in guarded.stderr, guarded.stderr
    local = check(tmp_path, base + '[ems]\nmodbus_listen = "127.0.0.1:1502"\nallow = []\n')
    assert "warning" not in local.stderr
    bad = check(tmp_path, base + '[ems]\nmodbus_listen = "127.0.0.1:1502"\nallow = ["10.0.0.300"]\n')
    assert bad.returncode == 2 and "ems.allow" in bad.stderr
