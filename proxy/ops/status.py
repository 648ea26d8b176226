"""The status page's model: one JSON snapshot of what every charger is doing and why (sans-IO).

:func:`snapshot` reads what the proxy already keeps (the server's sessions and
drains, the limit engine's views, the fuse's reservations, the facts
:class:`~proxy.ops.metrics.Metrics` records on rare events) and returns a plain
dict; it does no I/O, adds nothing to the per-frame path, and is built only
when someone asks (``GET /api/status`` on the monitor listener). The format
is documented in ``docs/status.md``; :data:`VERSION` changes only when a field
changes meaning or goes away (new fields may appear in the same version).

Nothing here is a secret: no passwords, no URLs (which may hold userinfo), no
certificates; untrusted texts (close reasons) arrive already cut to 200
characters by :meth:`Metrics.note_error`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import trio

from proxy import __version__
from proxy.config import ChargerBase, ChargerSettings, Config, ModbusChargerSettings
from proxy.core.sessionlog import MAX_LISTED, SessionSummary
from proxy.loadmgmt.driver import charger_limits, load_management, meter_configured
from proxy.loadmgmt.engine import ChargerView, SiteView, charger_phases
from proxy.messages.versions import version_of
from proxy.wire.local import LocalConnection

if TYPE_CHECKING:
    from proxy.ops.metrics import Metrics
    from proxy.runtime.relay import PairedSession
    from proxy.runtime.server import ProxyServer

#: The JSON format's version (docs/status.md).
VERSION = 1

#: What set a charger's limit in force (docs/status.md "limit.set_by").
BACKEND, SITE_FUSE, METER_HEADROOM, EMS, FALLBACK, CHARGER_MAX, CONFIG = (
    "backend", "site_fuse", "meter_headroom", "ems", "fallback", "charger_max", "config")
_EPSILON = 0.05


@dataclass(frozen=True)
class LimitInputs:
    """What decides whom to name as the setter of a charger's limit."""

    view: ChargerView
    max_current: float
    configured_enabled: bool
    site: SiteView
    meter: bool


def limit_source(inputs: LimitInputs) -> str | None:
    """The tightest input behind the effective limit; None while there is none.

    The effective limit is min(backend, local); the local one is the engine's
    share of the site, capped by the charger's own maximum and the EMS. The
    backend wins ties (its profile caps the engine's share, so equal means the
    backend set it).
    """
    view = inputs.view
    local, backend = view.local_limit, view.backend_limit
    if view.effective_limit is None:
        return None
    if backend is not None and (local is None or backend <= local + _EPSILON):
        return BACKEND
    if local is None:
        return None
    if view.fallback:
        return FALLBACK
    if not view.enabled:
        return CONFIG if not inputs.configured_enabled else EMS
    if view.ems_limit is not None and local >= math.floor(view.ems_limit * 10) / 10 - _EPSILON:
        return EMS
    if local >= inputs.max_current - _EPSILON:
        return CHARGER_MAX
    site = inputs.site
    if site.ems_limit is not None and (site.config_limit is None or site.ems_limit < site.config_limit):
        return EMS
    return METER_HEADROOM if inputs.meter and site.meter_fresh else SITE_FUSE


def security_profile(paired: PairedSession | None, charger: ChargerBase | None, config: Config) -> str | None:
    """The OCPP security profile the wallbox's current connection came in with (None: not connected).

    The transport says TLS or not; the configuration says which credentials
    that transport required (the admission rules of docs/security.md).
    """
    if paired is None or paired.drain:
        return None
    if isinstance(paired.wallbox, LocalConnection) or isinstance(charger, ModbusChargerSettings):
        return "local"
    stream = getattr(paired.wallbox, "stream", None)
    tls = isinstance(stream, trio.SSLStream)
    server = config.server
    password = bool(server.password or (isinstance(charger, ChargerSettings) and charger.password))
    if tls and server.client_ca:
        return "SP3"
    if password:
        return "SP2" if tls else "SP1"
    return "TLS, no credential" if tls else "none"


def backend_link(paired: PairedSession | None, draining: PairedSession | None, depth: int,
                 oldest: float | None, now: float) -> dict[str, Any]:
    """online / offline (queue depth, oldest frame's age) / standalone (no backend) / draining / disconnected."""
    link: dict[str, Any]
    if paired is not None and paired.session.standalone:
        link = {"state": "standalone"}  # docs/standalone.md: the proxy is its central system
    elif paired is not None:
        up = paired.session.primary in paired.upstreams
        link = {"state": "online" if up else "offline"}
    elif draining is not None:
        link = {"state": "draining"}
    else:
        link = {"state": "disconnected"}
    link["queued_frames"] = depth
    link["oldest_queued_age_seconds"] = round(max(0.0, now - oldest), 1) if depth and oldest is not None else None
    return link


