"""Would a compiled frame path pay? mypyc over the codec and the classifier, against the pure Python.

    python -m bench.compiled [--frames 50000] [--runs 3]

Issue 23 allows a compiled core only where the gain is measured (and the README's commands keep
working without a C compiler). This copies ``proxy/`` of this checkout to a temporary directory,
compiles ``proxy/wire/codec.py`` and ``proxy/messages/ocppj.py`` there with mypyc (needs mypy and
a C compiler), and times the per-frame sans-IO path both ways, interleaved, in fresh
interpreters: parse a masked frame (``FrameParser.feed``), classify it, encode it masked (what
the relay does with each frame besides socket calls, the session and the listeners). Alternating
Heartbeat and a 1 KiB MeterValues, as in ``python -m bench``; CPU time, best of 7 repeats.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.sysinfo import load_average, machine

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("proxy/wire/codec.py", "proxy/messages/ocppj.py")

LOOP = '''
import sys, time, timeit
from proxy.wire import codec
from proxy.messages.ocppj import classify
heartbeat = '[2,"123456","Heartbeat",{}]'
meter = ('[2,"123457","MeterValues",{"connectorId":1,"meterValue":[{"timestamp":"2026-11-27T08:00:00Z",'
         '"sampledValue":[' + ",".join(['{"value":"1234.5","measurand":"Energy.Active.Import.Register"}'] * 12)
         + ']}]}]')
frames = [codec.encode(codec.Opcode.TEXT, text.encode(), True) for text in (heartbeat, meter)]
parser = codec.FrameParser(from_client=True, max_message_size=1 << 20)

def both():
    for data in frames:
        for event in parser.feed(data):
            frame = classify(event.text)
            codec.encode(codec.Opcode.TEXT, frame.text.encode(), True)

n = int(sys.argv[1])
compiled = codec.__file__.endswith(".so")
best = min(timeit.repeat(both, number=n, repeat=7, timer=time.process_time))
print(compiled, best / n / 2 * 1e9)
'''


def measure(tree: Path, frames: int) -> tuple[bool, float]:
    result = subprocess.run([sys.executable, "-c", LOOP, str(frames)], cwd=tree, capture_output=True, text=True,
                            env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, timeout=600, check=True)
    compiled, ns = result.stdout.split()
    return compiled == "True", float(ns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compiled", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    mypyc = shutil.which("mypyc", path=str(Path(sys.executable).parent)) or shutil.which("mypyc")
    if mypyc is None:
        raise SystemExit("mypyc is not installed (pip install mypy)")
    info = machine(None)
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, Python {info['python']}, "
          f"load average before {load_average()[0]:.2f}")
    with tempfile.TemporaryDirectory() as scratch:
        plain, built = Path(scratch) / "plain", Path(scratch) / "compiled"
        for tree in (plain, built):
            shutil.copytree(ROOT / "proxy", tree / "proxy", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        subprocess.run([mypyc, *MODULES], cwd=built, check=True, capture_output=True, timeout=900)
        results: dict[str, list[float]] = {"pure Python": [], "mypyc": []}
        for _ in range(args.runs):
            for name, tree in (("pure Python", plain), ("mypyc", built)):
                compiled, ns = measure(tree, args.frames)
                assert compiled == (name == "mypyc"), f"{name}: the wrong module was imported"
                results[name].append(ns)
    print("\nns of CPU per frame: parse (masked) + classify + encode (masked), best of 7 per run\n")
    print("| build | runs | best |")
    print("|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {' / '.join(f'{v:.0f}' for v in values)} | {min(values):.0f} |")
    saved = min(results["pure Python"]) - min(results["mypyc"])
    print(f"\nmypyc saves {saved:.0f} ns per frame; load average after {load_average()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
