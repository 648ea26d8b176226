"""The fuse invariant with connectors as load points, as a hypothesis state machine.

Like ``tests/unit/test_fuse_machine.py``, the system under test is the sans-IO chain the trio
driver runs (:class:`Coordinator`: engine, fuse, one control per wallbox), here on a site with
two-connector wallboxes whose connectors are load points of their own (``[[chargers.connectors]]``)
next to a wallbox that is one load point. The simulated wallboxes hold the truth: the profiles
they really applied, per connector, with the OCPP composite (the TxProfile of the running
transaction beats every TxDefaultProfile; within a purpose the highest stack level wins, a
connector's own on a tie; the ChargePointMaxProfile caps each connector), the CALL they have not
answered yet (which they may apply at any instant), a backend profile on its way. Cars start and
stop per connector; the backend installs TxProfiles for running transactions and TxDefaultProfiles
on a connector or on connector 0, below or above the proxy's stack level; wallboxes answer late,
reject, time out (having applied the limit or not), drop, reconnect, reboot; the proxy restarts
from its record; a connector is disabled or enabled again by a reload; a meter reports house load
and each connector's MeterValues.

Checked after every step:

* per load point: what the fuse counts is never below what the connector may really draw;
* per phase: no step of the proxy or a car raises what may be drawn above the budget (nor further
  above it when an outside event did);
* per two-connector wallbox: the limits the engine decides and the gate lets out add up to at most
  its max_current, and no step of the proxy or a car raises what its connectors may draw together
  above it (nor further above it: at first contact each unknown connector may draw its own maximum).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hypothesis import settings, strategies as st
from hypothesis.stateful import initialize, invariant, rule

from proxy.loadmgmt.control import Control, ControlSettings
from proxy.loadmgmt.coordinator import Outgoing
from proxy.loadmgmt.engine import ChargerLimits, ConnectorLimits, SiteLimits, charger_phases, load_points
from tests.unit.test_fuse_machine import CID, HOLD, WALL, ProxySteps

CONNECTOR = st.sampled_from([1, 2])


@dataclass
class Installed:
    connector: int
    purpose: str
    stack_level: int
    amps: float
    transaction: int | None = None


@dataclass
class Wallbox:
    """A simulated wallbox: profiles by id (kept over reconnects, lost on reboot), cars per connector."""

    limits: ChargerLimits
    profiles: dict[int, Installed] = field(default_factory=dict)
    inflight: Outgoing | None = None
    #: A backend SetChargingProfile forwarded and not answered: (msg id, original payload, as forwarded)
    backend_call: tuple[str, dict[str, Any], dict[str, Any]] | None = None
    connected: bool = False
    lost_at: float | None = 0.0
    #: connector → transaction id of the car charging there
    cars: dict[int, int] = field(default_factory=dict)

    def points(self, cid: str) -> dict[str, tuple[int, ChargerLimits]]:
        return load_points(cid, self.limits)

    # -- what it may draw ------------------------------------------------------------------------

    def cap(self, connector: int, limits: ChargerLimits) -> float:
        """Connector 0: the wallbox as one load point (any Tx/TxDefault counts at its highest, as in the
        single-connector machine); connector N: the OCPP composite on N."""
        top = limits.max_current
        maxes = [p for p in self.profiles.values() if p.purpose == "ChargePointMaxProfile"]
        cp_max = _winner(maxes) if maxes else top
        if connector == 0:
            tx = [p.amps for p in self.profiles.values() if p.purpose in ("TxDefaultProfile", "TxProfile")]
            return min(top, cp_max, max(tx, default=top))
        running = self.cars.get(connector)
        tx_profiles = [p for p in self.profiles.values() if p.purpose == "TxProfile" and p.connector == connector
                       and running is not None and p.transaction in (None, running)]
        defaults = [p for p in self.profiles.values() if p.purpose == "TxDefaultProfile"
                    and p.connector in (0, connector)]
        decided = _winner(tx_profiles) if tx_profiles else _winner(defaults) if defaults else top
        return min(top, cp_max, decided)

    def may_draw(self, connector: int, limits: ChargerLimits, now: float) -> float:
        """What the load point may draw now (a car may plug in any moment): its cap, or its cap once it
        applied what it was sent. A lost one released after the hold counts no more, by decision."""
        if not self.connected and self.lost_at is not None and now - self.lost_at >= HOLD:
            return 0.0
        values = [self.cap(connector, limits)]
        if self.inflight is not None:
            values.append(self._after(lambda w: w.apply(self.inflight), connector, limits))
        if self.backend_call is not None:
            forwarded = self.backend_call[2]
            values.append(self._after(lambda w: w.install(forwarded), connector, limits))
        return min(max(values), limits.max_current)

    def _after(self, change: Any, connector: int, limits: ChargerLimits) -> float:
        copy = Wallbox(self.limits, dict(self.profiles), cars=dict(self.cars))
        change(copy)
        return copy.cap(connector, limits)

    # -- applying profiles -----------------------------------------------------------------------

    def apply(self, outgoing: Outgoing) -> None:
        command = outgoing.command
        if command.kind == "clear":
            self.profiles.pop(command.payload.get("id", 0), None)
            return
        self.install(command.payload)

    def install(self, payload: dict[str, Any]) -> None:
        """SetChargingProfile: the same id, or the same purpose and stack level on the same connector, is
        replaced (OCPP 1.6 errata)."""
        raw, connector = payload["csChargingProfiles"], payload["connectorId"]
        profile = Installed(connector, raw["chargingProfilePurpose"], raw["stackLevel"],
                            float(raw["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"]),
                            raw.get("transactionId"))
        for pid in [pid for pid, p in self.profiles.items() if pid == raw["chargingProfileId"] or (
                p.purpose == profile.purpose and p.stack_level == profile.stack_level and p.connector == connector)]:
            del self.profiles[pid]
        self.profiles[raw["chargingProfileId"]] = profile

    def rebooted(self) -> None:
        """Profiles in RAM only: a reboot loses them, and the cars' transactions."""
        self.profiles.clear()
        self.cars.clear()

    def apply_backend(self) -> None:
        """The backend's profile on its way is in force (as forwarded)."""
        assert self.backend_call is not None
        self.install(self.backend_call[2])

    def stop(self, connector: int) -> None:
        """The transaction ends: its TxProfiles go with it."""
        self.cars.pop(connector, None)
        for pid in [pid for pid, p in self.profiles.items() if p.purpose == "TxProfile" and p.connector == connector]:
            del self.profiles[pid]


