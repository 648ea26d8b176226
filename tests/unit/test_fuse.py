"""The fuse (sans-IO): the issue's two overbooking cases, refused decreases, lost chargers, restarts,
tx-default, the durable record; and the state machine's shrunk counterexamples, replayed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from proxy.loadmgmt.control import ControlSettings
from proxy.loadmgmt.coordinator import Coordinator, Outgoing
from proxy.loadmgmt.engine import ChargerLimits, LimitEngine, SiteLimits
from proxy.loadmgmt.fuse import Fuse
from proxy.storage.reservations import SqliteReservations
from tests.unit.test_fuse_machine import FuseMachine

WALL = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
CALM = SiteLimits(max_current=20.0, phases=3, ramp_up_interval=0.0, hysteresis=0.0, min_hold_time=0.0)
CHARGERS = {"CP1": ChargerLimits(max_current=16.0), "CP2": ChargerLimits(max_current=16.0)}


class Site:
    """A coordinator with booted wallboxes; ``send`` collects the CALLs of a recomputation."""

    def __init__(self, site: SiteLimits = CALM, chargers: dict[str, ChargerLimits] = CHARGERS,
                 recorded: dict[str, float | None] | None = None, hold: float = 600.0,
                 strategy: str = "max-profile") -> None:
        self.fuse = Fuse(phases=3, hold=hold)
        self.fuse.configure(3, chargers, ChargerLimits(), hold)
        if recorded is not None:
            self.fuse.restore(recorded, 0.0)
        self.site = Coordinator(LimitEngine(site, chargers), self.fuse)
        self.strategy = strategy
        self.now = 0.0

    def connect(self, cid: str, status: str = "Available") -> None:
        control = self.site.attach(cid, ControlSettings(strategy=self.strategy, retry=5.0), self.now)
        control.wallbox_call()
        self.site.engine.status(cid, 1, status, self.now)

    def charge(self, cid: str) -> None:
        self.site.engine.transaction_started(cid, 1, self.now)
        self.site.engine.status(cid, 1, "Charging", self.now)

    def tick(self, dt: float = 0.0) -> dict[str, Outgoing]:
        self.now += dt
        return {o.charger_id: o for o in self.site.tick(self.now, WALL)}

    def answer(self, out: Outgoing, status: str | None = "Accepted", error: str | None = None) -> Outgoing | None:
        self.site.answered(out.charger_id, out.command, status, error, self.now)
        return self.site.next(out.charger_id, self.now, WALL)

    def may_draw(self, cid: str) -> float:
        return self.fuse.may_draw(cid, self.now) / 10


def settle_at(site: Site, cid: str, amps: float) -> None:
    sent = site.tick()
    assert sent[cid].command.amps == amps
    assert site.answer(sent[cid]) is None


def two_known(site: Site) -> None:
    """CP1 charging at 16 A, CP2 idle at 0 A (what is left, 4 A, is below its minimum): both confirmed.

    At first contact both are unknown, counted at 16 A each on a 20 A site: each may have less
    installed, so a limit above 0 could raise what it really draws. Both are paused first, and CP1
    gets its 16 A once the pauses are Accepted."""
    site.connect("CP1")
    site.connect("CP2")
    site.charge("CP1")
    sent = site.tick()
    assert sent["CP1"].command.amps == 0.0 and sent["CP2"].command.amps == 0.0
    assert all(out.decrease for out in sent.values())
    for out in sent.values():
        assert site.answer(out) is None
    raised = site.tick()
    assert list(raised) == ["CP1"] and raised["CP1"].command.amps == 16.0
    assert site.answer(raised["CP1"]) is None


def test_slow_decrease_holds_the_newcomers_increase_until_accepted() -> None:
    """Issue case 1: CP1 at 16 A answers late; CP2's 10 A goes out only once CP1's 10 A is Accepted."""
    site = Site()
    two_known(site)
    site.charge("CP2")
    sent = site.tick(0.1)
    assert sent["CP1"].decrease and sent["CP1"].command.amps == 10.0
    assert "CP2" not in sent  # no room until CP1 accepts
    assert site.site.granted["CP2"] == 0.0 and site.site.targets["CP2"] == 10.0
    assert site.may_draw("CP1") + site.may_draw("CP2") == 16.0
    assert site.tick(3.0) == {}  # 3 s later: still unanswered, still nothing for CP2
    assert site.answer(sent["CP1"]) is None
    raise_ = site.tick()
    assert raise_["CP2"].command.amps == 10.0 and not raise_["CP2"].decrease
    assert site.may_draw("CP1") + site.may_draw("CP2") == 20.0


def test_lost_charger_keeps_its_reservation_until_the_hold_passes() -> None:
    """Issue case 2: CP1 drops mid-charge at 10 A; CP2 stays at 10 A, not 16 A."""
    site = Site(hold=600.0)
    two_known(site)
    site.charge("CP2")
    sent = site.tick()
    site.answer(sent["CP1"])
    site.answer(site.tick()["CP2"])
    assert site.may_draw("CP1") == site.may_draw("CP2") == 10.0
    site.site.detach("CP1", site.now)
    assert site.tick(0.01) == {}
    assert site.site.targets["CP2"] == 10.0  # the engine plans around the reservation
    assert site.fuse.lost(site.now) == {"CP1": 10.0}
    assert site.tick(599.0) == {}
    raise_ = site.tick(2.0)  # the hold passed: CP1 counts no more
    assert raise_["CP2"].command.amps == 16.0


def test_lost_charger_back_without_a_car_is_lowered_before_the_other_is_raised() -> None:
    """Its profile is still installed: a car plugged in would draw it. So its share moves to the
    other wallbox only once it accepted the lower limit."""
    site = Site()
    two_known(site)
    site.charge("CP2")
    site.answer(site.tick()["CP1"])
    site.answer(site.tick()["CP2"])
    site.site.detach("CP1", site.now)
    assert site.tick(1.0) == {}
    site.connect("CP1", status="Available")  # back, and not charging: the car left meanwhile
    sent = site.tick(0.1)
    assert list(sent) == ["CP1"] and sent["CP1"].decrease and sent["CP1"].command.amps == 0.0
    assert site.may_draw("CP1") == 10.0
    assert site.answer(sent["CP1"]) is None
    assert site.tick()["CP2"].command.amps == 16.0


def test_refused_or_unanswered_decrease_keeps_counting_the_old_value_and_is_retried() -> None:
    site = Site()
    two_known(site)
    site.charge("CP2")
    first = site.tick()["CP1"]
    assert site.answer(first, None, "InternalError") is None
    assert site.may_draw("CP1") == 16.0 and site.fuse.stats.failed_decreases == {"error": 1}
    assert site.tick(1.0) == {}  # nothing for CP2: CP1 may still draw 16 A; no retry before the backoff
    retry = site.tick(4.0)["CP1"]
    assert retry.command.amps == 10.0
    site.site.failed("CP1", retry.command, "no answer", site.now)
    assert site.may_draw("CP1") == 16.0 and site.fuse.stats.failed_decreases["unanswered"] == 1
    assert site.tick(9.0) == {}  # the wait doubled: 10 s
    third = site.tick(1.0)["CP1"]
    switched = site.answer(third, "Rejected")  # no ChargePointMaxProfile here: tx-default from now
    assert switched is not None and switched.command.amps == 10.0
    assert site.fuse.stats.failed_decreases["rejected"] == 1
    assert site.may_draw("CP1") == 16.0 and site.tick() == {}
    assert site.answer(switched) is None
    assert site.may_draw("CP1") == 10.0
    assert site.tick()["CP2"].command.amps == 10.0


def test_restart_counts_not_yet_reconnected_chargers_at_their_record_or_maximum() -> None:
    three = {**CHARGERS, "CP3": ChargerLimits(max_current=16.0)}
    site = Site(chargers=three, recorded={"CP1": 6.0, "CP2": None}, site=SiteLimits(
        max_current=30.0, ramp_up_interval=0.0, hysteresis=0.0, min_hold_time=0.0))
    # CP1 counts at its record (6 A), CP2 (record: unknown) and CP3 (none) at their 16 A.
    assert site.fuse.lost(0.0) == {"CP1": 6.0, "CP2": 16.0, "CP3": 16.0}
    site.connect("CP3")
    site.charge("CP3")
    down = site.tick()["CP3"]
    # 30 - 6 - 16 leaves 8 A, but CP3 is counted at 16 A and may have anything up to that installed:
    # over budget, so it is paused first (8 A could be more than it has now)
    assert down.decrease and down.command.amps == 0.0
    assert site.may_draw("CP1") + site.may_draw("CP3") + site.fuse.may_draw("CP2", site.now) / 10 == 38.0
    assert site.site.over_budget  # the restart's unknowns
    site.connect("CP2", status="Available")  # idle: paused too
    sent = site.tick()
    assert list(sent) == ["CP2"] and sent["CP2"].command.amps == 0.0  # CP3 has its CALL outstanding
    assert site.answer(down) is None and site.answer(sent["CP2"]) is None
    assert site.may_draw("CP1") + site.may_draw("CP2") + site.may_draw("CP3") == 6.0
    raised = site.tick()  # both now known at 0 A: CP3's 16 A and idle CP2's 8 A fit next to CP1's 6 A
    assert raised["CP3"].command.amps == 16.0 and raised["CP2"].command.amps == 8.0
    assert not raised["CP3"].decrease and not site.site.over_budget
    assert site.may_draw("CP1") + site.may_draw("CP2") + site.may_draw("CP3") == 30.0


def test_increase_needs_the_durable_record_first_and_decrease_does_not() -> None:
    site = Site()
    site.connect("CP1")
    site.charge("CP1")
    first = site.tick()["CP1"]
    assert not first.record_first  # unknown until now (its maximum): 16 A is no increase
    site.answer(first)
    assert site.fuse.records() == ({"CP1": 16.0}, False)  # 16 A: what it counted at before
    site.connect("CP2")
    site.charge("CP2")
    sent = site.tick()
    down = sent["CP1"]
    assert down.decrease and not down.record_first
    site.answer(down)
    site.answer(sent["CP2"])  # 0 A first: its unknown 16 A would overbook the site (20 A)
    assert site.fuse.records() == ({"CP1": 10.0, "CP2": 0.0}, False)  # lower: may be written later
    raised = site.tick()["CP2"]
    assert raised.command.amps == 10.0 and raised.record_first  # higher: written before it leaves
    site.answer(raised)
    assert site.fuse.records() == ({"CP2": 10.0}, True)
    site.site.engine.transaction_stopped("CP2", 1, site.now)
    site.site.engine.status("CP2", 1, "Available", site.now)
    freed = site.tick()
    assert list(freed) == ["CP2"] and freed["CP2"].command.amps == 0.0  # its car left: down first
    site.answer(freed["CP2"])
    up = site.tick()["CP1"]
    assert up.command.amps == 16.0 and up.record_first


def test_tx_default_backend_profile_counts_as_forwarded_until_answered() -> None:
    site = Site(strategy="tx-default")
    site.connect("CP1")
    site.charge("CP1")
    settle_at(site, "CP1", 16.0)
    site.connect("CP2")
    site.charge("CP2")
    down = site.tick()["CP1"]
    site.answer(down)
    assert site.may_draw("CP1") == 10.0
    payload = {"connectorId": 1, "csChargingProfiles": {
        "chargingProfileId": 7, "stackLevel": 1, "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Relative",
        "chargingSchedule": {"chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 32}]}}}
    clamped = site.site.rewrite("CP1", "b1", payload, WALL)
    assert clamped is not None
    assert clamped["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"] == 10.0
    assert site.may_draw("CP1") == 10.0
    site.site.controls["CP1"].backend_set_answered("b1", payload, "Accepted", WALL)
    site.site.backend_answered("CP1")
    assert site.may_draw("CP1") == 10.0


def test_over_budget_seconds_count_only_while_over() -> None:
    site = Site()
    for cid in ("CP1", "CP2"):
        site.connect(cid)
        site.charge(cid)
    for _ in range(2):  # unknown at first: paused, then 10 A each
        for out in site.tick().values():
            site.answer(out)
    assert site.may_draw("CP1") == site.may_draw("CP2") == 10.0
    site.site.engine.ems_site_limit(12.0, site.now)  # an EMS lowers the site limit: decreases go out
    sent = site.tick()
    assert site.site.over_budget and all(o.decrease for o in sent.values())
    site.tick(2.0)
    for out in sent.values():
        site.answer(out)
    site.tick(1.0)
    assert not site.site.over_budget
    assert site.fuse.stats.over_budget_seconds == 3.0


def test_reservation_store_round_trip_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data" / "reservations.sqlite3"
    store = SqliteReservations(path)
    assert store.load() == {}
    store.record({"CP1": 10.0, "CP2": None})
    store.record({"CP1": 6.5})
    store.close()
    again = SqliteReservations(path)
    assert again.load() == {"CP1": 6.5, "CP2": None}
    again.close()


# -- the state machine's shrunk counterexamples -----------------------------------------------------

def checker(state: FuseMachine) -> Callable[[Callable[[], None]], None]:
    """Runs a step of the machine, then checks both invariants."""
    def checked(step: Callable[[], None]) -> None:
        step()
        state.fuse_counts_at_least_what_may_be_drawn()
        state.never_over_budget_by_the_proxy()

    return checked


def settler(state: FuseMachine, checked: Callable[[Callable[[], None]], None]) -> Callable[[], None]:
    """A calm spell, checked: recomputations, and every wallbox accepts what it is sent (at most 12 rounds)."""
    def settle() -> None:
        for _ in range(12):
            checked(lambda: state.tick(dt=0.0))
            waiting = [cid for cid, w in state.wallboxes.items() if w.inflight is not None]
            for cid in waiting:
                state.answer(cid=cid, outcome="Accepted", applied=True)
                checked(lambda: None)
            if not waiting:
                return

    return settle


def test_machine_regression_reboot_then_restart_counts_the_reboot() -> None:
    """Shrunk: a reboot (profile gone: unknown) learnt just before a restart must reach the record."""
    state = FuseMachine()
    state.setup(site=10, meter=False, calm=False, chargers=[(16.0, 1, 1, 0, "max-profile"),
                                                            (16.0, 1, 1, 0, "max-profile")])
    state.reconnect(cid="CP1", boot=False)
    state.reconnect(cid="CP2", boot=False)
    state.tick(dt=0.0)
    state.answer(cid="CP1", outcome="Accepted", applied=False)
    state.restart_proxy(applied=False)
    state.reconnect(cid="CP1", boot=True)
    state.car_starts(cid="CP1")
    state.restart_proxy(applied=False)
    state.fuse_counts_at_least_what_may_be_drawn()
    state.never_over_budget_by_the_proxy()


def test_machine_regression_released_charger_reconnecting_is_an_outside_event() -> None:
    """Shrunk: a charger released after the hold that comes back charging counts again (not a proxy step)."""
    state = FuseMachine()
    state.setup(site=10, meter=False, calm=False, chargers=[(16.0, 1, 1, 0, "max-profile"),
                                                            (16.0, 1, 1, 0, "max-profile")])
    state.reconnect(cid="CP1", boot=False)
    state.car_starts(cid="CP1")
    state.drop(cid="CP1", applied=False)
    state.hold_passes()
    state.never_over_budget_by_the_proxy()
    state.reconnect(cid="CP1", boot=False)
    assert state.outside
    state.fuse_counts_at_least_what_may_be_drawn()
    state.never_over_budget_by_the_proxy()


def test_machine_regression_no_gate_overbooks() -> None:
    """Shrunk with the gate switched off (targets sent as they are): found at once; kept as the
    issue's first case in machine form: CP1's late decrease, CP2's increase held back."""
    state = FuseMachine()
    state.setup(site=20, meter=False, calm=True, chargers=[(16.0, 3, 1, 0, "max-profile"),
                                                           (16.0, 3, 1, 0, "max-profile")])
    state.reconnect(cid="CP1", boot=False)
    state.car_starts(cid="CP1")
    state.tick(dt=0.0)
    state.answer(cid="CP1", outcome="Accepted", applied=False)
    state.reconnect(cid="CP2", boot=False)
    state.car_starts(cid="CP2")
    state.never_over_budget_by_the_proxy()
    state.tick(dt=0.5)
    state.fuse_counts_at_least_what_may_be_drawn()
    state.never_over_budget_by_the_proxy()


