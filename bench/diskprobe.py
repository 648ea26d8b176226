"""The disk's own fsync stalls during a benchmark run, measured beside the proxy.

Offline answering waits for an fsync before each answer (docs/storage.md), so
its tail can be no better than the disk's. On a virtual disk (this project's
benchmark machine is a Firecracker VM) a plain ``fdatasync`` of 4 KiB, with
nothing else running, now and then takes 100 ms to over a second
(``bench/results/disk-stalls-20261127.md``). :class:`DiskProbe` measures that
floor during each run: a thread writes one 4 KiB block to a file of its own in
the proxy's data directory and fdatasyncs it every ``interval`` seconds (100 a
second by default, a tenth of the proxy's commit rate), recording every
latency. A run whose probe saw the disk stall shows the stall in the same
row as the proxy's p99, so a miss can be told apart: the disk's, or the proxy's own.

    PYTHONPATH=. python -m bench.diskprobe [--seconds 60] [--interval 0.01] [--block 4096] [--dir DIR]

runs the probe alone and prints what it saw (the disk's floor, nothing else running);
``--interval 0.001 --block 20480`` writes about what the offline queue's commits do at
2000 CALL/s (1000 fsyncs a second, 5 WAL pages each).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from bench.sysinfo import load_average, machine

#: A single fsync longer than this counts as a stall (the offline answering target's p99).
STALL_MS = 20.0
_BLOCK = 4096


@dataclass
class ProbeResult:
    """What one probe saw: every fsync's latency and when each stall began (seconds after the start)."""

    latencies_ms: list[float] = field(default_factory=list)
    stalls: list[tuple[float, float]] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        ordered = sorted(self.latencies_ms)
        count = len(ordered)
        return {"fsyncs": count,
                "p50_ms": round(ordered[count // 2], 3) if count else None,
                "p99_ms": round(ordered[min(count - 1, int(count * 0.99))], 3) if count else None,
                "max_ms": round(ordered[-1], 1) if count else None,
                "stalls": len(self.stalls),
                "stalled_ms": round(sum(ms for _, ms in self.stalls), 1),
                "longest_stalls": sorted(self.stalls, key=lambda s: -s[1])[:5]}


class DiskProbe:
    """A context manager: fdatasync of one block every ``interval`` s in ``directory`` from a thread, while inside."""

    def __init__(self, directory: Path, *, interval: float = 0.01, block: int = _BLOCK) -> None:
        self.path = directory / ".disk-probe"
        self.interval = interval
        self.block = block
        self.result = ProbeResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-probe", daemon=True)

    def __enter__(self) -> DiskProbe:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        block = os.urandom(self.block)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, block, 0)
            os.fsync(fd)  # allocated once: every probe write after this overwrites in place
            start = time.perf_counter()
            while not self._stop.wait(self.interval):
                os.pwrite(fd, block, 0)
                began = time.perf_counter()
                os.fdatasync(fd)
                ms = (time.perf_counter() - began) * 1000
                self.result.latencies_ms.append(ms)
                if ms > STALL_MS:
                    self.result.stalls.append((round(began - start, 2), round(ms, 1)))
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--block", type=int, default=_BLOCK, help="bytes written before each fdatasync")
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    args = parser.parse_args()
    print(f"machine: {machine(None)}; load average {load_average()[0]:.2f}; {args.block} B every {args.interval} s "
          f"for {args.seconds:g} s in {args.dir}", flush=True)
    with DiskProbe(args.dir, interval=args.interval, block=args.block) as probe:
        time.sleep(args.seconds)  # the measurement window itself: the probe runs while this waits
    print(probe.result.summary())


if __name__ == "__main__":
    main()
