"""Memory per idle paired connection, counted by tracemalloc: this checkout vs a baseline, one run.

    python -m bench.idle_memory [--baseline DIR] [--pairs 1000] [--frames 12] [--top 25]

RSS (``python -m bench --only idle``) moves with allocator fragmentation and the
machine; the bytes Python allocated for N idle pairs do not. For each checkout
a fresh ``python -m proxy run`` (the same config as ``python -m bench``) runs
under ``bench/memprobe.py`` with tracemalloc on. Snapshots are taken with no
wallbox, after N wallboxes connected and paired (every upstream handshake seen
by the backend), and after every wallbox made one round trip (Heartbeat or
MeterValues) and went idle again; each once the proxy has settled
(:meth:`ProbedProxy.settle`), not after a fixed sleep. Printed per pair: traced bytes, trio tasks,
objects by type (the garbage collector's view), RSS, and the allocation sites
that grew most (innermost line, and the first line in ``proxy/`` on the way).
Checkouts are run one after the other; the counts do not depend on the load.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import sys
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

from bench.procs import ROOT, Backend, LoadGen, OcppProxy, workdir
from bench.sysinfo import load_average, machine, raise_nofile

PROBE = Path(__file__).resolve().parent / "memprobe.py"
STAGES = ("connected", "after one round trip")


@dataclass
class Stage:
    """One snapshot's facts, and the snapshot."""

    facts: dict[str, Any]
    snapshot: tracemalloc.Snapshot


class ProbedProxy(OcppProxy):
    """The proxy of ``root`` under the probe; :meth:`probe` takes a snapshot and waits for it."""

    def __init__(self, work: Path, root: Path, name: str, frames: int) -> None:
        self.out = work / f"probe-{name}"
        self.out.mkdir(parents=True, exist_ok=True)
        super().__init__(work, root, name, start_timeout=60.0,
                         wrapper=["env", f"MEMPROBE_FRAMES={frames}", sys.executable, str(PROBE), str(self.out)])
        self.taken = 0
        self.counted = 0

    def probe(self, timeout: float = 120.0) -> Stage:
        self.taken += 1
        facts = self._ask(signal.SIGUSR1, f"{self.taken}", timeout)
        return Stage(facts, tracemalloc.Snapshot.load(str(self.out / f"{self.taken}.snapshot")))

    def settle(self, reads: int = 5, interval: float = 0.2, timeout: float = 120.0) -> None:
        """Until ``reads`` reads in a row, ``interval`` apart, find the same trio tasks (by coroutine) and
        nothing in the session log's write-behind: start-up, the pairs' set-up, the round trips' log
        entries are done. A snapshot after a guessed sleep counted a task still starting on a loaded
        machine (2.75 tasks per pair for 3)."""
        deadline = time.monotonic() + timeout
        seen: list[Any] = []
        while len(seen) < reads or any(read != seen[-1] for read in seen[-reads:]) or seen[-1][1]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: tasks still changing after {timeout} s: {seen[-reads:]}")
            if seen:
                time.sleep(interval)
            self.counted += 1
            facts = self._ask(signal.SIGUSR2, f"tasks-{self.counted}", deadline - time.monotonic())
            seen.append((facts["tasks_by_coroutine"], facts["session_log_waiting"]))

    def _ask(self, signum: signal.Signals, name: str, timeout: float) -> dict[str, Any]:
        """Send ``signum`` to the probe and wait for its answer ``OUTDIR/<name>.json``."""
        assert self.process is not None
        done = self.out / f"{name}.done"
        self.process.send_signal(signum)
        deadline = time.monotonic() + timeout
        while not done.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no answer to {signum.name} within {timeout:.0f} s")
            time.sleep(0.05)
        facts: dict[str, Any] = json.loads((self.out / f"{name}.json").read_text())
        return facts


