"""Where one round trip's time goes at 1 wallbox: scheduler passes, task steps, system calls, CPU.

    python -m bench.wakeups [--baseline DIR] [--paths proxy,log-off,floor] [--seconds 5] [--repeats 3]
                            [--no-strace] [--callgrind SECONDS]

At one wallbox the relay sleeps between frames, and each frame costs a whole
wake-up: the kernel's, trio's scheduler pass, the task steps, the system calls.
This runs each relay under ``bench/trioprobe.py`` (a trio instrument) and the
bench load generator with one wallbox in a closed loop (the next CALL as soon
as the answer is in, alternating Heartbeat and 1 KiB MeterValues), and prints
per round trip (two forwarded frames): trio scheduler passes that waited for
I/O, task steps (and by task), the Python time from each wake-up to the next
wait, user and system CPU, context switches, and the round trip's p50; then,
in a second window with ``strace -c -f`` attached (strace slows the process,
so it has its own window), system calls per round trip by name. With
``--callgrind SECONDS``, each path once more under ``valgrind --tool=callgrind``:
instructions executed per round trip (load-independent).

Paths: ``proxy`` (this checkout, defaults), ``log-off`` (the same with
``[offline] session_log = false``), ``floor`` (``bench/floor.py``: a minimal
trio relay on the proxy's wire layer, the floor of this shape), ``baseline``
(``--baseline DIR``: another checkout, defaults). Counts do not move with
other work on the machine; times and CPU do (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.procs import ROOT, Backend, Floor, LoadGen, OcppProxy, Path_, workdir
from bench.sysinfo import load_average, machine, raise_nofile

PROBE = str(ROOT / "bench" / "trioprobe.py")
SYSCALLS = ("epoll_wait", "epoll_ctl", "recvfrom", "sendto", "getrandom", "futex", "pwrite64", "fdatasync")


def _proc(pid: int) -> tuple[float, float, int, int]:
    """User and system CPU seconds, voluntary and involuntary context switches (threads included)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                involuntary += int(line.split()[1])
    return int(fields[11]) / tick, int(fields[12]) / tick, voluntary, involuntary


def _signal_and_wait(pid: int, out: Path, timeout: float = 30.0) -> dict[str, Any]:
    done = Path(str(out) + ".done")
    done.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not done.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the probe did not write its counters")
        time.sleep(0.01)
    value: dict[str, Any] = json.loads(out.read_text())
    return value


def _saturate(gen: LoadGen, seconds: float) -> dict[str, Any]:
    gen.send("load " + json.dumps({"mode": "saturate", "duration": seconds, "warmup": 0.0, "grace": 30.0}))
    result = gen.read_json(seconds + 60)
    if result["unanswered"]:
        raise RuntimeError(f"{result['unanswered']} CALLs unanswered")
    return result


