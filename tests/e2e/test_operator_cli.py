"""Operator experience (issue 19): the CLI as a user runs it, each command a real subprocess.

check-config refuses everything `run` would refuse at start (short of a port another process holds),
naming key and line; relative paths are relative to the config file; the certs CLI never replaces
a key without --force; start-up failures name key and value; the smaller papercuts.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from proxy.config import loads
from proxy.ops import certs
from tests.opskit import free_port, running_proxy

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _pair(directory: Path, name: str, *, now: datetime.datetime | None = None, days: int = 30) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    certs.write(certs.create_server({"CN": "gw"}, ["localhost"], days=days, now=now),
                directory / f"{name}.crt", directory / f"{name}.key")


# --- 1. check-config refuses what run refuses ------------------------------------------------

BASE = '[server]\nlisten = "127.0.0.1:0"\n{server}\n[metrics]\nlisten = "127.0.0.1:0"\n{rest}\n' \
       '[log]\nformat = "json"\n[[chargers]]\nid = "CP1"\npassword = "0123456789abcdef0123"\n[backend]\nurl = "ws://127.0.0.1:9/ocpp"\n'


def _setup_files(site: Path) -> None:
    _pair(site / "tls", "good")
    _pair(site / "tls", "other")
    _pair(site / "tls", "old", now=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=400))
    (site / "tls" / "junk.pem").write_text("not a certificate\n")
    (site / "blocker").write_text("a file where a directory should be\n")


CASES = {
    # the two examples: missing certificate files, a listen address that does not resolve
    "missing cert files": ('tls = "on"\ncert = "certs/server.crt"\nkey = "certs/server.key"', "",
                           r":4: server\.cert: .*certs/server\.crt: cannot read"),
    "unresolvable listen": ('', '', r":2: server\.listen: host '127\.0\.0\.256' does not resolve"),
    "key of another certificate": ('tls = "on"\ncert = "tls/good.crt"\nkey = "tls/other.key"', "",
                                   r":5: server\.key: .*other\.key: private key does not belong"),
    "expired certificate": ('tls = "detect"\ncert = "tls/old.crt"\nkey = "tls/old.key"', "",
                            r":4: server\.cert: .*old\.crt: certificate expired on"),
    "client CA not PEM": ('tls = "on"\ncert = "tls/good.crt"\nkey = "tls/good.key"\nclient_ca = ["tls/junk.pem"]',
                          "", r":6: server\.client_ca\[0\]: .*junk\.pem: not a PEM certificate"),
    "not this host's address": ('', '[ems]\nmodbus_listen = "192.0.2.1:31520"',
                                r":7: ems\.modbus_listen: 192\.0\.2\.1 is not an address of this machine"),
    "data_dir under a file": ('', '[offline]\ndata_dir = "blocker/data"',
                              r":7: offline\.data_dir: .*blocker/data cannot be created: .*blocker is not a directory"),
    "one port twice": ('', '[ems]\nmodbus_listen = "127.0.0.1:{port}"\n[site]\nmax_current = 32',
                       r"ems\.modbus_listen: port \d+ is already the metrics port \(metrics\.listen\)"),
    "backend client key unreadable": ('', '', r"backend\.client_key: .*nothing\.key: cannot read"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_config_refuses_what_run_refuses(tmp_path: Path, case: str) -> None:
    server, rest, expected = CASES[case]
    site = tmp_path / "site"
    _setup_files(site)
    port = free_port()
    text = BASE.format(server=server, rest=rest.format(port=port))
    if case == "unresolvable listen":
        text = text.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.256:31520"', 1)
    if case == "one port twice":
        text = text.replace('[metrics]\nlisten = "127.0.0.1:0"', f'[metrics]\nlisten = "127.0.0.1:{port}"')
    if case == "backend client key unreadable":
        text = text.replace('url = "ws://127.0.0.1:9/ocpp"',
                            'url = "wss://127.0.0.1:9/ocpp"\nclient_cert = "tls/good.crt"\nclient_key = "nothing.key"')
    config = site / "site.toml"
    config.write_text(text)
    checked = cli("check-config", str(config), cwd=tmp_path)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "OK" not in checked.stdout
    (first, *_) = error_lines(checked.stderr)
    assert re.search(expected, first), first
    assert first.startswith(f"error: {config}:")  # file and line, then the key
    ran = cli("run", "--config", str(config), cwd=tmp_path)
    assert ran.returncode == 2, ran.stderr
    assert error_lines(ran.stderr) == error_lines(checked.stderr)  # the same checks, the same words
    assert '"listening"' not in ran.stderr


async def test_a_config_check_config_accepts_starts(tmp_path: Path) -> None:
    """The converse, for the TLS set-up above: fixed, check-config says OK and run serves."""
    site = tmp_path / "site"
    _setup_files(site)
    config = site / "site.toml"
    config.write_text(BASE.format(server='tls = "on"\ncert = "tls/good.crt"\nkey = "tls/good.key"', rest=""))
    checked = await trio.to_thread.run_sync(lambda: cli("check-config", str(config), cwd=tmp_path))
    assert checked.returncode == 0 and checked.stdout.strip() == f"{config}: OK (1 charger)", checked
    async with running_proxy(config, cwd=tmp_path) as proxy:
        assert (await proxy.wait_event("listening"))["tls"] == "on"
        assert await proxy.stop() == 0


# --- 2. one rule for relative paths ------------------------------------------------------------

async def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """cert, key, certs_dir, data_dir and *_file: all from the config file's directory, whatever the cwd."""
    site, elsewhere = tmp_path / "etc" / "site", tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    _pair(site / "tls", "gw")
    (site / "secrets").mkdir()
    (site / "secrets" / "backend.pw").write_text("s3cret-from-file\n")
    config = site / "site.toml"
    config.write_text(BASE.format(server='tls = "detect"', rest='[offline]\ndata_dir = "state"')
                      + 'password_file = "secrets/backend.pw"\n')
    loaded = await trio.to_thread.run_sync(lambda: cli("check-config", str(config.relative_to(tmp_path)),
                                                       cwd=tmp_path))
    assert loaded.returncode == 0, loaded.stderr
    async with running_proxy(config, cwd=elsewhere) as proxy:
        created = await proxy.wait_event("self_signed_certificate")
        assert created["path"] == str(site / "certs" / "server.crt")  # default certs_dir: next to the file
        await proxy.wait_event("listening")
        assert (site / "state" / "queue.sqlite3").exists()
        assert await proxy.stop() == 0
    assert list(elsewhere.iterdir()) == []  # nothing landed in the working directory
    text = config.read_text().replace('tls = "detect"', 'tls = "on"\ncert = "tls/gw.crt"\nkey = "tls/gw.key"')
    parsed = loads(text, base_dir=site)
    assert (parsed.server.cert, parsed.offline.data_dir) == (str(site / "tls" / "gw.crt"), str(site / "state"))
    assert parsed.backend.password == "s3cret-from-file"
    # Tables left out have their defaults under the same rule.
    bare = loads('[backend]\nurl = "ws://127.0.0.1:9/ocpp"\n[[chargers]]\nid = "CP1"\n', base_dir=site)
    assert (bare.offline.data_dir, bare.server.certs_dir) == (str(site / "data"), str(site / "certs"))


