"""The fuse invariant as a hypothesis state machine (docs/load-management.md, "The fuse invariant").

The system under test is the sans-IO load management as the trio driver runs
it: :class:`Coordinator` (limit engine + fuse + one profile control per
wallbox). Around it, simulated wallboxes hold the truth: the profiles they
really applied, the CALL they have not answered yet (which they may apply at
any instant), whether a car draws. They answer late, reject, answer with a
CALLERROR, time out (having applied the limit or not), drop, reconnect,
reboot; the proxy restarts with its durable record; a grid meter reports
house load; an EMS writes site and charger limits.

Checked after every step:

* per charger: what the fuse counts is never below what the wallbox may
  really draw (accounting soundness);
* per phase: a step the proxy takes (a recomputation, an answer, a
  reconnect, a restart) or a car (starting or stopping) never raises what the
  wallboxes may draw above the budget, nor further above it when an outside
  event (an EMS write, more house load, a reboot that lost the profile) or the
  start (wallboxes never seen count at their maximum) already did.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from proxy.loadmgmt.control import Control, ControlSettings
from proxy.loadmgmt.coordinator import Coordinator, Outgoing
from proxy.loadmgmt.engine import ChargerLimits, LimitEngine, SiteLimits, charger_phases
from proxy.loadmgmt.fuse import Fuse
from proxy.loadmgmt.profiles import decode_kept, encode_kept

WALL = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
HOLD = 600.0
IDS = ("CP1", "CP2", "CP3", "CP4")
#: A wallbox of the machine's site (drawn from those it set up).
CID = st.runner().flatmap(lambda machine: st.sampled_from(sorted(machine.wallboxes)))


@dataclass
class Wallbox:
    """A simulated wallbox: what it really applies (profiles kept over reconnects, lost on reboot)."""

    limits: ChargerLimits
    strategy: str
    #: profile id → (purpose, highest limit A)
    profiles: dict[int, tuple[str, float]] = field(default_factory=dict)
    inflight: Outgoing | None = None
    #: A backend SetChargingProfile forwarded and not answered: (msg id, original payload, amps as forwarded)
    backend_call: tuple[str, dict[str, Any], float] | None = None
    connected: bool = False
    #: Not seen since the proxy started (at 0) counts as lost since then.
    lost_at: float | None = 0.0
    car: bool = False

    def cap(self) -> float:
        """The highest current its installed profiles may allow: ChargePointMaxProfile caps the
        Tx/TxDefault part (taken at its highest, whichever stack level wins)."""
        top = self.limits.max_current
        own = [amps for purpose, amps in self.profiles.values() if purpose == "ChargePointMaxProfile"]
        tx = [amps for purpose, amps in self.profiles.values() if purpose in ("TxDefaultProfile", "TxProfile")]
        return min(top, min(own, default=top), max(tx, default=top))

    def may_draw(self, now: float) -> float:
        """What it may be drawing now (a car may plug in any moment): its cap, or what it was sent and
        may apply any moment. A lost one released after the hold counts no more, by decision."""
        if not self.connected and self.lost_at is not None and now - self.lost_at >= HOLD:
            return 0.0
        values = [self.cap()]
        if self.inflight is not None:
            values.append(self._cap_after(lambda w: w.apply(self.inflight)))  # type: ignore[arg-type]
        if self.backend_call is not None:
            amps = self.backend_call[2]
            values.append(self._cap_after(lambda w: w._install(backend_payload(amps)["csChargingProfiles"], amps)))
        return min(max(values), self.limits.max_current)

    def _cap_after(self, change: Callable[[Wallbox], None]) -> float:
        """The cap once it applied ``change`` (on a copy)."""
        copy = Wallbox(self.limits, self.strategy, dict(self.profiles))
        copy._levels = dict(self._levels)
        change(copy)
        return copy.cap()

    def apply(self, outgoing: Outgoing) -> None:
        command = outgoing.command
        if command.kind == "clear":
            self.profiles.pop(command.payload.get("id", 0), None)
            return
        profile = command.payload["csChargingProfiles"]
        self._install(profile, command.amps if command.amps is not None else self.limits.max_current)

    def _install(self, profile: dict[str, Any], amps: float) -> None:
        purpose, level = profile["chargingProfilePurpose"], profile["stackLevel"]
        for pid in [pid for pid, (p, _) in self.profiles.items() if pid == profile["chargingProfileId"]
                    or (p == purpose and self._levels.get(pid) == level)]:
            del self.profiles[pid]
            self._levels.pop(pid, None)
        self.profiles[profile["chargingProfileId"]] = (purpose, amps)
        self._levels[profile["chargingProfileId"]] = level

    def __post_init__(self) -> None:
        self._levels: dict[int, int] = {}

    def rebooted(self) -> None:
        """Profiles in RAM only: a reboot loses them, and the car's transaction."""
        self.profiles.clear()
        self.car = False

    def apply_backend(self) -> None:
        """The backend's profile on its way is in force (as forwarded)."""
        assert self.backend_call is not None
        amps = self.backend_call[2]
        self._install(backend_payload(amps)["csChargingProfiles"], amps)