def _winner(profiles: list[Installed]) -> float:
    """Highest stack level wins; on a tie the connector's own (a TxDefault on connector 0 applies to all)."""
    best = max(profiles, key=lambda p: (p.stack_level, p.connector > 0))
    return best.amps


def backend_profile(connector: int, purpose: str, level: int, amps: float, transaction: int | None,
                    profile_id: int) -> dict[str, Any]:
    raw: dict[str, Any] = {"chargingProfileId": profile_id, "stackLevel": level, "chargingProfilePurpose": purpose,
                           "chargingProfileKind": "Absolute", "chargingSchedule": {
                               "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": amps}]}}
    if transaction is not None:
        raw["transactionId"] = transaction
    return {"connectorId": connector, "csChargingProfiles": raw}


class ConnectorMachine(ProxySteps):
    wallboxes: dict[str, Wallbox]

    def __init__(self) -> None:
        super().__init__()
        self.previous_wallbox: dict[str, float] = {}
        self.disabled: set[tuple[str, int]] = set()

    # -- setting up -------------------------------------------------------------------------

    @initialize(site=st.integers(10, 100), meter=st.booleans(), calm=st.booleans(), others=st.integers(0, 2),
                wallbox_max=st.sampled_from([16.0, 20.0, 32.0]), phases=st.sampled_from([1, 3]),
                priorities=st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 1)),
                strategy=st.sampled_from(["max-profile", "tx-default"]))
    def setup(self, site: int, meter: bool, calm: bool, others: int, wallbox_max: float, phases: int,
              priorities: tuple[int, int, int], strategy: str) -> None:
        """D1 (a two-connector wallbox) and ``others`` of D2 (another) and S1 (one load point)."""
        self.site_limits = SiteLimits(max_current=float(site), phases=3, meter=meter, meter_timeout=1e9,
                                      ramp_up_interval=0.0 if calm else 15.0, hysteresis=0.0 if calm else 1.0,
                                      min_hold_time=0.0 if calm else 60.0)
        self.strategy = strategy
        self.shapes = {"D1": (wallbox_max, phases, 1, priorities[0])}
        if others >= 1:
            self.shapes["D2"] = (16.0, 3, 2, priorities[1])
        self.limits = self._configured()
        if others >= 2:
            self.limits["S1"] = ChargerLimits(max_current=16.0, min_current=6.0, phases=1, first_phase=3,
                                              priority=priorities[2])
        for cid, limits in self.limits.items():
            self.wallboxes[cid] = Wallbox(limits)
        self._start_proxy()

    def _configured(self) -> dict[str, ChargerLimits]:
        out = {}
        for cid, (top, phases, first, priority) in self.shapes.items():
            connectors = tuple(ConnectorLimits(n, min(top, 16.0) if n == 2 else top, 6.0, phases, n % 2,
                                               (cid, n) not in self.disabled) for n in (1, 2))
            out[cid] = ChargerLimits(max_current=top, min_current=6.0, phases=phases, first_phase=first,
                                     priority=priority, connectors=connectors)
        return out

    def _settings(self, cid: str) -> ControlSettings:
        limits = self.limits[cid]
        return ControlSettings(strategy=self.strategy, phases=limits.phases, retry=5.0,
                               connectors=tuple(c.connector for c in limits.connectors))

    @rule()
    def everyone_answers_promptly(self) -> None:
        """A calm spell: recomputations, and every wallbox accepts what it is sent, until nothing is left
        to send (at most 12 rounds), so steps after it start from settled limits."""
        for _ in range(12):
            self.tick(0.0)
            waiting = [cid for cid, w in self.wallboxes.items() if w.inflight is not None]
            if not waiting:
                return
            for cid in waiting:
                self.answer(cid, "Accepted", True)
            self._check_step()

    def _statuses(self, cid: str, control: Control) -> None:
        wallbox, engine = self.wallboxes[cid], self.coordinator.engine
        for n in (1, 2):
            control.status(n)
            engine.status(cid, n, "Charging" if n in wallbox.cars else "Available", self.now)
            if n in wallbox.cars:  # the proxy learns the running transaction again from its frames
                engine.transaction_started(cid, n, self.now)

    @rule(cid=CID, connector=CONNECTOR)
    def toggle_connector(self, cid: str, connector: int) -> None:
        """A reload disables a connector (held at 0 A) or enables it again."""
        if cid not in self.shapes:
            return
        self.outside = False
        self.disabled ^= {(cid, connector)}
        self.limits.update(self._configured())
        self.coordinator.engine.configure(self.site_limits, self.limits, now=self.now)
        self.coordinator.fuse.configure(3, self.limits, ChargerLimits(), HOLD)
        for wallbox_id, wallbox in self.wallboxes.items():
            wallbox.limits = self.limits[wallbox_id]

    # -- cars and the backend -------------------------------------------------------------------

    @rule(cid=CID, connector=CONNECTOR)
    def car_starts(self, cid: str, connector: int) -> None:
        self.outside = False
        wallbox = self.wallboxes[cid]
        if not wallbox.connected or connector in wallbox.cars:
            return
        self.messages += 1
        wallbox.cars[connector] = self.messages
        engine, control = self.coordinator.engine, self.coordinator.controls[cid]
        engine.status(cid, connector, "Preparing", self.now)
        control.transaction_starting(f"start-{self.messages}", connector, WALL)
        engine.transaction_started(cid, connector, self.now)
        control.transaction_started(f"start-{self.messages}", self.messages)
        engine.status(cid, connector, "Charging", self.now)

    @rule(cid=CID, connector=CONNECTOR)
    def car_stops(self, cid: str, connector: int) -> None:
        self.outside = False
        wallbox = self.wallboxes[cid]
        if not wallbox.connected or connector not in wallbox.cars:
            return
        tx = wallbox.cars[connector]
        control = self.coordinator.controls[cid]
        # The transaction's TxProfiles end with it (OCPP). Where none of the proxy's profiles is on the connector
        # yet (no recomputation since the wallbox came back), that lifts it back to what it had at first contact,
        # its own maximum, as the reconnect did: not something the proxy can prevent or decided.
        self.outside = any(p.purpose == "TxProfile" and p.connector == connector for p in wallbox.profiles.values()) \
            and control.connector_profile_id(connector) not in wallbox.profiles
        wallbox.stop(connector)
        stopped = control.transaction_stopped(tx)
        self.coordinator.engine.transaction_stopped(cid, stopped, self.now)
        self.coordinator.engine.status(cid, connector, "Available", self.now)

    @rule(cid=CID, connector=st.sampled_from([0, 1, 2]), tx_profile=st.booleans(),
          level=st.sampled_from([0, 1, 8, 9, 20]), amps=st.sampled_from([6.0, 10.0, 16.0, 32.0]))
    def backend_sets_profile(self, cid: str, connector: int, tx_profile: bool, level: int, amps: float) -> None:
        """The backend installs a TxProfile for a running transaction, or a TxDefaultProfile (connector 0: all).

        Connector load points clamp it from the first contact on. A wallbox that is one load point under
        max-profile passes it unchanged until the proxy's ChargePointMaxProfile is known on it (counted at
        its max_current meanwhile): an outside event then, as in tests/unit/test_fuse_machine.py."""
        control = self.coordinator.controls.get(cid)
        self.outside = (control is not None and not control.per_connector and control.strategy == "max-profile"
                        and not isinstance(control.own, tuple))
        wallbox = self.wallboxes[cid]
        if not wallbox.connected or wallbox.backend_call is not None:
            return
        transaction = wallbox.cars.get(connector) if tx_profile else None
        if tx_profile and transaction is None:
            return
        self.messages += 1
        msg_id = f"b{self.messages}"
        original = backend_profile(connector, "TxProfile" if tx_profile else "TxDefaultProfile", level, amps,
                                   transaction, 100 + connector * 10 + int(tx_profile))
        control = self.coordinator.controls[cid]
        out = self.coordinator.rewrite(cid, msg_id, original, WALL) if control.rewrites else None
        wallbox.backend_call = (msg_id, original, out if out is not None else original)

    @rule(cid=CID)
    def wallbox_answers_backend(self, cid: str) -> None:
        self.outside = False
        wallbox = self.wallboxes[cid]
        if wallbox.backend_call is None:
            return
        msg_id, original, forwarded = wallbox.backend_call
        raw = forwarded["csChargingProfiles"]
        running = raw.get("transactionId") is None or wallbox.cars.get(forwarded["connectorId"]) == raw["transactionId"]
        status = "Accepted" if running else "Rejected"
        if running:
            wallbox.apply_backend()
        wallbox.backend_call = None
        self.coordinator.controls[cid].backend_set_answered(msg_id, original, status, WALL)
        self.coordinator.backend_answered(cid)

    # -- meter and EMS -------------------------------------------------------------------------------

    def _meter_reading(self) -> None:
        """The grid meter and each charging connector's MeterValues (connectorId), one snapshot."""
        grid = list(self.house)
        engine = self.coordinator.engine
        for cid, wallbox in self.wallboxes.items():
            present = wallbox.connected or wallbox.lost_at is not None
            for pid, (connector, limits) in wallbox.points(cid).items():
                cars = wallbox.cars if connector else {0: 1} if wallbox.cars else {}
                draw = wallbox.cap(connector, limits) if present and (connector in cars) else 0.0
                for ph in charger_phases(3, limits):
                    grid[ph] += draw
                if wallbox.connected:
                    currents = tuple(draw if i < limits.phases else 0.0 for i in range(3))
                    engine.measured(cid, (currents[0], currents[1], currents[2]), self.now,
                                    connector=connector or None)
        engine.meter_reading((grid[0], grid[1], grid[2]), self.now)

    # -- the invariants ----------------------------------------------------------------------------

    def _truths(self) -> dict[str, tuple[str, ChargerLimits, float]]:
        """Per load point: (wallbox, limits, what it may really draw)."""
        out = {}
        for cid, wallbox in self.wallboxes.items():
            for pid, (connector, limits) in wallbox.points(cid).items():
                out[pid] = (cid, limits, wallbox.may_draw(connector, limits, self.now))
        return out

    def _check_step(self) -> None:
        """The invariants between the rounds of a compound step too."""
        self.fuse_counts_at_least_what_may_be_drawn()
        self.never_over_budget_nor_over_a_wallbox_maximum_by_the_proxy()
        self.the_proxys_limits_keep_each_wallbox_within_its_maximum()

    @invariant()
    def fuse_counts_at_least_what_may_be_drawn(self) -> None:
        if not self.wallboxes:
            return
        fuse = self.coordinator.fuse
        for pid, (_, _, truth) in self._truths().items():
            counted = fuse.may_draw(pid, self.now) / 10
            assert counted + 1e-9 >= truth, f"{pid}: the fuse counts {counted} A, it may draw {truth} A"

    @invariant()
    def never_over_budget_nor_over_a_wallbox_maximum_by_the_proxy(self) -> None:
        if not self.wallboxes:
            return
        total = [0.0, 0.0, 0.0]
        per_wallbox: dict[str, float] = {}
        for cid, limits, truth in self._truths().values():
            for ph in charger_phases(3, limits):
                total[ph] += truth
            per_wallbox[cid] = per_wallbox.get(cid, 0.0) + truth
        budget = self._budget()
        if self.previous is not None and not self.outside:
            for ph in range(3):
                allowed = max(budget[ph], self.previous[ph])
                assert total[ph] <= allowed + 1e-9, (
                    f"phase L{ph + 1}: {total[ph]} A may be drawn, budget {budget[ph]} A "
                    f"(before this step {self.previous[ph]} A)")
            for cid, (top, *_) in self.shapes.items():
                allowed = max(top, self.previous_wallbox[cid])
                assert per_wallbox[cid] <= allowed + 1e-9, (
                    f"{cid}: its connectors may draw {per_wallbox[cid]} A together, its maximum is {top} A "
                    f"(before this step {self.previous_wallbox[cid]} A)")
        self.previous = total
        self.previous_wallbox = per_wallbox


    @invariant()
    def the_proxys_limits_keep_each_wallbox_within_its_maximum(self) -> None:
        """What the engine decides and what the gate lets out add up to at most the wallbox's max_current."""
        if not self.wallboxes:
            return
        for cid, (top, *_) in self.shapes.items():
            points = list(self.wallboxes[cid].points(cid))
            for name, limits in (("targets", self.coordinator.targets), ("granted", self.coordinator.granted)):
                total = sum(limits.get(pid, 0.0) for pid in points)
                assert total <= top + 1e-9, f"{cid}: {name} {total} A over its {top} A"