def test_the_path_rule_is_documented() -> None:
    reference = (ROOT / "docs" / "config.md").read_text()
    assert "relative to the directory of the config file" in reference
    for key in ("`cert`", "`key`", "`certs_dir`", "`data_dir`", "`client_ca`", "`<key>_file`"):
        assert key in reference.split("## ")[0], key  # in the introduction, where the rule is stated


# --- 3. the certs CLI never replaces a key without --force ----------------------------------

def test_init_ca_twice_refuses_and_keeps_the_key(tmp_path: Path) -> None:
    assert cli("certs", "init-ca", "--dir", "ca", cwd=tmp_path).returncode == 0
    key = (tmp_path / "ca" / "ca.key").read_bytes()
    cert = (tmp_path / "ca" / "ca.crt").read_bytes()
    again = cli("certs", "init-ca", "--dir", "ca", cwd=tmp_path)
    assert again.returncode == 2
    assert "ca/ca.key exists; not replaced" in again.stderr and "--force" in again.stderr
    assert (tmp_path / "ca" / "ca.key").read_bytes() == key and (tmp_path / "ca" / "ca.crt").read_bytes() == cert
    assert cli("certs", "server", "--dir", "ca", "--san", "gw.local", cwd=tmp_path).returncode == 0
    server_key = (tmp_path / "ca" / "server.key").read_bytes()
    refused = cli("certs", "server", "--dir", "ca", "--san", "gw.local", cwd=tmp_path)
    assert refused.returncode == 2 and (tmp_path / "ca" / "server.key").read_bytes() == server_key
    forced = cli("certs", "init-ca", "--dir", "ca", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and (tmp_path / "ca" / "ca.key").read_bytes() != key


def test_certs_server_without_san_says_localhost_only(tmp_path: Path) -> None:
    assert cli("certs", "init-ca", "--dir", "ca", cwd=tmp_path).returncode == 0
    result = cli("certs", "server", "--dir", "ca", cwd=tmp_path)
    assert result.returncode == 0
    assert "valid for the name localhost only" in result.stderr and "--san" in result.stderr
    with_san = cli("certs", "client", "--dir", "ca", "--id", "CP1", cwd=tmp_path)
    assert "localhost" not in with_san.stderr


def test_certs_option_errors_name_the_option(tmp_path: Path) -> None:
    result = cli("certs", "init-ca", "--dir", "ca", "--C", "Germany", cwd=tmp_path)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "error: --C 'Germany': Attribute's length must be >= 2 and <= 2, but it was 7 (two letters, e.g. DE)"]
    assert not (tmp_path / "ca").exists()
    days = cli("certs", "init-ca", "--help")
    assert re.search(r"--days N\s+validity in days from now \(default: 3650\)", days.stdout), days.stdout
    assert "(default: 825)" in cli("certs", "client", "--help").stdout