def backend_profile_accepted(wallbox: Wallbox, coordinator: Coordinator, cid: str) -> None:
    """The wallbox installs the backend's profile it was sent and answers Accepted; the proxy sees it."""
    assert wallbox.backend_call is not None
    msg_id, original, _ = wallbox.backend_call
    wallbox.apply_backend()
    wallbox.backend_call = None
    coordinator.controls[cid].backend_set_answered(msg_id, original, "Accepted", WALL)
    coordinator.backend_answered(cid)


def backend_payload(amps: float) -> dict[str, Any]:
    return {"connectorId": 1, "csChargingProfiles": {
        "chargingProfileId": 7, "stackLevel": 1, "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Relative",
        "chargingSchedule": {"chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": amps}]}}}


class ProxySteps(RuleBasedStateMachine):
    """What the fuse state machines share: the proxy's steps (recomputations, answers, drops, reboots,
    restarts from the record) and the site's (meter, EMS, time), around simulated wallboxes that have
    ``inflight``, ``backend_call``, ``connected``, ``lost_at``, ``apply(outgoing)`` and ``apply_backend()``.
    Subclasses set ``site_limits`` and ``limits`` up and add ``_settings``, ``_connect``,
    ``_meter_reading``, the cars, the backend's profiles and the invariants."""

    wallboxes: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.wallboxes = {}
        self.store: dict[str, float | None] = {}
        #: The durable record's backend profiles that may be on each wallbox (as the driver writes them).
        self.kept: dict[str, str] = {}
        self.house = [0.0, 0.0, 0.0]
        self.ems_site: float | None = None
        self.previous: list[float] | None = None
        self.outside = False  # the last step was an outside event
        self.messages = 0
        #: The CALL a wallbox applied before answering it: its answer is Accepted (or none).
        self.applied_early: dict[str, Outgoing] = {}
        self.site_limits = SiteLimits()
        self.limits: dict[str, ChargerLimits] = {}

    def _start_proxy(self) -> None:
        engine = LimitEngine(self.site_limits, self.limits)
        fuse = Fuse(phases=3, hold=HOLD)
        fuse.configure(3, self.limits, ChargerLimits(), HOLD)
        fuse.restore(self.store, self.now)
        self.coordinator = Coordinator(engine, fuse)
        for cid, text in self.kept.items():
            self.coordinator.restore_kept(cid, decode_kept(text))
        if self.ems_site is not None:
            engine.ems_site_limit(self.ems_site, self.now)
        if self.site_limits.meter:
            self._meter_reading()

    def _meter_reading(self) -> None:
        raise NotImplementedError

    def _settings(self, cid: str) -> ControlSettings:
        raise NotImplementedError

    # -- the proxy's steps --------------------------------------------------------------------

    def _dispatch(self, outgoing: list[Outgoing]) -> None:
        self.store.update(self.coordinator.fuse.records()[0])  # the driver writes before sending
        for item in outgoing:
            wallbox = self.wallboxes[item.charger_id]
            assert wallbox.inflight is None, "two CALLs outstanding on one wallbox"
            assert wallbox.connected
            wallbox.inflight = item

    @rule(dt=st.sampled_from([0.0, 0.5, 3.0, 16.0, 61.0]))
    def tick(self, dt: float) -> None:
        self.outside = False
        self.now += dt
        self._dispatch(self.coordinator.tick(self.now, WALL))

    @rule(cid=CID, outcome=st.sampled_from(["Accepted", "Accepted", "Rejected", "CALLERROR", "timeout"]),
          applied=st.booleans())
    def answer(self, cid: str, outcome: str, applied: bool) -> None:
        """The wallbox answers (or the proxy gives up waiting); the driver then asks for its next CALL."""
        self.outside = False
        wallbox = self.wallboxes.get(cid)
        item = wallbox.inflight if wallbox else None
        if wallbox is None or item is None:
            return
        wallbox.inflight = None
        early = self.applied_early.pop(cid, None)
        if early is not None and early.command is item.command and outcome in ("Rejected", "CALLERROR"):
            outcome = "Accepted"  # a limit it already applies was not refused (it may still go unanswered)
        if outcome == "Accepted" or (outcome == "timeout" and applied):
            wallbox.apply(item)
        if outcome == "timeout":
            self.coordinator.failed(cid, item.command, "no answer", self.now)
        elif outcome == "CALLERROR":
            self.coordinator.answered(cid, item.command, None, "InternalError", self.now)
        else:
            self.coordinator.answered(cid, item.command, outcome, None, self.now)
        following = self.coordinator.next(cid, self.now, WALL)
        self._dispatch([following] if following else [])

    @rule(cid=CID)
    def apply_before_answering(self, cid: str) -> None:
        """A slow wallbox: the limit is in force, the answer still on its way."""
        self.outside = False
        item = self.wallboxes[cid].inflight if cid in self.wallboxes else None
        if item is not None:
            self.wallboxes[cid].apply(item)
            self.applied_early[cid] = item

    @rule(cid=CID, applied=st.booleans())
    def drop(self, cid: str, applied: bool) -> None:
        """The connection drops; a car keeps charging on the installed profile."""
        self.outside = False
        if cid in self.wallboxes and self.wallboxes[cid].connected:
            self._drop(cid, applied)

    def _drop(self, cid: str, applied: bool) -> None:
        wallbox = self.wallboxes[cid]
        wallbox.connected, wallbox.lost_at = False, self.now
        item, wallbox.inflight = wallbox.inflight, None
        if item is not None and applied:
            wallbox.apply(item)
        if wallbox.backend_call is not None:
            if applied:
                wallbox.apply_backend()
            wallbox.backend_call = None
        self.coordinator.detach(cid, self.now)
        if item is not None:
            self.coordinator.failed(cid, item.command, "session gone", self.now)

    @rule(cid=CID, boot=st.booleans())
    def reconnect(self, cid: str, boot: bool) -> None:
        """A lost wallbox comes back (``boot``: it rebooted: its profiles and transaction are gone)."""
        self.outside = False
        if cid not in self.wallboxes or self.wallboxes[cid].connected:
            return
        lost_at = self.wallboxes[cid].lost_at
        # One released after lost_charger_hold counts again from here: by that decision, not this step;
        # one that rebooted meanwhile lost its profile: it may draw its maximum, whatever the proxy does.
        self.outside = boot or (lost_at is not None and self.now - lost_at >= HOLD)
        self._connect(cid, boot)

    def _connect(self, cid: str, boot: bool) -> None:
        wallbox = self.wallboxes[cid]
        wallbox.connected, wallbox.lost_at = True, None
        control = self.coordinator.attach(cid, self._settings(cid), self.now)
        engine = self.coordinator.engine
        if boot:
            wallbox.rebooted()
            control.boot(self.now)
            engine.transaction_stopped(cid, None, self.now)
            self.coordinator.sync(cid)
            control.boot_answered("Accepted")
        else:
            control.wallbox_call()
        self._statuses(cid, control)

    def _statuses(self, cid: str, control: Control) -> None:
        """After a (re)connect: the wallbox reports its connectors' statuses (and running transactions)."""
        raise NotImplementedError


    @rule(cid=CID)
    def reboot(self, cid: str) -> None:
        """A connected wallbox restarts: a new connection, BootNotification, no profiles, no transaction."""
        self.outside = True  # its profile is gone: it may draw its maximum until the proxy's is back
        if cid in self.wallboxes and self.wallboxes[cid].connected:
            self._drop(cid, False)
            self._connect(cid, True)

    @rule(applied=st.booleans())
    def restart_proxy(self, applied: bool) -> None:
        """The proxy restarts: every connection drops (a CALL or a backend profile on its way may have been
        applied); what it knows comes from its durable record (written by the driver after every input, so
        everything the proxy learnt is in it): the reservations and the backend profiles that may be installed."""
        self.outside = False
        self.store.update(self.coordinator.fuse.records()[0])
        for cid in self.wallboxes:
            pairs = self.coordinator.kept(cid)
            if pairs:
                self.kept[cid] = encode_kept(pairs)
            else:
                self.kept.pop(cid, None)
        for cid, wallbox in self.wallboxes.items():
            if wallbox.connected:
                wallbox.connected, wallbox.lost_at = False, self.now
                if wallbox.inflight is not None and applied:
                    wallbox.apply(wallbox.inflight)
                if wallbox.backend_call is not None and applied:
                    wallbox.apply_backend()
                wallbox.inflight = wallbox.backend_call = None
        self._start_proxy()

    @precondition(lambda self: self.site_limits.meter)
    @rule(house=st.lists(st.sampled_from([0.0, 2.0, 5.0, 12.0]), min_size=3, max_size=3))
    def meter(self, house: list[float]) -> None:
        """New house load: the grid meter and every charging wallbox's MeterValues, one snapshot."""
        self.outside = any(h > old for h, old in zip(house, self.house))
        self.house = house
        self._meter_reading()

    @rule(amps=st.one_of(st.none(), st.sampled_from([8.0, 16.0, 25.0, 40.0])))
    def ems_site_limit(self, amps: float | None) -> None:
        old = self._site()
        self.ems_site = amps
        self.outside = self._site() < old
        self.coordinator.engine.ems_site_limit(amps, self.now)

    @rule(cid=CID, amps=st.one_of(st.none(), st.sampled_from([0.0, 6.0, 10.0])), enabled=st.booleans())
    def ems_charger(self, cid: str, amps: float | None, enabled: bool) -> None:
        self.outside = False
        if cid not in self.wallboxes:
            return
        self.coordinator.engine.ems_charger_limit(cid, amps, self.now)
        self.coordinator.engine.ems_charger_enabled(cid, enabled, self.now)

    @rule()
    def hold_passes(self) -> None:
        """Long enough for lost chargers to be released (they count no more, by decision)."""
        self.outside = False
        self.now += HOLD + 1

    def _site(self) -> float:
        return self.site_limits.max_current if self.ems_site is None else min(self.site_limits.max_current,
                                                                               self.ems_site)

    def _budget(self) -> list[float]:
        """Per phase: the site limit in force less the house load (with a meter), as the fuse must hold."""
        house = self.house if self.site_limits.meter else [0.0, 0.0, 0.0]
        return [max(0.0, math.floor((self._site() - h) * 10 + 1e-6) / 10) for h in house]


