"""CPU per forwarded frame in the proxy's own per-frame code: Session, the relay's dispatch, metrics.

    python -m bench.dispatch [--baseline DIR] [--frames N] [--repeats N]

No sockets and no event loop: a wallbox MeterValues CALL and the backend's
answer go through ``Session.from_wallbox`` / ``from_upstream``, the
``MetricsListener``'s ``frame_received`` and ``PairedSession._dispatch`` (the
sends land in the outboxes, which are emptied). This is the part of the hot
path the listener contract (docs/design.md) touches; the relay's socket work is
in ``python -m bench``. ``--baseline DIR`` runs the same loop on another
checkout in a child process, side by side, interleaved run by run. CPU seconds
(``time.process_time``), best of ``--repeats``, so other work on a shared
machine inflates the figures less than wall time.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

from bench.sysinfo import load_average, machine

ROOT = Path(__file__).resolve().parents[1]

#: The measurement, run with ``proxy`` importable from the checkout under test.
LOOP = '''
import sys, time, timeit
from proxy.core.session import PRIMARY, WALLBOX, Session
from proxy.ops.metrics import Metrics, MetricsListener
from proxy.runtime.relay import PairedSession


class Idle:
    async def get_message(self): ...
    async def send_message(self, message): ...
    async def aclose(self, code=1000, reason=None): ...
    async def ping(self, payload=None): ...


frames, repeats = int(sys.argv[1]), int(sys.argv[2])
listener = MetricsListener(Metrics(["CP1"]))
session = Session("CP1")
paired = PairedSession("CP1", session, Idle(), {PRIMARY: Idle()}, log=None, listeners=[listener])
wallbox_out, upstream_out = paired._wallbox_out._queue, paired._upstream_out[PRIMARY]._queue
call = '[2,"%d","MeterValues",{"connectorId":1,"meterValue":[]}]'
answer = '[3,"%d",{}]'
count = [0]


def round_trip():
    count[0] += 1
    n = count[0]
    actions = session.from_wallbox(call % n, 0.0)
    frame = session.last_frame
    listener.frame_received(paired, WALLBOX, frame, len(frame.text))
    paired._dispatch(actions)
    actions = session.from_upstream(PRIMARY, answer % n, 0.0)
    frame = session.last_frame
    listener.frame_received(paired, PRIMARY, frame, len(frame.text))
    paired._dispatch(actions)
    wallbox_out.clear()
    upstream_out.clear()


best = min(timeit.repeat(round_trip, number=frames, repeat=repeats, timer=time.process_time))
print(best / frames / 2 * 1e9)
'''


def measure(checkout: Path, frames: int, repeats: int) -> float:
    """ns of CPU per forwarded frame, in a fresh interpreter importing ``proxy`` from ``checkout``."""
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(checkout)!r})\n{LOOP}",
                             str(frames), str(repeats)], cwd=checkout, capture_output=True, text=True,
                            timeout=600, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{checkout}: {result.stderr[-2000:]}")
    return float(result.stdout.strip())


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in load_average())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--baseline", type=Path, help="another checkout, measured side by side")
    parser.add_argument("--frames", type=int, default=5000, help="round trips per repeat")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per checkout")
    args = parser.parse_args(argv)
    info: dict[str, Any] = machine(None)
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, Python {platform.python_version()}, "
          f"load average {_load()}")
    checkouts = {"this checkout": ROOT}
    if args.baseline is not None:
        checkouts[f"baseline ({args.baseline})"] = args.baseline.resolve()
    results: dict[str, list[float]] = {name: [] for name in checkouts}
    for _ in range(args.runs):
        for name, path in checkouts.items():
            results[name].append(measure(path, args.frames, args.repeats))
    print(f"\nns of CPU per forwarded frame (session + dispatch + metrics), best of {args.repeats} x "
          f"{args.frames} round trips per run\n")
    print("| checkout | runs | best |")
    print("|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {' / '.join(f'{v:.0f}' for v in values)} | {min(values):.0f} |")
    print(f"\nmeasured {time.strftime('%Y-%m-%d %H:%M')}, load average after {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