TestConnectorMachine = ConnectorMachine.TestCase
TestConnectorMachine.settings = settings(max_examples=int(os.environ.get("FUSE_EXAMPLES", "150")),
                                         stateful_step_count=40, deadline=None)


def _check_connectors(machine: ConnectorMachine) -> None:
    machine.fuse_counts_at_least_what_may_be_drawn()
    machine.never_over_budget_nor_over_a_wallbox_maximum_by_the_proxy()
    machine.the_proxys_limits_keep_each_wallbox_within_its_maximum()


def _a_backend_default_below_the_proxys_level_after_a_reconnect(site: int, hold: bool) -> None:
    """Hypothesis's counterexamples 2: D1 reconnects (no boot; the proxy's connector profiles are not known to be
    on it), the backend sets a connector-0 TxDefaultProfile at stack level 0, below the proxy's (8, 9): with
    nothing of the proxy's to outrank it, it decides both connectors, so it is clamped like one above."""
    machine = ConnectorMachine()
    machine.setup(site=site, meter=False, calm=False, others=1, wallbox_max=16.0, phases=1, priorities=(0, 0, 0),
                  strategy="max-profile")
    _check_connectors(machine)
    machine.reconnect(boot=False, cid="D1")
    _check_connectors(machine)
    if hold:
        machine.hold_passes()
        _check_connectors(machine)
    machine.backend_sets_profile(amps=6.0, cid="D1", connector=0, level=0, tx_profile=False)
    _check_connectors(machine)
    machine.wallbox_answers_backend(cid="D1")
    _check_connectors(machine)
    machine.backend_sets_profile(amps=10.0, cid="D1", connector=0, level=0, tx_profile=False)
    _check_connectors(machine)
    machine.wallbox_answers_backend(cid="D1")
    _check_connectors(machine)
    machine.everyone_answers_promptly()
    _check_connectors(machine)


