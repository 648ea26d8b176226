"""One SQLite writer committing back to back: WAL checkpoints inline (SQLite's default) or on their own thread.

    PYTHONPATH=. python bench/commit_latency.py [--seconds 5] [--rounds 3] [--dir DIR]

Writes batches of two frames (a Heartbeat and a 1 KiB MeterValues, as the offline benchmark's
wallboxes send) through ``SqliteStorage.write`` as fast as one thread can, for ``--seconds``,
once with checkpoints inside the commits (``wal_autocheckpoint = 1000``, the checkpoint thread
stopped: what the queue did before) and once as the queue runs now (docs/storage.md,
"Checkpoints, off the commit path"), interleaved, ``--rounds`` times. No event loop, no
sockets: what the disk and the checkpoints cost a commit, per commit p50 / p99 / p99.9 / max.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bench.sysinfo import load_average
from proxy.storage.interface import Append
from proxy.storage.offline_queue import SqliteStorage

METER = '[2,"m","MeterValues",{"v":"' + "x" * 1000 + '"}]'
HEARTBEAT = '[2,"h","Heartbeat",{}]'


def one_round(mode: str, seconds: float, base: str | None) -> str:
    work = Path(tempfile.mkdtemp(prefix="commit-latency-", dir=base))
    storage = SqliteStorage(work / "queue.sqlite3", mirrors=False)
    try:
        if mode == "inline":
            storage.checkpoints.stop()
            storage.checkpoints.restart_pages = 10**9
            storage.db.execute("PRAGMA wal_autocheckpoint=1000")
        times: list[float] = []
        end = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < end:
            batch = [Append(f"CP{n % 100}", "Heartbeat", HEARTBEAT), Append(f"CP{(n + 1) % 100}", "MeterValues", METER)]
            began = time.perf_counter()
            storage.write(batch)
            times.append(time.perf_counter() - began)
            n += 1
        times.sort()

        def ms(q: float) -> float:
            return times[min(len(times) - 1, int(q * len(times)))] * 1000

        stats = storage.checkpoints.stats
        extra = f"{stats.runs} / {stats.catch_ups} / {stats.most_pages}" if mode == "thread" else ""
        return (f"| {mode} | {len(times) / seconds:.0f} | {ms(0.5):.2f} | {ms(0.99):.2f} | {ms(0.999):.2f} | "
                f"{times[-1] * 1000:.1f} | {load_average()[0]:.1f} | {extra} |")
    finally:
        storage.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the database goes (default: the temp dir)")
    args = parser.parse_args()
    print(f"load average before {load_average()[0]:.2f}")
    print("| checkpoints | commits/s | p50 ms | p99 ms | p99.9 ms | max ms | load average "
          "| checkpoints / writer catch-ups / most WAL pages |")
    print("|---|---|---|---|---|---|---|---|")
    for _ in range(args.rounds):
        for mode in ("inline", "thread"):
            print(one_round(mode, args.seconds, args.dir), flush=True)


if __name__ == "__main__":
    main()
