"""Function calls per forwarded frame, by function: where the interpreter's work goes.

    python -m bench.calls [--baseline DIR] [--wallboxes 10] [--seconds 10] [--top 40] [--session-log on|off]

``python -m bench.instructions`` gives one load-independent total (instructions per
frame); this says which functions it is spent in. The proxy (``python -m proxy run``,
as in ``python -m bench``) runs with this file as its wrapper: on SIGUSR1 it starts
counting every call of its main thread (``sys.setprofile``: Python functions and C
functions called from Python), on SIGUSR2 it stops and writes the counts. The bench
load generator saturates it in between (closed loop, alternating Heartbeat and 1 KiB
MeterValues), and the counts are divided by the frames forwarded (two per round
trip). The counting slows the proxy down several times, which changes how many
events one wait returns; the counts of the per-frame code do not depend on that.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

if __package__:  # run as python -m bench.calls (not as the proxy's wrapper)
    from bench.instructions import _load, header
    from bench.procs import ROOT, Backend, LoadGen, OcppProxy, workdir
    from bench.sysinfo import load_average


def _wrap() -> None:
    """The proxy's wrapper: ``calls.py OUT python -m proxy run ...`` (argv after OUT is the command)."""
    out = Path(sys.argv[1])
    counts: collections.Counter[str] = collections.Counter()

    callers = os.environ.get("BENCH_CALLS_CALLERS") == "1"

    def name(code: Any) -> str:
        return f"{code.co_qualname} {code.co_filename.rsplit('/', 1)[-1]}"

    def count(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            key = name(frame.f_code)
            if callers and frame.f_back is not None:
                key += " <- " + name(frame.f_back.f_code)
            counts[key] += 1
        elif event == "c_call":
            key = f"{getattr(arg, '__qualname__', arg)} (C)"
            counts[key + " <- " + name(frame.f_code) if callers else key] += 1

    def start(signum: int, _frame: FrameType | None) -> None:
        counts.clear()
        sys.setprofile(count)

    def stop(signum: int, _frame: FrameType | None) -> None:
        sys.setprofile(None)
        out.write_text(json.dumps(counts))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    module = sys.argv[sys.argv.index("-m") + 1]
    sys.argv = [module, *sys.argv[sys.argv.index("-m") + 2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def signalled_load(proxy: OcppProxy, backend: Backend, wallboxes: int, seconds: float, result: Path,
                   watch: Callable[[int], T] | None = None) -> tuple[int, T | None, T | None]:
    """Start ``proxy`` (its wrapper counts from SIGUSR1 and writes ``result`` on SIGUSR2) and saturate it in between.

    Returns the frames forwarded and ``watch(pid)`` read right before and right after the load
    (bench/gc_passes.py reads the CPU times there), or None without ``watch``.
    """
    proxy.start(backend.port, 0)
    gen = LoadGen(proxy.targets(wallboxes))
    try:
        gen.connected(120)
        pid = proxy.pids[0]
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)  # the handler runs between bytecodes of the main thread
        before = watch(pid) if watch is not None else None
        frames = _load(gen, seconds)
        after = watch(pid) if watch is not None else None
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not result.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        gen.close()
        proxy.stop()
    return frames, before, after


def measure(root: Path, name: str, backend: Backend, wallboxes: int, seconds: float,
            session_log: bool | None = None) -> dict[str, Any]:
    out = workdir()
    counts_file = out / "calls.json"
    proxy = OcppProxy(out, root, name, start_timeout=60, session_log=session_log,
                      wrapper=[sys.executable, str(Path(__file__).resolve()), str(counts_file)])
    frames, _, _ = signalled_load(proxy, backend, wallboxes, seconds, counts_file)
    counts: dict[str, int] = json.loads(counts_file.read_text())
    return {"frames": frames, "counts": counts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout, measured the same way in this run")
    parser.add_argument("--wallboxes", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--callers", action="store_true", help="count each function by its caller")
    parser.add_argument("--session-log", choices=("on", "off"), help="[offline] session_log (default: the config's)")
    args = parser.parse_args(argv)
    if args.callers:
        os.environ["BENCH_CALLS_CALLERS"] = "1"
    header(args)
    checkouts = ([("baseline", args.baseline.resolve())] if args.baseline else []) + [("this checkout", ROOT)]
    backend = Backend()
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, root in checkouts:
            results[name] = measure(root, name, backend, args.wallboxes, args.seconds,
                                    None if args.session_log is None else args.session_log == "on")
    finally:
        backend.stop()
    per_frame = {name: {f: n / r["frames"] for f, n in r["counts"].items()} for name, r in results.items()}
    names = list(results)
    print("\n| calls per forwarded frame | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    print("| frames counted | " + " | ".join(f"{results[n]['frames']:,}" for n in names) + " |")
    print("| all calls | " + " | ".join(f"{sum(per_frame[n].values()):.1f}" for n in names) + " |")
    top: collections.Counter[str] = collections.Counter()
    for counts in per_frame.values():
        for function, n in counts.items():
            top[function] = max(top[function], n)
    for function, _ in top.most_common(args.top):
        print(f"| {function} | " + " | ".join(f"{per_frame[n].get(function, 0):.2f}" for n in names) + " |")
    print(f"\nload average after {load_average()[0]:.2f} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
    return 0


if __name__ == "__main__":
    if __package__:
        raise SystemExit(main())
    _wrap()
