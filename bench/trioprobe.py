"""Run a trio program with an instrument that counts scheduler passes and task steps (for bench/wakeups.py).

    TRIOPROBE_OUT=FILE python bench/trioprobe.py python -m proxy run --config FILE
    TRIOPROBE_OUT=FILE python bench/trioprobe.py python -m bench.floor PORT URL

It runs as a script (not ``-m bench.trioprobe``), like bench/memprobe.py, so a
baseline checkout on PYTHONPATH runs under the same probe. Every ``trio.run``
gets a :class:`Counter` instrument. SIGUSR2 zeroes the counters; SIGUSR1 writes
them to ``TRIOPROBE_OUT`` (JSON) and then creates ``TRIOPROBE_OUT.done``.
Standard library and trio only.

Counted: the garbage collector's runs by generation and their time; scheduler passes that waited for I/O (``after_io_wait``), task steps
(``before_task_step``), steps per task (by coroutine name), and the time from
each wake-up to the next wait (``after_io_wait`` → ``before_io_wait``: the
Python work of one pass, which at one wallbox is the relay's share of a round
trip's latency). The instrument's own calls are in that time too, the same for
every checkout.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import trio

_perf = time.perf_counter
#: Samples kept per window (the medians are of these).
LIMIT = 200_000


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


class Counter(trio.abc.Instrument):
    """Scheduler passes, task steps and busy time, zeroed on SIGUSR2."""

    def __init__(self) -> None:
        self.zero()

    def zero(self) -> None:
        self.unsent = 0.0
        self.passes = 0
        self.steps = 0
        self.by_task: collections.Counter[str] = collections.Counter()
        self.busy = 0.0
        self.woke = 0.0
        #: Per pass: wake-up → the first frame handed to the socket (proxy.wire's WsConnection._send_now).
        self.to_send: list[float] = []
        #: Per pass: wake-up → next wait.
        self.pass_times: list[float] = []
        #: The cyclic garbage collector's runs by generation, and the seconds they took.
        self.collections = [0, 0, 0]
        self.collecting = 0.0
        self._gc_started = 0.0

    def after_io_wait(self, timeout: float) -> None:
        self.passes += 1
        self.woke = self.unsent = _perf()

    def sending(self) -> None:
        """A frame is about to be written: the first since the wake-up ends the pass's latency share."""
        if self.unsent:
            if len(self.to_send) < LIMIT:
                self.to_send.append(_perf() - self.unsent)
            self.unsent = 0.0

    def before_io_wait(self, timeout: float) -> None:
        if self.woke:
            took = _perf() - self.woke
            self.busy += took
            if len(self.pass_times) < LIMIT:
                self.pass_times.append(took)
            self.woke = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        self.by_task[task.coro.cr_code.co_qualname if hasattr(task.coro, "cr_code") else task.name] += 1

    def gc_phase(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = _perf()
        elif self._gc_started:
            self.collecting += _perf() - self._gc_started
            self.collections[info["generation"]] += 1
            self._gc_started = 0.0

    def facts(self) -> dict[str, Any]:
        return {"passes": self.passes, "steps": self.steps, "busy_seconds": self.busy,
                "to_send_p50": _median(self.to_send), "pass_p50": _median(self.pass_times),
                "steps_by_task": dict(self.by_task.most_common(20)),
                "collections": self.collections, "collecting_seconds": self.collecting}


COUNTER = Counter()


def _zero(_signum: int, _frame: FrameType | None) -> None:
    COUNTER.zero()


def _write(_signum: int, _frame: FrameType | None) -> None:
    out = Path(os.environ["TRIOPROBE_OUT"])
    out.write_text(json.dumps(COUNTER.facts()))
    Path(str(out) + ".done").touch()


def _watch_sends() -> None:
    """Time the first frame written after each wake-up (the relay's own wire layer, if it has one)."""
    sys.path.insert(0, os.getcwd())
    try:
        from proxy.wire.connection import WsConnection
    except ImportError:
        return
    send_now = WsConnection._send_now

    def timed(self: Any, raw: Any, data: bytes) -> int:
        COUNTER.sending()
        return send_now(self, raw, data)

    WsConnection._send_now = timed  # type: ignore[method-assign]


def main() -> None:
    command = sys.argv[1:]
    if len(command) < 3 or command[1] != "-m":
        raise SystemExit("usage: trioprobe.py PYTHON -m MODULE ARGS...")
    original = trio.run

    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = [*kwargs.get("instruments", ()), COUNTER]
        return original(*args, **kwargs)

    trio.run = run  # type: ignore[assignment]
    _watch_sends()
    gc.callbacks.append(COUNTER.gc_phase)
    signal.signal(signal.SIGUSR2, _zero)
    signal.signal(signal.SIGUSR1, _write)
    sys.argv = [command[2], *command[3:]]
    sys.path.insert(0, os.getcwd())
    runpy.run_module(command[2], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
