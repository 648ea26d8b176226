"""Two proxy processes on one shared store, as a hypothesis state machine (docs/cluster.md).

The system under test is what each process decides, sans-IO: the lease decisions
(:class:`proxy.core.lease.LeasePolicy`) and the load management (:class:`Coordinator`:
engine, fuse with :meth:`Fuse.adopt` / :meth:`Fuse.refresh`, ``site_owner``), driven the way
the trio layer drives them (proxy/runtime/leases.py, proxy/loadmgmt/driver.py): leases taken at
the handshake and renewed every third of their life in one round, a failed renewal closing
in time, the site's lease taken whenever free (the shared records read first), records
written before an increase leaves and a decrease later, a write of a charger another process
holds the lease of left out. Around them: one store (leases with expiry, the site's
reservations), one clock, simulated wallboxes (tests/unit/test_fuse_machine.py's) that
connect to either process, answer late or never, drop, and processes that are cut off from
the store, stall (SIGSTOP), are killed (kill -9) and restarted.

Checked after every step:

* **one server per charger**: no two running processes believe they hold one lease, and
  a lease a running process believes it holds is its own and live in the store; every
  connected wallbox is served by a process holding its lease;
* **one owner per site**: at most one running process grants current, and it holds the
  site's lease;
* **the fuse across both processes**: a step never raises what all wallboxes may draw
  together above the site's budget, nor further above it when an outside event (a
  wallbox back after its reservation was released, the start) already did; and each
  process counts the chargers it serves at least at what they may draw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from proxy.core.lease import Close, LeasePolicy, LeaseState, Serve
from proxy.loadmgmt.control import ControlSettings
from proxy.loadmgmt.coordinator import Coordinator, Outgoing
from proxy.loadmgmt.engine import ChargerLimits, LimitEngine, SiteLimits, charger_phases
from proxy.loadmgmt.fuse import Fuse
from tests.unit.test_fuse_machine import HOLD, IDS, WALL, Wallbox, backend_payload, backend_profile_accepted

TTL = 6.0
STEP = TTL / 6  # the clock moves in steps shorter than a renewal period
SITE = "site:site"
NAMES = ("proxy-a", "proxy-b")
CID = st.sampled_from(IDS)
PROC = st.sampled_from(NAMES)


@dataclass
class Store:
    """The shared database: leases (owner, expiry) and the site's reservations."""

    leases: dict[str, tuple[str, float]] = field(default_factory=dict)
    records: dict[str, float | None] = field(default_factory=dict)

    def acquire(self, key: str, owner: str, now: float) -> LeaseState:
        row = self.leases.get(key)
        if row is None or row[0] == owner or row[1] <= now:
            self.leases[key] = (owner, now + TTL)
        holder, expires = self.leases[key]
        return LeaseState(key, holder, expires - now)

    def renew(self, key: str, owner: str, now: float) -> LeaseState:
        """Extends the lease only if ``owner`` still holds it (never takes one)."""
        holder, expires = self.leases.get(key, ("", now))
        if holder == owner:
            self.leases[key] = (owner, now + TTL)
        holder, expires = self.leases.get(key, ("", now))
        return LeaseState(key, holder, expires - now)

    def release(self, key: str, owner: str) -> None:
        if self.leases.get(key, ("", 0.0))[0] == owner:
            del self.leases[key]

    def elsewhere(self, owner: str, now: float) -> set[str]:
        return {key for key, (holder, expires) in self.leases.items()
                if holder != owner and expires > now and key != SITE}

    def record(self, limits: dict[str, float | None], writer: str, now: float) -> None:
        """PostgresReservations.record: a charger whose live lease another holds is left out."""
        for charger, amps in limits.items():
            if charger not in self.elsewhere(writer, now):
                self.records[charger] = amps


@dataclass
class Process:
    name: str
    coordinator: Coordinator
    policy: LeasePolicy
    #: Leases it believes it holds: key → until when (its clock, never later than the store's expiry).
    held: dict[str, float] = field(default_factory=dict)
    #: Records handed to its writer, not written yet.
    unwritten: dict[str, float | None] = field(default_factory=dict)
    reachable: bool = True
    stalled: bool = False

    @property
    def running(self) -> bool:
        return not self.stalled


class ClusterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.store = Store()
        self.wallboxes: dict[str, Wallbox] = {}
        self.server: dict[str, str | None] = {}
        self.procs: dict[str, Process] = {}
        self.previous: list[float] | None = None
        self.outside = True  # the start: wallboxes never seen count at their maximum

    @initialize(site=st.integers(10, 48), calm=st.sampled_from([True, True, False]),
                chargers=st.lists(st.tuples(st.sampled_from([16.0, 32.0]), st.sampled_from([1, 3]),
                                            st.integers(1, 3), st.sampled_from(["max-profile", "tx-default"])),
                                  min_size=2, max_size=3))
    def setup(self, site: int, calm: bool, chargers: list[tuple[float, int, int, str]]) -> None:
        self.site_limits = SiteLimits(max_current=float(site), phases=3, ramp_up_interval=0.0 if calm else 15.0,
                                      hysteresis=0.0 if calm else 1.0, min_hold_time=0.0 if calm else 60.0)
        self.limits: dict[str, ChargerLimits] = {}
        for cid, (top, phases, first, strategy) in zip(IDS, chargers):
            self.limits[cid] = ChargerLimits(max_current=top, min_current=6.0, phases=phases, first_phase=first)
            self.wallboxes[cid] = Wallbox(self.limits[cid], strategy, car=True)  # cars plugged in: demand
            self.server[cid] = None
        for name in NAMES:
            self._start(name)

    def _start(self, name: str) -> None:
        """A process starts: every charger it does not serve counts at its shared record (or maximum)."""
        fuse = Fuse(phases=3, hold=HOLD)
        fuse.configure(3, self.limits, ChargerLimits(), HOLD)
        fuse.restore(self.store.records, self.now)
        coordinator = Coordinator(LimitEngine(self.site_limits, self.limits), fuse)
        coordinator.site_owner = False
        self.procs[name] = Process(name, coordinator, LeasePolicy(name, TTL))

    def _settings(self, cid: str) -> ControlSettings:
        return ControlSettings(strategy=self.wallboxes[cid].strategy, phases=self.limits[cid].phases, retry=5.0)

    # -- the trio layer, modelled ----------------------------------------------------------------

    def _take(self, proc: Process, key: str) -> bool:
        if not proc.reachable:
            return False
        state = self.store.acquire(key, proc.name, self.now)
        if isinstance(proc.policy.on_acquire(state), Serve):
            proc.held[key] = self.now + state.remaining
            return True
        return False

    def _release(self, proc: Process, key: str) -> None:
        proc.held.pop(key, None)
        if proc.reachable:
            self.store.release(key, proc.name)

    def _keeper_round(self, proc: Process) -> None:
        """LeaseKeeper.renew_now: all held leases in one round; Close ends the holder before expiry."""
        for key in sorted(proc.held):
            if proc.reachable:
                state = self.store.renew(key, proc.name, self.now)
                decision: Serve | Close = proc.policy.on_renew(state)
                if isinstance(decision, Serve):
                    proc.held[key] = self.now + state.remaining
            else:
                decision = proc.policy.on_renew_failed(proc.held[key] - self.now)
            if isinstance(decision, Close):
                self._lose(proc, key)

    def _lose(self, proc: Process, key: str) -> None:
        del proc.held[key]
        if key == SITE:
            proc.coordinator.site_owner = False
        elif self.server.get(key) == proc.name:
            self._end_session(proc, key, applied=False)
        elif key in proc.coordinator.connected:  # its wallbox already left (while it was stalled)
            proc.coordinator.detach(key, self.now)

    def _site_round(self, proc: Process) -> None:
        """Limiter._hold_site: take the site's lease when free, read the shared records, then grant."""
        if SITE in proc.held or not self._take(proc, SITE):
            return
        self._refresh(proc)
        proc.coordinator.site_owner = True

    def _refresh(self, proc: Process) -> None:
        if proc.reachable:
            proc.coordinator.fuse.refresh(self.store.records, self.store.elsewhere(proc.name, self.now), self.now)

    def _collect(self, proc: Process) -> None:
        proc.unwritten.update(proc.coordinator.fuse.records()[0])

    def _flush(self, proc: Process) -> bool:
        self._collect(proc)
        if not proc.reachable:
            return False
        self.store.record(proc.unwritten, proc.name, self.now)
        proc.unwritten = {}
        return True

    def _dispatch(self, proc: Process, outgoing: list[Outgoing]) -> None:
        """Limiter._send: anything but a decrease leaves once recorded, and only from the site's owner."""
        self._collect(proc)
        for item in outgoing:
            wallbox = self.wallboxes[item.charger_id]
            assert wallbox.inflight is None, "two CALLs outstanding on one wallbox"
            if item.record_first or not item.decrease:
                if not self._flush(proc) or not proc.coordinator.site_owner:
                    proc.coordinator.withdrawn(item.charger_id, item.command, "not recorded", self.now)
                    continue
            wallbox.inflight = item
        self._collect(proc)

    def _end_session(self, proc: Process, cid: str, applied: bool) -> None:
        """The session ends (the wallbox dropped, or the lease went): it may have applied what was in flight."""
        wallbox = self.wallboxes[cid]
        wallbox.connected, wallbox.lost_at = False, self.now
        self.server[cid] = None
        item, wallbox.inflight = wallbox.inflight, None
        if item is not None and applied:
            wallbox.apply(item)
        if wallbox.backend_call is not None:
            if applied:
                amps = wallbox.backend_call[2]
                wallbox._install(backend_payload(amps)["csChargingProfiles"], amps)
            wallbox.backend_call = None
        if cid in proc.coordinator.connected:
            proc.coordinator.detach(cid, self.now)
            if item is not None:
                proc.coordinator.failed(cid, item.command, "session gone", self.now)
        self._collect(proc)

    def _proc_of(self, cid: str) -> Process | None:
        name = self.server.get(cid)
        proc = self.procs[name] if name is not None else None
        return proc if proc is not None and proc.running else None

    # -- rules: wallboxes ------------------------------------------------------------------------

    @rule(cid=CID, name=PROC)
    def connect(self, cid: str, name: str) -> None:
        """A wallbox connects to a process (HAProxy's choice): served if it gets the charger's lease."""
        self.outside = False
        proc, wallbox = self.procs[name], self.wallboxes.get(cid)
        if wallbox is None or wallbox.connected or not proc.running or not self._take(proc, cid):
            return
        # ProxyServer._lease → Limiter.charger_leased: at least its shared record, before it is managed
        proc.coordinator.fuse.adopt(cid, self.store.records.get(cid), known=cid in self.store.records)
        lost_at = wallbox.lost_at
        self.outside = lost_at is not None and self.now - lost_at >= HOLD  # released by decision, back now
        wallbox.connected, wallbox.lost_at = True, None
        self.server[cid] = name
        control = proc.coordinator.attach(cid, self._settings(cid), self.now)
        control.wallbox_call()
        control.status(1)
        proc.coordinator.engine.status(cid, 1, "Charging" if wallbox.car else "Available", self.now)
        self._collect(proc)

    @rule(cid=CID, applied=st.booleans())
    def drop(self, cid: str, applied: bool) -> None:
        """The connection drops; the process releases the charger's lease (if it can reach the store)."""
        self.outside = False
        proc = self._proc_of(cid)
        if proc is None:
            return
        self._end_session(proc, cid, applied)
        self._release(proc, cid)

    @precondition(lambda self: any(p.stalled for p in self.procs.values()))
    @rule(cid=CID)
    def wallbox_gives_up(self, cid: str) -> None:
        """Its process is stalled: the wallbox's connection times out; the process learns of it later."""
        self.outside = False
        name = self.server.get(cid)
        if name is None or self.procs[name].running:
            return
        wallbox = self.wallboxes[cid]
        wallbox.connected, wallbox.lost_at, wallbox.inflight = False, self.now, None
        wallbox.backend_call = None
        self.server[cid] = None

    def _some(self, test: Callable[[Wallbox], bool]) -> bool:
        return any(test(wallbox) for wallbox in self.wallboxes.values())

    @precondition(lambda self: self._some(lambda w: w.inflight is not None))
    @rule(cid=CID, outcome=st.sampled_from(["Accepted", "Accepted", "Rejected", "CALLERROR", "timeout"]),
          applied=st.booleans())
    def answer(self, cid: str, outcome: str, applied: bool) -> None:
        self.outside = False
        proc, wallbox = self._proc_of(cid), self.wallboxes.get(cid)
        item = wallbox.inflight if wallbox else None
        if proc is None or wallbox is None or item is None:
            return
        wallbox.inflight = None
        if outcome == "Accepted" or (outcome == "timeout" and applied):
            wallbox.apply(item)
        coordinator = proc.coordinator
        if outcome == "timeout":
            coordinator.failed(cid, item.command, "no answer", self.now)
        elif outcome == "CALLERROR":
            coordinator.answered(cid, item.command, None, "InternalError", self.now)
        else:
            coordinator.answered(cid, item.command, outcome, None, self.now)
        following = coordinator.next(cid, self.now, WALL)
        self._dispatch(proc, [following] if following else [])

    @precondition(lambda self: self._some(lambda w: w.inflight is not None))
    @rule(cid=CID)
    def apply_before_answering(self, cid: str) -> None:
        self.outside = False
        wallbox = self.wallboxes.get(cid)
        if wallbox is not None and wallbox.inflight is not None:
            wallbox.apply(wallbox.inflight)

    @rule(cid=CID, start=st.booleans())
    def car(self, cid: str, start: bool) -> None:
        self.outside = False
        proc, wallbox = self._proc_of(cid), self.wallboxes.get(cid)
        if proc is None or wallbox is None or wallbox.car == start:
            return
        wallbox.car = start
        engine, control = proc.coordinator.engine, proc.coordinator.controls[cid]
        if start:
            engine.status(cid, 1, "Preparing", self.now)
            control.transaction_starting(f"s-{cid}-{self.now}", 1, WALL)
            engine.transaction_started(cid, 1, self.now)
            engine.status(cid, 1, "Charging", self.now)
        else:
            engine.transaction_stopped(cid, control.transaction_stopped(None), self.now)
            engine.status(cid, 1, "Available", self.now)

    @rule(cid=CID, amps=st.sampled_from([6.0, 16.0, 32.0]))
    def backend_sets_tx_default(self, cid: str, amps: float) -> None:
        """A backend TxDefaultProfile on its way (clamped under tx-default by the serving process). Under
        max-profile, before the proxy's ChargePointMaxProfile is known on the wallbox, the backend's doing
        within the wallbox's max_current count: an outside event (test_fuse_machine.py, same rule)."""
        proc, wallbox = self._proc_of(cid), self.wallboxes.get(cid)
        control = proc.coordinator.controls.get(cid) if proc is not None else None
        self.outside = control is not None and control.strategy == "max-profile" and not isinstance(control.own, tuple)
        if proc is None or wallbox is None or wallbox.backend_call is not None:
            return
        original = backend_payload(amps)
        out = proc.coordinator.rewrite(cid, f"b-{cid}-{self.now}", original, WALL)
        forwarded = out if out is not None else original
        wallbox.backend_call = (f"b-{cid}-{self.now}", original, float(
            forwarded["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"]))
        self._collect(proc)

    @precondition(lambda self: self._some(lambda w: w.backend_call is not None))
    @rule(cid=CID)
    def wallbox_answers_backend(self, cid: str) -> None:
        self.outside = False
        proc, wallbox = self._proc_of(cid), self.wallboxes.get(cid)
        if proc is None or wallbox is None or wallbox.backend_call is None:
            return
        backend_profile_accepted(wallbox, proc.coordinator, cid)
        self._collect(proc)

    # -- rules: the processes ----------------------------------------------------------------------

    @rule(name=PROC)
    def tick(self, name: str) -> None:
        self.outside = False
        proc = self.procs[name]
        if proc.running:
            self._dispatch(proc, proc.coordinator.tick(self.now, WALL))

    @rule(steps=st.sampled_from([1, 1, 2, 3, 8]))
    def time_passes(self, steps: int) -> None:
        """The clock moves; each running process renews, tries the site's lease, reads and writes records
        (recomputing is the ``tick`` rule's, so the two processes' decisions interleave in any order)."""
        self.outside = False
        for _ in range(steps):
            self.now += STEP
            for proc in self.procs.values():
                if proc.running:
                    self._keeper_round(proc)
                    self._site_round(proc)
                    self._refresh(proc)
                    self._flush(proc)

    @rule(name=PROC, reachable=st.booleans())
    def store_reachable(self, name: str, reachable: bool) -> None:
        """The process is cut off from the database (or back)."""
        self.outside = False
        self.procs[name].reachable = reachable

    @rule(name=PROC)
    def stall(self, name: str) -> None:
        """SIGSTOP: the process does nothing at all, its timers neither."""
        self.outside = False
        self.procs[name].stalled = True

    @precondition(lambda self: any(p.stalled for p in self.procs.values()))
    @rule(name=PROC)
    def wake(self, name: str) -> None:
        """SIGCONT: its renewal round runs first (its deadlines passed), then its sessions notice gone wallboxes."""
        self.outside = False
        proc = self.procs[name]
        if not proc.stalled:
            return
        proc.stalled = False
        self._keeper_round(proc)
        for cid in sorted(proc.coordinator.connected):
            if self.server.get(cid) != name:
                proc.coordinator.detach(cid, self.now)
                self._release(proc, cid)
        self._collect(proc)

    @rule(name=PROC, applied=st.booleans())
    def kill_and_restart(self, name: str, applied: bool) -> None:
        """kill -9: its sessions end, nothing released or written; it restarts under its own name."""
        self.outside = False
        for cid, server in self.server.items():
            if server == name:
                wallbox = self.wallboxes[cid]
                wallbox.connected, wallbox.lost_at, self.server[cid] = False, self.now, None
                if wallbox.inflight is not None and applied:
                    wallbox.apply(wallbox.inflight)
                wallbox.inflight = wallbox.backend_call = None
        self._start(name)

    @rule()
    def hold_passes(self) -> None:
        """Long enough for lost chargers to be released (they count no more, by decision)."""
        self.outside = False
        self.now += HOLD + 1
        for proc in self.procs.values():
            if proc.running:  # leases ran out long ago: the keepers close, as they would have in time
                for key in list(proc.held):
                    if proc.held[key] <= self.now:
                        self._lose(proc, key)
                self._site_round(proc)
                self._refresh(proc)

    # -- the invariants ----------------------------------------------------------------------------

    @invariant()
    def one_server_per_charger(self) -> None:
        if not self.procs:
            return
        believers: dict[str, list[str]] = {}
        for proc in self.procs.values():
            if not proc.running:
                continue
            for key, until in proc.held.items():
                believers.setdefault(key, []).append(proc.name)
                owner, expires = self.store.leases.get(key, ("", -math.inf))
                assert owner == proc.name and expires > self.now and until <= expires, (
                    f"{proc.name} believes it holds {key} until {until}, the store says {owner} until {expires}")
        assert all(len(names) == 1 for names in believers.values()), believers
        for cid, name in self.server.items():
            if name is not None and self.procs[name].running:
                assert cid in self.procs[name].held, f"{name} serves {cid} without its lease"

    @invariant()
    def one_site_owner(self) -> None:
        owners = [p.name for p in self.procs.values() if p.running and p.coordinator.site_owner]
        assert len(owners) <= 1, owners
        assert all(SITE in self.procs[name].held for name in owners)

    @invariant()
    def each_process_counts_what_its_chargers_may_draw(self) -> None:
        for cid, name in self.server.items():
            if name is None:
                continue
            truth = self.wallboxes[cid].may_draw(self.now)
            counted = self.procs[name].coordinator.fuse.may_draw(cid, self.now) / 10
            assert counted + 1e-9 >= truth, f"{name} counts {cid} at {counted} A, it may draw {truth} A"

    @invariant()
    def the_fuse_holds_across_both_processes(self) -> None:
        if not self.wallboxes:
            return
        total = [0.0, 0.0, 0.0]
        for wallbox in self.wallboxes.values():
            for ph in charger_phases(3, wallbox.limits):
                total[ph] += wallbox.may_draw(self.now)
        budget = self.site_limits.max_current
        if self.previous is not None and not self.outside:
            for ph in range(3):
                allowed = max(budget, self.previous[ph])
                assert total[ph] <= allowed + 1e-9, (
                    f"phase L{ph + 1}: {total[ph]} A may be drawn, fuse {budget} A (before: {self.previous[ph]} A)")
        self.previous = total


