"""bench/limit_latency.py runs end to end with tiny counts (no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_limit_latency_bench_runs_with_small_counts() -> None:
    result = subprocess.run([sys.executable, "bench/limit_latency.py", "--wallboxes", "3", "--rounds", "2",
                             "--budget", "60"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "machine: " in result.stdout and "cores, Python" in result.stdout
    assert "3 wallboxes, 2 rounds (6 frames)" in result.stdout
    assert "p50 " in result.stdout and "p99 " in result.stdout
