"""Garbage-collector passes and the relay's user and system CPU per forwarded frame, by wallbox count.

    python -m bench.gc_passes [--baseline DIR] [--wallboxes 100,1000] [--seconds 8] [--repeats 3]
                              [--session-log off,on]

Each checkout's proxy (``python -m proxy run``, as in ``python -m bench``) runs
under bench/gcprobe.py, which counts the collector's passes per generation
and the time spent in them while the bench load generator saturates the
proxy (closed loop, alternating Heartbeat and 1 KiB MeterValues). Printed per
forwarded frame (two per round trip): user and system CPU of the proxy (from
/proc, so the machine's load moves them), GC seconds, and passes per 1000
frames by generation, which are what grows with the number of wallboxes when
the collector's pace is wrong (proxy/runtime/gcpace.py). The runs of all
checkouts, counts and settings are interleaved, ``--repeats`` times; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.calls import signalled_load
from bench.instructions import header
from bench.procs import ROOT, Backend, OcppProxy, workdir
from bench.sysinfo import load_average

_TICK = os.sysconf("SC_CLK_TCK")
PROBE = Path(__file__).resolve().parent / "gcprobe.py"


def _times(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def measure(root: Path, name: str, backend: Backend, wallboxes: int, seconds: float,
            session_log: bool | None) -> dict[str, Any]:
    out = workdir()
    counts = out / "gc.json"
    proxy = OcppProxy(out, root, name, session_log=session_log, wrapper=[sys.executable, str(PROBE), str(counts)])
    frames, before, after = signalled_load(proxy, backend, wallboxes, seconds, counts, watch=_times)
    assert before is not None and after is not None
    (user0, system0), (user1, system1) = before, after
    gc_counts = json.loads(counts.read_text())
    return {"frames": frames, "user_us": 1e6 * (user1 - user0) / frames, "system_us": 1e6 * (system1 - system0) / frames,
            "gc_us": 1e6 * sum(gc_counts["seconds"]) / frames,
            "passes_per_1000": [1000 * n / frames for n in gc_counts["passes"]],
            "threshold": gc_counts["threshold"], "tracked": gc_counts["tracked"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gc_passes", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout, measured the same way in this run")
    parser.add_argument("--wallboxes", default="100,1000")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--session-log", default="", help="off,on: each checkout once per [offline] session_log")
    args = parser.parse_args(argv)
    header(args)
    checkouts = ([("baseline", args.baseline.resolve())] if args.baseline else []) + [("this checkout", ROOT)]
    logs: list[bool | None] = [s == "on" for s in args.session_log.split(",")] if args.session_log else [None]
    counts = [int(n) for n in args.wallboxes.split(",")]
    backend = Backend()
    runs: dict[tuple[int, str, bool | None], list[dict[str, Any]]] = {}
    try:
        for _ in range(args.repeats):
            for wallboxes in counts:
                for log in logs:
                    for name, root in checkouts:
                        result = measure(root, name, backend, wallboxes, args.seconds, log)
                        runs.setdefault((wallboxes, name, log), []).append(result)
    finally:
        backend.stop()
    print("\n| wallboxes | checkout | session log | frames/s | user µs/frame | system µs/frame | GC µs/frame "
          "| young / middle / full passes per 1000 frames | first threshold |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (wallboxes, name, log), results in runs.items():
        def med(key: str) -> float:
            return float(statistics.median(float(r[key]) for r in results))
        passes = " / ".join(f"{statistics.median(r['passes_per_1000'][g] for r in results):.2f}" for g in range(3))
        print(f"| {wallboxes} | {name} | {'default' if log is None else 'on' if log else 'off'} "
              f"| {med('frames') / args.seconds:,.0f} | {med('user_us'):.1f} | {med('system_us'):.1f} "
              f"| {med('gc_us'):.2f} | {passes} | {results[-1]['threshold'][0]} |")
    print(f"\nload average after {load_average()[0]:.2f} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
    print(json.dumps({f"{w} {n} {log}": r for (w, n, log), r in runs.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