TestClusterMachine = ClusterMachine.TestCase
TestClusterMachine.settings = settings(max_examples=int(os.environ.get("CLUSTER_EXAMPLES", "300")),
                                       stateful_step_count=50, deadline=None)


def test_two_processes_that_both_see_room_never_both_grant_it() -> None:
    """The race the site lease exists for, step by step: each process has read the other's charger paused
    (0 A recorded) and 20 A of room; only the owner of the site's lease may hand it out."""
    machine = ClusterMachine()
    machine.setup(site=20, calm=True, chargers=[(16.0, 3, 1, "max-profile"), (16.0, 3, 1, "max-profile")])

    def check() -> None:
        machine.one_server_per_charger()
        machine.one_site_owner()
        machine.each_process_counts_what_its_chargers_may_draw()
        machine.the_fuse_holds_across_both_processes()

    machine.connect("CP1", "proxy-a")
    machine.connect("CP2", "proxy-b")
    for _ in range(3):
        machine.tick("proxy-a")
        machine.tick("proxy-b")
        check()
        machine.answer("CP1", "Accepted", True)
        machine.answer("CP2", "Accepted", True)
        check()
        machine.time_passes(2)  # both renew; proxy-a (first) takes the site; both read the records
        check()
    granted = {cid: wallbox.may_draw(machine.now) for cid, wallbox in machine.wallboxes.items()}
    assert granted == {"CP1": 16.0, "CP2": 0.0}, granted  # the owner's charger charges, the other waits
    assert machine.procs["proxy-a"].coordinator.site_owner and not machine.procs["proxy-b"].coordinator.site_owner


