"""Cost per forwarded frame that other work on the machine does not change: instructions and system calls.

    python -m bench.instructions [--baseline DIR] [--wallboxes 10] [--seconds 20] [--tools callgrind,strace]
                                 [--session-log on,off]

Wall-clock throughput and even CPU seconds move with whatever else runs on a
shared host. Two counts do not: the instructions the proxy executes
(``valgrind --tool=callgrind``; the proxy runs about 50x slower under it, so
the window is short in frames) and the system calls it makes (``strace -c``).
Each checkout's proxy (``python -m proxy run``, as in ``python -m bench``) is
saturated by the bench load generator (closed loop, alternating Heartbeat and
1 KiB MeterValues); the counters are zeroed when the load starts and read when
it ends, and divided by the frames forwarded (two per round trip).
``--baseline DIR`` measures another checkout the same way in the same run;
``--session-log on,off`` measures this checkout (and the baseline, if
given) once per ``[offline] session_log`` setting (the cost of the session
log, side by side).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.procs import ROOT, Backend, LoadGen, OcppProxy, workdir
from bench.sysinfo import load_average, machine, raise_nofile

SYSCALLS = ("sendto", "recvfrom", "epoll_wait", "epoll_ctl", "getrandom")
#: Seconds after the load before the counters are read: longer than the session log's batch interval
#: (proxy/storage/offline_queue.py LATER_INTERVAL), so the frames' log work is in the count.
SETTLE = 3.0


def _load(gen: LoadGen, seconds: float) -> int:
    """Saturate for ``seconds``; the frames forwarded (every round trip answered)."""
    gen.send("load " + json.dumps({"mode": "saturate", "duration": seconds, "warmup": 0.0, "grace": 60.0}))
    result = gen.read_json(seconds + 180)
    if result["unanswered"]:
        raise RuntimeError(f"{result['unanswered']} CALLs unanswered")
    return 2 * int(result["completed_total"])


def callgrind(root: Path, name: str, backend: Backend, wallboxes: int, seconds: float,
              session_log: bool | None = None) -> dict[str, Any]:
    """Instructions executed per forwarded frame (callgrind's Ir between zeroing and a dump)."""
    out = workdir()
    proxy = OcppProxy(out, root, name, start_timeout=600, session_log=session_log,
                      wrapper=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.out"])
    proxy.start(backend.port, 0)
    gen = LoadGen(proxy.targets(wallboxes))
    try:
        gen.connected(600)
        pid = str(proxy.pids[0])
        subprocess.run(["callgrind_control", "--zero", pid], check=True, capture_output=True, timeout=120)
        frames = _load(gen, seconds)
        time.sleep(SETTLE)  # work left behind by the load (the session log's last batch) is counted too
        subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True, timeout=120)
    finally:
        gen.close()
        proxy.stop()
    dumps = sorted(out.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
    if not dumps:
        raise RuntimeError(f"no callgrind dump in {out}")
    match = re.search(r"^(?:summary|totals): (\d+)", dumps[0].read_text(errors="replace"), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no instruction total in {dumps[0]}")
    instructions = int(match.group(1))
    return {"frames": frames, "instructions": instructions, "instructions_per_frame": instructions / frames}


def strace(root: Path, name: str, backend: Backend, wallboxes: int, seconds: float,
           session_log: bool | None = None) -> dict[str, Any]:
    """System calls per forwarded frame, by name (``strace -c`` attached for the load window)."""
    out = workdir()
    proxy = OcppProxy(out, root, name, session_log=session_log)
    proxy.start(backend.port, 0)
    gen = LoadGen(proxy.targets(wallboxes))
    summary = out / "strace.txt"
    try:
        gen.connected(120)
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(summary), "-p", str(proxy.pids[0])],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert tracer.stderr is not None
        tracer.stderr.readline()  # "strace: Process N attached": counting from here
        frames = _load(gen, seconds)
        time.sleep(SETTLE)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
    finally:
        gen.close()
        proxy.stop()
    calls: dict[str, int] = {}
    for line in summary.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and not fields[-1].startswith("total"):
            calls[fields[-1]] = int(fields[3])
    per_frame = {call: calls.get(call, 0) / frames for call in SYSCALLS}
    per_frame["all"] = sum(calls.values()) / frames
    return {"frames": frames, "calls": calls, "per_frame": per_frame}


def header(args: argparse.Namespace) -> None:
    """Raise the open-file limit; print the machine, the load and the settings."""
    raise_nofile()
    info = machine(None)
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, Python {info['python']}, "
          f"load average before {load_average()[0]:.2f}; {args.wallboxes} wallboxes saturating, "
          f"{args.seconds:g} s windows")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout, measured the same way in this run")
    parser.add_argument("--wallboxes", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0, help="load window (under valgrind: slow)")
    parser.add_argument("--tools", default="callgrind,strace")
    parser.add_argument("--session-log", help="on,off: this checkout once per [offline] session_log setting")
    args = parser.parse_args(argv)
    tools = args.tools.split(",")
    for tool in ("valgrind" if "callgrind" in tools else None, "strace" if "strace" in tools else None):
        if tool is not None and shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    header(args)
    checkouts: list[tuple[str, Path, bool | None]] = []
    if args.session_log:  # the baseline too, once per setting: like with like
        for setting in args.session_log.split(","):
            if args.baseline:
                checkouts.append((f"baseline, session_log {setting}", args.baseline.resolve(), setting == "on"))
            checkouts.append((f"session_log {setting}", ROOT, setting == "on"))
    else:
        checkouts = [("baseline", args.baseline.resolve(), None)] if args.baseline else []
        checkouts.append(("this checkout", ROOT, None))
    backend = Backend()
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, root, session_log in checkouts:
            results[name] = {}
            if "callgrind" in tools:
                results[name]["callgrind"] = callgrind(root, name, backend, args.wallboxes, args.seconds, session_log)
            if "strace" in tools:
                results[name]["strace"] = strace(root, name, backend, args.wallboxes, args.seconds, session_log)
    finally:
        backend.stop()
    names = list(results)
    print("\n| per forwarded frame | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    print("| frames counted (callgrind / strace) | " + " | ".join(
        " / ".join(f"{results[n][t]['frames']:,}" for t in ("callgrind", "strace") if t in results[n])
        for n in names) + " |")
    if "callgrind" in tools:
        print("| instructions (callgrind Ir) | "
              + " | ".join(f"{results[n]['callgrind']['instructions_per_frame']:,.0f}" for n in names) + " |")
    if "strace" in tools:
        for call in (*SYSCALLS, "all"):
            print(f"| {call} | " + " | ".join(f"{results[n]['strace']['per_frame'][call]:.2f}" for n in names) + " |")
    print(f"\nload average after {load_average()[0]:.2f} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
