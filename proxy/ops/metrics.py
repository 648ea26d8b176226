"""Prometheus metrics: what an operator of a charging site watches.

:class:`Metrics` owns one ``CollectorRegistry`` (not prometheus-client's global
one, so several proxies in one process, and the tests, never share counters)
and offers one setter per fact. :class:`MetricsListener` is the
:class:`~proxy.runtime.relay.Listener` that feeds it from live sessions.

Label sets are bounded, because a wallbox or backend must not be able to
create series at will: actions outside the OCPP 1.6 / 2.0.1 / 2.1 action names
become ``other``, close codes outside the RFC 6455 range collapse to
``3xxx``/``4xxx``, statuses outside the OCPP enums become ``other``.

The per-frame path only looks up cached label children in a dict:
``Counter.labels()`` costs several microseconds per call.

Fed today by :class:`MetricsListener`: connections, sessions, frames and bytes,
malformed and rejected frames, handshake rejections, CALL round trips, the
proxy's own CALLs, upstream up/down, connector status, charger connected.
Defined with setters for features that call them when they land: charger
limits and measured current (limit engine), site limit, headroom, grid current
and meter state (limit engine / Modbus meter), offline queue depth and age and
upstream reconnects (offline mode), event-loop lag (the monitor's heartbeat).
"""

from __future__ import annotations

import bisect
import collections

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from prometheus_client.metrics_core import Metric

from proxy import __version__
from proxy.messages.ocppj import Frame, MessageType, payload_of
from proxy.core.admission import Refuse
from proxy.runtime.relay import GiveUp, Listener, PairedSession
from proxy.core.mirror import MirrorDropped
from proxy.core.session import (
    PRIMARY,
    PROXY,
    WALLBOX,
    Action,
    CallCompleted,
    Malformed,
    Policed,
    ProxyAnswer,
    ProxyCallFailed,
    Side,
)


def _ocpp_actions() -> frozenset[str]:
    from ocpp.v16.enums import Action as Action16
    from ocpp.v201.enums import Action as Action201
    from ocpp.v21.enums import Action as Action21

    return frozenset(a.value for enum in (Action16, Action201, Action21) for a in enum)


def _ocpp_statuses() -> frozenset[str]:
    from ocpp.v16.enums import ChargePointStatus
    from ocpp.v201.enums import ConnectorStatusEnumType
    from ocpp.v21.enums import ConnectorStatusEnumType as ConnectorStatus21

    return frozenset(s.value for enum in (ChargePointStatus, ConnectorStatusEnumType, ConnectorStatus21) for s in enum)


# ``*_created`` series double the series count and no dashboard here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Action label values: every OCPP 1.6, 2.0.1 and 2.1 action; anything else is "other".
KNOWN_ACTIONS = _ocpp_actions()
KNOWN_STATUSES = _ocpp_statuses()
OTHER = "other"

#: CALL round trips: LAN wallboxes answer in milliseconds, backends over the
#: internet in hundreds, a wallbox busy with a firmware update in seconds.
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_TYPES = {MessageType.CALL: "call", MessageType.CALLRESULT: "callresult",
          MessageType.CALLERROR: "callerror", None: "invalid"}
_MAX_CONNECTOR = 32


#: The bucket of an observation: the first bound it is not over (prometheus: ``le``).
_bucket = bisect.bisect_left
_go_string: Callable[[float], str] = floatToGoString  # (untyped in prometheus-client)
#: The buckets' ``le`` labels as prometheus-client writes them ("0.005", ..., "+Inf").
_LE = tuple(_go_string(bound) for bound in (*CALL_BUCKETS, float("inf")))


def action_label(action: str | None) -> str:
    return action if action in KNOWN_ACTIONS and action is not None else OTHER


def side_label(side: Side) -> str:
    """Session leg names → label values: the primary upstream is "backend", the others "secondary"."""
    if side in (WALLBOX, PROXY):
        return side
    return "backend" if side == PRIMARY else "secondary"


def close_code_label(code: int) -> str:
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return OTHER