def test_machine_regression_restored_record_is_an_upper_bound_not_what_is_installed() -> None:
    """Shrunk: CP2 was paused (0 A) before a restart whose record said 16 A; after the restart the
    site was over budget with the unknown CP3, and 10 A for CP2 went out as a "decrease" from the
    16 A it was counted at, while it really had 0 A installed: 26 A may be drawn on a 10 A phase."""
    state = FuseMachine()
    state.setup(site=10, meter=False, calm=False, chargers=[(16.0, 1, 1, 0, "max-profile"),
                                                            (16.0, 1, 2, 0, "max-profile"),
                                                            (16.0, 1, 2, 0, "max-profile")])

    checked = checker(state)

    checked(lambda: None)
    checked(lambda: state.reconnect(boot=False, cid="CP2"))
    checked(lambda: state.tick(dt=0.0))
    checked(lambda: state.restart_proxy(applied=True))
    checked(lambda: state.reconnect(boot=False, cid="CP2"))
    checked(lambda: state.reconnect(boot=False, cid="CP3"))
    checked(lambda: state.tick(dt=0.0))


def test_machine_regression_a_grid_reading_from_before_a_car_started_keeps_its_house_load() -> None:
    """Found by the connector machine, replayed on the plain one: 2 A of house load on L1 read while no car
    charged, then a car starts on CP1 and is counted at its 16 A limit before the meter sees it. Taking
    those 16 A off the old reading made the house look empty (0 A), and the 7 A that seemed left went to
    CP2: 23 A may be drawn on a 21 A budget. Only what CP1 drew when the grid was read comes off it now."""
    state = FuseMachine()
    state.setup(site=23, meter=True, calm=True, chargers=[(16.0, 1, 1, 0, "max-profile"),
                                                          (16.0, 1, 1, 0, "max-profile")])

    checked = checker(state)

    checked(lambda: None)
    checked(lambda: state.reconnect(boot=False, cid="CP1"))
    checked(lambda: state.reconnect(boot=False, cid="CP2"))
    checked(lambda: state.meter(house=[2.0, 0.0, 0.0]))
    checked(lambda: state.car_starts(cid="CP1"))
    for _ in range(6):
        checked(lambda: state.tick(dt=0.0))
        for cid in ("CP1", "CP2"):
            checked(lambda: state.answer(cid=cid, outcome="Accepted", applied=True))
    assert state.coordinator.targets == {"CP1": 16.0, "CP2": 0.0}  # the 5 A left are below its minimum