def _amps(value: float | None) -> float | None:
    """Rounded to 0.1 A; None for unknown and for what JSON cannot carry (unlimited, NaN from a peer)."""
    return None if value is None or not math.isfinite(value) else round(value, 1)


def _amps_list(values: Any) -> list[float | None]:
    return [_amps(v) for v in values]


def _age(at: float, now: float) -> float:
    return round(max(0.0, now - at), 1)


def limit_entry(view: ChargerView, site: SiteView, settings: ChargerBase | None, may_draw: float | None,
                meter: bool) -> dict[str, Any]:
    """A managed charger's ``limit`` object (docs/status.md): the limit in force, its inputs, who set it."""
    inputs = LimitInputs(view, settings.max_current if settings is not None else math.inf,
                         settings.enabled if settings is not None else True, site, meter)
    return {"amps": _amps(view.effective_limit), "set_by": limit_source(inputs),
            "local_a": _amps(view.local_limit), "backend_a": _amps(view.backend_limit),
            "ems_a": _amps(view.ems_limit), "reserved_a": _amps(may_draw)}


class StatusSource:
    """Reads a running proxy's state into :func:`snapshot`'s dict (the monitor calls it per request)."""

    def __init__(self, server: ProxyServer | None, metrics: Metrics) -> None:
        self.server = server
        self.metrics = metrics

    def snapshot(self, loop_now: float, wall: datetime) -> dict[str, Any]:
        """``loop_now``: trio's clock (the engine's and the fuse's); the wall clock for ages and the stamp."""
        server = self.server
        config = server.config if server is not None else None
        body: dict[str, Any] = {"version": VERSION, "generated_at": wall.isoformat().replace("+00:00", "Z"),
                                "proxy": {"version": __version__}, "site": None, "chargers": []}
        if server is None or config is None:
            return body
        now = wall.timestamp()
        ids = [c.id for c in config.all_chargers]
        ids += sorted({*server.sessions, *server.drains} - set(ids))  # accept_unknown wallboxes
        managed = load_management(config) and server.limiter.active
        reservations = server.limiter.coordinator.reservations(loop_now) if managed else {}
        site_view = server.limiter.engine.site_view(loop_now) if managed else None
        body["chargers"] = [self._charger(cid, config, site_view, reservations, loop_now, now) for cid in ids]
        if site_view is not None:
            body["site"] = self._site(config, site_view, reservations, loop_now, now)
        return body

    def _charger(self, charger_id: str, config: Config, site: SiteView | None, reservations: Mapping[str, Any],
                 loop_now: float, now: float) -> dict[str, Any]:
        assert self.server is not None
        server, metrics = self.server, self.metrics
        settings = config.settings_for(charger_id)
        paired = server.sessions.get(charger_id)
        version = version_of(paired.subprotocol) if paired is not None else None
        entry: dict[str, Any] = {
            "id": charger_id,
            "kind": "modbus" if isinstance(settings, ModbusChargerSettings) else "ocpp",
            "configured": settings is not None,
            "connected": paired is not None,
            "subprotocol": paired.subprotocol if paired is not None else None,
            "ocpp_version": version.value if version is not None else None,
            "security_profile": security_profile(paired, settings, config),
            "backend": backend_link(paired, server.drains.get(charger_id), metrics.queue_depths.get(charger_id, 0),
                                    metrics.queue_oldest(charger_id), now),
            "connectors": metrics.connector_statuses(charger_id),
        }
        view = server.limiter.engine.charger_view(charger_id) if site is not None else None
        entry.update(self._limits(view, settings, site, reservations.get(charger_id), config))
        error = metrics.last_errors.get(charger_id)
        entry["last_error"] = {"message": error[1], "age_seconds": _age(error[0], now)} if error else None
        if isinstance(settings, ModbusChargerSettings):
            link = metrics.modbus_links.get(charger_id)
            entry["modbus"] = {"address": settings.modbus or settings.serial_port, "transport": settings.transport,
                               "map": settings.map if not settings.map_file else "file",
                               "link": "unknown" if link is None else "up" if link else "down"}
        return entry

    def _limits(self, view: ChargerView | None, settings: ChargerBase | None, site: SiteView | None,
                reservation: Any, config: Config) -> dict[str, Any]:
        out: dict[str, Any] = {"state": view.mode if view is not None else None,
                               "transaction": view.transaction if view is not None else None,
                               "currents_a": _amps_list(view.currents) if view is not None else None,
                               "limit": None}
        if view is not None and site is not None:
            may_draw = reservation.may_draw if reservation is not None else None
            out["limit"] = limit_entry(view, site, settings, may_draw, meter_configured(config))
        return out

    def _site(self, config: Config, site: SiteView, reservations: Mapping[str, Any], loop_now: float,
              now: float) -> dict[str, Any]:
        assert self.server is not None
        engine, metrics = self.server.limiter.engine, self.metrics
        reserved = [0.0] * len(site.house_load)
        for charger_id, reservation in reservations.items():
            settings = config.settings_for(charger_id)
            limits = charger_limits(settings) if settings is not None else self.server.limiter.fuse.default
            for phase in charger_phases(len(reserved), limits):
                reserved[phase] += reservation.may_draw
        readiness = metrics.status()["meter"]
        # Fresh or stale as the limit engine judges it (meter_timeout), the one that decides the fallback.
        state = "not_configured" if not meter_configured(config) else "ok" if site.meter_fresh else "stale"
        meter: dict[str, Any] = {"state": state,
                                 "currents_a": _amps_list(metrics.meter_currents) or None,
                                 "age_seconds": readiness.get("age_seconds")}
        return {"limit_a": _amps(site.site_limit), "config_limit_a": _amps(site.config_limit),
                "ems_limit_a": _amps(site.ems_limit), "phases": len(site.house_load),
                "budget_a": _amps_list(b / 10 if not math.isinf(site.site_limit) else math.inf
                                       for b in engine.budget(loop_now)),
                "house_load_a": _amps_list(site.house_load), "headroom_a": _amps_list(site.headroom),
                "reserved_a": _amps_list(reserved), "fallback": site.fallback,
                "over_budget": self.server.limiter.coordinator.over_budget, "meter": meter}