def utf8_size(text: str, length: int) -> int:
    """Bytes on the wire; ``str.isascii`` is O(1) in CPython, so ASCII frames cost nothing."""
    return length if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class _Family:
    """A labelled metric with its children cached by label tuple (hot path: one dict lookup)."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def child(self, *labels: str) -> Any:
        found = self.children.get(labels)
        if found is None:
            found = self.children[labels] = self.metric.labels(*labels)
        return found

    def remove(self, *labels: str) -> None:
        if self.children.pop(labels, None) is not None:
            self.metric.remove(*labels)

    def remove_where(self, first: str) -> None:
        """Drop every child whose first label is ``first`` (a charger leaving)."""
        for labels in [k for k in self.children if k[0] == first]:
            self.remove(*labels)


class _FrameTally:
    """Frames and bytes of one label set since the registry was last read.

    The hot path adds to plain ints (a prometheus-client ``inc()`` takes a lock;
    two per relayed frame showed in ``python -m bench.profile``); :class:`_Tallies`
    adds them to the counters whenever the registry is read.
    """

    __slots__ = ("bytes", "bytes_child", "frames", "frames_child")

    def __init__(self, frames_child: Any, bytes_child: Any) -> None:
        self.frames_child, self.bytes_child = frames_child, bytes_child
        self.frames = 0
        self.bytes = 0

    def flush(self) -> None:
        if self.frames:
            self.frames_child.inc(self.frames)
            self.bytes_child.inc(self.bytes)
            self.frames = self.bytes = 0


class _Tallies:
    """A collector that reports nothing: registered before the counters it feeds, so any read
    of the registry (a scrape, a test) sees every frame counted so far."""

    def __init__(self) -> None:
        self.by_labels: dict[tuple[str, str, str], _FrameTally] = {}

    def collect(self) -> Iterable[Metric]:
        for tally in self.by_labels.values():
            tally.flush()
        return []


class _DurationTally:
    """CALL round trips of one (leg, action): per-bucket counts and their sum, in plain numbers."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(CALL_BUCKETS) + 1)  # the last: over the largest bound (+Inf)
        self.sum = 0.0


class _Durations:
    """``ocpp_proxy_call_duration_seconds``, a histogram kept as plain counts and built when read.

    Every answered CALL is observed (half the frames relayed); prometheus-client's ``observe``
    took two locks and a Python loop over the bounds for each (``python -m bench.calls``). The
    series are the same: cumulative buckets, ``_count`` and ``_sum`` per leg and action.
    """

    def __init__(self) -> None:
        self.by_labels: dict[tuple[str, str], _DurationTally] = {}

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily("ocpp_proxy_call_duration_seconds",
                                       "CALL round trip, by the leg that answered (wallbox, backend) and action",
                                       labels=["leg", "action"])
        for labels, tally in self.by_labels.items():
            running, buckets = 0, []
            for le, count in zip(_LE, tally.counts):
                running += count
                buckets.append((le, running))
            family.add_metric(list(labels), buckets, tally.sum)
        return [family]

    def describe(self) -> Iterable[Metric]:
        return self.collect()


