"""Metrics bookkeeping without sockets: label bounds, replaced sessions, config cross-check."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from proxy.config import ConfigError, loads
from proxy.ops.metrics import Metrics, action_label, close_code_label
from tests.opskit import parse, value


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return parse(generate_latest(metrics.registry).decode())[1]


def test_label_values_are_bounded() -> None:
    assert action_label("BootNotification") == "BootNotification"
    assert action_label("TransactionEvent") == "TransactionEvent"  # 2.0.1
    assert action_label("NotifySettlement") == "NotifySettlement"  # 2.1
    assert action_label("SomethingNew") == "other"
    assert action_label(None) == "other"
    assert [close_code_label(c) for c in (1000, 1006, 1015, 1016, 3001, 4999, 5000, 7)] == \
        ["1000", "1006", "1015", "other", "3xxx", "4xxx", "other", "other"]


def test_a_replaced_session_closing_late_keeps_the_charger_connected() -> None:
    """The server opens the new session before the old one's close is reported."""
    metrics = Metrics(["CP1"])
    metrics.session_opened("CP1", 1)
    metrics.set_connector_status("CP1", "1", "Charging")
    metrics.session_opened("CP1", 1)  # the wallbox reconnected
    metrics.session_closed("CP1", "proxy", 1001, 1)  # the old one goes away afterwards
    samples = scrape(metrics)
    assert value(samples, "ocpp_proxy_charger_connected", charger="CP1") == 1
    assert value(samples, "ocpp_proxy_upstream_up", charger="CP1") == 1
    assert value(samples, "ocpp_proxy_connections", side="wallbox") == 1
    assert value(samples, "ocpp_proxy_connections", side="backend") == 1
    assert value(samples, "ocpp_proxy_connector_status", charger="CP1", connector="1", status="Charging") == 1
    metrics.session_closed("CP1", "wallbox", 1000, 1)
    samples = scrape(metrics)
    assert value(samples, "ocpp_proxy_charger_connected", charger="CP1") == 0
    assert value(samples, "ocpp_proxy_connections", side="backend") == 0
    assert metrics.status()["wallboxes"] == 0


def test_upstream_lost_and_regained_while_the_wallbox_stays() -> None:
    """The calls offline mode makes: closed with a reason, then reconnected."""
    now = [100.0]
    metrics = Metrics(["CP1"], clock=lambda: now[0])
    metrics.session_opened("CP1", 1)
    now[0] = 110.0
    metrics.upstream_closed("CP1", reason="connection lost")
    status = metrics.status()
    assert status["upstream"] == {"state": "unreachable", "connected": 0,
                                  "last_failure": {"charger": "CP1", "reason": "connection lost", "age_seconds": 0.0}}
    metrics.upstream_closed("CP1")  # an unbalanced extra close changes nothing
    now[0] = 120.0
    metrics.upstream_reconnected("CP1")
    samples = scrape(metrics)
    assert value(samples, "ocpp_proxy_upstream_reconnects_total", charger="CP1") == 1
    assert value(samples, "ocpp_proxy_upstream_up", charger="CP1") == 1
    assert value(samples, "ocpp_proxy_connections", side="backend") == 1
    assert metrics.status()["upstream"]["state"] == "connected"


def test_connector_status_keeps_one_series_per_connector() -> None:
    metrics = Metrics(["CP1"])
    metrics.session_opened("CP1", 1)
    for status in ("Available", "Preparing", "Charging", "Weird"):
        metrics.set_connector_status("CP1", "1", status)
    series = [labels for (name, labels) in scrape(metrics) if name == "ocpp_proxy_connector_status"]
    assert series == [frozenset({"charger": "CP1", "connector": "1", "status": "other"}.items())]


def test_limits_none_removes_a_source() -> None:
    metrics = Metrics()
    metrics.set_charger_limits("CP1", effective=16, ems=10)
    metrics.set_charger_limits("CP1", effective=6)
    sources = {dict(labels)["source"] for (name, labels) in scrape(metrics)
               if name == "ocpp_proxy_charger_limit_amperes"}
    assert sources == {"effective"}


def test_metrics_port_must_differ_from_the_wallbox_port() -> None:
    with pytest.raises(ConfigError) as error:
        loads('[server]\nlisten = "0.0.0.0:19520"\n[metrics]\nlisten = "127.0.0.1:19520"\n')
    (problem,) = error.value.problems
    assert problem.key == "metrics.listen" and problem.line == 4
    loads('[server]\nlisten = "127.0.0.1:0"\n[metrics]\nlisten = "127.0.0.1:0"\n')  # ephemeral: fine


