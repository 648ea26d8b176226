"""Config loading: typed values, every error with key and line, secrets from env/files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, loads, upstream_url
from proxy.config.docs import schema_rows

GOOD = """
[server]
listen = "127.0.0.1:19520"

[backend]
url = "wss://backend.example/ocpp"
password_env = "BACKEND_PW"

[[chargers]]
id = "CP001"
upstream_id = "DE*ABC*E123"

[[chargers]]
id = "CP002"
upstream_url = "ws://other.example/ws/CP002"
upstream_password_file = "pw.txt"
"""


def test_good_config_resolves_upstreams(tmp_path: Path) -> None:
    (tmp_path / "pw.txt").write_text("file-secret\n")
    config = loads(GOOD, environ={"BACKEND_PW": "env-secret"}, base_dir=tmp_path)
    first = config.upstream_for(config.chargers[0])
    assert (first.url, first.identity, first.password) == (
        "wss://backend.example/ocpp/DE*ABC*E123", "DE*ABC*E123", "env-secret")
    second = config.upstream_for(config.chargers[1])
    assert (second.url, second.password) == ("ws://other.example/ws/CP002", "file-secret")
    assert "secret" not in repr(first)
    assert config.server.listen == "127.0.0.1:19520" and config.server.tls == "off"


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(text, "site.toml", environ={})
    return [p.render("site.toml") for p in info.value.problems]


def test_errors_name_key_and_line() -> None:
    text = '[server]\nlisten = "nonsense"\ntls = "maybe"\nmax_message_bytes = "big"\ntypo = 1\n' \
           '[backend]\nurl = "http://x"\n[[chargers]]\nid = "A"\n[[chargers]]\nid = "A"\nmax_curent = 16\n'
    assert errors(text) == [
        "site.toml:2: server.listen: must be HOST:PORT or [IPv6]:PORT, got 'nonsense'",
        "site.toml:3: server.tls: must be one of off, detect, on; got 'maybe'",
        "site.toml:4: server.max_message_bytes: must be an integer, got a string",
        "site.toml:5: server.typo: unknown key",
        "site.toml:7: backend.url: must be a ws:// or wss:// URL, got 'http://x' (for a WebSocket backend "
        "write ws://)",
        "site.toml:12: chargers[1].max_curent: unknown key; did you mean max_current?",
        # one mistake, one error: the chargers are not told again that they have no backend URL
        "site.toml:11: chargers[1].id: duplicate charger id 'A' (also chargers[0])",
    ]


def test_missing_required_and_secret_sources() -> None:
    assert errors('[[chargers]]\npassword_env = "NOPE"\n') == [
        "site.toml:1: chargers[0].id: is required",
        "site.toml:2: chargers[0].password_env: environment variable 'NOPE' is not set",
    ]
    assert errors("[server\n")[0].startswith("site.toml:1: (syntax)")


def test_upstream_url_appends_identity_once() -> None:
    assert upstream_url("ws://h/ocpp", "CP1") == "ws://h/ocpp/CP1"
    assert upstream_url("ws://h/ocpp/", "CP1") == "ws://h/ocpp/CP1"
    assert upstream_url("ws://h/ocpp/CP1", "CP1") == "ws://h/ocpp/CP1"
    assert upstream_url("ws://h/o", "A B") == "ws://h/o/A%20B"


def test_upstream_url_encodes_only_what_a_path_segment_cannot_carry() -> None:
    assert upstream_url("ws://h/ocpp", "DE*ABC*E001") == "ws://h/ocpp/DE*ABC*E001"  # sub-delims stay
    assert upstream_url("ws://h/ocpp", "a:b@c!$&'()+,;=-._~") == "ws://h/ocpp/a:b@c!$&'()+,;=-._~"
    assert upstream_url("ws://h/ocpp", "a/b?c#d%e") == "ws://h/ocpp/a%2Fb%3Fc%23d%25e"
    assert upstream_url("ws://h/ocpp", "Zähler 1") == "ws://h/ocpp/Z%C3%A4hler%201"
    assert upstream_url("ws://h/ocpp/DE*ABC*E001", "DE*ABC*E001") == "ws://h/ocpp/DE*ABC*E001"


def test_every_setting_is_documented() -> None:
    rows = list(schema_rows())
    assert {"server.listen", "backend.url", "chargers[].id"} <= {key for key, *_ in rows}
    assert all(doc for *_, doc in rows)


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[backend]\nurl = "ws://x/ocpp"\n[[chargers]]\nid = "CP1"\nmax_curent = 16\n')
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{bad}:5: chargers[0].max_curent: unknown key" in result.stderr
    good = tmp_path / "good.toml"
    good.write_text('[backend]\nurl = "ws://x/ocpp"\n[[chargers]]\nid = "CP1"\npassword = "0123456789abcdef"\n')
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(good)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_modbus_chargers_are_checked_like_chargers() -> None:
    text = ('[backend]\nurl = "ws://b/ocpp"\n[[chargers]]\nid = "A"\n'
            '[[modbus_chargers]]\nid = "A"\nmodbus = "127.0.0.1:502"\n'
            '[[modbus_chargers]]\nid = "B"\nmap = "abb"\npassword = "x"\n')
    from proxy.config.schema import WALLBOX_MAPS

    maps = ", ".join(WALLBOX_MAPS)
    assert sorted(errors(text)) == [
        f"site.toml:10: modbus_chargers[1].map: must be one of {maps}; got 'abb'",
        "site.toml:11: modbus_chargers[1].password: unknown key",  # nothing connects to a virtual charge point
        "site.toml:6: modbus_chargers[0].id: duplicate charger id 'A' (also chargers[0])",
        "site.toml:8: modbus_chargers[1].modbus: is required with transport = tcp (HOST:PORT)",
    ]
    assert errors(text.split("[[modbus_chargers]]\nid = \"B\"")[0]) == [
        "site.toml:6: modbus_chargers[0].id: duplicate charger id 'A' (also chargers[0])"]


def test_virtual_chargers_share_load_management_and_upstream_settings() -> None:
    config = loads('[backend]\nurl = "ws://b/ocpp"\n[[chargers]]\nid = "CP1"\n[[modbus_chargers]]\nid = "HD1"\n'
                   'modbus = "10.0.0.5:502"\nupstream_id = "DE*HD*1"\nmax_current = 11\nfixed_id_tag = "TAG"\n')
    assert [c.id for c in config.all_chargers] == ["CP1", "HD1"]  # the EMS register order
    assert config.charger("HD1") is None and config.is_virtual("HD1")  # no wallbox may connect as HD1
    settings = config.settings_for("HD1")
    assert settings is not None and settings.max_current == 11
    assert config.upstream_for(settings).url == "ws://b/ocpp/DE*HD*1"