# --- the session log's list (GET /api/sessions) ----------------------------------------------------

#: Sessions listed when the request does not say (docs/status.md).
DEFAULT_LISTED = 20
#: Untrusted texts from wallboxes and backends (transaction ids, id tags, stop reasons) are cut to this.
_TEXT_MAX = 100


@dataclass(frozen=True)
class SessionQuery:
    """What ``GET /api/sessions`` asked for, checked (:func:`session_query`)."""

    charger: str | None = None
    before: int | None = None
    per_charger: int | None = None
    limit: int = DEFAULT_LISTED


def session_query(query: str) -> SessionQuery | str:
    """The request's query string as a :class:`SessionQuery`, or what is wrong with it."""
    fields: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in ("charger", "before", "per_charger", "limit"):
            return f"unknown parameter {name[:40]!r}; known: charger, before, per_charger, limit"
        fields[name] = value
    numbers: dict[str, int] = {}
    for name in ("before", "per_charger", "limit"):
        if name in fields:
            if not fields[name].isdigit() or not 1 <= int(fields[name]) <= (2**62 if name == "before" else MAX_LISTED):
                return f"{name} must be a whole number from 1 to {'2^62' if name == 'before' else MAX_LISTED}"
            numbers[name] = int(fields[name])
    return SessionQuery(fields.get("charger") or None, numbers.get("before"), numbers.get("per_charger"),
                        numbers.get("limit", DEFAULT_LISTED))


def _cut(value: str | None) -> str | None:
    return None if value is None else value[:_TEXT_MAX]


def _wh(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 1)


def session_entry(summary: SessionSummary) -> dict[str, Any]:
    """One listed session (docs/status.md ``sessions[]``)."""
    record = summary.record
    return {"number": summary.number, "charger": record.charger, "transaction": _cut(record.transaction),
            "backend_transaction": record.backend_transaction, "connector": record.connector,
            "id_tag": _cut(record.id_tag), "started": record.started, "stopped": record.stopped,
            "running": record.stopped is None, "meter_start_wh": _wh(record.meter_start_wh),
            "meter_stop_wh": _wh(record.meter_stop_wh), "meter_last_wh": _wh(record.meter_last_wh),
            "energy_wh": _wh(record.energy_wh), "reason": _cut(record.reason), "signed": summary.signed}


def sessions_body(query: SessionQuery, found: list[SessionSummary] | None, wall: datetime,
                  error: str | None = None) -> dict[str, Any]:
    """The ``/api/sessions`` JSON: ``found`` None means no session log is kept (``error``: it cannot be read)."""
    listed = found or []
    body: dict[str, Any] = {
        "version": VERSION, "generated_at": wall.isoformat().replace("+00:00", "Z"),
        "log": "off" if found is None and error is None else "unreadable" if error is not None else "on",
        "sessions": [session_entry(s) for s in listed],
        # another page (older records) when this one is full
        "next_before": listed[-1].number if listed and len(listed) == query.limit else None}
    if error is not None:
        body["error"] = error[:200]
    return body
