"""Run ``python -m proxy ...`` with tracemalloc on and a snapshot on SIGUSR1 (for bench/idle_memory.py).

    MEMPROBE_FRAMES=12 python bench/memprobe.py OUTDIR python -m proxy run --config FILE

It runs as a script (not ``-m bench.memprobe``), so a baseline checkout on
PYTHONPATH, whose own ``bench`` package may differ, runs its proxy under the
same probe. Standard library only.

Tracing starts at the first SIGUSR1 (start-up under tracemalloc takes a
minute); the first snapshot is then the idle proxy with nothing traced yet,
and later ones hold what was allocated since and is still alive. On SIGUSR1 it
collects garbage and writes ``OUTDIR/<n>.snapshot`` (a
:class:`tracemalloc.Snapshot`) and ``OUTDIR/<n>.json``: traced bytes, the
number of trio tasks, live objects by type (the garbage collector's view), and
the process's RSS; then it creates ``OUTDIR/<n>.done``. On SIGUSR2 it writes only
the trio tasks, by coroutine, and what the session log's write-behind still
holds, to ``OUTDIR/tasks-<n>.json`` and creates
``OUTDIR/tasks-<n>.done``: cheap enough to ask again and again, so
bench/idle_memory.py snapshots once the tasks have settled instead of after a
guessed sleep. A Python-level signal
handler runs in the main thread between bytecodes, which is inside ``trio.run``,
so it may walk trio's task tree.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import runpy
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType
from typing import Any

_taken = 0
_counted = 0


def _tasks() -> tuple[int, collections.Counter[str]]:
    """How many trio tasks run, and by coroutine name (0 outside trio.run)."""
    try:
        import trio
        root = trio.lowlevel.current_root_task()
    except (ImportError, RuntimeError):
        return 0, collections.Counter()
    names: collections.Counter[str] = collections.Counter()
    todo = [root] if root is not None else []
    while todo:
        task = todo.pop()
        names[task.coro.cr_code.co_qualname if hasattr(task.coro, "cr_code") else task.name] += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return sum(names.values()), names


def _session_log_waiting() -> int:
    """Relayed frames and entries the store's write-behind has not committed yet (proxy.storage's
    ``AsyncQueue``; 0 in a checkout without one): until they are, they count as the pairs' memory."""
    waiting = 0
    for queue in gc.get_objects():
        if type(queue).__name__ == "AsyncQueue":
            waiting += (len(getattr(queue, "_later", ())) + len(getattr(queue, "_batch", ()))
                        + bool(getattr(queue, "_committing", False)))
    return waiting


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _snapshot(_signum: int, _frame: FrameType | None) -> None:
    global _taken
    _taken += 1
    out = Path(os.environ["MEMPROBE_OUT"])
    gc.collect()
    if not tracemalloc.is_tracing():  # from the first snapshot on: start-up under tracing is slow
        tracemalloc.start(int(os.environ.get("MEMPROBE_FRAMES", "12")))
    count, by_coro = _tasks()
    objects = gc.get_objects()
    types = collections.Counter(type(o).__qualname__ for o in objects)
    del objects
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.take_snapshot().dump(str(out / f"{_taken}.snapshot"))
    facts: dict[str, Any] = {"traced_bytes": current, "tasks": count, "tasks_by_coroutine": dict(by_coro),
                             "objects_by_type": dict(types),
                             "rss_bytes": _rss()}
    (out / f"{_taken}.json").write_text(json.dumps(facts))
    (out / f"{_taken}.done").touch()


def _count(_signum: int, _frame: FrameType | None) -> None:
    global _counted
    _counted += 1
    out = Path(os.environ["MEMPROBE_OUT"])
    count, by_coro = _tasks()
    facts = {"tasks": count, "tasks_by_coroutine": dict(by_coro), "session_log_waiting": _session_log_waiting()}
    (out / f"tasks-{_counted}.json").write_text(json.dumps(facts))
    (out / f"tasks-{_counted}.done").touch()


def main() -> None:
    out, command = sys.argv[1], sys.argv[2:]
    # command: [python, -m, proxy, run, ...]
    if len(command) < 3 or command[1] != "-m":
        raise SystemExit("usage: memprobe.py OUTDIR PYTHON -m MODULE ARGS...")
    os.environ["MEMPROBE_OUT"] = out
    signal.signal(signal.SIGUSR1, _snapshot)
    signal.signal(signal.SIGUSR2, _count)
    sys.path[0] = os.getcwd()  # as `python -m` would have it: the checkout, not bench/
    sys.argv = [command[2], *command[3:]]
    runpy.run_module(command[2], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
