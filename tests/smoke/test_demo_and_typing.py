"""The README's demo command works, and proxy, bench and tests stay mypy --strict clean."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from proxy.demo.run import run_demo

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_and_reports_byte_identical_frames() -> None:
    out = io.StringIO()
    assert run_demo(wallboxes=2, out=out) == 0
    text = out.getvalue()
    assert "all frames arrived byte-identical" in text
    assert "CP002" in text and "DataTransfer" in text and "StopTransaction" in text
    # Two wallboxes share the demo's 32 A site limit: the proxy's limits are shown.
    # (Which values depends on when the Modbus car starts drawing: any limit line shows it.)
    assert re.search(r"◀─ proxy    limit [0-9.]+ A \(ChargePointMaxProfile\)", text)
    assert "limits set by the proxy" in text
    # The Modbus wallbox appears to the backend as charge point HD001 and runs a whole transaction
    # (modbus_summary checks Boot, Authorize, Start, MeterValues and Stop arrived).
    virtual = [line for line in text.splitlines() if "HD001  ─▶ backend" in line]
    assert any("StartTransaction.req" in line for line in virtual) and any("MeterValues.req" in line for line in virtual)
    assert "current register: 0 A → " in text
    # The OCPP 2.0.1 station runs a signed transaction against its own 2.0.1 CSMS, byte for byte.
    station = [line for line in text.splitlines() if "CS201  ─▶ backend" in line]
    assert sum("TransactionEvent.req" in line for line in station) == 3
    assert "CS201  ◀─ proxy    limit" in text and "(ChargingStationMaxProfile)" in text  # load-managed in 2.0.1
    assert any(line.startswith("CS201 ") and " yes " in line for line in text.splitlines())


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    # Every module of the three packages was checked (pyproject's [tool.mypy] packages).
    modules = [p for name in ("proxy", "bench", "tests") for p in (ROOT / name).rglob("*.py")
               if "node_modules" not in p.parts]
    checked = int(result.stdout.rsplit(" in ", 1)[1].split()[0])
    assert checked >= len(modules), (checked, len(modules))
