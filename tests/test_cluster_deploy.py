"""deploy/haproxy.cfg, deploy/compose.cluster.yml and deploy/cluster.toml are valid and agree (issue 22).

Docker cannot run where the tests run: the compose file is parsed and checked against the other
files it names; HAProxy's own parser (``haproxy -c``) checks the shipped configuration, with only
its /etc/haproxy paths pointing at this test's files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load
from tests.haproxykit import BINDS, DEPLOYED, Upstream, check_config, render, write_certs

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.cluster.yml"
PROXIES = ("proxy1", "proxy2")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_the_shipped_haproxy_cfg_passes_haproxys_own_check(tmp_path: Path) -> None:
    write_certs(tmp_path)
    (tmp_path / "chargers.map").write_text((DEPLOY / "chargers.map").read_text())
    shipped = DEPLOYED.read_text().replace("/etc/haproxy/", f"{tmp_path}/")
    checked = check_config(shipped, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Configuration file is valid" in checked.stdout + checked.stderr
    # The proxies' names do not resolve here; in compose they do. Nothing else may be warned about.
    warnings = [line for line in checked.stderr.splitlines() if "[WARNING]" in line]
    assert all("could not resolve address 'proxy" in line for line in warnings), warnings


def test_the_rendered_test_configuration_passes_too(tmp_path: Path) -> None:
    write_certs(tmp_path)
    (tmp_path / "chargers.map").write_text("CP1 site-a\n")
    ports = {name: 20000 + i for i, name in enumerate(BINDS)}
    text = render([Upstream("proxy1", 30001, 30002), Upstream("proxy2", 30003, 30004)], ports, tmp_path)
    checked = check_config(text, tmp_path)
    assert checked.returncode == 0 and "[WARNING]" not in checked.stderr, checked.stderr
    assert "balance hash var(txn.route)" in text and "127.0.0.1:30003 port 30004" in text


def test_a_broken_haproxy_cfg_is_refused(tmp_path: Path) -> None:
    """The check above can fail: HAProxy's parser refuses a configuration with a wrong keyword."""
    write_certs(tmp_path)
    (tmp_path / "chargers.map").touch()
    broken = DEPLOYED.read_text().replace("/etc/haproxy/", f"{tmp_path}/").replace("timeout tunnel", "timeout tunel")
    assert check_config(broken, tmp_path).returncode != 0


def test_haproxy_cfg_routes_by_charger_checks_readyz_and_keeps_websockets_open() -> None:
    text = DEPLOYED.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "option httpchk GET /readyz" in lines and "http-check expect status 200" in lines
    assert any(line.startswith("default-server check port 9520") for line in lines)
    tunnel = next(line for line in lines if line.startswith("timeout tunnel"))
    assert re.fullmatch(r"timeout tunnel (\d+)m", tunnel) and int(tunnel.split()[2][:-1]) >= 1
    assert "hash-type consistent" in lines and "option redispatch" in lines
    assert any(line.startswith("bind :443 ssl") and "verify required" in line for line in lines)
    assert "mode tcp" in lines and "balance source" in lines


def test_compose_runs_two_proxies_haproxy_and_postgres() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "haproxy", *PROXIES}
    for name in PROXIES:
        proxy = services[name]
        assert proxy["build"] == {"context": "..", "dockerfile": "Dockerfile"}
        assert "./cluster.local.toml:/config/ocpp-proxy.toml:ro" in proxy["volumes"]
        assert "./proxy-certs:/tls:ro" in proxy["volumes"]  # one certificate for both (TLS passed through)
        assert proxy["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert proxy["hostname"] == name
    # Each proxy keeps its own /data.
    data = [next(v for v in services[name]["volumes"] if v.endswith(":/data")) for name in PROXIES]
    assert len(set(data)) == 2
    haproxy = services["haproxy"]
    assert haproxy["image"].startswith("haproxy:2.6")
    assert "./haproxy.cfg:/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    assert "./chargers.map:/etc/haproxy/chargers.map:ro" in haproxy["volumes"]
    # What HAProxy listens on is what compose publishes; the proxies publish nothing.
    binds = {port for port in re.findall(r"^\s*bind :(\d+)", DEPLOYED.read_text(), flags=re.MULTILINE)}
    published = {str(p).rsplit(":", 1)[-1] for p in haproxy["ports"]}
    assert binds == published
    assert all("ports" not in services[name] for name in PROXIES)
    # HAProxy's servers are the compose services, on the proxies' wallbox port.
    servers = set(re.findall(r"^\s*server (\S+) (\S+)$", DEPLOYED.read_text(), flags=re.MULTILINE))
    assert servers == {(name, f"{name}:19520") for name in PROXIES}
    assert services["postgres"]["image"].startswith("postgres:")


def test_cluster_toml_is_a_valid_config_for_the_compose_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCPP_PROXY_STORE_URL", "postgresql://ocpp:pw@postgres/ocpp")
    for name in re.findall(r'password_env = "(\w+)"', (DEPLOY / "cluster.toml").read_text()):
        monkeypatch.setenv(name, "a-long-enough-wallbox-password")
    config = load(str(DEPLOY / "cluster.toml"))
    assert config.store.url == "postgresql://ocpp:pw@postgres/ocpp"
    assert config.server.listen == "0.0.0.0:19520" and config.server.tls == "detect"
    assert config.server.cert == "/tls/server.crt" and config.server.key == "/tls/server.key"
    assert config.metrics.listen == "0.0.0.0:9520"  # the port of HAProxy's check
    # HAProxy marks a proxy down after fall x inter (2 x 1 s) of 503: the grace must be longer.
    assert config.server.drain_grace > 2
    assert config.server.per_address_rate == 0 and config.server.per_address_pending == 0


def test_the_image_has_the_postgres_driver() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "'.[postgres]'" in dockerfile and "[postgres]\"" in dockerfile


def test_haproxy_offers_wallboxes_the_cipher_suites_the_proxy_offers() -> None:
    from proxy.wire.tls import WHITEPAPER_CIPHERS

    lines = [line.split() for line in DEPLOYED.read_text().splitlines() if line.strip().startswith("ssl-default-bind")]
    settings = {words[0]: words[1:] for words in lines}
    assert settings["ssl-default-bind-ciphers"] == [WHITEPAPER_CIPHERS]
    assert settings["ssl-default-bind-options"][:2] == ["ssl-min-ver", "TLSv1.2"]


def test_check_config_passes_cluster_toml_with_its_certificate_in_place(tmp_path: Path) -> None:
    """What an operator runs before starting the cluster: ``ocpp-proxy check-config`` (preflight included)."""
    certs = write_certs(tmp_path)
    text = (DEPLOY / "cluster.toml").read_text().replace('"/tls/', f'"{certs}/').replace('"/data"',
                                                                                          f'"{tmp_path / "data"}"')
    config = tmp_path / "cluster.toml"
    config.write_text(text)
    env = {**os.environ, "OCPP_PROXY_STORE_URL": "postgresql://ocpp:pw@postgres/ocpp"}
    env.update({name: "a-long-enough-wallbox-password" for name in re.findall(r'password_env = "(\w+)"', text)})
    checked = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(config)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip().endswith("OK (2 chargers)")