def test_a_low_backend_default_is_clamped_until_the_proxys_connector_profiles_are_on() -> None:
    """Counterexample 2a (20 A site): 20 A over D1's 16 A maximum without the clamp."""
    _a_backend_default_below_the_proxys_level_after_a_reconnect(20, hold=True)


def test_a_low_backend_default_never_raises_a_phase_over_its_budget() -> None:
    """Counterexample 2b (10 A site): 52 A on L1 (44 A before) without the clamp."""
    _a_backend_default_below_the_proxys_level_after_a_reconnect(10, hold=False)


def test_a_granted_increase_waits_when_a_returning_wallbox_took_the_room() -> None:
    """Found by the harder search (seed 2): the recomputation grants D1's connectors 6 A each on a 12 A site
    (the others released after the hold); connector 1's limit goes out, then D2 comes back (counted at its
    maximum again). The proxy asked for D1's next CALL after the answer, and sent connector 2's 6 A from the
    stale grant (44 A on L1, 38 A before): an increase is checked against the room left right before it leaves."""
    machine = ConnectorMachine()
    machine.setup(phases=1, others=2, priorities=(1, 0, 0), site=12, wallbox_max=16.0, meter=True, calm=True,
                  strategy="max-profile")
    _check_connectors(machine)
    machine.reconnect(boot=False, cid="D1")
    _check_connectors(machine)
    machine.everyone_answers_promptly()
    _check_connectors(machine)
    machine.hold_passes()
    _check_connectors(machine)
    machine.tick(dt=0.0)
    _check_connectors(machine)
    machine.reconnect(boot=False, cid="D2")
    _check_connectors(machine)
    machine.answer(applied=False, cid="D1", outcome="Accepted")
    _check_connectors(machine)
    assert machine.wallboxes["D1"].inflight is None  # connector 2's increase waits for the next recomputation
    machine.everyone_answers_promptly()
    _check_connectors(machine)


