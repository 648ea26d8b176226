"""The import contract (docs/design.md, "Package map"): the sans-IO boundary and the demo's place.

1. The sans-IO modules (:data:`SANS_IO`) import only each other and no event loop
   (trio, trio-websocket, asyncio), read statically from every ``import`` in
   their source, function-level ones included; and, in a fresh interpreter,
   importing all of them loads neither trio nor trio-websocket (which also
   catches a third-party package that pulls trio in).
2. The runtime never imports :mod:`proxy.demo`: no module outside it imports
   it, except ``ocpp-proxy demo`` (``proxy.cli.cmd_demo``, at call time); and
   importing every other module in a fresh interpreter loads no ``proxy.demo``.
3. The demo's peers (``proxy/demo/peers*.py``) import nothing from ``proxy``
   but each other: a test against them is a test against an implementation
   that shares no code with the proxy.
4. The listener contract (docs/design.md): outside the session itself, no code
   assigns to a session's attributes (``x.session.observe = ...``,
   ``session.mirrors[...] = ...``); what a listener observes or rewrites goes
   through ``Session.tap``. The relay, the session's owner, records the
   transaction ids a replay taught it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "proxy"

#: Modules (or whole packages, ending in ".") that take events and return actions: no sockets,
#: no event loop, no clock of their own. Storage is synchronous SQLite behind one interface;
#: only its trio adapter (offline_queue.AsyncQueue) is outside.
SANS_IO = (
    "proxy.core.",
    "proxy.messages.",
    "proxy.config.",
    "proxy.loadmgmt.",
    "proxy.wire.codec",
    "proxy.wire.closecodes",
    "proxy.storage.interface",
    "proxy.storage.secondary_store",
    "proxy.ops.health",
    "proxy.modbus.registers",
    "proxy.modbus.maps",
    "proxy.modbus.wallboxmap",
    "proxy.modbus.chargepoint",
)
#: The trio edge inside a sans-IO package: it feeds the package's objects from the sessions.
EDGES = frozenset({"proxy.loadmgmt.driver"})
#: What a sans-IO module may not import directly (an event loop or an I/O framework).
EVENT_LOOPS = frozenset({"trio", "trio_websocket", "asyncio"})
#: The one place the runtime reaches the demo: the ``demo`` subcommand, when it runs.
DEMO_ENTRY = ("proxy.cli", "cmd_demo")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def sans_io(module: str) -> bool:
    if module in EDGES:
        return False
    return any(module.startswith(entry) if entry.endswith(".") else module == entry for entry in SANS_IO) \
        or f"{module}." in SANS_IO


class _Imports(ast.NodeVisitor):
    """Every import of a module with the function it sits in; ``if TYPE_CHECKING:`` blocks skipped."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.base = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, str | None]] = []
        self.function: str | None = None

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._in_function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._in_function(node)

    def _in_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer, self.function = self.function, self.function or node.name
        self.generic_visit(node)
        self.function = outer

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(alias.name, self.function) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.base.split(".")[: len(self.base.split(".")) - node.level + 1]
            target = ".".join([*base, node.module] if node.module else base)
        else:
            target = node.module or ""
        self.found.append((target, self.function))
        # ``from proxy.wire import codec`` imports the module proxy.wire.codec.
        self.found += [(f"{target}.{alias.name}", self.function) for alias in node.names
                       if f"{target}.{alias.name}" in MODULES]


def imports(module: str) -> list[tuple[str, str | None]]:
    """(imported module, enclosing top-level function or None) for every import in ``module``."""
    path = MODULES[module]
    visitor = _Imports(module, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.found


def loaded_after_import(modules: list[str]) -> set[str]:
    """Module names loaded by importing ``modules`` in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout))


def test_the_contract_names_only_existing_modules() -> None:
    """A renamed or moved module must not silently drop out of the contract."""
    for entry in SANS_IO:
        assert any(sans_io(m) for m in MODULES if m.startswith(entry.rstrip("."))), entry
    assert EDGES <= set(MODULES)
    assert DEMO_ENTRY[0] in MODULES and f"def {DEMO_ENTRY[1]}(" in MODULES[DEMO_ENTRY[0]].read_text()


def test_sans_io_modules_import_only_sans_io_modules_and_no_event_loop() -> None:
    offences = []
    for module in filter(sans_io, MODULES):
        for target, _ in imports(module):
            top = target.split(".")[0]
            if top in EVENT_LOOPS:
                offences.append(f"{module} imports {target}")
            elif top == "proxy" and target != "proxy" and target in MODULES and not sans_io(target):
                offences.append(f"{module} imports {target}, which is not sans-IO")
    assert offences == []


def test_importing_every_sans_io_module_loads_no_trio() -> None:
    sans = [m for m in MODULES if sans_io(m)]
    assert len(sans) >= 20  # the whole core, not an empty list
    loaded = loaded_after_import(sans)
    assert set(sans) <= loaded
    assert not {"trio", "trio_websocket"} & loaded, sorted({"trio", "trio_websocket"} & loaded)


def test_no_runtime_module_imports_the_demo() -> None:
    offences = []
    for module in MODULES:
        if module.startswith("proxy.demo"):
            continue
        for target, function in imports(module):
            if target.startswith("proxy.demo") and (module, function) != DEMO_ENTRY:
                offences.append(f"{module} imports {target}" + (f" in {function}()" if function else ""))
    assert offences == []


def test_importing_the_runtime_loads_no_demo_module() -> None:
    runtime = [m for m in MODULES if not m.startswith("proxy.demo") and m != "proxy.__main__"]
    loaded = loaded_after_import(runtime)
    assert "proxy.runtime.server" in loaded and "proxy.cli" in loaded
    assert sorted(m for m in loaded if m.startswith("proxy.demo")) == []


def test_the_demo_peers_share_no_code_with_the_proxy() -> None:
    peers = [m for m in MODULES if m.startswith("proxy.demo.peers")]
    assert peers
    for module in peers:
        shared = [t for t, _ in imports(module) if t.split(".")[0] == "proxy" and not t.startswith("proxy.demo.peers")]
        assert shared == [], module


#: (module, attribute) pairs allowed to be written from outside the session: its owner's.
SESSION_WRITES = frozenset({("proxy.runtime.relay", "transactions")})


def session_writes(module: str) -> list[tuple[str, int]]:
    """(attribute, line) of every assignment to ``<...>.session.<attr>`` or ``session.<attr>`` (or an item of it)."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        else:
            continue
        for target in targets:
            while isinstance(target, ast.Subscript):
                target = target.value
            if not isinstance(target, ast.Attribute):
                continue
            owner = target.value
            if (isinstance(owner, ast.Attribute) and owner.attr == "session") or \
                    (isinstance(owner, ast.Name) and owner.id == "session"):
                found.append((target.attr, node.lineno))
    return found


def test_no_listener_assigns_to_a_session() -> None:
    offences = [f"{module}:{line} writes session.{attr}" for module in MODULES if module != "proxy.core.session"
                for attr, line in session_writes(module) if (module, attr) not in SESSION_WRITES]
    assert offences == []
    assert [attr for attr, _ in session_writes("proxy.runtime.relay")] == ["transactions"]  # it sees writes
