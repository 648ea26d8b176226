"""Offline answering: 100 wallboxes while the backend is down, every frame committed before its answer.

    PYTHONPATH=. python bench/offline_answer.py [--baseline DIR] [--wallboxes 100] [--rate 20] [--seconds 10]
        [--repeats 3] [--loads rate,closed,saturate] [--paths online,offline] [--base DIR]
        [--session-log default|on|off|on,off]

Side by side in one run, the same wallboxes and load generator (``bench/loadgen.py``,
alternating Heartbeat and a 1 KiB MeterValues) against ``ocpp-proxy run``:

* ``online``: the backend (``bench/backend.py``) is up; the proxy relays.
* ``offline``: nothing listens at the backend's address; the proxy answers every CALL
  itself after committing it to its SQLite queue (fsync'd before the answer, docs/storage.md).

Loads (each on a fresh proxy, so its queue counts are its own):

* ``rate``: open loop, each wallbox ``--rate`` CALLs per second at random phase whether or not
  its earlier CALLs are answered (the issue's target: 100 × 20 = 2000 CALL/s at p99 ≤ 20 ms).
  Latency counts from when each CALL was *due*, so a generator that falls behind cannot hide
  the wait; its own lag (due → written) is printed beside.
* ``closed``: what a real wallbox does, one CALL outstanding: the next one ``1/rate`` s after
  the previous, or on its answer if that came later.
* ``saturate``: the next CALL as soon as the answer is in: the most this machine answers.

``--session-log on,off`` runs each checkout with ``[offline] session_log`` on and off (interleaved),
to tell the session log's share of the tail from the queue's.

The target is about reliability, not one lucky run: besides the medians the report lists every
run's p99 and how many runs met p99 ≤ 20 ms at ≥ 2000 CALL/s; it is *met* only if every run did.

During each offline load a probe (``bench/diskprobe.py``) fdatasyncs 4 KiB of its own in the data
directory 100 times a second: the disk's own stalls, printed beside each run's p99, so a miss
can be told apart as the disk's or the proxy's (the verdict also counts the runs with a quiet disk).

``--baseline DIR`` runs another checkout (e.g. ``git worktree add --detach /tmp/base <commit>``)
the same way, interleaved with this one, so both see the same machine noise.

Besides the wall-clock figures (noisy on a shared machine) it prints figures that do not depend
on the load: the proxy's CPU µs per answered CALL, commits (one fsync each) per answered CALL,
and, from the proxy's ``queue_stats`` log event, where an offline answer's time went (read →
enqueue, enqueue → committed, committed → answer written; per commit: gather, hop into the
worker thread, work there, hop back). After each offline load the queue's rows are counted:
every answered CALL must be in the queue (nothing is answered that is not on disk).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.diskprobe import STALL_MS, DiskProbe
from bench.procs import ROOT, Backend, LoadGen, OcppProxy, cpu_of, free_port, workdir
from bench.sysinfo import load_average, machine

TARGET_RATE = 2000.0
TARGET_P99_MS = 20.0
LOADS = ("rate", "closed", "saturate")


def percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def at_target(cells: list[dict[str, Any]]) -> int:
    """How many runs answered ≥ 98 % of the target rate at p99 ≤ the target (the issue's bar, per run)."""
    return sum(1 for c in cells if c["per_second"] >= TARGET_RATE * 0.98 and c["p99_ms"] <= TARGET_P99_MS)


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
    lag = result.get("lag_us", [])
    answered = int(result["completed_total"])
    return {"calls": len(latencies), "per_second": len(latencies) / float(spec["duration"]),
            "p50_ms": percentile(latencies, 0.50), "p99_ms": percentile(latencies, 0.99),
            "max_ms": max(latencies) / 1000.0 if latencies else float("nan"),
            "lag_p99_ms": percentile(lag, 0.99) if lag else 0.0,
            "unanswered": result["unanswered"], "answered_total": answered,
            "proxy_cpu_s": round(result["proxy_cpu"], 2),
            "cpu_us_per_call": result["proxy_cpu"] * 1e6 / answered if answered else float("nan")}


def queued_rows(data: Path) -> int:
    with sqlite3.connect(data / "queue.sqlite3") as db:
        return int(db.execute("SELECT count(*) FROM frames").fetchone()[0])


def queue_stats(log: Path) -> dict[str, Any]:
    """The proxy's last ``queue_stats`` event (logged at shutdown)."""
    found: dict[str, Any] = {}
    for line in log.read_text(errors="replace").splitlines():
        if '"queue_stats"' in line:
            found = json.loads(line)
    return found


def one_round(args: argparse.Namespace, root: Path, offline: bool, load: str, log: bool | None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ocpp-bench-", dir=args.base)) if args.base else workdir()
    backend = None if offline else Backend()
    proxy = OcppProxy(work, root=root, session_log=log)
    port = free_port() if offline else backend.port  # type: ignore[union-attr]  # offline: nothing listens
    proxy.start(port, args.wallboxes)
    seconds = args.seconds if load != "saturate" else min(args.seconds, 5.0)
    # The disk's own stalls during an offline load (bench/diskprobe.py); a relay online never waits for the disk.
    probe = DiskProbe(work / "data")
    try:
        with probe if offline else contextlib.nullcontext(probe):
            result = run_load(proxy, args.wallboxes, {"mode": load, "rate": args.rate, "duration": seconds,
                                                      "warmup": 1.0})
    finally:
        proxy.stop()
        if backend is not None:
            backend.stop()
    if offline:
        result["disk"] = probe.result.summary()
        rows = queued_rows(work / "data")
        stats = queue_stats(work / "proxy.log")
        commits = int(stats.get("commits", 0))
        answered = result["answered_total"]
        result["queue"] = {"rows": rows, "answered": answered, "every_answer_on_disk": rows >= answered,
                           "commits": commits, "commits_per_answer": round(commits / answered, 4) if answered else None,
                           "fsyncs_per_s": round(commits / (seconds + 1.0), 1),
                           "stages": {k: v for k, v in stats.items() if isinstance(v, dict) and "p50" in v},
                           "thread_utilisation": stats.get("thread_utilisation"),
                           "checkpoints": stats.get("checkpoints")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout, measured side by side in this run")
    parser.add_argument("--wallboxes", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0, help="CALLs per second per wallbox")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loads", default=",".join(LOADS), help="of " + ",".join(LOADS))
    parser.add_argument("--paths", default="online,offline")
    parser.add_argument("--session-log", default="default",
                        help="[offline] session_log: default (the checkout's), on, off, or on,off (both, interleaved)")
    parser.add_argument("--base", default="", help="directory for the proxy's data (default: a temp dir); "
                        "/dev/shm shows what the disk's fsync costs")
    args = parser.parse_args()
    loads = [load for load in args.loads.split(",") if load]
    paths = [path for path in args.paths.split(",") if path]
    checkouts = ([("before", args.baseline.resolve())] if args.baseline else []) + [("after", ROOT)]
    logs: list[tuple[str, bool | None]] = [(word, None if word == "default" else word == "on")
                                           for word in args.session_log.split(",") if word]
    info = machine(None)
    loads_seen = [load_average()]
    print(f"machine: {info.get('cpu_model')}, {info.get('cores')} cores, Python {info.get('python')}, "
          f"load average before {loads_seen[0][0]:.2f}", flush=True)
    for name, root in checkouts:
        print(f"{name}: {root}")
    runs: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for load in loads:
            for path in paths:
                for log_name, log in logs:
                    for name, root in checkouts:  # interleaved: all see the same machine noise
                        print(f"[{time.strftime('%H:%M:%S')}] {name} {path} {load} log {log_name} "
                              f"{repeat + 1}/{args.repeats} (load average {load_average()[0]:.1f})",
                              file=sys.stderr, flush=True)
                        result = one_round(args, root, path == "offline", load, log)
                        result["load_average"] = load_average()[0]
                        runs.setdefault((name, path, load, log_name), []).append(result)
                        loads_seen.append(load_average())
    print(f"\n{args.wallboxes} wallboxes, rate {args.rate:g}/s each ({args.wallboxes * args.rate:g} CALL/s offered "
          f"in rate/closed), {args.seconds:g} s window (saturate ≤ 5 s); medians of {args.repeats}; load average "
          f"(1 min) during the run {min(x[0] for x in loads_seen):.1f}-{max(x[0] for x in loads_seen):.1f}")
    print("| checkout | path | load | session log | CALL/s | p50 ms | p99 ms | max ms | gen lag p99 ms | unanswered "
          "| proxy CPU µs/CALL | commits/CALL | p99 of each run ms | runs at target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, path, load, log_name), cells in runs.items():
        def med(key: str, cells: list[dict[str, Any]] = cells) -> float:
            return float(statistics.median(c[key] for c in cells))

        commits = "" if path == "online" else f"{statistics.median(c['queue']['commits_per_answer'] or 0 for c in cells):.3f}"
        each = ", ".join(f"{c['p99_ms']:.1f}" for c in cells)
        print(f"| {name} | {path} | {load} | {log_name} | {med('per_second'):.0f} | {med('p50_ms'):.2f} | "
              f"{med('p99_ms'):.2f} | {med('max_ms'):.1f} | {med('lag_p99_ms'):.2f} | {med('unanswered'):.0f} | "
              f"{med('cpu_us_per_call'):.0f} | {commits} | {each} | {at_target(cells)}/{len(cells)} |")
    print("\nOffline, where the time went (ms, p50/p99 (max) per run; from the proxy's queue_stats):")
    for (name, path, load, log_name), cells in runs.items():
        if path != "offline":
            continue
        on_disk = all(c["queue"]["every_answer_on_disk"] for c in cells)
        print(f"- {name} {load} log {log_name}: every answer on disk in every run: {on_disk}")
        for number, cell in enumerate(cells, 1):
            queue = cell["queue"]
            stages = " ".join(f"{stage} {v['p50']}/{v['p99']}" + (f" ({v['max']})" if "max" in v else "")
                              for stage, v in queue["stages"].items() if stage not in ("gc", "gc_full"))
            full = queue["stages"].get("gc_full")
            pauses = f"full collections {full['n']} (longest {full['max']} ms)" if full else "no full collection"
            if queue.get("checkpoints"):
                pauses += f"; checkpoints {queue['checkpoints']}"
            disk = cell["disk"]
            print(f"  - run {number} (load average {cell['load_average']:.1f}): p99 {cell['p99_ms']:.2f} ms; disk probe "
                  f"{disk['fsyncs']} fsyncs, longest {disk['max_ms']} ms, {disk['stalls']} over {STALL_MS:g} ms "
                  f"({disk['stalled_ms']} ms, worst {disk['longest_stalls'][:3]}); commits "
                  f"{queue['commits']} ({queue['fsyncs_per_s']}/s), thread busy {queue['thread_utilisation']}; "
                  f"{pauses}; {stages or '(not logged)'}")
    for (name, path, load, log_name), cells in runs.items():
        if path != "offline" or load not in ("rate", "closed"):
            continue
        rate = statistics.median(c["per_second"] for c in cells)
        p99 = statistics.median(c["p99_ms"] for c in cells)
        met = at_target(cells)
        each = ", ".join(f"{c['p99_ms']:.1f}" for c in cells)
        verdict = "met in every run" if met == len(cells) else f"missed in {len(cells) - met} of {len(cells)} runs"
        quiet = [c for c in cells if not c["disk"]["stalls"]]
        verdict += (f"; in the {len(quiet)} runs whose disk probe saw no fsync over {STALL_MS:g} ms: "
                    f"{at_target(quiet)}/{len(quiet)} at target")
        print(f"target ≥ {TARGET_RATE:g} CALL/s at p99 ≤ {TARGET_P99_MS:g} ms offline ({name}, {load}, session log "
              f"{log_name}): median {rate:.0f} CALL/s at p99 {p99:.2f} ms; runs at target {met}/{len(cells)} "
              f"(p99 per run: {each} ms): {verdict}")
    print(f"load average after {load_average()[0]:.2f}")
    print(json.dumps({"machine": info, "runs": {" ".join(k): v for k, v in runs.items()}}, default=str),
          file=sys.stderr)


if __name__ == "__main__":
    main()