def _wait_paired(backend: Backend, count: int, timeout: float) -> None:
    """Until the backend has seen ``count`` upstream handshakes (the loadgen's 101 may come first)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        seen |= set(backend.accepted())
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(seen)} of {count} pairs after {timeout} s")
        time.sleep(0.2)


def measure(root: Path, name: str, backend: Backend, pairs: int, frames: int, work: Path) -> list[Stage]:
    """Snapshots of a fresh proxy: idle, ``pairs`` connected, after one round trip each."""
    proxy = ProbedProxy(work, root, name, frames)
    proxy.server_extra = "ping_interval = 3600\n"  # the steady state between pings; no round mid-snapshot
    try:
        proxy.start(backend.port, 0)  # inside: a proxy that does not come up is stopped too
        proxy.settle()  # start-up tasks end (first metrics scrape, store opened)
        stages = [proxy.probe()]
        backend.accepted()  # forget earlier handshakes
        gen = LoadGen(proxy.targets(pairs), concurrency=50)  # traced handshakes are slow: none may time out
        try:
            opened = gen.connected(timeout=120 + pairs / 20)
            if opened["failures"]:
                raise RuntimeError(f"{len(opened['failures'])} failed: {opened['failures'][:3]}")
            _wait_paired(backend, pairs, 120)
            proxy.settle()
            stages.append(proxy.probe())
            gen.send("load " + json.dumps({"mode": "once", "duration": 60.0, "warmup": 0.0, "grace": 60.0}))
            load = gen.read_json(180)
            if load["unanswered"]:
                raise RuntimeError(f"{load['unanswered']} CALLs unanswered")
            # The session log reads relayed transaction frames in batches (LATER_INTERVAL, 1 s) and
            # commits them behind: wait for that too, or its pending frames count as the pairs'.
            proxy.settle()
            stages.append(proxy.probe())
        finally:
            gen.close()
    finally:
        proxy.stop()
    return stages


def _function_at(path: str, lineno: int) -> str:
    """``Class.method`` holding line ``lineno`` of ``path`` (names survive the package move, paths do not)."""
    defs = _DEFS.get(path)
    if defs is None:
        defs = _DEFS[path] = []
        try:
            tree = ast.parse(Path(path).read_text())
        except (OSError, SyntaxError):
            tree = ast.Module(body=[], type_ignores=[])

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = prefix + child.name
                    defs.append((child.lineno, child.end_lineno or child.lineno, name))
                    walk(child, name + ".")
        walk(tree, "")
    inside = [(start, name) for start, end, name in defs if start <= lineno <= end]
    return max(inside)[1] if inside else f"<module {Path(path).stem}>"


_DEFS: dict[str, list[tuple[int, int, str]]] = {}


def _proxy_function(trace: tracemalloc.Traceback) -> str:
    """The innermost function of the proxy package on the way to an allocation."""
    for frame in reversed(trace):  # a Traceback lists the oldest frame first
        path = frame.filename
        if "/proxy/" in path and "site-packages" not in path:
            return _function_at(path, frame.lineno)
    return f"(no proxy frame) {_short(trace[-1].filename)}:{trace[-1].lineno}" if len(trace) else "?"


def _line(trace: tracemalloc.Traceback) -> str:
    return f"{_short(trace[-1].filename)}:{trace[-1].lineno}" if len(trace) else "?"


def _short(path: str) -> str:
    for marker in ("/proxy/", "/site-packages/", "/lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1] if marker != "/proxy/" else "proxy/" + path.split(marker, 1)[1]
    return path


def growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, pairs: int,
           key: Callable[[tracemalloc.Traceback], str]) -> dict[str, tuple[float, float]]:
    """Site -> (bytes per pair, blocks per pair) that ``after`` holds more than ``before``."""
    sizes: Counter[str] = Counter()
    blocks: Counter[str] = Counter()
    for sign, snapshot in ((-1, before), (1, after)):
        for stat in snapshot.statistics("traceback"):
            site = key(stat.traceback)
            sizes[site] += sign * stat.size
            blocks[site] += sign * stat.count
    return {site: (sizes[site] / pairs, blocks[site] / pairs) for site in sizes}


def _per_pair(stages: list[Stage], key: str, pairs: int) -> list[float]:
    return [(stage.facts[key] - stages[0].facts[key]) / pairs for stage in stages[1:]]


def _counted(stages: list[Stage], fact: str, index: int, pairs: int) -> dict[str, float]:
    after = Counter(stages[index].facts[fact])
    after.subtract(Counter(stages[0].facts[fact]))
    return {k: v / pairs for k, v in after.items() if v}


def _side_by_side(title: str, columns: dict[str, dict[str, float]], top: int, fmt: str) -> list[str]:
    """Rows with the largest difference between the first and the last column first."""
    names = list(columns)
    keys = set().union(*columns.values())
    first, last = columns[names[0]], columns[names[-1]]
    if len(names) > 1:
        ordered = sorted(keys, key=lambda k: (-abs(last.get(k, 0) - first.get(k, 0)), k))[:top]
    else:
        ordered = sorted(keys, key=lambda k: (-abs(first[k]), k))[:top]
    lines = ["", title, "", "| | " + " | ".join(names) + (" | difference |" if len(names) > 1 else " |"),
             "|---|" + "---:|" * (len(names) + (len(names) > 1))]
    for k in ordered:
        cells = [fmt.format(columns[n].get(k, 0)) for n in names]
        if len(names) > 1:
            cells.append(("+" if last.get(k, 0) >= first.get(k, 0) else "") + fmt.format(last.get(k, 0) - first.get(k, 0)))
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    return lines


def report(runs: dict[str, list[Stage]], pairs: int, top: int) -> str:
    info = machine(None)
    lines = [f"# Memory per idle pair, tracemalloc ({pairs} pairs)", "",
             f"machine: {info.get('cpu_model', '?')}, {info.get('cores', '?')} cores, Python "
             f"{sys.version.split()[0]}, trio {info['libraries'].get('trio', '?')}; load average "
             + " ".join(f"{x:.2f}" for x in load_average()), ""]
    names = list(runs)
    lines.append("| per pair | " + " | ".join(f"{n}: {s}" for n in names for s in STAGES) + " |")
    lines.append("|---|" + "---:|" * (len(names) * len(STAGES)))
    for label, key, scale, fmt in (("traced bytes (tracemalloc)", "traced_bytes", 1, "{:,.0f}"),
                                   ("traced KiB", "traced_bytes", 1024, "{:.2f}"),
                                   ("RSS KiB (tracemalloc on: noisy)", "rss_bytes", 1024, "{:.1f}"),
                                   ("trio tasks", "tasks", 1, "{:.2f}")):
        cells = [fmt.format(v / scale) for n in names for v in _per_pair(runs[n], key, pairs)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for index, stage in enumerate(STAGES, start=1):
        lines += _side_by_side(f"## {stage}: bytes per pair by the innermost proxy function on the way",
                               {n: {k: v[0] for k, v in growth(runs[n][0].snapshot, runs[n][index].snapshot,
                                                                  pairs, _proxy_function).items()}
                                for n in names}, top, "{:.0f}")
    last = len(STAGES)
    lines += _side_by_side("## trio tasks per pair, by coroutine (idle after a round trip)",
                           {n: _counted(runs[n], "tasks_by_coroutine", last, pairs) for n in names}, top, "{:.2f}")
    lines += _side_by_side("## objects per pair by type, garbage collector's view (idle after a round trip)",
                           {n: _counted(runs[n], "objects_by_type", last, pairs) for n in names}, top, "{:.2f}")
    for name in names:
        lines += _side_by_side(f"## {name}: bytes per pair by allocating line (idle after a round trip)",
                               {name: {k: v[0] for k, v in growth(runs[name][0].snapshot, runs[name][last].snapshot,
                                                                     pairs, _line).items()}}, top, "{:.0f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout, measured the same way first")
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=12, help="traceback depth kept by tracemalloc")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    raise_nofile()
    work = workdir()
    backend = Backend()
    runs: dict[str, list[Stage]] = {}
    try:
        if args.baseline:
            runs["baseline"] = measure(args.baseline.resolve(), "baseline", backend, args.pairs, args.frames, work)
        runs["proxy"] = measure(ROOT, "proxy", backend, args.pairs, args.frames, work)
    finally:
        backend.stop()
    text = report(runs, args.pairs, args.top)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
