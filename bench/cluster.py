"""Several proxies behind HAProxy (issue 22): pairing, throughput and failover, side by side in one run.

    PYTHONPATH=. python -m bench.cluster [--setup 300] [--saturate 100] [--duration 5] [--repeats 2]
                                         [--failover 100] [--lease 15] [--out bench/results]
    python -m bench.cluster --repeats 0 --lease 5     # the failover alone (--failover 0: no failover)

Every path gets the same load from the same load generator (bench/loadgen.py) against the same
backend (bench/backend.py), interleaved, ``--repeats`` times (medians reported):

* ``direct``: the load generator on the backend itself (the ceiling of generator + backend here);
* ``proxy-sqlite``: one ``python -m proxy run`` process as an appliance runs it (SQLite, no lease);
* ``proxy``: one process with the state in PostgreSQL (``[store] url``, the charger lease taken
  at every handshake), wallboxes connected to it directly;
* ``haproxy-1``: HAProxy with deploy/haproxy.cfg (rendered for loopback, tests/haproxykit.py) in
  front of that same process;
* ``haproxy-2``: HAProxy in front of two processes on the same database, routed by charge point id.

Per path: ``setup``: ``--setup`` wallboxes connect at once; pairs per second = wallboxes / the time
until the last one was paired (its 101 and the backend's handshake for it). ``saturate``:
``--saturate`` wallboxes in a closed loop for ``--duration`` s; frames per second forwarded (each
round trip is a CALL and its answer) and the CPU of the relay's processes per frame (HAProxy's
included on its paths).

Then ``failover``: ``--failover`` wallboxes (tests/cluster_wallbox.py: reconnect and send their
unanswered CALL again) send a Heartbeat every 0.5 s through HAProxy to the two processes; the
one serving more is killed with SIGKILL. Reported: from the kill until each of its wallboxes had
an answer again (p50, max), and the 503s they got meanwhile. Expect about ``[store]
lease_seconds`` (``--lease``, the product's default 15 s): the survivor serves a charger once the
dead process's lease ran out.

The machine (bench/sysinfo.py) and its load average before and after are printed with the
results: on a shared machine the numbers are noisy, and the side-by-side ratios are the finding.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench import report
from bench.procs import Backend, Direct, OcppProxy, Path_, free_port
from bench.run import Settings, Suite, measure_load, measure_setup
from bench.sysinfo import load_average, machine, raise_nofile
from tests.cluster_wallbox import ClusterWallbox
from tests.haproxykit import BINDS, Upstream, ensure_haproxy, render, server_states, stats_url, write_certs
from tests.pgkit import PgCluster

RESULTS = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"


class Balanced(Path_):
    """HAProxy (deploy/haproxy.cfg) in front of proxy processes that are already running."""

    def __init__(self, name: str, proxies: list[OcppProxy], etc: Path) -> None:
        self.name = name
        self.proxies = proxies
        self.etc = etc
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, backend_port: int, identities: int) -> None:
        write_certs(self.etc)
        (self.etc / "chargers.map").write_text("")
        self.ports = {name: free_port() for name in BINDS}
        upstreams = [Upstream(f"proxy{n + 1}", p.port, p.metrics_port) for n, p in enumerate(self.proxies)]
        config = self.etc / "haproxy.cfg"
        config.write_text(render(upstreams, self.ports, self.etc))
        log = open(self.etc / "haproxy.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen([ensure_haproxy(), "-db", "-f", str(config)], stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL)
        wanted = {u.name: "UP" for u in upstreams}
        deadline = time.monotonic() + 30
        while self.states() != wanted:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()  # never left running
                raise RuntimeError(f"HAProxy did not bring {wanted} up: {(self.etc / 'haproxy.log').read_text()[-800:]}")
            time.sleep(0.1)  # polling another process's state

    def states(self) -> dict[str, str]:
        try:
            with urllib.request.urlopen(stats_url(self.ports), timeout=5) as reply:
                return server_states(reply.read().decode(), "proxies_ws")
        except OSError:
            return {}

    def targets(self, count: int) -> list[tuple[int, str]]:
        # Ids of its own: a charger that moves to another process right after its session closed
        # is refused while the first still holds its lease (docs/cluster.md); paths must not share.
        return [(self.ports["ws"], f"/ocpp/{self.name.upper()}-{n:05d}") for n in range(count)]

    @property
    def pids(self) -> list[int]:
        own = [self.process.pid] if self.process is not None else []
        return own + [pid for proxy in self.proxies for pid in proxy.pids]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@dataclass
class Run:
    """What one invocation measures."""

    setup: int = 300
    saturate: int = 100
    duration: float = 5.0
    repeats: int = 2
    failover: int = 100
    lease: float = 15.0


def cluster_proxy(work: Path, name: str, store_url: str, lease: float) -> OcppProxy:
    (work / name).mkdir(parents=True, exist_ok=True)
    return OcppProxy(work / name, name=name,
                     extra=f'[store]\nurl = "{store_url}"\nprocess = "{name}"\nlease_seconds = {lease:g}\n')


def throughput(run: Run, backend: Backend, paths: list[Path_]) -> dict[str, Any]:
    settings = Settings(saturate_duration=run.duration, warmup=1.0, loadgen_procs=1)
    suite = Suite(settings, backend, {path.name: path for path in paths})
    rounds: dict[str, list[dict[str, Any]]] = {path.name: [] for path in paths}
    for repeat in range(run.repeats):
        for path in paths:
            suite.log(f"round {repeat + 1}/{run.repeats}: {path.name}")
            setup = measure_setup(suite, path, run.setup)
            load = measure_load(suite, path, run.saturate, "saturate")
            paired = setup.get("all_paired_after_s")
            rounds[path.name].append({
                "pairs_per_s": run.setup / paired if paired else None,
                "setup_failures": setup["failures"] + setup["unpaired"],
                "frames_per_s": load.get("frames_per_s"),
                "unanswered": load.get("unanswered"),
                "relay_cpu_us_per_frame": load.get("relay_cpu_us_per_frame"),
                "error": load.get("error"),
            })
    return {name: report.median_tree(runs) for name, runs in rounds.items()}


def sessions_by_proxy(proxies: list[OcppProxy], prefix: str) -> dict[str, str]:
    """Charger → the proxy whose log has its latest session_opened."""
    served: dict[str, str] = {}
    for proxy in proxies:
        for line in (proxy.workdir / "proxy.log").read_text(errors="replace").splitlines():
            if '"session_opened"' in line:
                event = json.loads(line)
                if event.get("charger", "").startswith(prefix):
                    served[event["charger"]] = proxy.workdir.name
    return served


async def failover(run: Run, haproxy: Balanced, proxies: list[OcppProxy]) -> dict[str, Any]:
    """Kill -9 the process serving most of ``run.failover`` wallboxes; time until all are served again."""
    url = f"ws://{HOST}:{haproxy.ports['ws']}/ocpp/"
    boxes = [ClusterWallbox(f"FO{n:04d}", url + f"FO{n:04d}") for n in range(run.failover)]
    async with trio.open_nursery() as nursery:
        for box in boxes:
            nursery.start_soon(box.serve, functools.partial(box.heartbeats, 0.5))
        with trio.fail_after(120):
            while not all(box.answered for box in boxes):
                await trio.sleep(0.05)  # a bench: polling wallboxes it drives
        served = sessions_by_proxy(proxies, "FO")
        victim_name = Counter(served.values()).most_common(1)[0][0]
        victim = next(p for p in proxies if p.workdir.name == victim_name)
        moved = [box for box in boxes if served.get(box.charger) == victim_name]
        assert victim.process is not None
        os.kill(victim.process.pid, signal.SIGKILL)
        killed = trio.current_time()
        refused_before = {box.charger: len(box.refusals) for box in moved}
        with trio.fail_after(run.lease * 4 + 60):
            while not all(box.answered_at[-1] > killed for box in moved):
                await trio.sleep(0.05)
        back = sorted(next(t for t in box.answered_at if t > killed) - killed for box in moved)
        nursery.cancel_scope.cancel()
    victim.process.wait()
    refusals = Counter(r.split(" retry-after")[0] for box in moved for r in box.refusals[refused_before[box.charger]:])
    return {"wallboxes": run.failover, "on_killed_process": len(moved), "lease_seconds": run.lease,
            "served_again_s": report.percentiles(back), "refusals": dict(refusals)}


def markdown(document: dict[str, Any]) -> str:
    m = document["machine"]
    lines = [f"# Cluster benchmark ({m['date']})", "",
             f"machine: {m['cpu_model']}, {m['cores']} cores, Python {m['python']}, {m['ram_bytes'] / 2**30:.1f} GiB, "
             f"kernel {m['kernel']}, HAProxy {document['haproxy']}.",
             f"Load average before: {', '.join(f'{x:.2f}' for x in m['load_average_start'])}; "
             f"after: {', '.join(f'{x:.2f}' for x in document['load_average_end'])}.", "",
             f"Settings: {document['run']}", "",
             "| path | pairs/s (setup of %d) | frames/s (%d wallboxes, closed loop) | relay CPU µs/frame | failures |"
             % (document["run"]["setup"], document["run"]["saturate"]),
             "|---|---|---|---|---|"]
    for name, row in document.get("throughput", {}).items():
        def num(key: str, fmt: str = "{:,.0f}") -> str:
            value = row.get(key)
            return fmt.format(value) if isinstance(value, (int, float)) else "–"
        lines.append(f"| {name} | {num('pairs_per_s')} | {num('frames_per_s')} | "
                     f"{num('relay_cpu_us_per_frame', '{:.1f}')} | {num('setup_failures')} setup, "
                     f"{num('unanswered')} unanswered |")
    fo = document.get("failover")
    if fo:
        s = fo["served_again_s"]
        lines += ["", f"Failover: {fo['wallboxes']} wallboxes through HAProxy on two processes, "
                      f"{fo['on_killed_process']} on the one killed with SIGKILL, lease_seconds = {fo['lease_seconds']:g}: "
                      f"served again after p50 {s['p50']:.1f} s, max {s['max']:.1f} s; refusals meanwhile: "
                      f"{fo['refusals'] or 'none'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.splitlines()[0])
    defaults = Run()
    for name in ("setup", "saturate", "repeats", "failover"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    parser.add_argument("--duration", type=float, default=defaults.duration)
    parser.add_argument("--lease", type=float, default=defaults.lease)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    run = Run(args.setup, args.saturate, args.duration, args.repeats, args.failover, args.lease)
    raise_nofile()
    document: dict[str, Any] = {"machine": machine(None), "run": run.__dict__,
                                "haproxy": subprocess.run([ensure_haproxy(), "-v"], capture_output=True, text=True,
                                                          check=False).stdout.split()[2]}
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    pg = PgCluster()
    backend = Backend()
    started: list[Path_] = []
    try:
        store = pg.database()
        one, two = (cluster_proxy(work, name, store, run.lease) for name in ("proxy1", "proxy2"))
        (work / "sqlite").mkdir()
        alone = OcppProxy(work / "sqlite", name="proxy-sqlite")  # the appliance: no [store] url, no lease
        direct, front1, front2 = Direct(), Balanced("haproxy-1", [one], work / "h1"), Balanced("haproxy-2", [one, two],
                                                                                                work / "h2")
        one.name = "proxy"  # the path's name in the report (its process is "proxy1")
        order: list[Path_] = [direct, alone, one, two, front1, front2]
        for path in order:
            started.append(path)  # stopped in any case: a proxy that never listened is still killed
            path.start(backend.port, run.setup)
        if run.repeats:
            document["throughput"] = throughput(run, backend, [direct, alone, one, front1, front2])
        if run.failover:
            document["failover"] = trio.run(failover, run, front2, [one, two])
    finally:
        for stopping in reversed(started):
            stopping.stop()
        backend.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    document["load_average_end"] = load_average()
    text = markdown(document)
    print(text)
    if args.out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"cluster-{stamp}.json").write_text(json.dumps(document, indent=1, default=str))
        (args.out / f"cluster-{stamp}.md").write_text(text)
        print(f"written: {args.out / f'cluster-{stamp}.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