class _ScrapeTime:
    """Values that are ages: computed when Prometheus scrapes, from stored timestamps."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.queue_oldest: dict[str, float] = {}
        self.meter_read_at: float | None = None
        self.meter_up: bool | None = None

    def collect(self) -> Iterable[Metric]:
        now = self.clock()
        age = GaugeMetricFamily("ocpp_proxy_queue_oldest_age_seconds",
                                "Age of the oldest frame in a charger's offline queue",
                                labels=["charger"])
        for charger, oldest in sorted(self.queue_oldest.items()):
            age.add_metric([charger], max(0.0, now - oldest))
        up = GaugeMetricFamily("ocpp_proxy_meter_up",
                               "1 while the grid meter answers and its data is fresh, else 0 (absent: no meter)")
        meter_age = GaugeMetricFamily("ocpp_proxy_meter_age_seconds",
                                      "Seconds since the grid meter was last read successfully")
        if self.meter_up is not None:
            up.add_metric([], 1.0 if self.meter_up else 0.0)
        if self.meter_read_at is not None:
            meter_age.add_metric([], max(0.0, now - self.meter_read_at))
        return [age, up, meter_age]

    def describe(self) -> Iterable[Metric]:
        return self.collect()


class Metrics:
    """Every ``ocpp_proxy_*`` metric, with setters that name the fact they record."""

    def __init__(self, chargers: Iterable[str] = (), *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.registry = CollectorRegistry()
        self.configured: set[str] = set()
        reg = self.registry
        self._tallies = _Tallies()
        reg.register(self._tallies)  # first: collected before the frame counters

        def family(kind: Any, name: str, doc: str, labels: Sequence[str], **kw: Any) -> _Family:
            return _Family(kind(name, doc, list(labels), registry=reg, **kw))

        Gauge("ocpp_proxy_build_info", "Version of the running proxy", ["version"],
              registry=reg).labels(__version__).set(1)
        Gauge("ocpp_proxy_start_time_seconds", "Unix time the proxy started", registry=reg).set(clock())
        self.connections = family(Gauge, "ocpp_proxy_connections",
                                  "Open WebSocket connections by side (wallbox, backend)", ["side"])
        self.sessions_opened = Counter("ocpp_proxy_sessions_opened", "Paired sessions opened", registry=reg)
        self.sessions_closed = family(Counter, "ocpp_proxy_sessions_closed",
                                      "Paired sessions closed, by the side that closed first and its close code",
                                      ["closed_by", "code"])
        self.handshake_rejections = family(Counter, "ocpp_proxy_handshake_rejections",
                                           "Wallbox handshakes refused, by reason", ["reason"])
        self.frames = family(Counter, "ocpp_proxy_frames",
                             "Text frames received, by source, OCPP-J type and CALL action",
                             ["source", "type", "action"])
        self.frame_bytes = family(Counter, "ocpp_proxy_frame_bytes",
                                  "UTF-8 bytes of text frames received, by source, type and CALL action",
                                  ["source", "type", "action"])
        self.malformed = family(Counter, "ocpp_proxy_malformed_frames",
                                "Frames that are not valid OCPP-J (forwarded unless strict)",
                                ["source", "dropped"])
        self.rejected = family(Counter, "ocpp_proxy_rejected_frames",
                               "Frames refused with a close (binary, over max_message_bytes)",
                               ["source", "reason"])
        self._durations = _Durations()
        reg.register(self._durations)
        self.own_calls = family(Counter, "ocpp_proxy_own_calls",
                                "The proxy's own CALLs to wallboxes, by outcome (result, error, timeout, closed)",
                                ["action", "outcome"])
        self.upstream_up = family(Gauge, "ocpp_proxy_upstream_up",
                                  "1 while the charger's backend connection is open", ["charger"])
        self.upstream_reconnects = family(Counter, "ocpp_proxy_upstream_reconnects",
                                          "Backend connections re-opened while the wallbox stayed", ["charger"])
        self.charger_connected = family(Gauge, "ocpp_proxy_charger_connected",
                                        "1 while the wallbox is connected to the proxy", ["charger"])
        self.connector_status = family(Gauge, "ocpp_proxy_connector_status",
                                       "1 for the status a connector last reported (StatusNotification)",
                                       ["charger", "connector", "status"])
        self.charger_limit = family(Gauge, "ocpp_proxy_charger_limit_amperes",
                                    "Current limit per charger: effective (sent), local (engine), "
                                    "backend (its profiles), ems (Modbus)", ["charger", "source"])
        self.charger_current = family(Gauge, "ocpp_proxy_charger_current_amperes",
                                      "Measured current per charger and phase (MeterValues Current.Import)",
                                      ["charger", "phase"])
        self.reserved_unconfirmed = family(Gauge, "ocpp_proxy_charger_reserved_unconfirmed_amperes",
                                           "Current the fuse reserves for a charger beyond the limit it should "
                                           "have: a decrease not yet accepted, a lost or unknown charger",
                                           ["charger"])
        self.over_budget = Counter("ocpp_proxy_site_over_budget_seconds",
                                   "Time what the chargers may draw exceeded the budget (0 unless the budget "
                                   "fell below what they hold: EMS, house load, restart)", registry=reg)
        self.decreases_pending = Gauge("ocpp_proxy_limit_decreases_unanswered",
                                       "Limit decreases sent and not answered yet", registry=reg)
        self.decreases_failed = family(Counter, "ocpp_proxy_limit_decreases_failed",
                                       "Limit decreases the wallbox did not apply, by reason (rejected, error, "
                                       "unanswered); each keeps counting at the old value and is retried",
                                       ["reason"])
        self._fuse_seen: tuple[float, dict[str, int]] = (0.0, {})
        self.queue_frames = family(Gauge, "ocpp_proxy_queue_frames",
                                   "Frames waiting in a charger's offline queue", ["charger"])
        self.site_limit = family(Gauge, "ocpp_proxy_site_limit_amperes",
                                 "Site current limit per phase, by source (config, ems, effective)", ["source"])
        self.site_headroom = family(Gauge, "ocpp_proxy_site_headroom_amperes",
                                    "Current left for the chargers per phase (site limit - house load)", ["phase"])
        self.grid_current = family(Gauge, "ocpp_proxy_grid_current_amperes",
                                   "Grid meter current per phase", ["phase"])
        self.modbus_wallbox_up = family(Gauge, "ocpp_proxy_modbus_wallbox_up",
                                        "1 while a Modbus wallbox (virtual charge point) answers with good "
                                        "readings, else 0", ["charger"])
        self.secondary_up = family(Gauge, "ocpp_proxy_secondary_up",
                                   "1 while a secondary upstream of the charger is connected", ["charger", "upstream"])
        self.secondary_connects = family(Counter, "ocpp_proxy_secondary_connects",
                                         "Connections opened to a secondary upstream", ["charger", "upstream"])
        self.secondary_queue = family(Gauge, "ocpp_proxy_secondary_queue_frames",
                                      "Wallbox frames waiting for a secondary upstream (down or slow)",
                                      ["charger", "upstream"])
        self.secondary_dropped = family(Counter, "ocpp_proxy_secondary_dropped_frames",
                                        "Frames a secondary will never get (queue_full, unanswered, "
                                        "unknown_transaction)", ["upstream", "action", "reason"])
        self.policy_refusals = family(Counter, "ocpp_proxy_policy_refusals",
                                      "Upstream commands the proxy answered (answer) or refused (reject) "
                                      "instead of forwarding", ["upstream", "action", "mode"])
        self.storage_errors = family(Counter, "ocpp_proxy_storage_errors",
                                     "Failed storage operations (append: a frame refused; mark, deliver, mirror: "
                                     "retried; read; write)", ["operation"])
        self.drains = Gauge("ocpp_proxy_queue_drains",
                            "Chargers whose queues the proxy is delivering without their wallbox", registry=reg)
        self.storage_failing = Gauge("ocpp_proxy_storage_failing",
                                     "1 from a failed storage operation until one succeeds again", registry=reg)
        self.upstream_lost = family(Counter, "ocpp_proxy_upstream_lost",
                                    "Backend connections given up by the proxy: stall (not reading), call_timeout "
                                    "(a CALL unanswered), ping_timeout", ["reason"])
        self.replay_resent = family(Counter, "ocpp_proxy_replay_resent",
                                    "Replayed frames sent again after an earlier send without a committed answer "
                                    "(the backend may have them twice)", ["action"])
        self.loop_lag = Gauge("ocpp_proxy_event_loop_lag_seconds",
                              "How late the event loop ran the monitor's last heartbeat", registry=reg)
        self._scrape_time = _ScrapeTime(clock)
        reg.register(self._scrape_time)
        self._statuses: dict[str, dict[str, str]] = {}
        self._wallboxes: dict[str, int] = {}
        self._upstreams: dict[str, int] = {}
        self._frame_children: dict[tuple[str, MessageType | None, str | None], _FrameTally] = {}
        self._duration_children: dict[tuple[str, str], _DurationTally] = {}
        self._upstream_ok_at: float | None = None
        self._upstream_failure: tuple[float, str, str] | None = None
        # Plain copies of a few facts for the status page (proxy/ops/status.py), kept where the
        # rare events that change them arrive: nothing here runs per frame.
        #: Per charger: Unix time and text of the last thing that went wrong.
        self.last_errors: dict[str, tuple[float, str]] = {}
        #: Per charger: frames in its offline queue (0 once delivered).
        self.queue_depths: dict[str, int] = {}
        #: Per Modbus wallbox: its link answers with good readings.
        self.modbus_links: dict[str, bool] = {}
        #: The grid meter's last currents per phase (A).
        self.meter_currents: tuple[float, ...] = ()
        for side in (WALLBOX, "backend"):
            self.connections.child(side).set(0)
        self.set_configured(chargers)

    # -- chargers and sessions (fed by MetricsListener) -------------------------------

    def set_configured(self, chargers: Iterable[str]) -> None:
        """Configured chargers keep their series while disconnected (value 0)."""
        self.configured = set(chargers)
        for charger in self.configured:
            self.charger_connected.child(charger)

    def session_opened(self, charger: str, upstreams: int) -> None:
        self.sessions_opened.inc()
        self.connections.child(WALLBOX).inc()
        self._wallboxes[charger] = self._wallboxes.get(charger, 0) + 1
        self.charger_connected.child(charger).set(1)
        for _ in range(upstreams):
            self.upstream_opened(charger)

    def session_closed(self, charger: str, closed_by: Side, code: int, upstreams: int) -> None:
        """``upstreams``: backend connections still counted open for this session."""
        self.sessions_closed.child(side_label(closed_by), close_code_label(code)).inc()
        self.connections.child(WALLBOX).dec()
        for _ in range(upstreams):
            self.upstream_closed(charger)
        left = self._wallboxes.get(charger, 1) - 1
        if left > 0:  # a replacement session of the same charger is already open
            self._wallboxes[charger] = left
            return
        self._wallboxes.pop(charger, None)
        self.connector_status.remove_where(charger)
        self._statuses.pop(charger, None)
        if charger in self.configured:
            self.charger_connected.child(charger).set(0)
        else:  # an accept_unknown charger: do not keep a series (or a note) per id ever seen
            self.last_errors.pop(charger, None)
            self.queue_depths.pop(charger, None)
            for fam in (self.charger_connected, self.upstream_up, self.upstream_reconnects,
                        self.charger_limit, self.charger_current, self.queue_frames):
                fam.remove_where(charger)

    def upstream_opened(self, charger: str) -> None:
        """A backend connection for ``charger`` is open (calls balance with upstream_closed)."""
        self._upstreams[charger] = self._upstreams.get(charger, 0) + 1
        self.connections.child("backend").inc()
        self.upstream_up.child(charger).set(1)
        self._upstream_ok_at = self.clock()

    def upstream_closed(self, charger: str, reason: str = "") -> None:
        """A backend connection closed; a ``reason`` marks it as a failure (offline mode)."""
        left = self._upstreams.get(charger, 0) - 1
        if left < 0:
            return
        self.connections.child("backend").dec()
        if left:
            self._upstreams[charger] = left
        else:
            del self._upstreams[charger]
            self.upstream_up.child(charger).set(0)
        if reason:
            self.upstream_failed(charger, reason)

    def upstream_failed(self, charger: str, reason: str) -> None:
        """A backend connection attempt failed (shown in /readyz)."""
        self._upstream_failure = (self.clock(), charger, reason)
        self.note_error(charger, f"backend: {reason}")

    def note_error(self, charger: str, message: str) -> None:
        """The last thing that went wrong for ``charger`` (status page); cut to 200 characters."""
        if charger:
            self.last_errors[charger] = (self.clock(), message[:200])

    def connector_statuses(self, charger: str) -> dict[str, str]:
        """The status each connector of ``charger`` last reported (a copy)."""
        return dict(self._statuses.get(charger, {}))

    def queue_oldest(self, charger: str) -> float | None:
        """Unix time the oldest frame of ``charger``'s offline queue was stored; None: empty."""
        return self._scrape_time.queue_oldest.get(charger)

    def upstream_reconnected(self, charger: str) -> None:
        self.upstream_reconnects.child(charger).inc()
        self.upstream_opened(charger)

    def handshake_refused(self, reason: str) -> None:
        self.handshake_rejections.child(reason).inc()

    def secondary_changed(self, charger: str, upstream: str, up: bool) -> None:
        self.secondary_up.child(charger, upstream).set(1 if up else 0)
        if up:
            self.secondary_connects.child(charger, upstream).inc()

    def set_secondary_queue(self, charger: str, upstream: str, depth: int) -> None:
        self.secondary_queue.child(charger, upstream).set(depth)

    def secondary_frame_dropped(self, upstream: str, action: str, reason: str) -> None:
        self.secondary_dropped.child(upstream, action_label(action), reason).inc()

    def storage_error(self, operation: str, detail: str) -> None:
        """A storage operation failed (``detail``) or, with an empty detail, worked again."""
        if detail:
            self.storage_errors.child(operation).inc()
        self.storage_failing.set(1 if detail else 0)

    def policy_refusal(self, upstream: str, action: str, mode: str) -> None:
        self.policy_refusals.child(upstream, action_label(action), mode).inc()

    def frame(self, source: Side, frame: Frame, length: int) -> None:
        """Hot path: one received frame."""
        kind = frame.kind
        key = (source, kind, frame.action if kind is MessageType.CALL else None)
        tally = self._frame_children.get(key)
        if tally is None:
            tally = self._frame_tally(source, frame)
        tally.frames += 1
        text = frame.text
        tally.bytes += length if text.isascii() else utf8_size(text, length)

    def _frame_tally(self, source: Side, frame: Frame) -> _FrameTally:
        action = action_label(frame.action) if frame.kind is MessageType.CALL else ""
        labels = (source, _TYPES[frame.kind], action)
        tally = self._tallies.by_labels.get(labels)
        if tally is None:
            tally = _FrameTally(self.frames.child(*labels), self.frame_bytes.child(*labels))
            self._tallies.by_labels[labels] = tally
        if action != OTHER:
            # Unknown action names are not cached: the cache must stay as bounded as the labels.
            self._frame_children[(source, frame.kind, frame.action if action else None)] = tally
        return tally

    def call_completed(self, leg: Side, action: str, seconds: float) -> None:
        """Hot path: one answered CALL."""
        tally = self._duration_children.get((leg, action))
        if tally is None:
            tally = self._duration_tally(leg, action)
        tally.counts[_bucket(CALL_BUCKETS, seconds)] += 1
        tally.sum += seconds

    def _duration_tally(self, leg: Side, action: str) -> _DurationTally:
        labels = (side_label(leg), action_label(action))
        tally = self._durations.by_labels.get(labels)
        if tally is None:
            tally = self._durations.by_labels[labels] = _DurationTally()
        if labels[1] != OTHER:  # unknown action names are not cached (bounded, as the labels are)
            self._duration_children[(leg, action)] = tally
        return tally

    def own_call(self, action: str, outcome: str) -> None:
        self.own_calls.child(action_label(action), outcome).inc()

    def malformed_frame(self, source: Side, dropped: bool) -> None:
        self.malformed.child(source, "true" if dropped else "false").inc()

    def frame_rejected(self, source: Side, reason: str, charger: str = "") -> None:
        self.rejected.child(source, reason).inc()
        self.note_error(charger, f"{side_label(source)} frame refused: {reason.replace('_', ' ')}")

    def set_connector_status(self, charger: str, connector: str, status: str) -> None:
        status = status if status in KNOWN_STATUSES else OTHER
        known = self._statuses.setdefault(charger, {})
        old = known.get(connector)
        if old == status:
            return
        if old is not None:
            self.connector_status.remove(charger, connector, old)
        known[connector] = status
        self.connector_status.child(charger, connector, status).set(1)

    # -- limit engine, meter, offline queue (setters for the features that feed them) ---

    def set_charger_limits(self, charger: str, *, effective: float | None = None,
                           local: float | None = None, backend: float | None = None,
                           ems: float | None = None) -> None:
        """Limits in A; None removes that source's series (not known / not applicable)."""
        for source, value in (("effective", effective), ("local", local), ("backend", backend), ("ems", ems)):
            if value is None:
                self.charger_limit.remove(charger, source)
            else:
                self.charger_limit.child(charger, source).set(value)

    def set_charger_current(self, charger: str, phases: Sequence[float]) -> None:
        for index, value in enumerate(phases[:3], start=1):
            self.charger_current.child(charger, f"L{index}").set(value)

    def set_site(self, *, limit: float | None = None, ems_limit: float | None = None,
                 effective_limit: float | None = None, headroom: Sequence[float] | None = None) -> None:
        for source, value in (("config", limit), ("ems", ems_limit), ("effective", effective_limit)):
            if value is None:
                self.site_limit.remove(source)
            else:
                self.site_limit.child(source).set(value)
        for index, value in enumerate((headroom or ())[:3], start=1):
            self.site_headroom.child(f"L{index}").set(value)

    def set_fuse(self, *, unconfirmed: Mapping[str, float], over_budget_seconds: float,
                 decreases_unanswered: int, decreases_failed: Mapping[str, int]) -> None:
        """The fuse's state (:mod:`proxy.loadmgmt.fuse`); the two totals only ever grow."""
        for charger, amps in unconfirmed.items():
            self.reserved_unconfirmed.child(charger).set(amps)
        seconds, failed = self._fuse_seen
        if over_budget_seconds > seconds:
            self.over_budget.inc(over_budget_seconds - seconds)
        for reason, count in decreases_failed.items():
            if count > failed.get(reason, 0):
                self.decreases_failed.child(reason).inc(count - failed.get(reason, 0))
        self._fuse_seen = (max(seconds, over_budget_seconds), dict(decreases_failed))
        self.decreases_pending.set(decreases_unanswered)

    def set_modbus_wallbox(self, charger: str, up: bool) -> None:
        self.modbus_wallbox_up.child(charger).set(1.0 if up else 0.0)
        if not up and self.modbus_links.get(charger, True):
            self.note_error(charger, "Modbus link lost or readings bad")
        self.modbus_links[charger] = up

    def set_meter(self, up: bool, currents: Sequence[float] | None = None,
                  read_at: float | None = None) -> None:
        """Grid meter state; ``read_at`` is the Unix time of the last good reading."""
        self._scrape_time.meter_up = up
        if read_at is not None:
            self._scrape_time.meter_read_at = read_at
        for index, value in enumerate((currents or ())[:3], start=1):
            self.grid_current.child(f"L{index}").set(value)
        if currents is not None:
            self.meter_currents = tuple(currents[:3])

    def set_queue(self, charger: str, depth: int, oldest: float | None = None) -> None:
        """Offline queue of ``charger``: frames waiting, Unix time of the oldest (None: empty)."""
        self.queue_frames.child(charger).set(depth)
        self.queue_depths[charger] = depth
        if depth and oldest is not None:
            self._scrape_time.queue_oldest[charger] = oldest
        else:
            self._scrape_time.queue_oldest.pop(charger, None)

    def set_loop_lag(self, seconds: float) -> None:
        self.loop_lag.set(seconds)

    # -- what /readyz reports -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock()
        connected = sum(self._upstreams.values())
        failure = self._upstream_failure
        if failure is not None and (self._upstream_ok_at is None or failure[0] > self._upstream_ok_at):
            state = "unreachable"
        elif connected:
            state = "connected"
        else:
            state = "idle"
        upstream: dict[str, Any] = {"state": state, "connected": connected}
        if failure is not None:
            upstream["last_failure"] = {"charger": failure[1], "reason": failure[2],
                                        "age_seconds": round(now - failure[0], 3)}
        scrape = self._scrape_time
        meter: dict[str, Any] = {"state": "not_configured" if scrape.meter_up is None
                                 else "ok" if scrape.meter_up else "stale"}
        if scrape.meter_read_at is not None:
            meter["age_seconds"] = round(now - scrape.meter_read_at, 3)
        return {"wallboxes": sum(self._wallboxes.values()), "upstream": upstream, "meter": meter}