Checked = Callable[[Callable[[], None]], None]


def _backend_default_forgotten_then_paused(forget: Callable[[FuseMachine, Checked], None]) -> None:
    """CP1 (tx-default) and CP2 settled, the backend's TxDefaultProfile goes out to CP1 (clamped to its 16 A), then
    ``forget`` (how the proxy may lose track of it), CP1 back and paused by the EMS: the profile must keep counting
    and be re-sent clamped to 0 A."""
    state = FuseMachine()
    state.setup(site=40, meter=False, calm=True, chargers=[(16.0, 1, 1, 0, "tx-default"),
                                                           (16.0, 1, 2, 0, "max-profile")])
    checked = checker(state)
    settle = settler(state, checked)
    checked(lambda: state.reconnect(boot=False, cid="CP1"))
    checked(lambda: state.reconnect(boot=False, cid="CP2"))
    settle()
    checked(lambda: state.backend_sets_tx_default(cid="CP1", amps=16.0))
    forget(state, checked)
    checked(lambda: state.reconnect(boot=False, cid="CP1"))
    checked(lambda: state.ems_charger(cid="CP1", amps=None, enabled=False))
    settle()
    assert state.wallboxes["CP1"].profiles[7] == ("TxDefaultProfile", 0.0)  # re-sent clamped
    assert state.coordinator.fuse.may_draw("CP1", state.now) == 0


