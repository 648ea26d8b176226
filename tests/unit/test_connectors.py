"""Connectors as load points (docs/load-management.md, "Connectors as load points"), sans-IO.

The engine shares the budget between a wallbox's connectors as between chargers (priority,
minimum, pause below it) while the wallbox stays within its own max_current; the fuse's gate
holds that bound at every instant too; the control puts each connector's limit in a
TxDefaultProfile on that connector, clamps a backend TxProfile that would outrank it, and the
coordinator counts each command on the load points it changes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from proxy.config import ConfigError, loads
from proxy.loadmgmt.control import Command, ControlSettings
from proxy.loadmgmt.coordinator import Coordinator, Outgoing
from proxy.loadmgmt.driver import charger_limits
from proxy.loadmgmt.engine import ChargerLimits, ConnectorLimits, LimitEngine, SiteLimits, load_points
from proxy.loadmgmt.fuse import Fuse

WALL = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
CALM = SiteLimits(max_current=20.0, phases=3, ramp_up_interval=0.0, hysteresis=0.0, min_hold_time=0.0)


def double(max_current: float = 32.0, *, first: int = 1, second: int = 0, enabled2: bool = True,
           connector_max: float = 32.0) -> ChargerLimits:
    """A two-connector wallbox; ``first`` / ``second``: the connectors' priorities (added to the charger's 0)."""
    return ChargerLimits(max_current=max_current, min_current=6.0, connectors=(
        ConnectorLimits(1, connector_max, 6.0, 3, first, True), ConnectorLimits(2, connector_max, 6.0, 3, second,
                                                                                enabled2)))


def charging(engine: LimitEngine, cid: str, connector: int) -> None:
    engine.status(cid, connector, "Preparing", 0.0)
    engine.transaction_started(cid, connector, 0.0)
    engine.status(cid, connector, "Charging", 0.0)


# --- the engine -----------------------------------------------------------------------------------

def test_priorities_give_the_connectors_different_limits() -> None:
    engine = LimitEngine(CALM, {"W": double()})
    engine.charger_connected("W", 0.0)
    charging(engine, "W", 1)
    charging(engine, "W", 2)
    assert engine.targets(0.0) == {"W#1": 14.0, "W#2": 6.0}  # 20 A: both minimums, the rest to priority 1


def test_wallbox_maximum_bounds_the_sum_of_its_connectors() -> None:
    site = SiteLimits(max_current=100.0, phases=3, ramp_up_interval=0.0, hysteresis=0.0, min_hold_time=0.0)
    engine = LimitEngine(site, {"W": double(16.0, first=0, connector_max=16.0), "X": ChargerLimits(max_current=32.0)})
    engine.charger_connected("W", 0.0)
    engine.charger_connected("X", 0.0)
    charging(engine, "W", 1)
    charging(engine, "W", 2)
    charging(engine, "X", 1)
    targets = engine.targets(0.0)
    assert targets == {"W#1": 8.0, "W#2": 8.0, "X": 32.0}
    engine.transaction_stopped("W", 2, 0.0)
    engine.status("W", 2, "Available", 0.0)
    # the connector without a car gets what its wallbox has left (0), the charging one the wallbox's max
    assert engine.targets(0.0) == {"W#1": 16.0, "W#2": 0.0, "X": 32.0}


def test_minimum_that_does_not_fit_pauses_the_lower_priority_connector_only() -> None:
    site = SiteLimits(max_current=10.0, phases=3, ramp_up_interval=0.0, hysteresis=0.0, min_hold_time=0.0)
    engine = LimitEngine(site, {"W": double()})
    engine.charger_connected("W", 0.0)
    charging(engine, "W", 1)
    charging(engine, "W", 2)
    assert engine.targets(0.0) == {"W#1": 10.0, "W#2": 0.0}
    assert engine.connector_views("W")[2].mode == "paused"
    assert engine.connector_views("W")[1].mode == "charging"


def test_a_disabled_connector_is_held_at_zero_while_the_other_charges() -> None:
    engine = LimitEngine(CALM, {"W": double(enabled2=False)})
    engine.charger_connected("W", 0.0)
    charging(engine, "W", 1)
    charging(engine, "W", 2)
    assert engine.targets(0.0) == {"W#1": 20.0, "W#2": 0.0}
    assert engine.connector_views("W")[2].mode == "blocked"


def test_measurements_are_attributed_per_connector() -> None:
    engine = LimitEngine(CALM, {"W": double()})
    engine.charger_connected("W", 0.0)
    charging(engine, "W", 1)
    charging(engine, "W", 2)
    engine.targets(0.0)
    engine.measured("W", (9.0, 9.0, 9.0), 1.0, power_w=6000.0, energy_wh=100.0, connector=1)
    engine.measured("W", (4.0, 4.0, 4.0), 1.0, power_w=2700.0, energy_wh=50.0, connector=2)
    engine.measured("W", (99.0, 99.0, 99.0), 1.0, connector=0)  # the main meter: nobody's
    engine.measured("W", (99.0, 99.0, 99.0), 1.0, connector=5)  # not a configured connector
    views = engine.connector_views("W")
    assert views[1].currents == (9.0, 9.0, 9.0) and views[2].currents == (4.0, 4.0, 4.0)
    whole = engine.charger_view("W")
    assert whole is not None
    assert whole.currents == (13.0, 13.0, 13.0) and whole.power_w == 8700.0 and whole.energy_wh == 150.0
    assert whole.local_limit == 20.0 and whole.mode == "charging" and whole.transaction


def test_a_stop_without_connector_and_a_boot_end_every_connectors_transaction() -> None:
    engine = LimitEngine(CALM, {"W": double()})
    engine.charger_connected("W", 0.0)
    charging(engine, "W", 1)
    charging(engine, "W", 2)
    engine.transaction_stopped("W", None, 0.0)
    engine.status("W", 0, "Available", 0.0)
    assert not any(v.transaction for v in engine.connector_views("W").values())


def test_a_wallbox_without_connector_settings_is_one_load_point_as_before() -> None:
    assert load_points("CP", ChargerLimits()) == {"CP": (0, ChargerLimits())}
    engine = LimitEngine(CALM, {"CP": ChargerLimits(max_current=16.0)})
    engine.charger_connected("CP", 0.0)
    charging(engine, "CP", 1)
    charging(engine, "CP", 2)  # its connectors share its limit
    assert engine.targets(0.0) == {"CP": 16.0}
    assert engine.connector_views("CP") == {}


# --- configuration -----------------------------------------------------------------------------------

BASE = '[site]\nmax_current = 32\n[[chargers]]\nid = "W"\nmax_current = 16\nphases = 1\n'


def problems(extra: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        loads(BASE + extra, "site.toml")
    return [p.render("site.toml") for p in caught.value.problems]


def test_connector_settings_resolve_to_the_chargers_defaults() -> None:
    config = loads(BASE + '[[chargers.connectors]]\nid = 1\npriority = 2\n[[chargers.connectors]]\nid = 2\n'
                   'max_current = 10\nmin_current = 8\nenabled = false\n')
    limits = charger_limits(config.chargers[0])
    assert limits.connectors == (ConnectorLimits(1, 16.0, 6.0, 1, 2, True), ConnectorLimits(2, 10.0, 8.0, 1, 0, False))
    points = load_points("W", limits)
    assert list(points) == ["W#1", "W#2"]
    assert points["W#2"][1].on_disable == "block" and points["W#1"][1].wallbox_max == 16.0


def test_connector_settings_that_cannot_work_are_config_errors() -> None:
    assert problems('[[chargers.connectors]]\nid = 1\nmax_current = 20\n[[chargers.connectors]]\nid = 1\n'
                    'min_current = 10\nmax_current = 8\nphases = 3\n') == [
        "site.toml:9: chargers[0].connectors[0].max_current: 20 A is above the charger's max_current (16 A): "
        "the wallbox as a whole stays bounded by it",
        "site.toml:11: chargers[0].connectors[1].id: connector 1 is listed twice (also chargers[0].connectors[0])",
        "site.toml:12: chargers[0].connectors[1].min_current: 10 A is above the connector's max_current (8 A)",
        "site.toml:14: chargers[0].connectors[1].phases: 3 is more than the charger's phases (1)"]
    assert problems('[[chargers.connectors]]\nid = 0\n') == [
        "site.toml:8: chargers[0].connectors[0].id: must be greater than 0"]
    assert problems('[[chargers.connectors]]\nid = 1\nmax_curent = 3\n') == [
        "site.toml:9: chargers[0].connectors[0].max_curent: unknown key; did you mean max_current?"]
    assert problems('unit = "W"\n[[chargers.connectors]]\nid = 1\n') == [
        'site.toml:7: chargers[0].unit: per-connector limits are sent in A: unit = "W" cannot be combined with '
        '[[chargers.connectors]]']


# --- the whole chain: coordinator, fuse, controls ------------------------------------------------------

class Site:
    def __init__(self, limits: ChargerLimits, site: SiteLimits = CALM, strategy: str = "max-profile") -> None:
        chargers = {"W": limits}
        self.fuse = Fuse(phases=3, hold=600.0)
        self.fuse.configure(3, chargers, ChargerLimits(), 600.0)
        self.coordinator = Coordinator(LimitEngine(site, chargers), self.fuse)
        self.settings = ControlSettings(strategy=strategy, retry=5.0,
                                        connectors=tuple(c.connector for c in limits.connectors))
        self.control = self.coordinator.attach("W", self.settings, 0.0)
        self.control.wallbox_call()
        self.now = 0.0

    def tick(self) -> Outgoing | None:
        out = self.coordinator.tick(self.now, WALL)
        assert len(out) <= 1  # one CALL at a time per wallbox
        return out[0] if out else None

    def answer(self, out: Outgoing, status: str = "Accepted") -> Outgoing | None:
        self.coordinator.answered("W", out.command, status, None, self.now)
        return self.coordinator.next("W", self.now, WALL)

    def settle(self) -> list[Command]:
        """Answer every CALL Accepted until nothing is left to send; returns them in order."""
        sent = []
        out = self.tick()
        while out is not None:
            sent.append(out.command)
            out = self.answer(out) or self.tick()
        return sent


def profile(command: Command) -> dict[str, Any]:
    payload = command.payload["csChargingProfiles"]
    assert isinstance(payload, dict)
    return payload


def test_each_connector_gets_a_tx_default_profile_of_its_own_and_the_wallbox_its_maximum() -> None:
    site = Site(double(16.0))
    charging(site.coordinator.engine, "W", 1)
    charging(site.coordinator.engine, "W", 2)
    sent = site.settle()
    by_connector = {c.payload["connectorId"]: profile(c) for c in sent if c.action == "SetChargingProfile"}
    assert by_connector[0]["chargingProfilePurpose"] == "ChargePointMaxProfile"
    assert by_connector[0]["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"] == 16.0
    for connector, limit, level in ((1, 10.0, 8), (2, 6.0, 9)):
        tx = by_connector[connector]
        assert tx["chargingProfilePurpose"] == "TxDefaultProfile"
        assert tx["chargingProfileId"] == 990001 + connector and tx["stackLevel"] == level
        assert tx["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"] == limit
    assert site.fuse.may_draw("W#1", 0.0) == 100 and site.fuse.may_draw("W#2", 0.0) == 60
    assert site.fuse.slot("W") is None  # the wallbox itself is no load point


def test_an_increase_on_one_connector_waits_for_the_others_decrease_within_the_wallbox_maximum() -> None:
    site = SiteLimits(max_current=100.0, phases=3, ramp_up_interval=0.0, hysteresis=0.0, min_hold_time=0.0)
    s = Site(double(16.0, first=0, connector_max=16.0), site)
    engine = s.coordinator.engine
    engine.status("W", 2, "Available", 0.0)
    charging(engine, "W", 1)
    s.settle()
    assert s.fuse.may_draw("W#1", 0.0) == 160  # the only car: the wallbox's maximum
    charging(engine, "W", 2)
    out = s.tick()
    assert out is not None and out.command.connector == 1 and out.command.amps == 8.0 and out.decrease
    # the decrease is not answered yet: connector 2 may get nothing, or the wallbox could draw 16 + 8
    assert s.coordinator.granted["W#2"] == 0.0
    assert s.tick() is None
    following = s.answer(out)
    assert following is None
    out = s.tick()
    assert out is not None and out.command.connector == 2 and out.command.amps == 8.0
    assert s.fuse.wallbox_draw("W", 0.0) == 160


def test_backend_tx_profile_on_a_connector_is_clamped_to_that_connectors_limit() -> None:
    s = Site(double())
    charging(s.coordinator.engine, "W", 1)
    charging(s.coordinator.engine, "W", 2)
    s.control.transaction_starting("m1", 2, WALL)
    s.control.transaction_started("m1", 42)
    s.settle()
    backend: dict[str, Any] = {"connectorId": 2, "csChargingProfiles": {
        "chargingProfileId": 5, "stackLevel": 0, "chargingProfilePurpose": "TxProfile", "transactionId": 42,
        "chargingProfileKind": "Absolute", "chargingSchedule": {
            "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 32.0}]}}}
    out = s.coordinator.rewrite("W", "b1", backend, WALL)
    assert out is not None
    assert out["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"] == 6.0
    assert s.fuse.may_draw("W#2", 0.0) == 60 and s.fuse.may_draw("W#1", 0.0) == 140
    s.control.backend_set_answered("b1", backend, "Accepted", WALL)
    s.coordinator.backend_answered("W")
    assert s.control.holding_at(2) == 6.0
    # a backend TxDefaultProfile on connector 0 below the proxy's stack level is not clamped (outranked)
    low: dict[str, Any] = {"connectorId": 0, "csChargingProfiles": {**backend["csChargingProfiles"], "chargingProfileId": 6,
                                                     "chargingProfilePurpose": "TxDefaultProfile"}}
    del low["csChargingProfiles"]["transactionId"]
    assert s.coordinator.rewrite("W", "b2", low, WALL) is None


def test_backend_tx_default_on_connector_zero_lowers_each_connectors_profile() -> None:
    s = Site(double())
    charging(s.coordinator.engine, "W", 1)
    charging(s.coordinator.engine, "W", 2)
    s.settle()
    backend = {"connectorId": 0, "csChargingProfiles": {
        "chargingProfileId": 6, "stackLevel": 1, "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Absolute", "chargingSchedule": {
            "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 8.0}]}}}
    s.control.backend_set_answered("b1", backend, "Accepted", WALL)
    s.coordinator.backend_answered("W")
    sent = s.settle()
    # the backend's 8 A caps each connector (min(backend, local)): 14 → 8 on connector 1, and connector 2
    # gets what that leaves (6 → 8)
    assert [(c.connector, c.amps) for c in sent] == [(1, 8.0), (2, 8.0)]
    assert s.control.holding_at(1) == 8.0 and s.control.holding_at(2) == 8.0


def test_a_refused_connector_profile_keeps_counting_the_old_value() -> None:
    s = Site(double())
    s.coordinator.engine.status("W", 2, "Available", 0.0)
    charging(s.coordinator.engine, "W", 1)
    s.settle()
    assert s.fuse.may_draw("W#1", 0.0) == 200
    charging(s.coordinator.engine, "W", 2)
    out = s.tick()
    assert out is not None and out.command.connector == 1 and out.decrease
    assert s.coordinator.answered("W", out.command, "Rejected", None, 0.0)  # a refused decrease
    assert s.fuse.may_draw("W#1", 0.0) == 200
    assert s.coordinator.granted.get("W#2", 0.0) == 0.0


def test_tx_default_strategy_sends_no_charge_point_maximum_with_connector_load_points() -> None:
    s = Site(double(), strategy="tx-default")
    charging(s.coordinator.engine, "W", 1)
    sent = s.settle()
    sets = [c for c in sent if c.action == "SetChargingProfile"]
    assert {c.connector for c in sets} == {1, 2}
    assert all(profile(c)["chargingProfilePurpose"] == "TxDefaultProfile" for c in sets)
    # its ChargePointMaxProfile, should one be left from before, is cleared by id
    assert [c.payload for c in sent if c.action == "ClearChargingProfile"] == [{"id": 990001}]


def test_a_wallbox_that_rejects_the_charge_point_maximum_keeps_its_connector_profiles() -> None:
    s = Site(double())
    s.coordinator.engine.status("W", 2, "Available", 0.0)
    charging(s.coordinator.engine, "W", 1)
    out = s.tick()
    sent: list[Command] = []
    while out is not None:
        whole = out.command.connector == 0 and out.command.action == "SetChargingProfile"
        sent.append(out.command)
        out = s.answer(out, "Rejected" if whole else "Accepted") or s.tick()
    assert s.control.strategy == "tx-default"
    assert s.control.holding_at(1) == 20.0 and s.control.holding_at(2) == 0.0


def test_after_a_lost_answer_the_gate_keeps_the_other_connector_within_the_wallbox_maximum() -> None:
    """Connector 1's decrease (16 → 10 A) times out: it may hold either, so it counts at 16 A. Connector 2's
    6 A would be sent first next time (the control does not know connector 1's profile any more), so the
    gate holds it at 0 A until connector 1's decrease is Accepted: the wallbox never may draw 16 + 6 A."""
    site = SiteLimits(max_current=100.0, phases=3, ramp_up_interval=0.0, hysteresis=0.0, min_hold_time=0.0)
    s = Site(double(16.0, connector_max=16.0), site)
    engine = s.coordinator.engine
    engine.status("W", 2, "Available", 0.0)
    charging(engine, "W", 1)
    s.settle()
    charging(engine, "W", 2)
    out = s.tick()
    assert out is not None and out.command.connector == 1 and out.command.amps == 10.0
    assert s.coordinator.failed("W", out.command, "no answer", s.now)  # a decrease left unanswered
    assert s.fuse.may_draw("W#1", s.now) == 160
    s.now += 6.0  # past the retry wait
    out = s.tick()
    assert s.coordinator.targets == {"W#1": 10.0, "W#2": 6.0}
    assert s.coordinator.granted == {"W#1": 10.0, "W#2": 0.0}
    assert out is not None and out.command.connector == 1 and out.command.amps == 10.0
    assert s.fuse.wallbox_draw("W", s.now) <= 160
    assert s.answer(out) is None
    out = s.tick()
    assert out is not None and out.command.connector == 2 and out.command.amps == 6.0
    assert s.fuse.wallbox_draw("W", s.now) == 160


def test_check_config_warns_per_connector_when_the_site_is_short() -> None:
    from proxy.config import LineIndex, site_warnings

    text = ('[site]\nmax_current = 10\n[[chargers]]\nid = "W"\nmax_current = 16\n'
            '[[chargers.connectors]]\nid = 1\n[[chargers.connectors]]\nid = 2\nmin_current = 12\n')
    warnings = [p.render("site.toml") for p in site_warnings(loads(text), LineIndex(text))]
    assert warnings == [
        "site.toml:10: chargers[0].connectors[1].min_current: 12 A is above the site limit ([site] max_current = "
        "10 A): connector 2 of charger 'W' can never charge",
        "site.toml:2: site.max_current: 10 A is below the sum of the chargers' min_current on phase L1 (18 A): when "
        "all charge, the lower priorities (then the later arrivals, then by id) wait at 0 A"]


def test_machine_regression_an_idle_connector_gets_no_room_the_grid_reading_has_not_seen() -> None:
    """Shrunk by the connector machine: 2 A of house load on L1 read before a car started on connector 2;
    the idle connector 1 was given the 7 A that seemed left once connector 2 counted at its 16 A."""
    from tests.unit.test_connector_machine import ConnectorMachine

    state = ConnectorMachine()
    state.setup(site=23, meter=True, calm=False, others=1, wallbox_max=32.0, phases=1, priorities=(0, 0, 0),
                strategy="max-profile")
    state.reconnect(boot=False, cid="D1")
    state.meter(house=[2.0, 0.0, 0.0])
    state.hold_passes()
    state.car_starts(cid="D1", connector=2)
    state.never_over_budget_nor_over_a_wallbox_maximum_by_the_proxy()
    state.everyone_answers_promptly()  # checks every round
    assert state.coordinator.targets == {"D1#1": 0.0, "D1#2": 16.0}  # the 5 A left are below its minimum
