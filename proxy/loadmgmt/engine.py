"""The local limit engine (sans-IO): events in, a current limit per charger out.

Everything here is plain arithmetic on amperes and seconds. The engine knows
nothing about OCPP frames, sockets or clocks: callers feed it what happened
(a charger connected, its status, its measured phase currents, a grid meter
reading, an EMS limit, a new configuration) together with ``now`` (any
monotonic clock, seconds), and ask :meth:`LimitEngine.targets` for the limit
each connected charger should have. The trio side turns those limits into
charging profiles.

How a limit is found (docs/load-management.md, "How the limit is found"):

* house load per phase = grid meter − managed chargers' estimated draw
  (``_estimated_draw``: a car held by its limit counts at its limit, one
  drawing less at its MeterValues sample); without a meter the house load is
  only what unmanaged chargers draw, so ``max_current`` is the chargers' budget;
* headroom = site limit (config, lowered by the EMS) − house load, per phase;
* chargers that want current are admitted by priority, running ones before
  paused ones (so a newcomer never knocks a running charger out), each only
  if its minimum fits; a charger whose minimum does not fit gets 0 (paused)
  rather than a current the car cannot use;
* the rest of the headroom is shared by priority, and fairly (equal current)
  within one priority, up to each charger's cap (its max_current, the EMS
  limit, the backend's own limit);
* chargers without a car (Available, Finishing, ...) share what is then
  left, the same way: under-used sites send no profile at every plug-in,
  crowded ones keep idle chargers at 0 so a new car never overloads the fuse;
* decreases apply at once; increases only every ``ramp_up_interval`` and by at
  least ``hysteresis``; a charger paused for lack of headroom stays paused for
  ``min_hold_time`` and needs its minimum plus ``hysteresis`` to resume;
* while a configured meter has not been read yet or is stale, every charger
  that wants current gets ``fallback_current`` (0 with ``fail_closed``).

Arithmetic is done in integer tenths of an ampere (OCPP limits have one
decimal), so "the sum never exceeds the headroom" holds exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

#: Connector statuses in which a charger wants current. ``SuspendedEVSE`` is
#: what a wallbox reports while the proxy pauses it: it still wants current.
DEMANDING = frozenset({"Preparing", "Charging", "SuspendedEV", "SuspendedEVSE"})

INFINITE = math.inf
#: A car drawing within this of its limit is taken to be held by the limit (it
#: will follow the next one); one drawing less draws what it wants.
LIMITED_MARGIN = 1.0
#: Caps and headroom above this are "unlimited" (in tenths of an ampere).
_UNLIMITED = 10**9


# --- settings --------------------------------------------------------------------

@dataclass(frozen=True)
class SiteLimits:
    """Engine view of ``[site]`` (plus whether a grid meter is configured)."""

    max_current: float = INFINITE
    phases: int = 3
    meter: bool = False
    meter_timeout: float = 10.0
    #: None: each charger's min_current.
    fallback_current: float | None = None
    fail_closed: bool = False
    ramp_up_interval: float = 15.0
    hysteresis: float = 1.0
    min_hold_time: float = 60.0


@dataclass(frozen=True)
class ConnectorLimits:
    """One ``[[chargers.connectors]]`` entry, defaults resolved (the charger's where left out)."""

    connector: int
    max_current: float
    min_current: float
    phases: int
    priority: int = 0
    enabled: bool = True


@dataclass(frozen=True)
class ChargerLimits:
    """Engine view of one ``[[chargers]]`` entry, or of one connector of it (a load point)."""

    max_current: float = 16.0
    min_current: float = 6.0
    phases: int = 3
    #: The site phase (1-3) the charger's L1 is wired to.
    first_phase: int = 1
    priority: int = 0
    enabled: bool = True
    on_disable: str = "clear"
    #: Its connectors as load points of their own (empty: the wallbox is one load point).
    connectors: tuple[ConnectorLimits, ...] = ()
    #: A connector's load point: the wallbox it belongs to, whose max_current bounds the sum of its connectors.
    wallbox: str = ""
    wallbox_max: float = INFINITE

    @property
    def managed(self) -> bool:
        """A disabled charger with ``on_disable = "clear"`` is left to itself."""
        return self.enabled or self.on_disable == "block"


#: Separates a wallbox's id from its connector in a load point's id (``CP001#2``); never in a charge point id.
POINT_SEP = "#"


def point_id(charger_id: str, connector: int) -> str:
    """The load point of a connector (0: the wallbox as one load point, its own id)."""
    return charger_id if connector == 0 else f"{charger_id}{POINT_SEP}{connector}"


def load_points(charger_id: str, limits: ChargerLimits) -> dict[str, tuple[int, ChargerLimits]]:
    """The load points of one charger: the charger itself (connector 0), or one per configured connector.

    A connector's load point draws on the charger's first ``phases`` phases, has its own minimum,
    maximum and priority, and is grouped under its wallbox (``wallbox_max`` bounds the group). A
    disabled connector is held at 0 A (``block``); a disabled charger disables all of them its way.
    """
    if not limits.connectors:
        return {charger_id: (0, limits)}
    out = {}
    for c in limits.connectors:
        out[point_id(charger_id, c.connector)] = (c.connector, ChargerLimits(
            max_current=c.max_current, min_current=c.min_current, phases=c.phases, first_phase=limits.first_phase,
            priority=limits.priority + c.priority, enabled=limits.enabled and c.enabled,
            on_disable=limits.on_disable if not limits.enabled else "block",
            wallbox=charger_id, wallbox_max=limits.max_current))
    return out


def expand(chargers: Mapping[str, ChargerLimits]) -> dict[str, ChargerLimits]:
    """Configured chargers → configured load points, by load point id."""
    return {pid: point for cid, limits in chargers.items() for pid, (_, point) in load_points(cid, limits).items()}


def wallbox_groups(points: Mapping[str, ChargerLimits], phases: int) -> dict[str, int]:
    """Each multi-connector wallbox → the index of its extra resource (after the site phases) in a headroom list:
    its max_current, shared by its connectors like a phase is shared by chargers."""
    names = sorted({limits.wallbox for limits in points.values() if limits.wallbox})
    return {name: phases + i for i, name in enumerate(names)}


# --- outputs ---------------------------------------------------------------------

@dataclass(frozen=True)
class ChargerView:
    """What the engine knows about one charger (EMS registers, metrics, demo)."""

    #: "offline", or the charger's last StatusNotification status ("Available"
    #: until the first one): what the EMS register table reports.
    state: str
    status: str | None
    currents: tuple[float, float, float]
    power_w: float | None
    energy_wh: float | None
    local_limit: float | None
    backend_limit: float | None
    effective_limit: float | None
    enabled: bool
    transaction: bool
    fallback: bool
    ems_limit: float | None = None
    #: The engine's view: offline | unmanaged | blocked | idle | charging | paused
    mode: str = "offline"


@dataclass(frozen=True)
class SiteView:
    #: In force: the configured limit, lowered by the EMS.
    site_limit: float
    house_load: tuple[float, ...]
    headroom: tuple[float, ...]
    meter_fresh: bool
    fallback: bool
    config_limit: float | None = None
    ems_limit: float | None = None


# --- allocation (pure) -------------------------------------------------------------

@dataclass(frozen=True)
class Demand:
    """One charger asking for current, in tenths of an ampere."""

    charger_id: str
    priority: int
    minimum: int
    cap: int
    phases: frozenset[int]
    running: bool


def allocate(demands: Iterable[Demand], headroom: list[int], hysteresis: int = 0) -> dict[str, int]:
    """Share ``headroom`` (per phase) among ``demands``; every result is 0 or in [minimum, cap].

    Admission reserves minimums in order (priority, running first, id); a
    paused charger needs ``minimum + hysteresis`` to be admitted. Then each
    priority group, highest first, fills up to its caps with equal increments.
    """
    ordered = sorted(demands, key=lambda d: (-d.priority, not d.running, d.charger_id))
    result = {d.charger_id: 0 for d in ordered}
    remaining = list(headroom)
    admitted: list[Demand] = []
    for demand in ordered:
        if demand.cap < demand.minimum or demand.minimum <= 0 and demand.cap <= 0:
            continue
        need = demand.minimum if demand.running else demand.minimum + hysteresis
        if all(remaining[ph] >= max(need, 1) for ph in demand.phases):
            admitted.append(demand)
            for ph in demand.phases:
                remaining[ph] -= demand.minimum
            result[demand.charger_id] = demand.minimum
    for priority in sorted({d.priority for d in admitted}, reverse=True):
        _fill([d for d in admitted if d.priority == priority], result, remaining)
    return result


def _fill(group: list[Demand], result: dict[str, int], remaining: list[int]) -> None:
    """Progressive filling: raise everyone equally until a cap or a phase runs out."""
    active = [d for d in group if result[d.charger_id] < d.cap]
    while active:
        users: dict[int, int] = {}
        for d in active:
            for ph in d.phases:
                users[ph] = users.get(ph, 0) + 1
        step = min(d.cap - result[d.charger_id] for d in active)
        for ph, count in users.items():
            step = min(step, remaining[ph] // count)
        frozen: set[str] = set()
        if step > 0:
            for d in active:
                result[d.charger_id] += step
                for ph in d.phases:
                    remaining[ph] -= step
        else:
            # Fewer tenths left on a phase than chargers on it: hand them out in order.
            tight = {ph for ph, count in users.items() if remaining[ph] < count}
            for d in active:
                if d.phases & tight:
                    if all(remaining[ph] >= 1 for ph in d.phases):
                        result[d.charger_id] += 1
                        for ph in d.phases:
                            remaining[ph] -= 1
                    frozen.add(d.charger_id)
        active = [d for d in active if d.charger_id not in frozen and result[d.charger_id] < d.cap
                  and all(remaining[ph] > 0 for ph in d.phases)]


def charger_phases(site_phases: int, limits: ChargerLimits) -> frozenset[int]:
    """The site phases (0-based) a charger draws on."""
    first = (limits.first_phase - 1) % site_phases
    return frozenset((first + i) % site_phases for i in range(min(limits.phases, site_phases)))


def tenths_down(amps: float) -> int:
    if amps >= _UNLIMITED / 10:
        return _UNLIMITED
    return max(0, math.floor(amps * 10 + 1e-6))


def tenths_up(amps: float) -> int:
    return max(0, math.ceil(amps * 10 - 1e-6))


# --- the engine --------------------------------------------------------------------------

@dataclass
class _Charger:
    limits: ChargerLimits
    connected: bool = False
    statuses: dict[int, str] = field(default_factory=dict)
    transactions: set[int] = field(default_factory=set)
    currents: tuple[float, float, float] = (0.0, 0.0, 0.0)
    power_w: float | None = None
    energy_wh: float | None = None
    ems_limit: float | None = None
    ems_enabled: bool = True
    backend_limit: float | None = None
    #: The limit last decided (tenths); None before the first decision.
    applied: int | None = None
    last_increase: float | None = None
    #: When the engine paused it for lack of headroom (not: idle).
    paused_at: float | None = None
    #: The limit in force when ``currents`` were sampled while the car was
    #: charging; None: no such sample since the car started.
    sampled_at_limit: int | None = None
    #: Per site phase (tenths): what the car drew when a sample showed it taking
    #: clearly less than it was allowed; it draws that much, not its limit.
    demand: dict[int, int] = field(default_factory=dict)
    fallback: bool = False
    #: While not connected: what it may still draw (tenths, the fuse's reservation).
    reserved: int = 0
    #: Per site phase (tenths): its estimated draw when the grid meter was last read (None: it was not
    #: connected then). The reading can contain no more of its draw than that.
    draw_at_meter: list[int] | None = None

    def demanding(self) -> bool:
        if self.transactions:
            return True
        statuses = [s for connector, s in self.statuses.items() if connector > 0]
        if not statuses:
            return self.statuses.get(0) not in ("Unavailable", "Faulted")  # unknown: assume it may
        return any(s in DEMANDING for s in statuses)

    def drawing(self) -> bool:
        """A car is charging (as far as the charger said)."""
        return "Charging" in self.statuses.values() or (bool(self.transactions) and not self.statuses)

    def status(self) -> str | None:
        for connector in sorted(self.statuses):
            if connector > 0:
                return self.statuses[connector]
        return self.statuses.get(0)


class LimitEngine:
    """Limits per charger from site, meter, EMS and charger inputs.

    ``on_input`` (optional) is called after every input, so a driver can
    recompute at once instead of at its next tick.
    """

    def __init__(self, site: SiteLimits = SiteLimits(), chargers: Mapping[str, ChargerLimits] | None = None,
                 default: ChargerLimits = ChargerLimits()) -> None:
        self.site = site
        self.default = default
        self._configured: dict[str, ChargerLimits] = {}
        #: Load points by id (a charger, or one connector of it: ``CP001#2``).
        self._chargers: dict[str, _Charger] = {}
        self._points: dict[str, ChargerLimits] = {}
        self._groups: dict[str, int] = {}
        #: EMS charger limits as written (a multi-connector wallbox's apply to each connector).
        self._ems: dict[str, float | None] = {}
        self._set_configured(chargers or {})
        self._meter: tuple[float, float, float] | None = None
        self._meter_at: float | None = None
        self._ems_site: float | None = None
        self._fallback = False
        self.on_input: Callable[[], None] | None = None

    # -- inputs: configuration ---------------------------------------------------------------

    def configure(self, site: SiteLimits, chargers: Mapping[str, ChargerLimits],
                  default: ChargerLimits | None = None, now: float = 0.0) -> None:
        """A reloaded configuration; connected chargers keep their state."""
        self.site = site
        self.default = default or self.default
        self._set_configured(chargers)
        for charger_id, state in self._chargers.items():
            limits = self._limits_for(charger_id)
            if limits.managed != state.limits.managed:
                state.applied = state.paused_at = None
            state.limits = limits
        if not site.meter:
            self._meter = self._meter_at = None
        self._changed()

    def _set_configured(self, chargers: Mapping[str, ChargerLimits]) -> None:
        self._configured = dict(chargers)
        self._points = expand(self._configured)
        self._groups = wallbox_groups(self._points, self.site.phases)

    def _limits_for(self, point: str) -> ChargerLimits:
        return self._points.get(point, self.default)

    def points(self, charger_id: str) -> list[tuple[str, int]]:
        """(load point id, connector) of a charger: itself with connector 0, or one per configured connector."""
        limits = self._configured.get(charger_id, self.default)
        return [(pid, connector) for pid, (connector, _) in load_points(charger_id, limits).items()]

    def wallbox_max(self, charger_id: str) -> float:
        return self._configured.get(charger_id, self.default).max_current

    def _route(self, charger_id: str, connector: int | None) -> list[tuple[str, int | None]]:
        """The load points a connector's event is about, with the connector number to record it under.

        A wallbox without connector settings is one load point (every connector's event is its own).
        With them, connector N is load point N (an unlisted connector: none), and connector 0 (the whole
        wallbox) or None (not known) is all of them.
        """
        points = self.points(charger_id)
        if points == [(charger_id, 0)]:
            return [(charger_id, connector)]
        if connector is None or connector == 0:
            return [(pid, connector) for pid, _ in points]
        return [(pid, connector) for pid, n in points if n == connector]

    def _state(self, charger_id: str) -> _Charger:
        state = self._chargers.get(charger_id)
        if state is None:
            state = self._chargers[charger_id] = _Charger(self._limits_for(charger_id))
        return state

    # -- inputs: chargers ------------------------------------------------------------------------

    def charger_connected(self, charger_id: str, now: float) -> None:
        for point, _ in self.points(charger_id):
            self._point_connected(point)
        self._changed()

    def _point_connected(self, point: str) -> None:
        state = self._state(point)
        state.connected = True
        state.reserved = 0
        state.statuses.clear()
        state.transactions.clear()
        state.applied = None
        state.paused_at = None
        state.sampled_at_limit = None
        state.demand.clear()

    def charger_disconnected(self, charger_id: str, now: float) -> None:
        for point, _ in self.points(charger_id):
            state = self._chargers.get(point)
            if state is not None:
                state.connected = False
                state.statuses.clear()
                state.transactions.clear()
                state.currents = (0.0, 0.0, 0.0)
                state.power_w = None
                state.applied = None
        self._changed()

    def status(self, charger_id: str, connector_id: int, status: str, now: float) -> None:
        """StatusNotification of one connector (0: the whole charge point)."""
        for point, connector in self._route(charger_id, connector_id):
            assert connector is not None
            state = self._state(point)
            if status == "Charging" and not state.drawing():
                state.sampled_at_limit = None  # samples from before the car drew say nothing now
                state.demand.clear()
            state.statuses[connector] = status
            if status not in DEMANDING and connector > 0 and not state.transactions:
                state.currents = (0.0, 0.0, 0.0)
        self._changed()

    def measured(self, charger_id: str, currents: tuple[float, float, float] | None, now: float,
                 power_w: float | None = None, energy_wh: float | None = None, connector: int | None = None) -> None:
        """Phase currents (L1, L2, L3 of the charger) from MeterValues of ``connector`` (None: not said).

        A wallbox with connector load points attributes a sample to the connector it names; one for
        connector 0 (its main meter) or none says nothing about any connector and is not used.
        """
        routed = self._route(charger_id, connector)
        if len(routed) != 1 or (not connector and self.points(charger_id) != [(charger_id, 0)]):
            return
        state = self._state(routed[0][0])
        if currents is not None:  # (None: a sample of power or energy only; the currents stay as they were)
            state.currents = currents
        state.sampled_at_limit = state.applied if state.drawing() else None
        self._learn_demand(state)
        if power_w is not None:
            state.power_w = power_w
        if energy_wh is not None:
            state.energy_wh = energy_wh
        self._changed()

    def transaction_started(self, charger_id: str, connector_id: int, now: float) -> None:
        for point, connector in self._route(charger_id, connector_id):
            assert connector is not None
            self._state(point).transactions.add(connector)
        self._changed()

    def transaction_stopped(self, charger_id: str, connector_id: int | None, now: float) -> None:
        """``connector_id`` None: the connector is not known (StopTransaction has none)."""
        for point, connector in self._route(charger_id, connector_id):
            state = self._state(point)
            if connector is None:
                state.transactions.clear()
            else:
                state.transactions.discard(connector)
            if not state.transactions:
                state.currents = (0.0, 0.0, 0.0)
        self._changed()

    def backend_limit(self, charger_id: str, amps: float | None, now: float, connector: int = 0) -> None:
        """The backend's own composite limit on this charger, or on one connector's load point (None: none)."""
        point = point_id(charger_id, connector) if connector else charger_id
        state = self._state(point)
        if state.backend_limit != amps:
            state.backend_limit = amps
            self._changed()

    def reserve(self, charger_id: str, amps: float, now: float) -> None:
        """A charger that is not connected may still draw ``amps`` (its reservation, see
        :mod:`proxy.loadmgmt.fuse`): counted as house load until it comes back or is released."""
        state = self._state(charger_id)
        value = 0 if state.connected else tenths_up(amps)
        if state.reserved != value:
            state.reserved = value
            self._changed()

    # -- inputs: meter and EMS (the Modbus side) ----------------------------------------------------

    def meter_reading(self, currents: tuple[float, float, float], now: float) -> None:
        """Grid phase currents at the site's connection point."""
        self._meter = currents
        self._meter_at = now
        for state in self._chargers.values():
            state.draw_at_meter = self._estimated_draw(state) if state.connected else None
        self._changed()

    def meter_lost(self, now: float) -> None:
        """The meter stopped answering: fallback until the next reading."""
        self._meter = self._meter_at = None
        self._changed()

    def ems_site_limit(self, amps: float | None, now: float) -> None:
        """Site limit per phase written by the EMS (None: only the configured one)."""
        self._ems_site = amps
        self._changed()

    def ems_charger_limit(self, charger_id: str, amps: float | None, now: float) -> None:
        """An EMS limit per phase for a charger (each of its connectors, where they are load points)."""
        self._ems[charger_id] = amps
        for point, _ in self.points(charger_id):
            self._state(point).ems_limit = amps
        self._changed()

    def ems_charger_enabled(self, charger_id: str, enabled: bool, now: float) -> None:
        """An EMS pause is a limit of 0; the charger's profile stays installed."""
        for point, _ in self.points(charger_id):
            self._state(point).ems_enabled = enabled
        self._changed()

    def _changed(self) -> None:
        if self.on_input is not None:
            self.on_input()

    # -- outputs --------------------------------------------------------------------------------

    @property
    def site_limit(self) -> float:
        if self._ems_site is None:
            return self.site.max_current
        return min(self.site.max_current, max(0.0, self._ems_site))

    def meter_fresh(self, now: float) -> bool:
        return self._meter_at is not None and now - self._meter_at <= self.site.meter_timeout

    def managed(self, charger_id: str) -> bool:
        return self._configured.get(charger_id, self.default).managed

    def targets(self, now: float) -> dict[str, float]:
        """The limit (A, 0 = paused) of every connected managed charger, as of ``now``.

        This commits: ramp-up and hold timers count from the values returned.
        """
        managed = {cid: s for cid, s in self._chargers.items() if s.connected and s.limits.managed}
        self._fallback = self.site.meter and not self.meter_fresh(now)
        wanted = self._fallback_targets(managed, now) if self._fallback else self._share(managed, now)
        result: dict[str, float] = {}
        for charger_id, state in managed.items():
            state.fallback = self._fallback
            result[charger_id] = self._apply(state, wanted.get(charger_id, 0), now) / 10
        return result

    def next_event(self, now: float) -> float | None:
        """The next time a target may change without new input (meter goes stale, timers)."""
        times: list[float] = []
        if self.site.meter and self._meter_at is not None and self.meter_fresh(now):
            times.append(self._meter_at + self.site.meter_timeout + 1e-3)
        for state in self._chargers.values():
            if not state.connected:
                continue
            if state.last_increase is not None and now < state.last_increase + self.site.ramp_up_interval:
                times.append(state.last_increase + self.site.ramp_up_interval)
            if state.paused_at is not None and now < state.paused_at + self.site.min_hold_time:
                times.append(state.paused_at + self.site.min_hold_time)
        return min(times, default=None)

    def charger_view(self, charger_id: str) -> ChargerView | None:
        """The charger as a whole (a multi-connector wallbox: its connectors' load points summed)."""
        points = self.points(charger_id)
        if points == [(charger_id, 0)]:
            return self.point_view(charger_id)
        views = [v for v in (self.point_view(pid) for pid, _ in points) if v is not None]
        return _combined(views, self._ems.get(charger_id)) if views else None

    def connector_views(self, charger_id: str) -> dict[int, ChargerView]:
        """Per connector load point (empty for a wallbox that is one load point)."""
        points = self.points(charger_id)
        if points == [(charger_id, 0)]:
            return {}
        return {n: v for pid, n in points if (v := self.point_view(pid)) is not None}

    def point_view(self, point: str) -> ChargerView | None:
        state = self._chargers.get(point)
        if state is None:
            return None
        local = None if state.applied is None or not state.limits.managed else state.applied / 10
        limits = [v for v in (local, state.backend_limit) if v is not None]
        return ChargerView(
            state=(state.status() or "Available") if state.connected else "offline", status=state.status(),
            currents=state.currents, mode=self._state_name(state),
            power_w=state.power_w, energy_wh=state.energy_wh, local_limit=local,
            backend_limit=state.backend_limit, effective_limit=min(limits) if limits else None,
            enabled=state.limits.enabled and state.ems_enabled, transaction=bool(state.transactions),
            fallback=state.fallback and state.connected, ems_limit=state.ems_limit)

    def site_view(self, now: float) -> SiteView:
        house = self._house_load(self._managed_connected(), self.meter_fresh(now), now)
        limit = self.site_limit
        return SiteView(site_limit=limit, house_load=tuple(h / 10 for h in house),
                        headroom=tuple(max(0.0, round(limit - h / 10, 1)) for h in house),
                        meter_fresh=self.meter_fresh(now), fallback=self._fallback,
                        config_limit=None if math.isinf(self.site.max_current) else self.site.max_current,
                        ems_limit=self._ems_site)

    def chargers(self) -> list[str]:
        return sorted(self._chargers)

    def budget(self, now: float) -> list[int]:
        """Per site phase, tenths: what the connected managed chargers may draw together
        (site limit − house load, lost chargers' reservations included)."""
        use_meter = self.site.meter and self.meter_fresh(now)
        house = self._house_load(self._managed_connected(), use_meter, now)
        limit = tenths_down(self.site_limit)
        return [max(0, limit - h) for h in house]

    # -- internals ------------------------------------------------------------------------------------

    def _managed_connected(self) -> dict[str, _Charger]:
        return {cid: s for cid, s in self._chargers.items() if s.connected and s.limits.managed}

    @staticmethod
    def _state_name(state: _Charger) -> str:
        if not state.connected:
            return "offline"
        if not state.limits.managed:
            return "unmanaged"
        if not (state.limits.enabled and state.ems_enabled):
            return "blocked"
        if not state.demanding():
            return "idle"
        return "charging" if state.applied else "paused"

    def _phases(self, limits: ChargerLimits) -> frozenset[int]:
        return charger_phases(self.site.phases, limits)

    def _resources(self, limits: ChargerLimits) -> frozenset[int]:
        """The entries of a headroom list a load point uses: its site phases, and its wallbox's maximum."""
        group = self._groups.get(limits.wallbox) if limits.wallbox else None
        phases = self._phases(limits)
        return phases if group is None else phases | {group}

    def _with_wallboxes(self, headroom: list[int]) -> list[int]:
        """Per-phase headroom followed by each multi-connector wallbox's max_current (its connectors share it)."""
        caps = {limits.wallbox: tenths_down(limits.wallbox_max) for limits in self._points.values() if limits.wallbox}
        return headroom + [caps[name] for name in sorted(self._groups, key=self._groups.__getitem__)]

    def _site_phase_currents(self, state: _Charger, cap: int | None, round_up: bool) -> list[int]:
        """The charger's measured draw on each site phase, never above its limit.

        Rounded towards the safe side: down where it is subtracted from the
        grid reading, up where it adds to the house load.
        """
        out = [0] * self.site.phases
        count = self.site.phases
        first = (state.limits.first_phase - 1) % count
        for i, amps in enumerate(state.currents[:min(state.limits.phases, count)]):
            value = tenths_up(amps) if round_up else tenths_down(amps)
            if cap is not None:
                value = min(value, cap)
            out[(first + i) % count] += value
        return out

    def _learn_demand(self, state: _Charger) -> None:
        """After a sample: per phase, did the car take what it was allowed, or clearly less?"""
        allowed = state.sampled_at_limit
        if allowed is None or allowed <= 0:
            return  # paused or not charging: the sample says nothing about what it wants
        raw = self._site_phase_currents(state, None, False)
        for ph in self._phases(state.limits):
            if raw[ph] < allowed - tenths_up(LIMITED_MARGIN):
                state.demand[ph] = raw[ph]
            else:
                state.demand.pop(ph, None)

    def _following(self, state: _Charger) -> bool:
        """A charging car whose draw at its current limit no sample has confirmed yet.

        Per phase: a car seen drawing clearly less than allowed on one phase (a
        two-phase car taking 2 A on L1 and its limit on L2) still follows its
        limit on the others, so a raise must wait for a sample there too; else
        the raise shows on the grid before the sample and looks like house load,
        and the limit swings between two values for as long as it charges.
        """
        applied, sampled = state.applied, state.sampled_at_limit
        return (state.drawing() and applied is not None and applied > 0
                and not self._phases(state.limits) <= state.demand.keys()
                and (sampled is None or applied > sampled))

    def _estimated_draw(self, state: _Charger) -> list[int]:
        """What a managed charger draws now, per site phase, as the grid meter sees it.

        MeterValues lag the grid meter (often by a minute), so a sample alone
        misleads: a car that just started, or was just allowed more, would look
        like house load and be paused again at once. So a *following* car (one
        charging at a limit no sample has confirmed yet) is counted at its
        limit, and in return gets no increase until a sample confirms it
        (:meth:`_share`), so an estimate that is too high can neither feed on
        itself nor hand the same current to another charger. A car seen
        drawing clearly less than it was allowed draws that; otherwise a
        charger counts at its sample, never above its limit.
        """
        measured = self._site_phase_currents(state, state.applied, False)
        applied = state.applied
        if applied is None or not state.drawing():
            return measured
        phases = self._phases(state.limits)
        following = self._following(state)
        out = []
        for ph, m in enumerate(measured):
            if ph in state.demand:
                out.append(min(state.demand[ph], applied))
            elif following and ph in phases:
                out.append(applied)
            else:
                out.append(m)
        return out

    def _house_load(self, managed: Mapping[str, _Charger], use_meter: bool, now: float) -> list[int]:
        """Per site phase, tenths: what the managed chargers cannot change.

        Without a (fresh) meter that is only what unmanaged chargers draw.
        With a meter: grid − the managed chargers' estimated draw
        (:meth:`_estimated_draw`), each at most what it was estimated to draw
        when the grid was read (a car started or raised since is not in the
        reading yet). A measured current counts at most up to the
        charger's limit, so a sample from before a decrease never makes the
        house look smaller; an estimate that is too high (a car drawing less
        than its limit before its next MeterValues) is corrected by the next
        grid reading or sample.
        """
        phases = self.site.phases
        unmanaged = [s for cid, s in self._chargers.items() if s.connected and cid not in managed]
        lost = self._lost_reservations()
        if use_meter and self._meter is not None:
            house = [tenths_up(self._meter[ph]) for ph in range(phases)]
            for state in managed.values():
                # A car that started or was raised after the reading is not in it yet: only what it drew
                # then comes off (else the house would look smaller by the draw the meter has not seen).
                seen = state.draw_at_meter or [0] * phases
                for ph, draw in enumerate(self._estimated_draw(state)):
                    house[ph] -= min(draw, seen[ph])
            # The meter shows what a lost charger draws now, not what it may draw: its
            # reservation counts on top (at worst it is counted twice, never too little).
            return [max(0, h) + extra for h, extra in zip(house, lost)]
        house = list(lost)
        for state in unmanaged:
            for ph, draw in enumerate(self._site_phase_currents(state, None, True)):
                house[ph] += draw
        return house

    def _lost_reservations(self) -> list[int]:
        out = [0] * self.site.phases
        for state in self._chargers.values():
            if not state.connected and state.reserved and state.limits.managed:
                for ph in self._phases(state.limits):
                    out[ph] += state.reserved
        return out

    def _cap(self, state: _Charger) -> int:
        if not (state.limits.enabled and state.ems_enabled):
            return 0
        caps = [state.limits.max_current]
        caps += [v for v in (state.ems_limit, state.backend_limit) if v is not None]
        return tenths_down(max(0.0, min(caps)))

    def _in_hold(self, state: _Charger, now: float) -> bool:
        return (state.applied == 0 and state.paused_at is not None
                and now - state.paused_at < self.site.min_hold_time)

    def _share(self, managed: Mapping[str, _Charger], now: float) -> dict[str, int]:
        house = self._house_load(managed, self.site.meter, now)
        limit = tenths_down(self.site_limit)
        headroom = self._with_wallboxes([max(0, limit - h) for h in house])
        hysteresis = tenths_up(self.site.hysteresis)
        wanting = {cid: s for cid, s in managed.items() if s.demanding()}
        result = allocate((self._demand(cid, s) for cid, s in wanting.items() if not self._in_hold(s, now)),
                          headroom, hysteresis)
        # Chargers without a car share what is left, so a car plugged in there
        # starts at once where the site has room; they never take from the others.
        for cid, value in result.items():
            for ph in self._resources(managed[cid].limits):
                headroom[ph] -= value
        idle = allocate((self._demand(cid, s) for cid, s in managed.items() if cid not in wanting),
                        headroom, hysteresis)
        return {**result, **idle}

    def _demand(self, charger_id: str, state: _Charger) -> Demand:
        cap = self._cap(state)
        if self.site.meter and state.applied is not None and self._following(state):
            cap = min(cap, state.applied)  # more only once a sample shows it uses what it has
        return Demand(charger_id, state.limits.priority, tenths_up(state.limits.min_current), cap,
                      self._resources(state.limits), running=bool(state.applied))

    def _fallback_targets(self, managed: Mapping[str, _Charger], now: float) -> dict[str, int]:
        """Stale inputs: each charger its fallback, as far as the site limit allows (cars first)."""
        if self.site.fail_closed:
            return {}
        remaining = self._with_wallboxes([max(0, tenths_down(self.site_limit) - h)
                                          for h in self._house_load(managed, False, now)])
        wanted: dict[str, int] = {}
        order = sorted(managed.items(), key=lambda item: (not item[1].demanding(), -item[1].limits.priority,
                                                           item[0]))
        for charger_id, state in order:
            fallback = state.limits.min_current if self.site.fallback_current is None else self.site.fallback_current
            value = min(tenths_down(fallback), self._cap(state))
            if value < tenths_up(state.limits.min_current) or value <= 0:
                continue
            phases = self._resources(state.limits)
            if all(remaining[ph] >= value for ph in phases):
                for ph in phases:
                    remaining[ph] -= value
                wanted[charger_id] = value
        return wanted

    def _apply(self, state: _Charger, target: int, now: float) -> int:
        """Hysteresis, ramp-up and hold: what the charger actually gets now."""
        previous = state.applied
        site = self.site
        if previous is None or target < previous:
            if target == 0 and previous and state.demanding():
                state.paused_at = now
            elif target == 0 and not state.demanding():
                state.paused_at = None
            state.applied = target
            return target
        if target == previous:
            return previous
        resuming_idle = previous == 0 and state.paused_at is None
        ramp_ok = (state.last_increase is None or now - state.last_increase >= site.ramp_up_interval
                   or resuming_idle)
        if previous == 0:
            allowed = ramp_ok and not self._in_hold(state, now)
        else:
            allowed = ramp_ok and target - previous >= tenths_up(site.hysteresis)
        if allowed:
            state.applied = target
            state.last_increase = now
            state.paused_at = None
        return state.applied if state.applied is not None else target


_MODES = ("charging", "paused", "idle", "blocked", "unmanaged", "offline")


def _sum(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present), 1) if present else None


def _combined(views: list[ChargerView], ems_limit: float | None) -> ChargerView:
    """A multi-connector wallbox as one: currents, power, energy and limits summed over its connectors;
    its mode the busiest of theirs (charging, then paused, ...); its state a charging connector's, else the first's."""
    mode = min((v.mode for v in views), key=lambda m: _MODES.index(m) if m in _MODES else len(_MODES))
    first = next((v for v in views if v.state == "Charging"), views[0])
    currents = tuple(round(sum(v.currents[i] for v in views), 3) for i in range(3))
    return ChargerView(
        state=first.state, status=first.status, currents=(currents[0], currents[1], currents[2]),
        power_w=_sum(v.power_w for v in views), energy_wh=_sum(v.energy_wh for v in views),
        local_limit=_sum(v.local_limit for v in views), backend_limit=_sum(v.backend_limit for v in views),
        effective_limit=_sum(v.effective_limit for v in views), enabled=any(v.enabled for v in views),
        transaction=any(v.transaction for v in views), fallback=any(v.fallback for v in views),
        ems_limit=ems_limit, mode=mode)
