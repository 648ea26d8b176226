"""``ocpp-proxy sessions export``: the session log as CSV or JSON (docs/standalone.md).

Reads the store in ``[offline] data_dir`` while the proxy runs (SQLite WAL:
a reader never blocks the proxy's commits). Signed meter data is printed as
the exact text the wallbox sent (each signed ``sampledValue`` object, as a
JSON string in JSON output and a JSON array of strings in one CSV column), so
a verifier can check it against the meter's signature.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxy.core.sessionlog import SessionRecord, utc
from proxy.storage.offline_queue import DB_NAME, SqliteStorage

#: CSV columns, in order (JSON objects have the same keys).
COLUMNS = ("charger", "transaction", "backend_transaction", "connector", "id_tag", "started", "stopped",
           "meter_start_wh", "meter_stop_wh", "energy_wh", "reason", "signed")


class ExportError(Exception):
    """The export cannot run (no log yet, a bad time); the message says what to do."""


def parse_time(value: str | None, option: str) -> str | None:
    """``--from``/``--to``: an ISO date or date-time (UTC unless it carries an offset)."""
    if value is None:
        return None
    parsed = utc(value)
    if parsed is None:
        raise ExportError(f"{option} {value!r}: expected a date (2026-11-01) or date-time (2026-11-01T08:00:00Z)")
    return parsed


def read_sessions(data_dir: str, since: str | None, until: str | None) -> list[SessionRecord]:
    path = Path(data_dir) / DB_NAME
    if not path.exists():
        raise ExportError(f"no session log at {path}: the proxy has not recorded anything with this data_dir")
    storage = SqliteStorage(path, mirrors=False)
    try:
        return storage.sessions(since, until)
    finally:
        storage.close()


def as_dict(record: SessionRecord) -> dict[str, Any]:
    return {"charger": record.charger, "transaction": record.transaction,
            "backend_transaction": record.backend_transaction, "connector": record.connector,
            "id_tag": record.id_tag, "started": record.started, "stopped": record.stopped,
            "meter_start_wh": record.meter_start_wh,
            "meter_stop_wh": record.meter_stop_wh,
            "energy_wh": record.energy_wh, "reason": record.reason, "signed": list(record.signed)}


def render(records: Sequence[SessionRecord], fmt: str) -> str:
    rows = [as_dict(record) for record in records]
    if fmt == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {key: "" if value is None else value for key, value in row.items()}
        cells["signed"] = json.dumps(row["signed"], ensure_ascii=False) if row["signed"] else ""
        writer.writerow(cells)
    return out.getvalue()