def test_a_car_stopping_before_the_proxys_first_limits_ends_a_clamped_tx_profile() -> None:
    """The deeper search's counterexample (100 steps), a model correction: D1 back (no boot), a car on connector 1,
    the backend's TxProfile clamped to 0 A (nothing decided yet), the car stops before any recomputation: the
    TxProfile ends with the transaction and connector 1 may draw its maximum again, as at first contact. The fuse
    counted it at its maximum all along; the step is not the proxy's doing (outside)."""
    machine = ConnectorMachine()
    machine.setup(site=10, meter=False, calm=False, others=0, wallbox_max=16.0, phases=1, priorities=(0, 0, 0),
                  strategy="max-profile")
    machine.reconnect(boot=False, cid="D1")
    _check_connectors(machine)
    machine.car_starts(cid="D1", connector=1)
    _check_connectors(machine)
    machine.backend_sets_profile(amps=6.0, cid="D1", connector=1, level=0, tx_profile=True)
    _check_connectors(machine)
    machine.wallbox_answers_backend(cid="D1")
    _check_connectors(machine)
    connector_1 = machine.wallboxes["D1"].points("D1")["D1#1"][1]
    assert machine.wallboxes["D1"].may_draw(1, connector_1, machine.now) == 0.0  # the clamped TxProfile
    machine.car_stops(cid="D1", connector=1)
    assert machine.outside
    _check_connectors(machine)
    assert machine.coordinator.fuse.may_draw("D1#1", machine.now) == 160  # counted at its maximum all along
    machine.everyone_answers_promptly()
    _check_connectors(machine)