# --- 6. start-up errors name key and value -------------------------------------------------------

async def test_port_in_use_names_the_key_and_port(tmp_path: Path) -> None:
    taken = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = taken[0].socket.getsockname()[1]
    for key, text in (("server.listen", f'[server]\nlisten = "127.0.0.1:{port}"\n[metrics]\nlisten = ""\n'),
                      ("metrics.listen", f'[server]\nlisten = "127.0.0.1:0"\n[metrics]\nlisten = "127.0.0.1:{port}"\n')):
        config = tmp_path / "site.toml"
        config.write_text(text + f'[log]\nformat = "json"\n[offline]\ndata_dir = "{tmp_path}/data"\n')
        assert (await trio.to_thread.run_sync(lambda: cli("check-config", str(config)))).returncode == 0
        result = await trio.to_thread.run_sync(lambda: cli("run", "--config", str(config)))
        assert result.returncode == 1
        (failed,) = [e for e in map(json.loads, result.stderr.splitlines()) if e["event"] == "startup_failed"]
        assert failed["key"] == key and failed["value"] == f"127.0.0.1:{port}"
        assert failed["error"].startswith(f"{key} = '127.0.0.1:{port}': port {port} is already in use")
    for listener in taken:
        await listener.aclose()


def test_an_unusable_data_dir_names_the_key(tmp_path: Path) -> None:
    """A file in the way, a database that is not one: check-config and run name the key."""
    (tmp_path / "data").write_text("not a directory")
    config = tmp_path / "site.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\n[metrics]\nlisten = ""\n[log]\nformat = "json"\n'
                      f'[offline]\ndata_dir = "data"\n')
    refused = cli("run", "--config", str(config))
    assert refused.returncode == 2
    assert error_lines(refused.stderr) == [f"error: {config}:8: offline.data_dir: {tmp_path}/data "
                                           f"is not a directory (for the offline queue)"]
    (tmp_path / "data").unlink()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "queue.sqlite3").write_text("this is no SQLite database " * 100)
    for command in (["check-config", str(config)], ["run", "--config", str(config)]):
        refused = cli(*command)
        assert refused.returncode == 2
        (line,) = error_lines(refused.stderr)
        assert line.startswith(f"error: {config}:8: offline.data_dir: {tmp_path}/data/queue.sqlite3: cannot be "
                               "used (file is not a database); move it away"), line


# --- 7. smaller -----------------------------------------------------------------------------------

def test_top_level_help_lists_every_command_without_markup() -> None:
    result = cli("--help")
    assert result.returncode == 0 and "``" not in result.stdout
    for command in ("run", "reload", "check-config", "certs", "demo"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), command
    assert "``" not in cli("certs", "--help").stdout


def test_config_messages(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text('[backend]\nurl = "http://csms.example/ocpp"\n[[chargers]]\nid = "CP1"\nmax_curent = 16\n'
                      'password = "0123456789abcdef0123"\n'
                      '[sever]\nlisten = "0.0.0.0:1"\n')
    result = cli("check-config", str(config))
    assert result.returncode == 2
    assert error_lines(result.stderr) == [  # one error for the http:// URL, not three
        f"error: {config}:2: backend.url: must be a ws:// or wss:// URL, got 'http://csms.example/ocpp' "
        "(for a WebSocket backend write ws://)",
        f"error: {config}:5: chargers[0].max_curent: unknown key; did you mean max_current?",
        f"error: {config}:7: sever: unknown key; did you mean server?",
    ]
    config.write_text(f'[backend]\nurl = "ws://csms.example/ocpp"\n[offline]\ndata_dir = "{tmp_path}/d"\n'
                      '[server]\npassword = "0123456789abcdef0123"\n[[chargers]]\nid = "CP1"\n')
    assert cli("check-config", str(config)).stdout.strip() == f"{config}: OK (1 charger)"
    config.write_text(config.read_text() + '[[chargers]]\nid = "CP2"\n')
    assert cli("check-config", str(config)).stdout.strip() == f"{config}: OK (2 chargers)"