def measure(path: Path_, out: Path, seconds: float, strace: bool) -> dict[str, Any]:
    """One window under the probe (and one under strace): per round trip."""
    gen = LoadGen(path.targets(1))
    try:
        gen.connected(60)
        pid = path.pids[0]
        _saturate(gen, 0.5)  # warm: the first frames pay for imports and first-time set-ups
        os.kill(pid, signal.SIGUSR2)
        before = _proc(pid)
        result = _saturate(gen, seconds)
        after = _proc(pid)
        probe = _signal_and_wait(pid, out)
        trips = int(result["completed_total"])
        latencies = sorted(v for kind in ("hb", "mv") for v in result["latencies_us"][kind])
        row: dict[str, Any] = {
            "round_trips": trips,
            "p50_us": latencies[len(latencies) // 2] if latencies else None,
            "passes": probe["passes"] / trips,
            "task_steps": probe["steps"] / trips,
            "steps_by_task": {k: v / trips for k, v in probe["steps_by_task"].items()},
            "busy_us_per_pass": probe["busy_seconds"] / max(1, probe["passes"]) * 1e6,
            "pass_p50_us": probe["pass_p50"] * 1e6 if probe["pass_p50"] is not None else None,
            "to_send_p50_us": probe["to_send_p50"] * 1e6 if probe["to_send_p50"] is not None else None,
            "gc_runs_per_1000": sum(probe["collections"]) / trips * 1000,
            "gc_us": probe["collecting_seconds"] / trips * 1e6,
            "user_us": (after[0] - before[0]) / trips * 1e6,
            "system_us": (after[1] - before[1]) / trips * 1e6,
            "voluntary_switches": (after[2] - before[2]) / trips,
            "involuntary_switches": (after[3] - before[3]) / trips,
        }
        if strace:
            row["syscalls"] = _strace(pid, gen, seconds)
        return row
    finally:
        gen.close()


def _strace(pid: int, gen: LoadGen, seconds: float) -> dict[str, float]:
    summary = workdir() / "strace.txt"
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(summary), "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert tracer.stderr is not None
    tracer.stderr.readline()  # "strace: Process N attached": counting from here
    trips = int(_saturate(gen, seconds)["completed_total"])
    tracer.send_signal(signal.SIGINT)
    tracer.wait(60)
    calls: dict[str, int] = {}
    for line in summary.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and not fields[-1].startswith("total"):
            calls[fields[-1]] = int(fields[3])
    per_trip = {call: calls.get(call, 0) / trips for call in SYSCALLS}
    per_trip["all"] = sum(calls.values()) / trips
    return per_trip


def instructions(path: Path_, out: Path, seconds: float) -> dict[str, Any]:
    """Under callgrind: instructions executed per round trip (zeroed when the load starts, dumped 1 s after)."""
    gen = LoadGen(path.targets(1))
    try:
        gen.connected(600)
        pid = str(path.pids[0])
        _saturate(gen, 0.5)
        subprocess.run(["callgrind_control", "--zero", pid], check=True, capture_output=True, timeout=120)
        trips = int(_saturate(gen, seconds)["completed_total"])
        time.sleep(1.0)
        subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True, timeout=120)
    finally:
        gen.close()
    dumps = sorted(out.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
    match = re.search(r"^(?:summary|totals): (\d+)", dumps[-1].read_text(errors="replace"), re.MULTILINE) \
        if dumps else None
    if match is None:
        raise RuntimeError(f"no callgrind dump in {out}")
    return {"round_trips": trips, "instructions_per_round_trip": int(match.group(1)) / trips}


def _path(name: str, work: Path, baseline: Path | None, callgrind: bool = False) -> Path_:
    wrapper = [sys.executable, PROBE]
    if callgrind:
        (work / f"{name}-callgrind").mkdir()
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/{name}-callgrind/callgrind.out"]
    timeout = 600.0 if callgrind else 30.0
    if name == "floor":
        return Floor(wrapper=wrapper)
    if name == "baseline":
        if baseline is None:
            raise SystemExit("the baseline path needs --baseline DIR")
        (work / name).mkdir(exist_ok=True)
        return OcppProxy(work / name, baseline.resolve(), name, wrapper=wrapper, start_timeout=timeout)
    (work / name).mkdir(exist_ok=True)
    return OcppProxy(work / name, ROOT, name, wrapper=wrapper, start_timeout=timeout,
                     session_log=False if name == "log-off" else None)


def table(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Medians over the repeats, one column per path."""
    names = list(results)

    def med(name: str, *keys: str) -> float | None:
        values: list[float] = []
        for run in results[name]:
            value: Any = run
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, (int, float)):
                values.append(float(value))
        return statistics.median(values) if values else None

    def fmt(value: float | None, form: str) -> str:
        return "–" if value is None else form.format(value)

    rows: list[tuple[str, tuple[str, ...], str]] = [
            ("round trip p50 (µs)", ("p50_us",), "{:.0f}"),
            ("instructions (callgrind Ir)", ("instructions",), "{:,.0f}"),
            ("trio passes that waited for I/O", ("passes",), "{:.2f}"),
            ("task steps", ("task_steps",), "{:.2f}"),
            ("µs per pass, wake-up → next wait: mean", ("busy_us_per_pass",), "{:.1f}"),
            ("µs per pass, wake-up → next wait: p50", ("pass_p50_us",), "{:.1f}"),
            ("µs per pass, wake-up → frame handed to the socket: p50", ("to_send_p50_us",), "{:.1f}"),
            ("garbage collector runs per 1000 round trips", ("gc_runs_per_1000",), "{:.1f}"),
            ("garbage collector µs", ("gc_us",), "{:.2f}"),
            ("user CPU µs", ("user_us",), "{:.1f}"),
            ("system CPU µs", ("system_us",), "{:.1f}"),
            ("voluntary context switches", ("voluntary_switches",), "{:.2f}"),
            ("involuntary context switches", ("involuntary_switches",), "{:.2f}")]
    tasks = sorted({task for name in names for run in results[name] for task in run["steps_by_task"]})
    rows += [(f"steps of {task}", ("steps_by_task", task), "{:.2f}") for task in tasks]
    if any("syscalls" in run for name in names for run in results[name]):
        rows += [(f"{call} (strace window)", ("syscalls", call), "{:.2f}") for call in (*SYSCALLS, "all")]
    out = ["| per round trip (2 frames), 1 wallbox closed loop | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
    for title, keys, form in rows:
        out.append(f"| {title} | " + " | ".join(fmt(med(n, *keys), form) for n in names) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wakeups", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout, measured the same way in this run")
    parser.add_argument("--paths", help="comma-separated subset of proxy,log-off,floor,baseline "
                                        "(default: baseline if given, log-off, proxy, floor)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-strace", action="store_true")
    parser.add_argument("--callgrind", type=float, metavar="SECONDS",
                        help="also count instructions per round trip under callgrind (a SECONDS window per path)")
    args = parser.parse_args(argv)
    names = args.paths.split(",") if args.paths else (
        (["baseline"] if args.baseline else []) + ["log-off", "proxy", "floor"])
    raise_nofile()
    info = machine(None)
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, Python {info['python']}; "
          f"load average before {' '.join(f'{x:.2f}' for x in load_average())}; "
          f"{args.seconds:g} s windows, {args.repeats} runs interleaved (medians)", flush=True)
    work = workdir()
    backend = Backend()
    paths = {name: _path(name, work, args.baseline) for name in names}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    try:
        for name, path in paths.items():
            os.environ["TRIOPROBE_OUT"] = str(work / f"{name}.json")
            path.start(backend.port, 1)
        for repeat in range(args.repeats):
            for name, path in paths.items():
                print(f"[{time.strftime('%H:%M:%S')}] {name} run {repeat + 1}/{args.repeats}", file=sys.stderr,
                      flush=True)
                results[name].append(measure(path, work / f"{name}.json", args.seconds,
                                             strace=not args.no_strace and repeat == 0))
        for path in paths.values():
            path.stop()
        if args.callgrind:
            for name in names:
                print(f"[{time.strftime('%H:%M:%S')}] {name} under callgrind", file=sys.stderr, flush=True)
                path = _path(name, work, args.baseline, callgrind=True)
                path.start(backend.port, 1)
                try:
                    counted = instructions(path, work / f"{name}-callgrind", args.callgrind)
                finally:
                    path.stop()
                for run in results[name]:
                    run["instructions"] = counted["instructions_per_round_trip"]
    finally:
        for path in paths.values():
            path.stop()
        backend.stop()
    print("\n".join(["", *table(results), "",
                     f"load average after {' '.join(f'{x:.2f}' for x in load_average())} "
                     f"({time.strftime('%Y-%m-%d %H:%M:%S')})"]))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
