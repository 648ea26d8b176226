"""Load management on the wire (trio): the limit engine and the profile controls, driven.

:class:`Limiter` is a :class:`~proxy.runtime.relay.Listener`. For every session it
asks to observe the frames the limit engine and the profile control need,
feeds them to the sans-IO :class:`~proxy.loadmgmt.engine.LimitEngine` and one
:class:`~proxy.loadmgmt.control.Control` per wallbox, and sends the proxy's
SetChargingProfile / ClearChargingProfile through
:meth:`PairedSession.request` (the session holds them while the backend has
a CALL outstanding on the wallbox, and consumes their answers).

One task (:meth:`run`, started in the server's nursery) recomputes when an
input changes, after every answer, and at least every ``[site] interval``;
each CALL runs in a short task of that task's nursery, at most one per wallbox
at a time. The decisions are the sans-IO :class:`~proxy.loadmgmt.coordinator.Coordinator`'s
(engine, fuse, controls); this layer adds the durable record of the fuse's
reservations (:mod:`proxy.storage.reservations`): an increase leaves only once
its reservation is on disk.

Several processes on one site (``[store] url``, docs/cluster.md): the
reservations are the site's shared ones (PostgreSQL), and only the holder of
the site's lease (:class:`SharedSite`) grants current; every other process
pauses the chargers it serves and counts the owner's at their records. The
owner reads the shared records again every third of the lease's life (and
when it takes the lease over), so chargers served elsewhere count at what
their process recorded; a charger that comes to this process is counted at the
higher of its record and what this process remembers (:meth:`Limiter.charger_leased`).

Without ``[site]`` (and without meter or EMS) the limiter stays out of the
way: it registers no :class:`~proxy.core.session.Tap` (observes nothing,
rewrites nothing) and sends nothing. Once a session is managed, its tap
observes :data:`OBSERVE` and clamps backend SetChargingProfiles while the
wallbox's :class:`~proxy.loadmgmt.control.Control` says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import trio

from proxy.config import ChargerBase, ChargerSettings, Config, SiteSettings
from proxy.config.checks import connector_max, connector_min, connector_phases
from proxy.messages.ocppj import Frame, MessageType, payload_of
from proxy.loadmgmt.control import Control, ControlSettings, field_of, read_meter_values
from proxy.loadmgmt.coordinator import Coordinator, Outgoing
from proxy.loadmgmt.engine import ChargerLimits, ConnectorLimits, LimitEngine, SiteLimits, load_points
from proxy.loadmgmt.fuse import Fuse
from proxy.storage.interface import StorageError
from proxy.storage.reservations import DB_NAME, ReservationStore, SqliteReservations
from proxy.ops.logs import get_logger
from proxy.loadmgmt.profiles import Kept, ProfileError, decode_kept, encode_kept, replace_payload
from proxy.runtime.leases import LeaseKeeper
from proxy.runtime.relay import Listener, PairedSession
from proxy.core.session import WALLBOX, Action, Observed, ProxyAnswer, Rewriter, Side, Tap
from proxy.loadmgmt.v2 import CHARGING_STATES, CONNECTOR_STATUSES, V2Profiles, validate_v2

#: What the limiter reads from a session.
OBSERVE = frozenset({"BootNotification", "StatusNotification", "MeterValues", "StartTransaction",
                     "StopTransaction", "SetChargingProfile", "ClearChargingProfile",
                     "TransactionEvent"})  # 2.0.1 / 2.1
REWRITTEN = "SetChargingProfile"
#: Longest delay before a lowered reservation is written (a raised one is written at once).
RECORD_DELAY = 1.0
#: The limiter's name among a session's taps.
TAP_OWNER = "limiter"


class LimitsSink(Protocol):
    """Where the limits are published after each recomputation (``proxy.ops.metrics.Metrics`` fits)."""

    def set_charger_limits(self, charger: str, *, effective: float | None = None, local: float | None = None,
                           backend: float | None = None, ems: float | None = None) -> None: ...
    def set_charger_current(self, charger: str, phases: Sequence[float]) -> None: ...
    def set_site(self, *, limit: float | None = None, ems_limit: float | None = None,
                 effective_limit: float | None = None, headroom: Sequence[float] | None = None) -> None: ...
    def set_fuse(self, *, unconfirmed: Mapping[str, float], over_budget_seconds: float,
                 decreases_unanswered: int, decreases_failed: Mapping[str, int]) -> None: ...
    def storage_error(self, operation: str, detail: str) -> None: ...


def meter_configured(config: Config) -> bool:
    """A grid meter is configured: stale or missing readings switch to the fallback."""
    return bool(config.meter.modbus)


def ems_configured(config: Config) -> bool:
    return bool(config.ems.modbus_listen)


def load_management(config: Config) -> bool:
    """Limits are managed when a site, a meter or an EMS interface is configured."""
    return config.site is not None or meter_configured(config) or ems_configured(config)


def site_settings(config: Config) -> SiteSettings:
    return config.site or SiteSettings(max_current=math.inf)


def site_limits(config: Config) -> SiteLimits:
    site = site_settings(config)
    return SiteLimits(
        max_current=site.max_current, phases=site.phases, meter=meter_configured(config),
        meter_timeout=site.meter_timeout,
        fallback_current=None if site.fallback_current < 0 else site.fallback_current,
        fail_closed=site.fail_closed, ramp_up_interval=site.ramp_up_interval, hysteresis=site.hysteresis,
        min_hold_time=site.min_hold_time)


def charger_limits(charger: ChargerBase) -> ChargerLimits:
    return ChargerLimits(max_current=charger.max_current, min_current=charger.min_current, phases=charger.phases,
                         first_phase=charger.first_phase, priority=charger.priority, enabled=charger.enabled,
                         on_disable=charger.on_disable, connectors=tuple(
                             ConnectorLimits(c.id, connector_max(charger, c), connector_min(charger, c),
                                             connector_phases(charger, c), c.priority, c.enabled)
                             for c in _connectors(charger)))


def _connectors(charger: ChargerBase | None) -> list[Any]:
    return list(charger.connectors) if isinstance(charger, ChargerSettings) else []


@dataclass(frozen=True)
class SharedSite:
    """The site shared by several processes: the lease keeper, the site's lease key, its shared reservations."""

    keeper: LeaseKeeper
    key: str
    open_store: Callable[[], ReservationStore]

    @property
    def refresh_every(self) -> float:
        return self.keeper.policy.renew_every