class FuseMachine(ProxySteps):
    wallboxes: dict[str, Wallbox]

    # -- setting up -------------------------------------------------------------------------

    @initialize(site=st.integers(10, 64), meter=st.booleans(), calm=st.booleans(),
                chargers=st.lists(st.tuples(st.sampled_from([16.0, 32.0]), st.sampled_from([1, 3]),
                                            st.integers(1, 3), st.integers(0, 1),
                                            st.sampled_from(["max-profile", "tx-default"])),
                                  min_size=2, max_size=4))
    def setup(self, site: int, meter: bool, calm: bool, chargers: list[tuple[float, int, int, int, str]]) -> None:
        self.site_limits = SiteLimits(max_current=float(site), phases=3, meter=meter, meter_timeout=1e9,
                                      ramp_up_interval=0.0 if calm else 15.0, hysteresis=0.0 if calm else 1.0,
                                      min_hold_time=0.0 if calm else 60.0)
        self.limits = {}
        for cid, (top, phases, first, priority, strategy) in zip(IDS, chargers):
            limits = ChargerLimits(max_current=top, min_current=6.0, phases=phases, first_phase=first,
                                   priority=priority)
            self.limits[cid] = limits
            self.wallboxes[cid] = Wallbox(limits, strategy)
        self.strategies = {cid: w.strategy for cid, w in self.wallboxes.items()}
        self._start_proxy()

    def _settings(self, cid: str) -> ControlSettings:
        limits = self.limits[cid]
        return ControlSettings(strategy=self.strategies[cid], phases=limits.phases, retry=5.0)

    def _statuses(self, cid: str, control: Control) -> None:
        control.status(1)
        self.coordinator.engine.status(cid, 1, "Charging" if self.wallboxes[cid].car else "Available", self.now)

    # -- cars, the backend, meter and EMS -----------------------------------------------------

    @rule(cid=CID)
    def car_starts(self, cid: str) -> None:
        """A car draws up to what the wallbox has installed, asked or not: counted already."""
        self.outside = False
        wallbox = self.wallboxes.get(cid)
        if wallbox is None or not wallbox.connected or wallbox.car:
            return
        self.wallboxes[cid].car = True
        engine, control = self.coordinator.engine, self.coordinator.controls[cid]
        self.messages += 1
        engine.status(cid, 1, "Preparing", self.now)
        control.transaction_starting(f"start-{self.messages}", 1, WALL)
        engine.transaction_started(cid, 1, self.now)
        control.transaction_started(f"start-{self.messages}", self.messages)
        engine.status(cid, 1, "Charging", self.now)

    @rule(cid=CID)
    def car_stops(self, cid: str) -> None:
        self.outside = False
        wallbox = self.wallboxes.get(cid)
        if wallbox is None or not wallbox.connected or not wallbox.car:
            return
        self.wallboxes[cid].car = False
        connector = self.coordinator.controls[cid].transaction_stopped(None)
        self.coordinator.engine.transaction_stopped(cid, connector, self.now)
        self.coordinator.engine.status(cid, 1, "Available", self.now)

    @rule(cid=CID, amps=st.sampled_from([6.0, 10.0, 16.0, 32.0]))
    def backend_sets_tx_default(self, cid: str, amps: float) -> None:
        """The backend installs a TxDefaultProfile (clamped on its way under tx-default).

        Under max-profile the backend's frames pass unchanged and the proxy's ChargePointMaxProfile caps
        them; until that is known on the wallbox (first contact, a backend Clear that may have hit it) the
        fuse counts the wallbox at its max_current, and what the backend installs meanwhile is the backend's
        doing within that count (docs/load-management.md, "The fuse invariant"): an outside event."""
        wallbox = self.wallboxes.get(cid)
        control = self.coordinator.controls.get(cid)
        self.outside = control is not None and control.strategy == "max-profile" and not isinstance(control.own, tuple)
        if wallbox is None or not wallbox.connected or wallbox.backend_call is not None:
            return
        self.messages += 1
        msg_id = f"b{self.messages}"
        original = backend_payload(amps)
        out = self.coordinator.rewrite(cid, msg_id, original, WALL)
        forwarded = out if out is not None else original
        self.wallboxes[cid].backend_call = (
            msg_id, original, float(forwarded["csChargingProfiles"]["chargingSchedule"]
                                    ["chargingSchedulePeriod"][0]["limit"]))

    @rule(cid=CID)
    def wallbox_answers_backend(self, cid: str) -> None:
        self.outside = False
        wallbox = self.wallboxes.get(cid)
        if wallbox is None or wallbox.backend_call is None:
            return
        backend_profile_accepted(wallbox, self.coordinator, cid)

    def _meter_reading(self) -> None:
        grid = list(self.house)
        engine = self.coordinator.engine
        for cid, wallbox in self.wallboxes.items():
            draw = wallbox.cap() if wallbox.car and (wallbox.connected or wallbox.lost_at is not None) else 0.0
            for ph in charger_phases(3, wallbox.limits):
                grid[ph] += draw
            if wallbox.connected:
                phases = wallbox.limits.phases
                currents = tuple(draw if i < phases else 0.0 for i in range(3))
                engine.measured(cid, (currents[0], currents[1], currents[2]), self.now)
        engine.meter_reading((grid[0], grid[1], grid[2]), self.now)

    # -- the invariant ----------------------------------------------------------------------------

    def _truth(self) -> tuple[list[float], list[float]]:
        total = [0.0, 0.0, 0.0]
        for wallbox in self.wallboxes.values():
            amps = wallbox.may_draw(self.now)
            for ph in charger_phases(3, wallbox.limits):
                total[ph] += amps
        return total, self._budget()

    @invariant()
    def fuse_counts_at_least_what_may_be_drawn(self) -> None:
        if not self.wallboxes:
            return
        fuse = self.coordinator.fuse
        for cid, wallbox in self.wallboxes.items():
            truth = wallbox.may_draw(self.now)
            counted = fuse.may_draw(cid, self.now) / 10
            assert counted + 1e-9 >= truth, f"{cid}: the fuse counts {counted} A, it may draw {truth} A"

    @invariant()
    def never_over_budget_by_the_proxy(self) -> None:
        if not self.wallboxes:
            return
        total, budget = self._truth()
        if self.previous is not None and not self.outside:
            for ph in range(3):
                allowed = max(budget[ph], self.previous[ph])
                assert total[ph] <= allowed + 1e-9, (
                    f"phase L{ph + 1}: {total[ph]} A may be drawn, budget {budget[ph]} A "
                    f"(before this step {self.previous[ph]} A)")
        self.previous = total


TestFuseMachine = FuseMachine.TestCase
TestFuseMachine.settings = settings(max_examples=int(os.environ.get("FUSE_EXAMPLES", "150")), stateful_step_count=40)