def test_machine_regression_a_tx_default_backend_profile_whose_answer_was_lost_keeps_counting() -> None:
    """The lost-answer gap of the connector machine on a wallbox that is one load point under tx-default: the
    connection drops with the backend's profile applied and unanswered. The proxy used to forget the profile and
    count CP1 at its own 0 A while the backend's 16 A stayed in force; now it counts it and re-sends it clamped."""
    def dropped(state: FuseMachine, checked: Checked) -> None:
        checked(lambda: state.drop(applied=True, cid="CP1"))

    _backend_default_forgotten_then_paused(dropped)


def test_machine_regression_a_tx_default_backend_profile_from_before_a_proxy_restart_keeps_counting() -> None:
    """The restart sibling: the backend's profile is accepted and the proxy restarts. Without the backend's profiles
    in the durable record the proxy counted CP1 at its own 0 A while 16 A stayed in force; now the record brings the
    profile back as maybe installed, and it is re-sent clamped."""
    def restarted(state: FuseMachine, checked: Checked) -> None:
        checked(lambda: state.wallbox_answers_backend(cid="CP1"))
        checked(lambda: state.restart_proxy(applied=False))
        assert "CP1" in state.kept and "CP2" not in state.kept

    _backend_default_forgotten_then_paused(restarted)
