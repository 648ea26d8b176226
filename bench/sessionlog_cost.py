"""The session log's own cost, in one process: CPU per logged frame and the event loop's longest stall.

    python -m bench.sessionlog_cost [--chargers 100] [--rate 1000] [--seconds 5] [--repeats 3] [--baseline DIR]

The relay's part of the log is :meth:`AsyncQueue.log_later` (a reference kept
per relayed transaction frame); the rest runs once a second in
:meth:`AsyncQueue.commit_behind`: reading the frames into entries and
committing them (SQLite, fsync) in the store's worker thread. This bench runs
exactly that code on a real SQLite file, without sockets, so what it measures
is the log and nothing else:

* the load: ``--chargers`` chargers, ``--rate`` logged frames per second in
  all (1000: the bench's worst case at 2000 CALL/s, every other CALL a 1 KiB
  MeterValues of a running transaction with an energy reading and a signed
  value; ``bench/loadgen.py``'s frame), fed in 1 ms ticks for ``--seconds``;
* **stall**: a task that sleeps 1 ms in a loop records how late it wakes
  (the longest is the longest time the event loop could not run a relayed
  frame), and a trio Instrument records the longest task step (wall time and
  the event loop thread's CPU time: a step that waited for the GIL shows a
  long wall time with little CPU);
* **CPU**: the event loop thread's CPU time (``time.thread_time``) and the
  whole process's (the store's worker thread included) per logged frame,
  beside the same loop with the log's calls left out (the difference is the
  log's);
* **busy loop** (``--busy``): a task stands in for a saturated relay, doing
  a fixed piece of per-frame work (classifying and parsing a 1 KiB frame)
  and yielding, without end; the pieces it completes a second with the log
  off and on say how much of a saturated event loop the log takes, GIL
  hand-overs with the store's thread included;
* the records read back after the run (each charger's transaction with its
  first and last reading and one signed value per frame) are checked, so a
  faster log that lost something fails here.

Wall-clock figures move with the machine's load (printed); the CPU figures
much less. ``--baseline DIR`` runs another checkout's code the same way in a
subprocess, interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel

ROOT = Path(__file__).resolve().parent.parent


class StepClock(trio.abc.Instrument):
    """The longest task step (wall and event loop thread CPU) and the task it was."""

    def __init__(self) -> None:
        self.longest_wall = 0.0
        self.longest_cpu = 0.0
        self.longest_task = ""
        self._began = 0.0
        self._cpu = 0.0
        #: Event loop thread CPU seconds spent in each task's steps, by task name.
        self.cpu_by_task: dict[str, float] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = time.perf_counter()
        self._cpu = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        wall = time.perf_counter() - self._began
        cpu = time.thread_time() - self._cpu
        if wall > self.longest_wall:
            self.longest_wall, self.longest_task = wall, task.name
        self.longest_cpu = max(self.longest_cpu, cpu)
        self.cpu_by_task[task.name] = self.cpu_by_task.get(task.name, 0.0) + cpu


def _frames(chargers: int, total: int) -> list[tuple[str, Any, Any]]:
    """(charger, CALL, answer) in the order they are relayed: the bench load's 1 KiB MeterValues, round robin."""
    from bench.loadgen import meter_values
    from proxy.messages.ocppj import classify
    answer = classify('[3,"1",{}]')
    return [(f"cp{n % chargers:04d}", classify(meter_values(1_000_000 + n).decode()), answer) for n in range(total)]


async def _measure(args: argparse.Namespace, queue: Any, frames: list[tuple[str, Any, Any]] | None,
                   late: list[float], pieces: list[int]) -> None:
    """Feed the frames at ``args.rate`` (none: the same loop without the log) until the last is committed."""
    from proxy.messages.versions import OcppVersion
    v16 = OcppVersion.V16
    total = int(args.rate * args.seconds)
    per_tick = args.rate / 1000.0
    done = trio.Event()

    async def ticker() -> None:
        while not done.is_set():
            due = time.perf_counter() + 0.001
            await trio.sleep(0.001)
            late.append(time.perf_counter() - due)

    async def busy() -> None:
        """A saturated relay's stand-in: the same piece of per-frame work, then a checkpoint, until done."""
        from bench.loadgen import meter_values
        from proxy.messages.ocppj import classify, payload_of
        text = meter_values(1).decode()
        while not done.is_set():
            payload_of(classify(text))
            pieces[0] += 1
            await trio.lowlevel.checkpoint()

    async def feed() -> None:
        """The relay's part: one log_later per relayed transaction frame."""
        sent, owed, began = 0, 0.0, trio.current_time()
        while sent < total:
            owed += per_tick
            while owed >= 1.0 and sent < total:
                if frames is not None:
                    charger, call, answer = frames[sent]
                    queue.log_later(charger, v16, call, answer)
                sent += 1
                owed -= 1.0
            await trio.sleep_until(began + sent / args.rate)
        while queue.later or queue._batch or queue._committing:  # the last batch read and committed
            await trio.sleep(0.01)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.commit_behind, name="commit_behind")
        nursery.start_soon(ticker, name="ticker")
        if args.busy:
            nursery.start_soon(busy, name="busy")
        await nursery.start(_started, feed, name="feed")
        await done.wait()
        nursery.cancel_scope.cancel()


