"""Run ``python -m proxy ...`` counting the garbage collector's passes between SIGUSR1 and SIGUSR2.

    python bench/gcprobe.py OUT.json python -m proxy run --config FILE

For bench/gc_passes.py. It runs as a script (not ``-m bench.gcprobe``), so a
baseline checkout on PYTHONPATH runs its proxy under the same probe. Standard
library only. SIGUSR1 zeroes the counts and starts counting (a ``gc.callbacks``
hook: passes, seconds and objects collected per generation); SIGUSR2 stops and
writes them to OUT.json with the thresholds in force and the tracked objects.
A Python-level signal handler runs in the main thread between bytecodes.
"""

from __future__ import annotations

import gc
import json
import runpy
import signal
import sys
import time
from types import FrameType
from typing import Any

_counting = False
_started = 0.0
_passes = [0, 0, 0]
_seconds = [0.0, 0.0, 0.0]
_collected = [0, 0, 0]
_out = ""


def _callback(phase: str, info: dict[str, Any]) -> None:
    global _started
    if not _counting:
        return
    if phase == "start":
        _started = time.perf_counter()
        return
    generation = info["generation"]
    _passes[generation] += 1
    _seconds[generation] += time.perf_counter() - _started
    _collected[generation] += info["collected"]


def _start(signum: int, _frame: FrameType | None) -> None:
    global _counting
    for counts in (_passes, _seconds, _collected):
        counts[:] = [0, 0, 0]
    _counting = True


def _stop(signum: int, _frame: FrameType | None) -> None:
    global _counting
    _counting = False
    result = {"passes": _passes, "seconds": _seconds, "collected": _collected,
              "threshold": gc.get_threshold(), "tracked": len(gc.get_objects())}
    with open(_out, "w") as out:
        json.dump(result, out)


def main() -> None:
    global _out
    _out = sys.argv[1]  # before the proxy's module takes sys.argv over
    gc.callbacks.append(_callback)
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
    module = sys.argv[sys.argv.index("-m") + 1]
    sys.argv = [module, *sys.argv[sys.argv.index("-m") + 2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
