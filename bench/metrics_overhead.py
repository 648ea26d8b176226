"""Cost of the metrics on the relay's hot path, and of one scrape.

    PYTHONPATH=. python bench/metrics_overhead.py

Per-frame work is one dict lookup for a cached tally plus two integer additions (added to the
locked Prometheus counters when the registry is read); a CALL round trip (two frames and a histogram observation) should
stay far below the relay's own CPU per round trip (two forwarded frames at 25-29 µs
each: README, "Performance").
"""

from __future__ import annotations

import time
import timeit
from typing import Any

from prometheus_client import generate_latest

from proxy.messages.ocppj import classify
from proxy.ops.metrics import Metrics, MetricsListener
from proxy.core.session import CallCompleted, Session


class _Paired:
    """What MetricsListener reads of a PairedSession: its charger, upstreams and (sans-IO) session."""

    charger_id = "CP1"
    upstreams: dict[str, Any] = {"primary": None}
    session = Session("CP1")


def main() -> None:
    metrics = Metrics(["CP1"])
    listener = MetricsListener(metrics)
    paired: Any = _Paired()
    call = classify('[2,"1","Heartbeat",{}]')
    result = classify('[3,"1",{"currentTime":"2026-01-01T00:00:00Z"}]')
    signed = classify('[2,"2","MeterValues",{"connectorId":1,"meterValue":[{"sampledValue":[{"value":"K\u00f6ln"}]}]}]')
    done = CallCompleted("primary", "Heartbeat", 0.003)

    def round_trip() -> None:
        listener.frame_received(paired, "wallbox", call, len(call.text))
        listener.frame_received(paired, "primary", result, len(result.text))
        listener.action(paired, done)

    cases = {
        "frame, ASCII": lambda: listener.frame_received(paired, "wallbox", call, len(call.text)),
        "frame, non-ASCII (UTF-8 length)": lambda: listener.frame_received(paired, "wallbox", signed,
                                                                           len(signed.text)),
        "CallCompleted (histogram)": lambda: listener.action(paired, done),
        "round trip: 2 frames + histogram": round_trip,
    }
    number = 200_000
    for name, fn in cases.items():
        seconds = min(timeit.repeat(fn, number=number, repeat=3)) / number
        print(f"{name:36s} {seconds * 1e6:6.2f} µs")

    for n in range(200):
        charger = f"C{n:03d}"
        metrics.session_opened(charger, 1)
        metrics.set_charger_limits(charger, effective=10, local=10, backend=16)
        metrics.set_charger_current(charger, [9.8, 9.9, 10.0])
        metrics.set_connector_status(charger, "1", "Charging")
    for action in ("Heartbeat", "MeterValues", "StatusNotification", "Authorize", "StartTransaction"):
        for leg in ("primary", "wallbox"):
            metrics.call_completed(leg, action, 0.01)
    start = time.perf_counter()
    body = generate_latest(metrics.registry)
    print(f"{'scrape, 200 chargers':36s} {(time.perf_counter() - start) * 1e3:6.2f} ms, {len(body)} bytes")


if __name__ == "__main__":
    main()
