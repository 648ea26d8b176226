"""The Docker image's install steps, run without Docker (issue 8).

Docker is not available where the tests run, so this test reads the
Dockerfile, stages exactly what its build stage COPYs, runs its ``pip wheel``
command, installs the wheels into a fresh venv with its ``pip install``
command (no index: only the wheels the build produced), and runs the installed
console script outside the source tree.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

import proxy
from tests.test_dependencies import pins

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt '.[postgres]'"
INSTALL = 'pip install --no-cache-dir --no-index --find-links /wheels "$(ls /wheels/ocpp_proxy-*.whl)[postgres]"'


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in joined.splitlines() if line.strip()]


def build_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    starts = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    assert len(starts) == 2, "multi-stage: build and runtime"
    return instructions[starts[0]:starts[1]]


def stage_sources(target: Path) -> None:
    """Copy what the build stage's COPY instructions copy, relative to its WORKDIR."""
    for op, args in build_stage():
        if op != "COPY":
            continue
        *sources, dest = [word for word in shlex.split(args) if not word.startswith("--")]
        for source in sources:
            origin = ROOT / source
            assert origin.exists(), f"the Dockerfile copies {source}, which does not exist"
            if origin.is_dir():
                shutil.copytree(origin, target / dest, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                into_dir = dest.endswith("/") or dest == "."
                destination = target / dest / origin.name if into_dir else target / dest
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, destination)


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_dockerfile_runs_the_commands_this_test_runs() -> None:
    runs = [args for op, args in dockerfile_instructions() if op == "RUN"]
    assert any(WHEEL in r for r in runs) and any(INSTALL in r for r in runs)
    assert [args for op, args in build_stage() if op == "WORKDIR"] == ["/src"]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_like_the_image(tmp_path: Path) -> None:
    src, wheels, venv, elsewhere = (tmp_path / name for name in ("src", "wheels", "venv", "elsewhere"))
    stage_sources(src)
    elsewhere.mkdir()
    # Build stage: the proxy and every dependency as wheels.
    run([sys.executable, "-m", *shlex.split(WHEEL.replace("/wheels", str(wheels)))], cwd=src)
    built = sorted(p.name for p in wheels.glob("*.whl"))
    assert any(name.startswith(f"ocpp_proxy-{proxy.__version__}-") for name in built), built
    # Every dependency at exactly the version constraints.txt pins (the set CI tests).
    pinned = pins()
    versions = {canonicalize_name(n.split("-")[0]): n.split("-")[1] for n in built if not n.startswith("ocpp_proxy-")}
    assert versions and {n: pinned.get(n) for n in versions} == versions
    # Runtime stage: a clean interpreter environment and only those wheels.
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    pip = shlex.join([str(venv / "bin" / "python"), "-m"])
    run(["sh", "-c", f"{pip} {INSTALL.replace('/wheels', str(wheels))}"], cwd=elsewhere)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    script = str(venv / "bin" / "ocpp-proxy")
    version = run([script, "--version"], cwd=elsewhere, env=env)
    assert version.stdout.strip() == f"ocpp-proxy {proxy.__version__}"
    # The example as the image has it; its /data and /certs volumes stand in as directories here (check-config
    # checks they are writable, and / is not for a user other than root).
    example = (ROOT / "deploy" / "config.example.toml").read_text()
    example = example.replace('"/data"', f'"{tmp_path}/data"').replace('"/certs"', f'"{tmp_path}/certs"')
    (elsewhere / "ocpp-proxy.toml").write_text(example)
    checked = run([script, "check-config", str(elsewhere / "ocpp-proxy.toml")], cwd=elsewhere, env=env)
    assert checked.stdout.strip().endswith("OK (1 charger)")
    # The installed package is the venv's copy, not this source tree.
    where = run([str(venv / "bin" / "python"), "-c", "import proxy; print(proxy.__file__)"], cwd=elsewhere, env=env)
    assert where.stdout.strip().startswith(str(venv))
    # The PostgreSQL driver ([store] url, docs/cluster.md) is in the image, with its own libpq.
    driver = run([str(venv / "bin" / "python"), "-c", "import psycopg; print(psycopg.pq.__impl__)"],
                 cwd=elsewhere, env=env)
    assert driver.stdout.strip() == "binary"
    # The built-in wallbox maps are package data (proxy/modbus/wallboxes/*.toml): shipped in the wheel.
    maps = run([str(venv / "bin" / "python"), "-c", "from proxy.modbus.maps import WALLBOXES; print(sorted(WALLBOXES))"],
               cwd=elsewhere, env=env)
    assert "'alfen-eve-double'" in maps.stdout and "'heidelberg'" in maps.stdout and "'webasto-next'" in maps.stdout
    # So are the status page's files (proxy/ops/static): the monitor reads them when it is built.
    page = run([str(venv / "bin" / "python"), "-c", "from proxy.ops.monitor import STATIC, _static; "
                "print(sum(len(_static(name)) for name, _ in STATIC.values()))"], cwd=elsewhere, env=env)
    assert int(page.stdout) > 5000
    broken = elsewhere / "broken.toml"
    broken.write_text('[server]\nlisten = "nowhere"\n')
    refused = subprocess.run([script, "check-config", str(broken)], check=False, cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "server.listen" in refused.stderr
