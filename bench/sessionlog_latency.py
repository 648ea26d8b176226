"""Online answering latency with the session log off and on: what its once-a-second batch costs a wallbox.

    python -m bench.sessionlog_latency [--baseline DIR] [--wallboxes 100] [--rate 20] [--seconds 10] [--repeats 3]

The load of ``bench/offline_answer.py --paths online --loads rate`` (open loop:
each wallbox ``--rate`` CALLs a second at random phase, alternating Heartbeat
and a 1 KiB MeterValues that names a transaction, carries an energy reading and
a signed value: every other CALL is logged, the log's worst case; latency
counted from when each CALL was due) against ``ocpp-proxy run`` relaying to the
bench backend, once with ``[offline] session_log = false`` and once with it on
(the default), interleaved, and the same for ``--baseline DIR`` (another
checkout). A batch of the log that holds the event loop shows in p99 and max
with the log on; the proxy's CPU per answered CALL shows what the log costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.offline_answer import run_load
from bench.procs import ROOT, Backend, OcppProxy, workdir
from bench.sysinfo import load_average, machine


def one_round(root: Path, log: bool, args: argparse.Namespace) -> dict[str, Any]:
    backend = Backend()
    proxy = OcppProxy(workdir(), root=root, session_log=log)
    proxy.start(backend.port, args.wallboxes)
    try:
        return run_load(proxy, args.wallboxes, {"mode": "rate", "rate": args.rate, "duration": args.seconds,
                                                "warmup": 1.0})
    finally:
        proxy.stop()
        backend.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sessionlog_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout, measured the same way, interleaved")
    parser.add_argument("--wallboxes", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0, help="CALLs per second per wallbox")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    checkouts = ([("before", args.baseline.resolve())] if args.baseline else []) + [("after", ROOT)]
    info = machine(None)
    loads = [load_average()[0]]
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, Python {info['python']}; load average before "
          f"{loads[0]:.2f}; {args.wallboxes} wallboxes x {args.rate:g} CALL/s (open loop), {args.seconds:g} s",
          flush=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for name, root in checkouts:
            for log in (False, True):
                label = f"{name} log {'on' if log else 'off'}"
                print(f"[{time.strftime('%H:%M:%S')}] {label} {repeat + 1}/{args.repeats} "
                      f"(load average {load_average()[0]:.1f})", file=sys.stderr, flush=True)
                runs.setdefault(label, []).append(one_round(root, log, args))
                loads.append(load_average()[0])
    keys = ("per_second", "p50_ms", "p99_ms", "max_ms", "lag_p99_ms", "unanswered", "cpu_us_per_call")
    print(f"medians of {args.repeats}; load average (1 min) during the run {min(loads):.1f}-{max(loads):.1f}")
    print("| run | CALL/s | p50 ms | p99 ms | max ms | gen lag p99 ms | unanswered | proxy CPU µs/CALL |")
    print("|---|---|---|---|---|---|---|---|")
    for label, cells in runs.items():
        print(f"| {label} | " + " | ".join(f"{statistics.median(float(c[k]) for c in cells):.2f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
