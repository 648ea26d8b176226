"""Offline answering: 100 wallboxes while the backend is down, every frame committed before its answer.

    PYTHONPATH=. python bench/offline_answer.py [--wallboxes 100] [--rate 20] [--seconds 10] [--repeats 3]

Side by side in one run, the same wallboxes and load generator (``bench/loadgen.py``,
alternating Heartbeat and a 1 KiB MeterValues) against ``ocpp-proxy run``:

* ``online``: the backend (``bench/backend.py``) is up; the proxy relays.
* ``offline``: nothing listens at the backend's address; the proxy answers every CALL
  itself after committing it to its SQLite queue (``synchronous=FULL``: one fsync per group
  commit).

Each path runs two loads: ``rate`` (each wallbox ``--rate`` CALLs per second, random phase:
the issue's target is 100 × 20 = 2000 CALL/s at p99 ≤ 20 ms) and ``saturate`` (each wallbox
sends its next CALL as soon as the answer is in: the most this machine answers). After the
offline loads the bench counts the queue's rows: every answered CALL must be in the queue
(nothing is answered that is not on disk). Prints the machine, the load average, and p50 /
p99 / max, CALL/s and the proxy's frames per commit.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procs import Backend, LoadGen, OcppProxy, cpu_of, free_port, workdir
from bench.sysinfo import load_average, machine

TARGET_RATE = 2000.0
TARGET_P99_MS = 20.0


def percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def run_load(proxy: OcppProxy, count: int, spec: dict[str, Any]) -> dict[str, Any]:
    gen = LoadGen(proxy.targets(count))
    try:
        connected = gen.connected(timeout=120)
        if connected["failures"]:
            raise RuntimeError(f"connections failed: {connected['failures'][:3]}")
        cpu = cpu_of(proxy.pids)
        gen.send("load " + json.dumps(spec))
        result = gen.read_json(float(spec["duration"]) + float(spec.get("warmup", 1.0)) + 60)
        result["proxy_cpu"] = cpu_of(proxy.pids) - cpu
    finally:
        gen.close()
    latencies = result["latencies_us"]["hb"] + result["latencies_us"]["mv"]
    return {"calls": len(latencies), "per_second": len(latencies) / float(spec["duration"]),
            "p50_ms": percentile(latencies, 0.50), "p99_ms": percentile(latencies, 0.99),
            "max_ms": max(latencies) / 1000.0 if latencies else float("nan"),
            "unanswered": result["unanswered"], "answered_total": result["completed_total"],
            "proxy_cpu_s": round(result["proxy_cpu"], 2)}


def queued_rows(data: Path) -> int:
    with sqlite3.connect(data / "queue.sqlite3") as db:
        return int(db.execute("SELECT count(*) FROM frames").fetchone()[0])


def commits_logged(log: Path) -> tuple[int, int, float]:
    """(commits, frames, seconds in commits) from the proxy's last ``queue_stats`` event (logged at shutdown)."""
    found = (0, 0, 0.0)
    for line in log.read_text(errors="replace").splitlines():
        if '"queue_stats"' in line:
            event = json.loads(line)
            found = (int(event["commits"]), int(event["changes"]), float(event.get("commit_seconds", 0.0)))
    return found


def one_round(args: argparse.Namespace, offline: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ocpp-bench-", dir=args.base)) if args.base else workdir()
    backend = None if offline else Backend()
    proxy = OcppProxy(work)
    port = free_port() if offline else backend.port  # type: ignore[union-attr]  # offline: nothing listens
    proxy.start(port, args.wallboxes)
    results: dict[str, Any] = {}
    try:
        rate = {"mode": "rate", "rate": args.rate, "duration": args.seconds, "warmup": 1.0}
        results["rate"] = run_load(proxy, args.wallboxes, rate)
        results["saturate"] = run_load(proxy, args.wallboxes, {"mode": "saturate", "duration": 5.0, "warmup": 1.0})
    finally:
        proxy.stop()
        if backend is not None:
            backend.stop()
    if offline:
        rows = queued_rows(work / "data")
        answered = results["rate"]["answered_total"] + results["saturate"]["answered_total"]
        commits, changes, seconds = commits_logged(work / "proxy.log")
        results["queue"] = {"rows": rows, "answered": answered, "every_answer_on_disk": rows >= answered,
                            "commits": commits, "frames_per_commit": round(changes / commits, 1) if commits else None,
                            "ms_per_commit": round(1000 * seconds / commits, 2) if commits else None}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wallboxes", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0, help="CALLs per second per wallbox")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base", default="", help="directory for the proxy's data (default: a temp dir); "
                        "/dev/shm shows what the disk's fsync costs")
    args = parser.parse_args()
    info = machine(None)
    print(f"machine: {info.get('cpu_model')} ({info.get('cores')} cores), Python {info.get('python')}, "
          f"load average before {load_average()[0]:.2f}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"online": [], "offline": []}
    for repeat in range(args.repeats):
        for name in ("online", "offline"):  # interleaved: both see the same machine noise
            print(f"[{time.strftime('%H:%M:%S')}] {name} {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
            runs[name].append(one_round(args, offline=name == "offline"))
    print(f"\n{args.wallboxes} wallboxes, rate {args.rate:g}/s each ({args.wallboxes * args.rate:g} CALL/s offered), "
          f"{args.seconds:g} s window; saturate 5 s; medians of {args.repeats}")
    print("| path | load | CALL/s | p50 ms | p99 ms | max ms | unanswered | proxy CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rounds in runs.items():
        for load in ("rate", "saturate"):
            cells = [r[load] for r in rounds]

            def med(key: str, cells: list[dict[str, Any]] = cells) -> float:
                return float(statistics.median(c[key] for c in cells))

            print(f"| {name} | {load} | {med('per_second'):.0f} | {med('p50_ms'):.2f} | {med('p99_ms'):.2f} | "
                  f"{med('max_ms'):.1f} | {med('unanswered'):.0f} | {med('proxy_cpu_s'):.2f} |")
    for r in runs["offline"]:
        print(f"offline queue: {r['queue']}")
    offline_rate = [r["rate"] for r in runs["offline"]]
    rate = statistics.median(c["per_second"] for c in offline_rate)
    p99 = statistics.median(c["p99_ms"] for c in offline_rate)
    met = rate >= TARGET_RATE * 0.98 and p99 <= TARGET_P99_MS
    print(f"target ≥ {TARGET_RATE:g} CALL/s at p99 ≤ {TARGET_P99_MS:g} ms offline: {rate:.0f} CALL/s at p99 "
          f"{p99:.2f} ms: {'met' if met else 'missed'}; load average after {load_average()[0]:.2f}")
    print(json.dumps({"machine": info, "runs": runs}, default=str), file=sys.stderr)


if __name__ == "__main__":
    main()
