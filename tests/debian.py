"""Test support: a Debian package a test needs, installed on first use (apt-get, as root).

A test that needs a program from Debian (Chromium for the status page, HAProxy for the cluster)
calls :func:`ensure_program`. On a fresh machine it installs the package once, under a file lock
so parallel test runs do not race. Where it cannot (not root, no apt-get, the install fails) it
fails the test naming what to install: such a test never skips.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

INSTALL_TIMEOUT = 1200


def ensure_program(package: str, find: Callable[[], str | None], hint: str) -> str:
    """The program's path from ``find``; installs Debian's ``package`` when it is missing and we may.

    ``hint`` says which test needs it and what to install; it starts every failure message.
    """
    found = find()
    if found:
        return found
    problems: list[str] = []
    lock = Path(tempfile.gettempdir()) / f"ocpp-proxy-{package}-install.lock"
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another test run may be installing it right now
        found = find()
        if found:
            return found
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.fail(f"{hint}; not root or no apt-get here, so the test cannot install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, env=env,
                                      check=False)
            except subprocess.TimeoutExpired:
                problems.append(f"{' '.join(command)}: no result after {INSTALL_TIMEOUT} s")
                break
            if done.returncode != 0:
                problems.append(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
                break
    found = find()
    if found is None:
        pytest.fail(f"{hint}; installing it failed: {'; '.join(problems) or f'no {package} afterwards'}")
    return found
