"""Frame parser micro-benchmark: one 1 MiB text frame fed whole, in 1 KiB, 64 B and 1 B reads.

    python -m bench.codec [--baseline DIR] [--size BYTES] [--skip-baseline-bytes]

Reports CPU seconds (``time.process_time``, so other work on the machine
changes it less than wall time) per way of feeding. A parser that re-copies the
partial frame on every read is quadratic in the number of reads; this one is
linear. ``--baseline DIR`` loads ``DIR/proxy/wire/codec.py`` (another checkout,
e.g. ``git worktree add /tmp/base main``) and measures it side by side in the
same run; its 1-byte case alone took about 20 s before the parser was made
linear, so ``--skip-baseline-bytes`` leaves it out.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Protocol

from bench.sysinfo import load_average, machine
from proxy.wire import codec

CHUNKS: tuple[tuple[str, int | None], ...] = (("whole", None), ("1 KiB", 1024), ("64 B", 64), ("1 B", 1))


class Parser(Protocol):
    def feed(self, data: bytes) -> Sequence[object]: ...


def masked_text_frame(size: int) -> bytes:
    """One client text frame of ``size`` payload bytes, masked with a random key."""
    payload = b"[2,\"1\",\"DataTransfer\",{\"data\":\"" + b"x" * (size - 36) + b"\"}]"
    return codec.encode(codec.Opcode.TEXT, payload, mask=True)


def feed_all(parser: Parser, data: bytes, chunk: int | None) -> tuple[float, int]:
    """CPU seconds to feed ``data`` in ``chunk``-byte reads; the number of events it gave."""
    step = chunk or len(data)
    pieces = [data[i:i + step] for i in range(0, len(data), step)]  # cut before the clock starts
    feed = parser.feed
    events = 0
    started = time.process_time()
    for piece in pieces:
        events += len(feed(piece))
    return time.process_time() - started, events


def load_baseline(checkout: Path) -> ModuleType:
    source = checkout / "proxy" / "wire" / "codec.py"
    spec = importlib.util.spec_from_file_location("baseline_codec", source)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {source}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def measure(make: Callable[[], Parser], data: bytes, chunk: int | None, repeats: int) -> float | None:
    """Best of ``repeats`` CPU times (the least disturbed run); None if the frame did not come out whole."""
    best: float | None = None
    for _ in range(repeats):
        seconds, events = feed_all(make(), data, chunk)
        if events != 1:
            return None
        best = seconds if best is None else min(best, seconds)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 20, help="payload bytes (default 1 MiB)")
    parser.add_argument("--baseline", type=Path, help="another checkout whose parser runs side by side")
    parser.add_argument("--skip-baseline-bytes", action="store_true", help="leave out the baseline's 1 B case")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case, best reported (1 B: one run)")
    args = parser.parse_args(argv)
    data = masked_text_frame(args.size)
    limit = args.size + 1024
    parsers: dict[str, Callable[[], Parser]] = {
        "this checkout": lambda: codec.FrameParser(from_client=True, max_message_size=limit)}
    if args.baseline is not None:
        old = load_baseline(args.baseline)
        parsers[f"baseline ({args.baseline})"] = lambda: old.FrameParser(from_client=True, max_message_size=limit)
    info = machine(None)
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, Python {platform.python_version()}, "
          f"load average before {load_average()[0]:.2f}; {len(data):,} bytes, one masked text frame")
    print(f"CPU seconds (best of {args.repeats}; 1 B reads: one run)\n")
    names = list(parsers)
    print("| reads | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, chunk in CHUNKS:
        cells = []
        for name, make in parsers.items():
            if chunk == 1 and name != names[0] and args.skip_baseline_bytes:
                cells.append("skipped")
                continue
            seconds = measure(make, data, chunk, 1 if chunk == 1 else args.repeats)
            cells.append("wrong result" if seconds is None else f"{seconds:.4f} s")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nload average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