def _refused_max_profile_with_a_backend_default_on_its_way() -> ClusterMachine:
    """Counterexamples 1a/1b's common start: CP1 on proxy-a (max-profile, 10 A site), the backend's TxDefault 6 A
    forwarded unchanged (the proxy's ChargePointMaxProfile caps it), the wallbox applies that ChargePointMaxProfile
    and still answers Rejected: the proxy switches to tx-default while the 6 A profile may yet go in."""
    machine = ClusterMachine()
    machine.setup(site=10, calm=True, chargers=[(16.0, 1, 1, "max-profile"), (16.0, 1, 1, "max-profile")])
    _check_cluster(machine)
    machine.tick(name="proxy-a")
    machine.tick(name="proxy-a")
    machine.connect(cid="CP1", name="proxy-a")
    _check_cluster(machine)
    machine.tick(name="proxy-a")
    _check_cluster(machine)
    machine.backend_sets_tx_default(cid="CP1", amps=6.0)
    _check_cluster(machine)
    machine.apply_before_answering(cid="CP1")
    _check_cluster(machine)
    machine.answer(cid="CP1", outcome="Rejected", applied=False)
    _check_cluster(machine)
    return machine


def _check_cluster(machine: ClusterMachine) -> None:
    machine.each_process_counts_what_its_chargers_may_draw()
    machine.one_server_per_charger()
    machine.one_site_owner()
    machine.the_fuse_holds_across_both_processes()