def _settled(strategy: str, site: int = 40, meter: bool = False) -> ConnectorMachine:
    """D1 alone (two connectors, 16 A, one phase, connector 2 one priority up) on a calm site: back and settled."""
    machine = ConnectorMachine()
    machine.setup(meter=meter, phases=1, calm=True, priorities=(0, 1, 0), others=0, site=site, wallbox_max=16.0,
                  strategy=strategy)
    machine.reconnect(boot=False, cid="D1")
    machine.everyone_answers_promptly()
    return machine


def test_a_backend_default_whose_answer_was_lost_keeps_counting() -> None:
    """Found by the harder search (seed 16). tx-default, D1 settled at 6 A per connector, the EMS disables it, the
    backend's connector-0 TxDefaultProfile 6 A at stack level 9 (above connector 1's 8) is forwarded and the
    connection drops with it applied and its answer lost. The proxy used to forget it: after the reconnect its 0 A
    profiles were accepted and the fuse counted connector 1 at 0 A while it could draw 6 A. Now it counts as maybe
    installed, and the proxy re-sends it clamped (0 A: the EMS disable holds); accepted, it is the backend's."""
    machine = _settled("tx-default", site=12, meter=True)
    machine.ems_charger(amps=None, cid="D1", enabled=False)
    machine.backend_sets_profile(amps=6.0, cid="D1", connector=0, level=9, tx_profile=False)
    machine.drop(applied=True, cid="D1")
    machine.reconnect(boot=False, cid="D1")
    _check_connectors(machine)
    control = machine.coordinator.controls["D1"]
    assert [sent.profile.id for _, sent in control.maybe] == [100]
    machine.everyone_answers_promptly()
    _check_connectors(machine)
    wallbox = machine.wallboxes["D1"]
    for pid, (connector, limits) in wallbox.points("D1").items():
        assert wallbox.may_draw(connector, limits, machine.now) == 0.0, pid  # disabled: held at 0 A
        assert machine.coordinator.fuse.may_draw(pid, machine.now) == 0
    assert wallbox.profiles[100].amps == 0.0  # the backend's profile, re-sent clamped
    assert not control.maybe and 100 in control.backend  # now the backend's, as if it had been Accepted


