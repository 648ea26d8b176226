"""bench/modbus.py runs end to end with tiny counts (no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_modbus_bench_runs_with_small_counts() -> None:
    result = subprocess.run([sys.executable, "bench/modbus.py", "--polls", "20", "--wallboxes", "3",
                             "--window", "1.5"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "machine: " in result.stdout and "cores, Python" in result.stdout
    for client in ("trio framer", "sync in thread", "asyncio native"):
        assert client in result.stdout
    assert "3 virtual charge points" in result.stdout and "all booted and in a transaction" in result.stdout
    assert "µs per poll" in result.stdout