class MetricsListener(Listener):
    """Feeds :class:`Metrics` from the sessions' callbacks (see :class:`proxy.runtime.relay.Listener`)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        #: Per charger, when each queued frame was stored, oldest first: the queue is FIFO, so
        #: depth going up appends "now" and going down drops the oldest. Frames found in the queue
        #: at start count from when they were first seen (the age is then a lower bound).
        self._queued_at: dict[str, collections.deque[float]] = {}

    def session_opened(self, paired: PairedSession) -> None:
        if paired.drain:  # no wallbox: the proxy delivers its queues alone
            self.metrics.drains.inc()
            return
        self.metrics.session_opened(paired.charger_id, 0)  # upstreams arrive through upstream_state

    def session_closed(self, paired: PairedSession, side: Side, code: int, reason: str) -> None:
        if paired.drain:
            self.metrics.drains.dec()
            if paired.session.primary in paired.upstreams:
                self.metrics.upstream_closed(paired.charger_id)
        else:
            if code not in (1000, 1001):  # before session_closed, which forgets an unknown charger
                self.metrics.note_error(paired.charger_id, f"closed by {side_label(side)}: {code} {reason}".rstrip())
            self.metrics.session_closed(paired.charger_id, side, code,
                                        int(paired.session.primary in paired.upstreams))
        for name in paired.session.mirrors:
            if name in paired.upstreams:
                self.metrics.secondary_changed(paired.charger_id, name, False)

    def frame_received(self, paired: PairedSession, source: Side, frame: Frame, size: int) -> None:
        wallbox = source == WALLBOX
        self.metrics.frame(WALLBOX if wallbox else "backend" if source == PRIMARY else side_label(source), frame, size)
        if wallbox and frame.action == "StatusNotification" and frame.kind is MessageType.CALL:
            for connector, status in _statuses(frame):
                self.metrics.set_connector_status(paired.charger_id, connector, status)
        if paired.session.mirrors and (wallbox or source != PRIMARY):
            self._queues(paired)

    def _queues(self, paired: PairedSession) -> None:
        for name, mirror in paired.session.mirrors.items():
            self.metrics.set_secondary_queue(paired.charger_id, name, mirror.depth)

    #: What :meth:`action` counts (the relay calls it for these only).
    actions = frozenset({CallCompleted, Malformed, ProxyAnswer, ProxyCallFailed, MirrorDropped, Policed})

    def action(self, paired: PairedSession, action: Action) -> None:
        metrics = self.metrics
        if type(action) is CallCompleted:  # every answered CALL: an exact-type check, as in the relay's loop
            metrics.call_completed(action.leg, action.action, action.seconds)
            return
        match action:
            case Malformed():
                metrics.malformed_frame(side_label(action.source), action.dropped)
            case ProxyAnswer():
                metrics.own_call(action.action, "result" if action.frame.kind is MessageType.CALLRESULT else "error")
            case ProxyCallFailed():
                metrics.own_call(action.action, "timeout" if action.reason == "timeout" else "closed")
            case MirrorDropped():
                metrics.secondary_frame_dropped(action.upstream, action.action, action.reason)
            case Policed():
                metrics.policy_refusal(action.upstream, action.action, action.mode)

    def upstream_state(self, paired: PairedSession, name: str, up: bool, reason: str) -> None:
        if name != paired.session.primary:  # a secondary: its own series, not the backend's
            self.metrics.secondary_changed(paired.charger_id, name, up)
            self._queues(paired)
            return
        connects = paired.upstream_connects.get(name, 0)
        if up:
            (self.metrics.upstream_reconnected if connects > 1 else self.metrics.upstream_opened)(paired.charger_id)
        elif connects:
            self.metrics.upstream_closed(paired.charger_id, reason or "closed")
        else:  # never connected in this session
            self.metrics.upstream_failed(paired.charger_id, reason)

    def queue_depth(self, paired: PairedSession, depth: int) -> None:
        times = self._queued_at.setdefault(paired.charger_id, collections.deque())
        now = self.metrics.clock()
        while len(times) < depth:
            times.append(now)
        while len(times) > depth:
            times.popleft()
        self.metrics.set_queue(paired.charger_id, depth, times[0] if times else None)

    def modbus_wallbox(self, charger: str, up: bool) -> None:
        self.metrics.set_modbus_wallbox(charger, up)

    def storage_error(self, operation: str, detail: str) -> None:
        self.metrics.storage_error(operation, detail)

    def replay_resent(self, paired: PairedSession, action: str) -> None:
        self.metrics.replay_resent.child(action_label(action)).inc()

    def upstream_given_up(self, paired: PairedSession, name: Side, kind: GiveUp) -> None:
        self.metrics.upstream_lost.child(kind).inc()
        self.metrics.note_error(paired.charger_id, f"{side_label(name)} given up: {kind.replace('_', ' ')}")

    def frame_rejected(self, paired: PairedSession, side: Side, code: int, reason: str) -> None:
        self.metrics.frame_rejected(side_label(side), "binary" if code == 1003 else "too_big", paired.charger_id)

    def handshake_refused(self, refusal: Refuse) -> None:
        """Called by the server for every refused handshake (:class:`proxy.core.admission.Refuse`)."""
        self.metrics.handshake_refused(refusal.reason)
        if refusal.reason == "upstream_unavailable":
            self.metrics.upstream_failed(refusal.charge_box_id or "", refusal.detail)


def _statuses(frame: Frame) -> Iterator[tuple[str, str]]:
    """(connector, status) from a StatusNotification, 1.6 or 2.0.1; nothing if unreadable."""
    try:
        payload = payload_of(frame)
    except ValueError:
        return
    if not isinstance(payload, dict):
        return
    status = payload.get("status", payload.get("connectorStatus"))
    connector = payload.get("connectorId")
    evse = payload.get("evseId")
    if not isinstance(status, str) or not _small_int(connector) or not (evse is None or _small_int(evse)):
        return
    yield (str(connector) if evse is None else f"{evse}/{connector}"), status


def _small_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_CONNECTOR