async def _started(fn: Any, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    await fn()


def _check(records: list[Any], chargers: int, total: int) -> None:
    """Every charger's transaction, its first and last reading, every frame's signed value as sent."""
    per = total // chargers
    assert len(records) == chargers, f"{len(records)} records for {chargers} chargers"
    for record in records:
        assert record.meter_start_wh == record.meter_last_wh == 12345678.0, record
        assert len(record.signed) in (per, per + 1), f"{len(record.signed)} signed texts, {per} frames"
        assert all(text.startswith('{"value":"OCMF|') and text.endswith('"Sample.Periodic"}')
                   for text in record.signed)


def one(args: argparse.Namespace, log: bool) -> dict[str, Any]:
    from proxy.storage.offline_queue import AsyncQueue, SqliteStorage
    total = int(args.rate * args.seconds)
    frames = _frames(args.chargers, total) if log else None
    storage = SqliteStorage(Path(tempfile.mkdtemp(prefix="ocpp-sl-")) / "queue.sqlite3", mirrors=False)
    queue = AsyncQueue(storage)
    clock = StepClock()
    late: list[float] = []
    pieces = [0]
    cpu0, process0, began = time.thread_time(), time.process_time(), time.perf_counter()
    trio.run(_measure, args, queue, frames, late, pieces, instruments=[clock])
    wall, cpu, process = time.perf_counter() - began, time.thread_time() - cpu0, time.process_time() - process0
    if log:
        _check(storage.sessions(None, None), args.chargers, total)
    storage.close()
    tasks = clock.cpu_by_task
    late.sort()
    return {"frames": total, "wall_s": wall,
            "feed_cpu_us_per_frame": tasks.get("feed", 0.0) * 1e6 / total,
            "batch_loop_cpu_us_per_frame": tasks.get("commit_behind", 0.0) * 1e6 / total,
            "loop_cpu_us_per_frame": cpu * 1e6 / total,
            "worker_cpu_us_per_frame": (process - cpu) * 1e6 / total,
            "busy_pieces_per_s": pieces[0] / wall,
            "late_p99_ms": late[int(0.99 * (len(late) - 1))] * 1e3 if late else 0.0,
            "late_max_ms": late[-1] * 1e3 if late else 0.0,
            "step_max_ms": clock.longest_wall * 1e3, "step_max_cpu_ms": clock.longest_cpu * 1e3,
            "step_max_task": clock.longest_task}


def _child(root: Path, args: argparse.Namespace, log: bool) -> dict[str, Any]:
    """The same measurement with another checkout's proxy package (a subprocess)."""
    command = [sys.executable, str(ROOT / "bench" / "sessionlog_cost.py"), "--one", "on" if log else "off",
               "--chargers", str(args.chargers), "--rate", str(args.rate), "--seconds", str(args.seconds)]
    command += ["--busy"] if args.busy else []
    env = dict(os.environ, PYTHONPATH=str(root))  # its proxy (and bench.loadgen's frames)
    out = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=True, timeout=600)
    return dict(json.loads(out.stdout.splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sessionlog_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--chargers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000.0, help="logged frames per second, in all")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout, measured the same way, interleaved")
    parser.add_argument("--busy", action="store_true", help="a task keeps the event loop busy (a saturated relay)")
    parser.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args, args.one == "on")))
        return 0
    checkouts = ([("before", args.baseline.resolve())] if args.baseline else []) + [("after", ROOT)]
    from bench.sysinfo import machine
    info = machine(None)
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, Python {info['python']}; "
          f"load average before {os.getloadavg()[0]:.2f}; {args.chargers} chargers, {args.rate:g} logged frames/s "
          f"(1 KiB signed MeterValues), {args.seconds:g} s; medians of {args.repeats}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for name, root in checkouts:
            for log in (False, True):
                runs.setdefault(f"{name} log {'on' if log else 'off'}", []).append(_child(root, args, log))
    keys = ("feed_cpu_us_per_frame", "batch_loop_cpu_us_per_frame", "worker_cpu_us_per_frame", "busy_pieces_per_s",
            "late_p99_ms", "late_max_ms", "step_max_ms",
            "step_max_cpu_ms")
    print("| run | " + " | ".join(keys) + " | longest step's task |")
    print("|---|" + "---|" * (len(keys) + 1))
    for name, cells in runs.items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(c[k] for c in cells):.2f}" for k in keys)
              + f" | {cells[-1]['step_max_task']} |")
    print(f"load average after {os.getloadavg()[0]:.2f} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
    print(json.dumps(runs), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