def test_fuse_metrics_totals_only_grow() -> None:
    metrics = Metrics(["CP1"])
    metrics.set_fuse(unconfirmed={"CP1": 6.0}, over_budget_seconds=1.5, decreases_unanswered=1,
                     decreases_failed={"rejected": 1})
    metrics.set_fuse(unconfirmed={"CP1": 0.0}, over_budget_seconds=2.0, decreases_unanswered=0,
                     decreases_failed={"rejected": 1, "unanswered": 2})
    samples = scrape(metrics)
    assert value(samples, "ocpp_proxy_charger_reserved_unconfirmed_amperes", charger="CP1") == 0.0
    assert value(samples, "ocpp_proxy_site_over_budget_seconds_total") == 2.0
    assert value(samples, "ocpp_proxy_limit_decreases_unanswered") == 0
    assert value(samples, "ocpp_proxy_limit_decreases_failed_total", reason="rejected") == 1
    assert value(samples, "ocpp_proxy_limit_decreases_failed_total", reason="unanswered") == 2


def test_frames_counted_between_scrapes_are_all_reported_once() -> None:
    """The hot path tallies frames in plain ints; every read of the registry adds them exactly once."""
    from proxy.messages.ocppj import classify

    metrics = Metrics(["CP1"])
    heartbeat, unknown = classify('[2,"1","Heartbeat",{}]'), classify('[2,"2","NoSuchAction",{}]')
    for _ in range(3):
        metrics.frame("wallbox", heartbeat, len(heartbeat.text))
    metrics.frame("wallbox", unknown, len(unknown.text))
    for _ in range(2):  # a second scrape with nothing new adds nothing
        samples = scrape(metrics)
        assert value(samples, "ocpp_proxy_frames_total", source="wallbox", type="call", action="Heartbeat") == 3
        assert value(samples, "ocpp_proxy_frame_bytes_total", source="wallbox", type="call",
                     action="Heartbeat") == 3 * len(heartbeat.text)
        assert value(samples, "ocpp_proxy_frames_total", source="wallbox", type="call", action="other") == 1
    metrics.frame("wallbox", heartbeat, len(heartbeat.text))
    assert metrics.registry.get_sample_value(
        "ocpp_proxy_frames_total", {"source": "wallbox", "type": "call", "action": "Heartbeat"}) == 4


def test_call_durations_read_as_prometheus_client_s_own_histogram() -> None:
    """The round-trip histogram is kept as plain counts: its text is what ``Histogram.observe`` gives.

    Edges included: a value exactly on a bound belongs to it (``le``), one over the largest to +Inf;
    an unknown action counts under "other" (and is not cached under its own name).
    """
    from prometheus_client import CollectorRegistry, Histogram

    from proxy.ops.metrics import CALL_BUCKETS

    observed = [("primary", "Heartbeat", 0.0), ("primary", "Heartbeat", 0.005), ("primary", "Heartbeat", 0.0051),
                ("primary", "Heartbeat", 60.0), ("primary", "Heartbeat", 61.0), ("wallbox", "Reset", 0.3),
                ("primary", "NoSuchAction", 1.0), ("primary", "NoSuchAction2", 2.0), ("ems", "MeterValues", 0.02)]
    metrics = Metrics(["CP1"])
    reference_registry = CollectorRegistry()
    reference = Histogram("ocpp_proxy_call_duration_seconds",
                          "CALL round trip, by the leg that answered (wallbox, backend) and action",
                          ["leg", "action"], buckets=CALL_BUCKETS, registry=reference_registry)
    labels = {"primary": "backend", "wallbox": "wallbox", "ems": "secondary"}
    for leg, action, seconds in observed:
        metrics.call_completed(leg, action, seconds)
        reference.labels(labels[leg], action_label(action)).observe(seconds)
    mine = {key: v for key, v in scrape(metrics).items() if key[0].startswith("ocpp_proxy_call_duration")}
    theirs = {key: v for key, v in parse(generate_latest(reference_registry).decode())[1].items()
              if not key[0].endswith("_created")}
    assert mine == theirs
    assert value(mine, "ocpp_proxy_call_duration_seconds_count", leg="backend", action="other") == 2
    assert value(mine, "ocpp_proxy_call_duration_seconds_bucket", leg="backend", action="Heartbeat", le="0.005") == 2
    assert value(mine, "ocpp_proxy_call_duration_seconds_bucket", leg="backend", action="Heartbeat", le="60.0") == 4
    assert value(mine, "ocpp_proxy_call_duration_seconds_bucket", leg="backend", action="Heartbeat", le="+Inf") == 5
