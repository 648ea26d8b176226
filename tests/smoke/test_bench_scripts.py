"""The stand-alone benchmark scripts run end to end with tiny counts (no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str) -> str:
    """Run ``bench/<script>`` (or ``-m bench.<module>``) as a user would; its output, which must name
    the machine it ran on."""
    target = [f"bench/{script}"] if script.endswith(".py") else ["-m", f"bench.{script}"]
    result = subprocess.run([sys.executable, *target, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "machine: " in result.stdout and "cores, Python" in result.stdout
    return result.stdout


def test_limit_latency_bench_runs_with_small_counts() -> None:
    out = run_bench("limit_latency.py", "--wallboxes", "3", "--rounds", "2", "--budget", "60")
    assert "3 wallboxes, 2 rounds (6 frames)" in out
    assert "p50 " in out and "p99 " in out


def test_modbus_bench_runs_with_small_counts() -> None:
    out = run_bench("modbus.py", "--polls", "20", "--wallboxes", "3", "--window", "1.5")
    for client in ("trio framer", "sync in thread", "asyncio native"):
        assert client in out
    assert "3 virtual charge points" in out and "all booted and in a transaction" in out
    assert "µs per poll" in out


def test_codec_bench_runs_side_by_side_with_a_baseline() -> None:
    out = run_bench("codec", "--size", "20000", "--repeats", "1", "--baseline", str(ROOT))
    rows = [line for line in out.splitlines() if line.startswith("| ") and " s |" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| whole", "| 1 KiB", "| 64 B", "| 1 B"]
    assert all(row.count(" s") == 2 and "wrong result" not in row for row in rows)  # both parsers, every split


def test_modbus_bus_bench_runs_with_small_counts() -> None:
    out = run_bench("modbus_bus.py", "--wallboxes", "2", "--rounds", "10")
    for way in ("tcp, own connection each", "tcp, shared client", "rtu-over-tcp, shared", "rtu-over-tcp, 5 ms gap"):
        assert way in out
    assert "2 wallboxes" in out and "CPU/request" in out


def test_dispatch_bench_runs_side_by_side_with_a_baseline() -> None:
    out = run_bench("dispatch", "--frames", "200", "--repeats", "2", "--runs", "1", "--baseline", str(ROOT))
    rows = [line for line in out.splitlines() if line.startswith(("| this checkout", "| baseline"))]
    assert len(rows) == 2 and all(float(row.rsplit("|", 2)[1]) > 0 for row in rows)


def test_door_flood_bench_runs_with_small_counts() -> None:
    out = run_bench("door_flood", "--sessions", "30", "--flood-seconds", "1", "--budget", "20")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "failed)" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| quiet", "| flood, caps on (defaults)", "| flood, caps off"]
    assert all(" (0 failed)" in row for row in rows)  # the probe got its 101 every time


def test_cluster_bench_runs_with_small_counts(tmp_path: Path) -> None:
    out = run_bench("cluster", "--setup", "10", "--saturate", "4", "--duration", "1", "--repeats", "1",
                    "--failover", "6", "--lease", "2", "--out", str(tmp_path))
    rows = [line for line in out.splitlines() if line.startswith("| ") and "unanswered" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| direct", "| proxy-sqlite", "| proxy", "| haproxy-1",
                                                       "| haproxy-2"]
    assert all("0 setup, 0 unanswered" in row for row in rows), rows
    assert "on the one killed with SIGKILL" in out and "served again after p50" in out
    assert list(tmp_path.glob("cluster-*.md"))


def test_idle_memory_bench_counts_per_pair_side_by_side_with_a_baseline() -> None:
    out = run_bench("idle_memory", "--pairs", "4", "--top", "5", "--baseline", str(ROOT))
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:]
            for line in out.splitlines() if line.startswith("| ")}
    # baseline connected, baseline after a round trip, proxy connected, proxy after a round trip
    assert all(float(cell.replace(",", "")) > 0 for cell in rows["traced bytes (tracemalloc)"])
    # Three tasks per idle pair: the connection's (with the wallbox's reader), the link, the timer.
    assert rows["trio tasks"] == ["3.00"] * 4
    assert "## connected: bytes per pair by the innermost proxy function on the way" in out


def test_wakeups_bench_counts_per_round_trip_beside_the_floor_and_a_baseline() -> None:
    out = run_bench("wakeups", "--seconds", "0.5", "--repeats", "1", "--baseline", str(ROOT))
    header = next(line for line in out.splitlines() if line.startswith("| per round trip"))
    assert header.split(" | ")[1:] == ["baseline", "log-off", "proxy", "floor |"]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in out.splitlines() if line.startswith("| ")}
    # One wallbox, closed loop: each round trip wakes every relay at least once per direction, and the
    # strace window saw each relay's socket calls.
    for title in ("trio passes that waited for I/O", "recvfrom (strace window)", "sendto (strace window)"):
        assert all(float(cell.strip(" |")) >= 1.5 for cell in rows[title]), (title, rows[title])


def test_session_log_cost_bench_runs_side_by_side_with_a_baseline() -> None:
    out = run_bench("sessionlog_cost", "--chargers", "5", "--rate", "200", "--seconds", "0.5", "--repeats", "1",
                    "--baseline", str(ROOT))
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and "log o" in line]
    assert rows == ["| before log off", "| before log on", "| after log off", "| after log on"]


def test_session_log_latency_bench_runs_with_small_counts() -> None:
    out = run_bench("sessionlog_latency", "--wallboxes", "3", "--rate", "5", "--seconds", "1", "--repeats", "1")
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and "log o" in line]
    assert rows == ["| after log off", "| after log on"]


def test_wakeups_bench_counts_instructions_of_the_floor_under_callgrind() -> None:
    out = run_bench("wakeups", "--seconds", "0.5", "--repeats", "1", "--no-strace", "--paths", "floor",
                    "--callgrind", "0.5")
    row = next(line for line in out.splitlines() if line.startswith("| instructions (callgrind Ir)"))
    assert int(row.split(" | ")[1].strip(" |").replace(",", "")) > 10_000  # a round trip is work for the interpreter


def test_gc_passes_bench_shows_the_proxy_process_pacing_its_collector() -> None:
    """``ocpp-proxy run`` as an operator starts it: 30 wallboxes raise its first GC threshold to 40 × 30."""
    out = run_bench("gc_passes", "--wallboxes", "30", "--seconds", "1", "--repeats", "1", "--session-log", "off")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 30 |")]
    assert len(rows) == 1, out
    assert rows[0][2] == "off" and float(rows[0][3].replace(",", "")) > 0  # frames went through
    assert rows[0][-1].rstrip(" |") == "1200"


def test_offline_answer_bench_reports_each_run_and_the_runs_at_target() -> None:
    out = run_bench("offline_answer", "--wallboxes", "4", "--rate", "5", "--seconds", "1", "--repeats", "2",
                    "--loads", "rate", "--paths", "offline", "--session-log", "off")
    assert "runs at target" in out and "every answer on disk in every run: True" in out
    assert out.count("  - run ") == 2 and "checkpoints {" in out


def test_commit_latency_bench_runs_both_checkpoint_modes() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.commit_latency", "--seconds", "0.3", "--rounds", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "| inline |" in out and "| thread |" in out