def site_key(config: Config) -> str:
    """The site's lease key (``:`` never occurs in a charge point id, so it never meets a charger's)."""
    return f"site:{site_settings(config).name}"


class Limiter(Listener):
    def __init__(self, config: Config, *, log: Any = None) -> None:
        self.log = log or get_logger()
        self.engine = LimitEngine()
        self.fuse = Fuse()
        self.coordinator = Coordinator(self.engine, self.fuse)
        #: One per wallbox (the coordinator's).
        self.controls: dict[str, Control] = self.coordinator.controls
        #: The fuse's durable record (opened by :meth:`run` while load management is on).
        self.store: ReservationStore | None = None
        self._unwritten: dict[str, float | None] = {}
        #: The backend profiles that may be on each wallbox as last handed to the writer (:meth:`_keep`), and
        #: those not written yet (JSON text; None: none any more).
        self._kept: dict[str, list[Kept]] = {}
        self._unwritten_kept: dict[str, str | None] = {}
        self._record_failing = False
        self._queued = self._written = self._failed = 0  # record generations
        self._records_queued = trio.Event()  # something to write
        self._records_changed = trio.Event()  # ... at once
        self._records_done = trio.Event()
        #: Chargers whose session speaks OCPP 2.0.1 / 2.1: the translation of their frames (proxy/loadmgmt/v2.py).
        self.v2: dict[str, V2Profiles] = {}
        self.sessions: dict[str, PairedSession] = {}
        #: The sessions the limiter manages (observe set, engine told), by charger.
        self.attached: dict[str, PairedSession] = {}
        self.active = False
        self._wake = trio.Event()
        self._progress = trio.Event()
        self._ticking = False
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.CancelScope()
        self._proxy_answer: str | None = None
        self.sinks: list[LimitsSink] = []
        #: Several processes on this site (``[store] url``): set by the server before :meth:`run`.
        self.shared: SharedSite | None = None
        self.config = config
        self.reconfigure(config)
        self.engine.on_input = self.poke

    # -- configuration --------------------------------------------------------------------------

    def reconfigure(self, config: Config) -> None:
        """Apply a (re)loaded configuration; connections stay as they are."""
        self.config = config
        was_active, self.active = self.active, load_management(config)
        chargers = {c.id: charger_limits(c) for c in config.all_chargers}
        default = charger_limits(ChargerSettings(id=""))
        # A connected wallbox whose connector layout changes is detached and attached again under the new one.
        relaid = [cid for cid in list(self.attached) if cid in self.coordinator.connected and
                  [p for p, _ in self.coordinator.points(cid)] != list(load_points(cid, chargers.get(cid, default)))]
        for charger_id in relaid:
            self.coordinator.detach(charger_id, _now())
        self.engine.configure(site_limits(config), chargers, default=default, now=_now())
        site = site_settings(config)
        self.fuse.configure(site.phases, chargers, default, site.lost_charger_hold)
        self.coordinator.active = self.active
        for charger_id, control in self.controls.items():
            control.configure(self._control_settings(charger_id))
        for charger_id in relaid:
            self.coordinator.attach(charger_id, self._control_settings(charger_id), _now())
        if self.active:
            for paired in list(self.sessions.values()):
                self._attach(paired)
        if was_active != self.active:
            self.log.info("load_management", active=self.active)
            if self.active and self.store is None and self._nursery is not None:
                self._nursery.start_soon(self._open_late)  # switched on by a reload: as at a start
        self.poke()

    def _control_settings(self, charger_id: str) -> ControlSettings:
        site = site_settings(self.config)
        charger = self.config.settings_for(charger_id) or ChargerSettings(id=charger_id)
        managed = self.active and (charger.enabled or charger.on_disable == "block")
        return ControlSettings(managed=managed, strategy=charger.strategy or site.strategy,
                               profile_id=site.profile_id, stack_level=site.stack_level,
                               tx_default_stack_level=site.tx_default_stack_level, unit=charger.unit,
                               phases=charger.phases, voltage=site.voltage, retry=site.interval,
                               connectors=tuple(sorted(c.id for c in _connectors(charger))))

    # -- Listener hooks (synchronous, from the sessions' tasks) ---------------------------------------------

    def session_opened(self, paired: PairedSession) -> None:
        self.sessions[paired.charger_id] = paired
        if self.active:
            self._attach(paired)

    def session_closed(self, paired: PairedSession, side: str, code: int, reason: str) -> None:
        charger_id = paired.charger_id
        if self.sessions.get(charger_id) is not paired:
            return  # replaced by a newer connection, which is the one that counts
        del self.sessions[charger_id]
        if self.attached.get(charger_id) is paired:
            del self.attached[charger_id]
            self.coordinator.detach(charger_id, _now())
            self._keep(charger_id)
            for sink in self.sinks:
                sink.set_charger_limits(charger_id)

    def _attach(self, paired: PairedSession) -> None:
        version = paired.session.version
        if version is None:
            return  # a subprotocol the proxy does not speak: nothing is injected
        charger_id = paired.charger_id
        if version.is_v2:
            if charger_id not in self.v2 or self.v2[charger_id].version is not version:
                self.v2[charger_id] = V2Profiles(version)
        else:
            self.v2.pop(charger_id, None)
        settings = self._control_settings(charger_id)
        control = self.coordinator.control(charger_id, settings)
        if self.attached.get(charger_id) is paired:
            return
        self.attached[charger_id] = paired  # a reconnect replaces the old session here
        paired.session.tap(TAP_OWNER, Tap(OBSERVE, {REWRITTEN: self._rewriter(control)}))
        self.coordinator.attach(charger_id, settings, _now())

    #: What :meth:`action` reads (the relay calls it for these only).
    actions = frozenset({ProxyAnswer, Observed})

    def action(self, paired: PairedSession, action: Action) -> None:
        match action:
            case ProxyAnswer(msg_id=msg_id):
                self._proxy_answer = msg_id
            case Observed():
                self._watched(paired, action)

    def _watched(self, paired: PairedSession, action: Observed) -> None:
        """An observed frame of a managed session (not the answer to the limiter's own CALL) feeds the engine."""
        own_answer = action.call is not None and action.call.msg_id == self._proxy_answer
        self._proxy_answer = None
        charger_id = paired.charger_id
        if own_answer or self.attached.get(charger_id) is not paired:
            return
        try:
            self._observed(charger_id, self.controls[charger_id], action)
        except Exception as exc:  # noqa: BLE001 - never let a frame's content break the session
            self.log.warning("frame_not_understood", charger=charger_id, action=action.action, error=str(exc)[:200])
        self._keep(charger_id)
        self.poke()

    def _observed(self, charger_id: str, control: Control, observed: Observed) -> None:
        frame, name, now = observed.frame, observed.action, _now()
        if frame.kind is MessageType.CALL:
            if observed.source == WALLBOX:
                v2 = self.v2.get(charger_id)
                if v2 is None:
                    self._wallbox_call(charger_id, control, name, frame.msg_id or "", payload_of(frame), now)
                else:
                    self._station_call(charger_id, control, v2, name, frame.msg_id or "", payload_of(frame), now)
                if name == "BootNotification":
                    self.coordinator.sync(charger_id)  # its profiles may be gone
                    if self._answered_locally(charger_id):
                        control.boot_answered("Accepted")  # offline mode: the proxy accepted it itself
            return  # a backend CALL on its way: what counts is the wallbox's answer
        if observed.call is None:
            return
        if observed.source == WALLBOX and name in ("SetChargingProfile", "ClearChargingProfile") \
                and frame.kind is not MessageType.CALLRESULT:
            if name == "SetChargingProfile":  # a CALLERROR: nothing changed on the wallbox
                control.backend_set_answered(observed.call.msg_id or "", None, None, _wall())
            self.coordinator.backend_answered(charger_id)
            return
        if frame.kind is not MessageType.CALLRESULT:
            if name == "BootNotification" and observed.source != WALLBOX:
                control.boot_answered(None)
            return
        answer = payload_of(frame)
        status = field_of(answer, "status")
        v2 = self.v2.get(charger_id)
        if observed.source == WALLBOX:  # the wallbox answered the backend
            request = payload_of(observed.call)
            if name == "SetChargingProfile":
                model = request if v2 is None else v2.set_request(request)
                control.backend_set_answered(observed.call.msg_id or "", model, status, _wall())
            elif name == "ClearChargingProfile":
                control.backend_clear_answered(request if v2 is None else v2.clear_request(request), status)
            if name in ("SetChargingProfile", "ClearChargingProfile"):
                self.coordinator.backend_answered(charger_id)
            self._log_notes(charger_id, control)
        elif name == "BootNotification":
            control.boot_answered(status if isinstance(status, str) else None)
        elif name == "StartTransaction":
            tx = field_of(answer, "transactionId")
            control.transaction_started(observed.call.msg_id or "", tx if isinstance(tx, int) else None)

    def _answered_locally(self, charger_id: str) -> bool:
        paired = self.attached.get(charger_id)
        return paired is not None and paired.session.offline_mode

    def _wallbox_call(self, charger_id: str, control: Control, name: str, msg_id: str, payload: Any,
                      now: float) -> None:
        engine = self.engine
        if self._booted(charger_id, control, name, now):
            return
        if name == "StatusNotification":
            connector, status = field_of(payload, "connectorId"), field_of(payload, "status")
            if isinstance(connector, int) and isinstance(status, str):
                control.status(connector)
                engine.status(charger_id, connector, status, now)
        elif name == "MeterValues":
            self._measured(charger_id, control, payload, now, _connector(payload, "connectorId"))
        elif name == "StartTransaction":
            connector = field_of(payload, "connectorId")
            connector = connector if isinstance(connector, int) else 1
            control.transaction_starting(msg_id, connector, _wall())
            engine.transaction_started(charger_id, connector, now)
        elif name == "StopTransaction":
            tx = field_of(payload, "transactionId")
            connector = control.transaction_stopped(tx if isinstance(tx, int) else None)
            engine.transaction_stopped(charger_id, connector, now)

    def _booted(self, charger_id: str, control: Control, name: str, now: float) -> bool:
        """A BootNotification (True: nothing else to read from it); any other CALL: the wallbox is up."""
        if name == "BootNotification":
            control.boot(now)
            self.engine.transaction_stopped(charger_id, None, now)
            return True
        control.wallbox_call()
        return False

    def _station_call(self, charger_id: str, control: Control, v2: V2Profiles, name: str, msg_id: str,
                      payload: Any, now: float) -> None:
        """A 2.0.1 / 2.1 station's CALL: the same facts as from a 1.6 wallbox, from other messages."""
        engine = self.engine
        if self._booted(charger_id, control, name, now):
            return
        if name == "StatusNotification":
            evse = field_of(payload, "evseId")
            status = CONNECTOR_STATUSES.get(str(field_of(payload, "connectorStatus")))
            if isinstance(evse, int) and status is not None:
                control.status(evse)
                engine.status(charger_id, evse, status, now)
        elif name == "MeterValues":
            self._measured(charger_id, control, v2.meter_values(payload), now, _connector(payload, "evseId"))
        elif name == "TransactionEvent" and isinstance(payload, dict):
            self._transaction_event(charger_id, control, v2, msg_id, payload, now)

    def _transaction_event(self, charger_id: str, control: Control, v2: V2Profiles, msg_id: str,
                           payload: dict[str, Any], now: float) -> None:
        tx, evse = v2.transaction_evse(payload)
        event = payload.get("eventType")
        if event == "Started":
            control.transaction_starting(msg_id, evse, _wall())
            control.transaction_started(msg_id, v2.transaction_number(tx))  # the station's own id
            self.engine.transaction_started(charger_id, evse, now)
        info = payload.get("transactionInfo")
        state = CHARGING_STATES.get(str(info.get("chargingState"))) if isinstance(info, dict) else None
        if state is not None and event != "Ended":
            self.engine.status(charger_id, evse, state, now)
        self._measured(charger_id, control, v2.meter_values(payload), now, evse)
        if event == "Ended":
            control.transaction_stopped(v2.transaction_number(tx))
            self.engine.transaction_stopped(charger_id, evse, now)

    def _measured(self, charger_id: str, control: Control, payload: Any, now: float, connector: int | None) -> None:
        """Measurements of the connector (1.6 connectorId, 2.x evseId) they were taken on: with connector load
        points each connector's own; the wallbox's main meter (connector 0) is not any connector's."""
        meter = read_meter_values(payload, control.settings.phases)
        if meter.currents is not None or meter.power_w is not None or meter.energy_wh is not None:
            self.engine.measured(charger_id, meter.currents, now, meter.power_w, meter.energy_wh, connector=connector)

    def _rewriter(self, control: Control) -> Rewriter:
        """Clamps an upstream's SetChargingProfile to the local limit while the control says so."""
        def rewrite(source: Side, destination: Side, frame: Frame) -> str:
            if destination != WALLBOX or source == WALLBOX:
                return frame.text
            try:
                return rewritten(frame)
            finally:
                self._keep(control.charger_id)  # on its way: it may be on the wallbox from now (before its answer)

        def rewritten(frame: Frame) -> str:
            if not control.rewrites:
                self._forwarded(control, frame.msg_id or "", payload_of(frame))
                return frame.text
            try:
                payload = self._clamped(control, frame.msg_id or "", payload_of(frame))
                if payload is None:
                    return frame.text
                text = replace_payload(frame.text, payload)
            except Exception as exc:  # noqa: BLE001 - the frame is forwarded as received
                self.log.warning("profile_not_clamped", charger=control.charger_id, error=str(exc)[:200])
                return frame.text
            self.log.info("backend_profile_clamped", charger=control.charger_id, limit=control.local)
            return text

        return rewrite

    def _forwarded(self, control: Control, msg_id: str, payload: Any) -> None:
        """A backend SetChargingProfile forwarded unchanged (max-profile): the coordinator remembers it until
        its answer, in case the wallbox refuses the proxy's ChargePointMaxProfile meanwhile."""
        v2 = self.v2.get(control.charger_id)
        try:
            self.coordinator.rewrite(control.charger_id, msg_id, payload if v2 is None else v2.set_request(payload),
                                     _wall())
        except Exception as exc:  # noqa: BLE001 - the frame is forwarded as received either way
            self.log.warning("profile_not_understood", charger=control.charger_id, error=str(exc)[:200])

    def _clamped(self, control: Control, msg_id: str, payload: Any) -> dict[str, Any] | None:
        """The backend's SetChargingProfile clamped to the local limit, in its own version (None: as it is)."""
        v2, charger_id = self.v2.get(control.charger_id), control.charger_id
        if v2 is None:
            return self.coordinator.rewrite(charger_id, msg_id, payload, _wall())
        if self.coordinator.rewrite(charger_id, msg_id, v2.set_request(payload), _wall()) is None \
                or control.local is None:
            return None
        settings = control.settings
        return v2.clamped(payload, control.local, charger_phases=settings.phases, voltage=settings.voltage)

    # -- the task -----------------------------------------------------------------------------------------

    def poke(self) -> None:
        """An input changed: recompute now (call from the trio thread)."""
        if not self._ticking:
            self._wake.set()

    def stop(self) -> None:
        """End :meth:`run` (the server is stopping)."""
        self._stopped.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._stopped = trio.CancelScope()
        with self._stopped:
            try:
                await self._restore()
                await self._run(task_status)
            finally:
                if self.store is not None:
                    self.store.close()
                    self.store = None

    def share(self, shared: SharedSite) -> None:
        """Several processes serve this site: grant only while holding its lease (see the module)."""
        self.shared = shared
        self.coordinator.site_owner = False

    async def _restore(self) -> None:
        """Open the durable record; chargers not connected yet count at their recorded limit or maximum."""
        if not self.active:
            return
        path = Path(self.config.offline.data_dir) / DB_NAME
        opener = self.shared.open_store if self.shared is not None else lambda: SqliteReservations(path)
        recorded: dict[str, float | None] = {}
        profiles: dict[str, str] = {}
        try:
            self.store = await trio.to_thread.run_sync(opener)
            recorded = await trio.to_thread.run_sync(self.store.load)
            profiles = await trio.to_thread.run_sync(self.store.load_profiles)
        except StorageError as exc:
            self.log.error("reservations_unreadable", file=str(path) if self.shared is None else "[store] url",
                           error=str(exc)[:300], consequence="chargers not connected yet count at their max_current; "
                           "backend profiles from before the restart are not known")
            self._storage_error(exc.operation, str(exc)[:300])
        self.fuse.restore(recorded, _now())
        kept = self._restore_kept(profiles)
        if kept:
            self.log.info("backend_profiles_restored", chargers=len(profiles), profiles=kept)
        lost = self.fuse.lost(_now())
        if lost:
            self.log.info("reservations_restored", chargers=len(lost), amps=round(sum(lost.values()), 1))

    async def _open_late(self) -> None:
        await self._restore()
        if self.store is not None and self._nursery is not None:
            self._nursery.start_soon(self._write_records, self.store)
            self._start_shared(self._nursery)
        self.poke()

    def _start_shared(self, nursery: trio.Nursery) -> None:
        if self.shared is not None and self.store is not None:
            nursery.start_soon(self._hold_site, self.shared, self.store)
            nursery.start_soon(self._refresh_often, self.shared, self.store)

    # -- several processes on one site ---------------------------------------------------------------

    async def _hold_site(self, shared: SharedSite, store: ReservationStore) -> None:
        """Take the site's lease whenever it is free; while held (and only then) this process grants current."""
        while True:
            wait = shared.refresh_every
            async with shared.keeper.hold(shared.key) as refused:
                if refused is None and await self._refresh(store):  # what the last owner may have installed
                    self._site_owner(True)
                    try:
                        await trio.sleep_forever()  # until the keeper loses the lease (cancelled in time)
                    finally:
                        self._site_owner(False)
                elif refused is not None:
                    wait = min(max(refused.retry_after, 0.1), wait)
            await trio.sleep(wait)

    def _site_owner(self, owner: bool) -> None:
        self.coordinator.site_owner = owner
        self.log.info("site_lease", site=site_settings(self.config).name, held=owner,
                      consequence="grants current" if owner else "pauses the chargers it serves")
        self.poke()

    async def _refresh_often(self, shared: SharedSite, store: ReservationStore) -> None:
        while True:
            await trio.sleep(shared.refresh_every)
            if await self._refresh(store):
                self.poke()

    async def _refresh(self, store: ReservationStore) -> bool:
        """Read the site's shared records again (False: the store could not be read; nothing changed)."""
        try:
            recorded = await trio.to_thread.run_sync(store.load)
            elsewhere = await trio.to_thread.run_sync(store.served_elsewhere)
        except StorageError as exc:
            self.log.error("reservations_unreadable", file=store.location, error=str(exc)[:300],
                           consequence="no current is granted until they are read")
            return False
        # Leases are per charger; a wallbox's connector load points are served where the wallbox is.
        points = {pid for cid in elsewhere for pid, _ in self.coordinator.points(cid)} | set(elsewhere)
        self.fuse.refresh(recorded, points, _now())
        return True

    async def charger_leased(self, charger_id: str) -> None:
        """This process now holds the charger's lease: count it at least at its shared record (another
        process may have served it since this one last did). Unreadable: at its max_current."""
        store = self.store
        if self.shared is None or store is None:
            return
        points = [pid for pid, _ in self.coordinator.points(charger_id)]  # itself, or its connectors
        profiles: dict[str, str] = {}
        try:
            recorded = await trio.to_thread.run_sync(store.load, points)
            profiles = await trio.to_thread.run_sync(store.load_profiles, [charger_id])
        except StorageError as exc:
            self.log.error("reservations_unreadable", file=store.location, error=str(exc)[:300],
                           consequence=f"{charger_id} counts at its max_current")
            recorded = {}
        self._restore_kept(profiles)  # what the process that served it kept
        for pid in points:
            self.fuse.adopt(pid, recorded.get(pid), known=pid in recorded)

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.store is not None:
                nursery.start_soon(self._write_records, self.store)
                self._start_shared(nursery)
            task_status.started()
            try:
                while True:
                    self._wake = trio.Event()
                    now = _now()
                    try:
                        self._tick(now)
                    except Exception as exc:  # noqa: BLE001 - a bug here must not stop the relay
                        self.log.error("limiter_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                    with trio.move_on_at(self._deadline(now)):
                        await self._wake.wait()
            finally:
                self._nursery = None

    def _deadline(self, now: float) -> float:
        times = [now + site_settings(self.config).interval]
        coming = self.coordinator.next_event(now) if self.active else None
        if coming is not None:
            times.append(coming)
        return max(now, min(times))

    def _tick(self, now: float) -> None:
        wall = _wall()
        self._ticking = True
        try:
            outgoing = self.coordinator.tick(now, wall)
        finally:
            self._ticking = False
        generation = self._collect_records()
        for item in outgoing:
            self._start(item, generation)
        for charger_id in self.attached:
            self._log_notes(charger_id, self.controls[charger_id])
        if self.sinks and self.active:
            self._publish(now)
        self._progressed()

    def _publish(self, now: float) -> None:
        site = self.engine.site_view(now)
        views = {cid: self.engine.charger_view(cid) for cid in self.attached}
        reservations = self.coordinator.reservations(now)
        stats = self.fuse.stats
        unanswered = sum(1 for cid in self.attached for pid, _ in self.coordinator.points(cid)
                         if self.fuse.is_decrease(pid))
        for sink in self.sinks:
            sink.set_site(limit=site.config_limit, ems_limit=site.ems_limit, effective_limit=site.site_limit,
                          headroom=site.headroom)
            sink.set_fuse(unconfirmed={cid: r.unconfirmed for cid, r in reservations.items()},
                          over_budget_seconds=stats.over_budget_seconds, decreases_unanswered=unanswered,
                          decreases_failed=stats.failed_decreases)
            for charger_id, view in views.items():
                if view is None:
                    continue
                sink.set_charger_limits(charger_id, effective=view.effective_limit, local=view.local_limit,
                                        backend=view.backend_limit, ems=view.ems_limit)
                sink.set_charger_current(charger_id, view.currents)

    def _start(self, item: Outgoing, generation: int) -> None:
        paired = self.sessions.get(item.charger_id)
        control = self.controls[item.charger_id]
        if paired is None or self._nursery is None:
            self.coordinator.failed(item.charger_id, item.command, "session gone", _now())
            self._keep(item.charger_id)
            return
        self._keep(item.charger_id)  # a backend profile re-sent: kept before it leaves (it waits for the write)
        self._nursery.start_soon(self._send, paired, control, item, generation)

    async def _send(self, paired: PairedSession, control: Control, item: Outgoing, generation: int) -> None:
        try:
            await self._exchange(paired, control, item, generation)
        finally:
            self._keep(item.charger_id)  # a backend profile re-sent may be on the wallbox now, or settled

    async def _exchange(self, paired: PairedSession, control: Control, item: Outgoing, generation: int) -> None:
        command, charger_id = item.command, item.charger_id
        log = self.log.bind(charger=charger_id)
        # Anything but a decrease leaves only once every reservation handed to the store is on disk.
        if (item.record_first or not item.decrease) and not await self._durable(max(generation, self._queued)):
            self.coordinator.withdrawn(charger_id, command, "reservation not recorded", _now())
            log.warning("profile_withheld", action=command.action, reason="reservation not recorded",
                        **command.describe())
            self._progressed()
            return
        if command.generation != control.generation or paired.closed.is_set():
            self._lost(item, "session gone", log)
            return
        if not item.decrease and not self.coordinator.site_owner:  # the site's lease went while it was recorded
            self.coordinator.withdrawn(charger_id, command, "site lease lost", _now())
            log.warning("profile_withheld", action=command.action, reason="site lease lost", **command.describe())
            self._progressed()
            return
        log.debug("profile_sent", action=command.action, decrease=item.decrease, **command.describe())
        status = error = None
        payload = command.payload
        v2 = self.v2.get(charger_id)
        if v2 is not None:  # the control's model, in the station's version
            try:
                payload = v2.command(command.action, payload)
                validate_v2(v2.version, command.action, payload)
            except (ProfileError, KeyError) as exc:
                self._lost(item, f"cannot build a {v2.version.value} {command.action}: {exc}", log)
                log.error("profile_invalid", action=command.action, reason=str(exc)[:200])
                self._progressed()
                return
        with trio.move_on_after(paired.session.call_timeout + 5) as scope:
            try:
                frame = await paired.request(command.action, payload)
            except RuntimeError as exc:
                self._lost(item, str(exc)[:200], log)
            else:
                if frame.kind is MessageType.CALLRESULT:
                    status = field_of(payload_of(frame), "status")
                else:
                    error = frame.action or "CALLERROR"
                status = status if isinstance(status, str) else None
                refused = self.coordinator.answered(charger_id, command, status, error, _now())
                level = log.info if status == "Accepted" or (status == "Unknown" and command.kind == "clear") \
                    else log.warning
                level("profile_answered", action=command.action, status=status, error=error, **command.describe())
                if refused:
                    log.warning("limit_decrease_refused", answer=status or error, amps=command.amps,
                                counting=self.coordinator.counting(charger_id, command, _now()))
        if scope.cancelled_caught:
            self._lost(item, "no answer", log)
        self._log_notes(charger_id, control)
        if self.coordinator.waiting():
            self.poke()  # an increase waits for room: this answer may have made it
        elif self.sessions.get(charger_id) is paired:
            following = self.coordinator.next(charger_id, _now(), _wall())
            if following is not None:
                self._start(following, self._collect_records())
        self._collect_records()
        self._progressed()

    def _lost(self, item: Outgoing, reason: str, log: Any) -> None:
        """No answer: the wallbox may hold the new limit or the old one (the higher counts)."""
        if self.coordinator.failed(item.charger_id, item.command, reason, _now()):
            log.warning("limit_decrease_unanswered", reason=reason, amps=item.command.amps,
                        counting=self.coordinator.counting(item.charger_id, item.command, _now()))
        else:
            log.warning("profile_failed", action=item.command.action, reason=reason)

    # -- the durable record --------------------------------------------------------------------------------

    def _collect_records(self) -> int:
        """Hand the fuse's changed reservations to the writer; returns their generation."""
        records, raised = self.fuse.records()
        if records and self.store is not None:
            self._unwritten.update(records)
            self._queued += 1
            self._records_queued.set()
            if raised:
                self._records_changed.set()  # an increase waits for it, or a restart must see it
        return self._queued

    async def _durable(self, generation: int) -> bool:
        """Wait until the records up to ``generation`` are on disk; False if that write failed."""
        if self._written < generation:
            self._records_changed.set()
        while self._written < generation:
            if self._failed >= generation:
                return False
            await self._records_done.wait()
        return True

    async def _write_records(self, store: ReservationStore) -> None:
        """One writer: every batch of changed reservations in one transaction (fsync). Raised values go
        at once; lowered ones (a stale higher record only over-counts) at most a second later, batched."""
        while True:
            await self._records_queued.wait()
            with trio.move_on_after(RECORD_DELAY):
                await self._records_changed.wait()
            self._records_queued, self._records_changed = trio.Event(), trio.Event()
            batch, generation, self._unwritten = self._unwritten, self._queued, {}
            kept, self._unwritten_kept = self._unwritten_kept, {}
            try:
                await trio.to_thread.run_sync(_record, store, batch, kept)
            except StorageError as exc:
                self._failed = generation
                self._unwritten = {**batch, **self._unwritten}  # written with the next batch
                self._unwritten_kept = {**kept, **self._unwritten_kept}
                self.log.error("reservations_not_recorded", file=store.location, operation=exc.operation,
                               error=str(exc)[:300], consequence="increases wait")
                self._storage_error(exc.operation, str(exc)[:300])
                self._records_queued.set()
                await trio.sleep(1.0)
            else:
                self._written = generation
                if self._record_failing:
                    self._storage_error("reservation", "")
            self._records_done.set()
            self._records_done = trio.Event()

    def _keep(self, charger_id: str) -> None:
        """After anything that may change which backend profiles may be on the wallbox: a changed set goes to the
        writer at once (a restart must find it; docs/load-management.md, "The backend's profiles over a restart").
        The relay never waits for it; a CALL of the proxy's that leaves after this waits like an increase."""
        if self.store is None:
            return
        pairs = self.coordinator.kept(charger_id)
        if pairs == self._kept.get(charger_id, []):
            return
        self._kept[charger_id] = pairs
        self._unwritten_kept[charger_id] = encode_kept(pairs) if pairs else None
        self._queued += 1
        self._records_queued.set()
        self._records_changed.set()

    def _restore_kept(self, recorded: Mapping[str, str]) -> int:
        """The backend profiles the record says may be on the wallboxes: maybe installed (returns how many)."""
        count = 0
        for charger_id, text in recorded.items():
            try:
                pairs = decode_kept(text)
            except ProfileError as exc:
                self.log.error("backend_profiles_unreadable", charger=charger_id, error=str(exc)[:300])
                continue
            self.coordinator.restore_kept(charger_id, pairs)
            self._kept[charger_id] = pairs  # as recorded: more that this process knew is written next
            self._keep(charger_id)
            count += len(pairs)
        return count

    def _storage_error(self, operation: str, detail: str) -> None:
        self._record_failing = bool(detail)
        for sink in self.sinks:
            sink.storage_error(operation, detail)

    def _log_notes(self, charger_id: str, control: Control) -> None:
        for note in control.drain_notes():
            getattr(self.log, note.level)(note.event, charger=charger_id, **note.fields)

    def _progressed(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    # -- for tests, the benchmark and the demo ---------------------------------------------------------------

    def settled(self) -> bool:
        """No CALL in flight, none due, and no recomputation pending."""
        if self._wake.is_set():
            return False
        now, wall = _now(), _wall()
        for charger_id in self.attached:
            control = self.controls[charger_id]
            if control.inflight is not None or control.peek(now, wall) is not None:
                return False
        return True

    async def next_progress(self) -> None:
        """Wait for the next recomputation or answer (callers bound it with ``trio.fail_after``)."""
        await self._progress.wait()

    async def wait_settled(self) -> None:
        """Wait until :meth:`settled` (callers bound it with ``trio.fail_after``)."""
        while not self.settled():
            await self._progress.wait()

    def views(self) -> Mapping[str, Any]:
        return {cid: self.engine.charger_view(cid) for cid in sorted(self.sessions)}


def _record(store: ReservationStore, limits: Mapping[str, float | None], kept: Mapping[str, str | None]) -> None:
    """The writer's batch (in its thread): the reservations, then the backend profiles (each one transaction)."""
    store.record(limits)
    store.record_profiles(kept)


def _connector(payload: Any, key: str) -> int | None:
    value = field_of(payload, key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # constructed outside trio.run (configuration only)
        return 0.0


def _wall() -> datetime:
    return datetime.now(UTC)