def test_a_backend_default_on_its_way_counts_once_the_proxys_maximum_is_refused() -> None:
    """Hypothesis's counterexample 1a: the proxy's next CALL (its TxDefaultProfile, replacing its
    ChargePointMaxProfile by id) accepted, the backend's 6 A, still unanswered, may decide: it is counted."""
    machine = _refused_max_profile_with_a_backend_default_on_its_way()
    if machine.wallboxes["CP1"].inflight is not None:
        machine.answer(cid="CP1", outcome="Accepted", applied=False)
    _check_cluster(machine)
    assert machine.procs["proxy-a"].coordinator.fuse.may_draw("CP1", machine.now) >= 60
    machine.wallbox_answers_backend(cid="CP1")  # in force, then re-sent clamped to the local limit
    _check_cluster(machine)
    for _ in range(3):
        machine.tick(name="proxy-a")
        if machine.wallboxes["CP1"].inflight is not None:
            machine.answer(cid="CP1", outcome="Accepted", applied=False)
        _check_cluster(machine)
    assert machine.wallboxes["CP1"].may_draw(machine.now) == 0.0  # proxy-a does not own the site: paused


def test_the_proxys_default_never_lifts_its_refused_maximum_over_a_backend_default_on_its_way() -> None:
    """Hypothesis's counterexample 1b: had the proxy sent its TxDefaultProfile at once, the wallbox applying it
    would drop the ChargePointMaxProfile it applied though it refused it, and the backend's 6 A would decide
    (22 A on a 10 A fuse): the proxy waits for the backend profile's answer."""
    machine = _refused_max_profile_with_a_backend_default_on_its_way()
    machine.apply_before_answering(cid="CP1")
    _check_cluster(machine)
    machine.wallbox_answers_backend(cid="CP1")
    _check_cluster(machine)
    machine.tick(name="proxy-a")
    _check_cluster(machine)
    machine.apply_before_answering(cid="CP1")
    _check_cluster(machine)