def test_a_lost_backend_default_that_was_not_applied_is_settled_by_the_re_send() -> None:
    """The same with the profile not applied before the drop: counted all the same (the proxy cannot tell), and
    the clamped re-send puts on the wallbox what the backend asked for, at the local limit."""
    machine = _settled("tx-default")
    machine.backend_sets_profile(amps=16.0, cid="D1", connector=0, level=20, tx_profile=False)
    machine.drop(applied=False, cid="D1")
    machine.reconnect(boot=False, cid="D1")
    _check_connectors(machine)
    machine.ems_charger(amps=None, cid="D1", enabled=False)
    machine.everyone_answers_promptly()
    _check_connectors(machine)
    assert machine.wallboxes["D1"].profiles[100].amps == 0.0
    assert not machine.coordinator.controls["D1"].maybe


def test_a_lost_re_send_of_a_lost_backend_default_counts_at_both_versions() -> None:
    """Sibling found while closing the gap above: the backend's TxDefaultProfile (stack level 20, connector 1) went out
    clamped to 6 A and its answer was lost; after the reconnect the limit rises and the proxy re-sends it at 10 A, and
    the connection drops again with that applied and unanswered. Back once more at 6 A, the proxy's own profiles were
    accepted at 6 A and the fuse counted connector 1 at 6 A (the first version) while the re-sent 10 A was in force:
    a re-send lost with its connection is maybe installed at its version too."""
    machine = _settled("tx-default")
    machine.ems_charger(amps=6.0, cid="D1", enabled=True)
    machine.everyone_answers_promptly()
    machine.backend_sets_profile(amps=16.0, cid="D1", connector=1, level=20, tx_profile=False)
    machine.drop(applied=True, cid="D1")
    machine.reconnect(boot=False, cid="D1")
    machine.ems_charger(amps=None, cid="D1", enabled=True)
    machine.tick(0.0)
    wallbox = machine.wallboxes["D1"]
    assert wallbox.inflight is not None and wallbox.inflight.command.kind == "restore"
    assert wallbox.inflight.command.describe()["limit"] == 10.0
    machine.drop(applied=True, cid="D1")
    _check_connectors(machine)
    machine.reconnect(boot=False, cid="D1")
    machine.ems_charger(amps=6.0, cid="D1", enabled=True)
    machine.everyone_answers_promptly()
    _check_connectors(machine)
    assert wallbox.profiles[110].amps == 6.0  # settled: re-sent at 6 A


def test_a_backend_default_never_answered_on_a_live_connection_keeps_counting() -> None:
    """Sibling found while closing the gap above: the backend's connector-0 TxDefaultProfile (6 A, stack level 9) is
    applied and never answered while the connection stays (the relay's call_timeout frees the slot); the backend's
    next profile is answered. The fuse used to stop counting the first with that answer (connector 1 counted at the
    proxy's 0 A, 6 A in force after an EMS pause); now it is maybe installed from then on and re-sent clamped."""
    machine = _settled("tx-default")
    machine.ems_charger(amps=None, cid="D1", enabled=False)
    machine.backend_sets_profile(amps=6.0, cid="D1", connector=0, level=9, tx_profile=False)
    wallbox = machine.wallboxes["D1"]
    wallbox.apply_backend()
    wallbox.backend_call = None  # its answer never comes
    _check_connectors(machine)
    machine.backend_sets_profile(amps=16.0, cid="D1", connector=2, level=0, tx_profile=False)
    machine.wallbox_answers_backend(cid="D1")
    _check_connectors(machine)
    machine.everyone_answers_promptly()
    _check_connectors(machine)
    assert wallbox.profiles[100].amps == 0.0


