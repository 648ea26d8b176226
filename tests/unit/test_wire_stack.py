"""One WebSocket stack on the proxy's path: its own, with trio-websocket only a test peer (issue 14)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Imports every module of the proxy package with trio_websocket made unimportable.
_IMPORT_ALL = """
import importlib, importlib.abc, pkgutil, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "trio_websocket" or name.startswith("trio_websocket."):
            raise ImportError(f"{name} imported at runtime")
        return None

sys.meta_path.insert(0, Refuse())
import proxy
names = [m.name for m in pkgutil.walk_packages(proxy.__path__, "proxy.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_no_proxy_module_imports_trio_websocket() -> None:
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) > 40  # every module was imported, not an empty walk


def test_trio_websocket_is_not_a_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [d.lower() for d in project["dependencies"]]
    assert not any(d.startswith("trio-websocket") for d in runtime)
    assert any(d.startswith("trio-websocket") for d in project["optional-dependencies"]["test"])
