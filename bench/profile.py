"""Profile ocpp-proxy's hot path under saturation with py-spy (``pip install py-spy``).

    python -m bench.profile [--wallboxes 100] [--seconds 10] [--out /tmp/proxy.collapsed] [--session-log on|off]
        [--mode saturate|rate] [--rate 1] [--offline]

Starts the bench backend and the proxy (as ``python -m proxy run``), attaches
py-spy to the proxy, saturates it from the load generator, and prints the
functions with the most samples: self time (the function itself) and total
(with what it calls). The collapsed stacks can be fed to a flame graph tool.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench.procs import Backend, LoadGen, OcppProxy, free_port, workdir
from bench.sysinfo import raise_nofile


def summarize(collapsed: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        samples += count
        frames = [f.split(" (")[0] + " " + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                  if " (" in f else f for f in stack.split(";")]
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    lines = [f"{samples} samples", "", "self %   function"]
    lines += [f"{n / samples * 100:6.1f}   {name}" for name, n in own.most_common(top)]
    lines += ["", "total %  function"]
    lines += [f"{n / samples * 100:6.1f}   {name}" for name, n in total.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--wallboxes", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("/tmp/proxy.collapsed"))
    parser.add_argument("--mode", default="saturate", choices=("saturate", "rate"))
    parser.add_argument("--session-log", choices=("on", "off"), help="[offline] session_log (default: the config's)")
    parser.add_argument("--rate", type=float, default=1.0, help="CALLs per second per wallbox (--mode rate)")
    parser.add_argument("--offline", action="store_true",
                        help="no backend listens: every CALL is committed to the queue and answered locally")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raise_nofile()
    backend = None if args.offline else Backend()
    proxy = OcppProxy(workdir(), session_log=None if args.session_log is None else args.session_log == "on")
    proxy.start(free_port() if backend is None else backend.port, 0)
    gen = LoadGen(proxy.targets(args.wallboxes))
    try:
        gen.connected(120)
        recorder = subprocess.Popen([spy, "record", "--pid", str(proxy.pids[0]), "--rate", "500",
                                     "--duration", str(int(args.seconds)), "--format", "raw",
                                     "--output", str(args.out), "--nonblocking"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gen.send("load " + json.dumps({"mode": args.mode, "duration": args.seconds + 1, "warmup": 0.5,
                                      "rate": args.rate}))
        result = gen.read_json(args.seconds + 60)
        recorder.wait(60)
        rps = sum(len(v) for v in result["latencies_us"].values()) / (args.seconds + 1)
        print(f"{args.wallboxes} wallboxes, {args.mode}: {rps:,.0f} round trips/s while profiled")
    finally:
        gen.close()
        proxy.stop()
        if backend is not None:
            backend.stop()
    print(summarize(args.out, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