def test_a_backend_default_on_the_other_connector_at_the_same_level_does_not_hide_the_first() -> None:
    """Sibling found while closing the gap above: the backend's TxDefaultProfiles on connector 1 and then on
    connector 2, both at stack level 20. The proxy took the second as replacing the first (same purpose and stack
    level), although a wallbox that keeps one stack per connector keeps both; once the EMS disabled D1 the fuse
    counted connector 1 at 0 A while the first profile (clamped to 10 A when it went out) let it draw 10 A. What
    the proxy stops counting is now only what is replaced on every reading: same id, or same purpose and stack
    level on the same connector."""
    for strategy in ("tx-default", "max-profile"):
        machine = _settled(strategy)
        for connector in (1, 2):
            machine.backend_sets_profile(amps=16.0, cid="D1", connector=connector, level=20, tx_profile=False)
            _check_connectors(machine)
            machine.wallbox_answers_backend(cid="D1")
            _check_connectors(machine)
        machine.ems_charger(amps=None, cid="D1", enabled=False)
        machine.everyone_answers_promptly()
        _check_connectors(machine)
        wallbox = machine.wallboxes["D1"]
        assert {pid: p.amps for pid, p in wallbox.profiles.items() if pid in (110, 120)} == {110: 0.0, 120: 0.0}


def test_a_backend_default_from_before_a_proxy_restart_keeps_counting() -> None:
    """Sibling found while closing the lost-answer gap: D1 settled, the backend's TxDefaultProfile on connector 1 at
    stack level 20 (above the proxy's 8) is accepted (clamped to 10 A), the proxy restarts and D1 reconnects, the EMS
    disables D1. The proxy used to forget the profile: its 0 A profiles were accepted and the fuse counted connector
    1 at 0 A while the backend's profile let it draw 10 A. Now the durable record keeps it: after the restart it is
    maybe installed (counted at 10 A) and re-sent clamped to 0 A; accepted, it is the backend's again."""
    machine = _settled("tx-default")
    machine.backend_sets_profile(amps=16.0, cid="D1", connector=1, level=20, tx_profile=False)
    machine.wallbox_answers_backend(cid="D1")
    machine.restart_proxy(applied=False)
    _check_connectors(machine)
    control = machine.coordinator.control("D1", machine._settings("D1"))
    assert [(origin.profile.id, sent.profile.periods[0].limit) for origin, sent in control.maybe] == [(110, 10.0)]
    machine.reconnect(boot=False, cid="D1")
    _check_connectors(machine)
    machine.ems_charger(amps=None, cid="D1", enabled=False)
    machine.everyone_answers_promptly()
    _check_connectors(machine)
    assert machine.wallboxes["D1"].profiles[110].amps == 0.0  # re-sent clamped to the EMS pause
    assert control.maybe == [] and 110 in control.backend  # settled: the backend's, as if never forgotten
    assert [(o.profile.id, s.profile.periods[0].limit) for o, s in control.kept()] == [(110, 0.0)]


def test_a_backend_profile_on_its_way_at_a_proxy_restart_keeps_counting() -> None:
    """The same with the backend's TxDefaultProfile still on its way when the proxy stops (applied, never answered):
    the record kept it as forwarded (clamped to 10 A), so after the restart it counts until re-sent clamped."""
    for strategy in ("tx-default", "max-profile"):
        machine = _settled(strategy)
        machine.backend_sets_profile(amps=16.0, cid="D1", connector=1, level=20, tx_profile=False)
        machine.restart_proxy(applied=True)
        _check_connectors(machine)
        assert machine.wallboxes["D1"].profiles[110].amps == 10.0
        machine.reconnect(boot=False, cid="D1")
        machine.ems_charger(amps=None, cid="D1", enabled=False)
        machine.everyone_answers_promptly()
        _check_connectors(machine)
        assert machine.wallboxes["D1"].profiles[110].amps == 0.0


def test_a_backend_profile_settled_before_a_proxy_restart_is_not_kept() -> None:
    """What the record keeps goes with what settles it: a backend Clear that matches the profile, accepted, leaves
    nothing to count after a restart (the record of D1 is empty)."""
    machine = _settled("tx-default")
    machine.backend_sets_profile(amps=16.0, cid="D1", connector=1, level=20, tx_profile=False)
    machine.wallbox_answers_backend(cid="D1")
    control = machine.coordinator.controls["D1"]
    assert [origin.profile.id for origin, _ in machine.coordinator.kept("D1")] == [110]
    control.backend_clear_answered({"id": 110}, "Accepted")
    machine.wallboxes["D1"].profiles.pop(110)
    machine.coordinator.backend_answered("D1")
    assert machine.coordinator.kept("D1") == []
    machine.restart_proxy(applied=False)
    assert "D1" not in machine.kept
    _check_connectors(machine)
