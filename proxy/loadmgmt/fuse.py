"""The fuse ledger (sans-IO): what each wallbox may be drawing, and which increases may go out.

The limit engine's targets add up to at most the headroom, but a target is a
decision, not the state of the wallboxes: between a SetChargingProfile and its
answer the wallbox still holds its old limit, a wallbox that lost its
connection keeps charging on its installed profile, and one that rejects a
decrease keeps the old value. :class:`Fuse` keeps, per charger, the highest
limit the wallbox may be applying and lets an increase out only where it fits
next to everyone else's. The invariant (docs/load-management.md, "The fuse
invariant"), per site phase::

    Σ over managed chargers of may_draw(c)  ≤  budget

* ``may_draw(c)`` = the highest of: ``held`` (the limit it last accepted; a limit whose answer was lost
  counts as applied; unknown, e.g. after a reboot or a backend Clear that may
  have removed the proxy's profile: its ``max_current``), ``pending`` (the
  proxy's limit sent and not answered) and ``backend_pending`` (a backend
  profile on its way, as forwarded). A lost charger keeps ``held`` until
  ``lost_charger_hold`` seconds pass. A charger without a car counts too: a car
  plugged in draws what is installed without asking anyone.
* ``budget`` = site limit (EMS-lowered) − house load, where the house load
  includes the lost chargers' reservations (the engine's, see
  :meth:`LimitEngine.reserve`).

Decreases never wait. :meth:`Fuse.grant` turns the engine's targets into what
each charger may be sent now: a decrease as is, an increase only up to the
room the others' ``may_draw`` leaves (so the engine's increase waits for the
decreases that make room to be Accepted). A decrease that is Rejected, unanswered or answered with a
CALLERROR keeps counting at the old value; the others share the rest.

Amperes are tenths (int), like the engine's, so sums are exact.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from proxy.loadmgmt.engine import ChargerLimits, charger_phases, expand, tenths_down, tenths_up, wallbox_groups

#: How long a lost charger keeps its reservation by default (``[site] lost_charger_hold``): 8 h,
#: a full charge of an 80 kWh battery at 11 kW, so a charger that keeps charging on its installed
#: profile while its connection is down is counted for as long as a car can charge.
LOST_HOLD = 28_800.0


@dataclass
class Slot:
    """One charger's reservation."""

    charger_id: str
    limits: ChargerLimits
    #: Highest limit the wallbox may have installed (tenths); None: unknown (its max_current).
    held: int | None = None
    #: The proxy's own limit sent, not answered yet.
    pending: int | None = None
    #: A backend profile forwarded (maybe clamped), not answered yet; -1: unknown (max_current).
    backend_pending: int | None = None
    connected: bool = False
    #: Since when it is lost (disconnected, or not seen since the proxy started).
    lost_at: float | None = None
    #: The last value handed to the durable store (tenths; None: max_current).
    recorded: int | None = None
    #: ``held`` is what the wallbox has (an accepted answer, a boot), not only an upper bound
    #: (a restored record, an answer that never came).
    exact: bool = False

    def peak(self) -> int:
        """max(held, pending, backend_pending), unknown = max_current."""
        top = tenths_up(self.limits.max_current)
        values = [top if self.held is None else self.held]
        if self.pending is not None:
            values.append(self.pending)
        if self.backend_pending is not None:
            values.append(top if self.backend_pending < 0 else self.backend_pending)
        return max(values)

    def floor(self) -> int:
        """What it surely may draw at least: a new limit up to this raises nothing on the wallbox."""
        if self.exact and self.held is not None and self.pending is None and self.backend_pending is None:
            return self.held
        return 0


@dataclass
class FuseStats:
    """Counted for metrics and logs."""

    #: Decreases not applied, by reason: rejected, error (CALLERROR), unanswered.
    failed_decreases: dict[str, int] = field(default_factory=dict)
    over_budget_seconds: float = 0.0


class Fuse:
    def __init__(self, phases: int = 3, hold: float = LOST_HOLD) -> None:
        self.phases = phases
        self.hold = hold
        self.default = ChargerLimits()
        #: Configured load points (a charger, or one connector of a multi-connector wallbox: ``CP001#2``).
        self._configured: dict[str, ChargerLimits] = {}
        #: Multi-connector wallbox → its index in the gate's room list (after the phases).
        self._groups: dict[str, int] = {}
        self._slots: dict[str, Slot] = {}
        self.stats = FuseStats()
        self._over_since: float | None = None
        self._unrecorded: set[str] = set()
        self._checked_at: float | None = None

    # -- configuration and restart ---------------------------------------------------------

    def configure(self, phases: int, chargers: Mapping[str, ChargerLimits], default: ChargerLimits,
                  hold: float) -> None:
        self.phases, self.hold, self.default = phases, hold, default
        self._configured = expand(chargers)
        self._groups = wallbox_groups(self._configured, phases)
        for charger_id, slot in self._slots.items():
            slot.limits = self._limits_for(charger_id)

    def restore(self, recorded: Mapping[str, float | None], now: float) -> None:
        """After a start: every managed charger not connected yet counts as lost since ``now``,
        at its recorded limit (None or absent: its max_current)."""
        for charger_id in set(recorded) | set(self._configured):
            slot = self._slot(charger_id)
            if slot.connected or not slot.limits.managed:
                continue
            amps = recorded.get(charger_id)
            slot.held = None if amps is None else tenths_up(amps)
            slot.recorded = slot.held
            slot.exact = False  # the record is an upper bound of what it holds
            slot.lost_at = now

    # -- several processes on one site (docs/cluster.md) ------------------------------------------

    def adopt(self, charger_id: str, recorded: float | None, known: bool = True) -> None:
        """This process takes over serving the charger: fold its shared record in as an upper bound.

        Another process may have served it since this one last did (and installed a
        higher limit, recorded before it was sent), so what this process remembers
        counts no more than the record: the higher of the two, not exact. ``known``
        False: no record at all (unknown: its max_current).
        """
        slot = self._slot(charger_id)
        if not slot.limits.managed:
            return
        top = tenths_up(slot.limits.max_current)
        record = top if not known or recorded is None else tenths_up(recorded)
        slot.held = max(top if slot.held is None else slot.held, record)
        slot.exact = False
        self._dirty(slot)

    def refresh(self, recorded: Mapping[str, float | None], elsewhere: Collection[str], now: float) -> None:
        """The site's shared records, read again: chargers this process does not serve count at them.

        A charger another process serves (``elsewhere``: it holds its lease) counts
        at that process's record, which is newer than anything this one knows, and
        for as long as it is served there. One nobody serves counts at the higher of
        its record and what this process knows (a write of its own may be on its way).
        """
        # Another process's charger counts here once it is this site's: configured, or recorded for the site.
        for charger_id in set(recorded) | (set(elsewhere) & set(self._configured)):
            slot = self._slot(charger_id)
            if slot.connected or not slot.limits.managed:
                continue
            amps = recorded.get(charger_id)
            record = tenths_up(slot.limits.max_current) if amps is None else tenths_up(amps)
            if charger_id in elsewhere:
                slot.held, slot.pending, slot.backend_pending = record, None, None
                slot.recorded, slot.exact, slot.lost_at = record, False, now
            elif charger_id in recorded:
                slot.held = max(slot.peak(), record)
                slot.exact = False
                self._dirty(slot)

    def _limits_for(self, charger_id: str) -> ChargerLimits:
        return self._configured.get(charger_id, self.default)

    def retire(self, charger_id: str) -> None:
        """A load point that no longer exists (the wallbox came back with another connector layout: its new
        load points count from now on, each at what it may hold or its max_current)."""
        self._slots.pop(charger_id, None)
        self._unrecorded.discard(charger_id)

    def _slot(self, charger_id: str) -> Slot:
        slot = self._slots.get(charger_id)
        if slot is None:
            slot = self._slots[charger_id] = Slot(charger_id, self._limits_for(charger_id))
        return slot

    # -- the wallbox's connection --------------------------------------------------------------

    def connected(self, charger_id: str, now: float) -> None:
        """A (re)connect: its installed profile is still what it was (a reboot says otherwise)."""
        slot = self._slot(charger_id)
        self._fold(slot)
        slot.connected = True
        slot.lost_at = None

    def disconnected(self, charger_id: str, now: float) -> None:
        """Lost: it keeps charging on whatever it may have installed."""
        slot = self._slot(charger_id)
        self._fold(slot)
        slot.connected = False
        slot.lost_at = now

    def installed(self, charger_id: str, amps: float | None) -> None:
        """What the proxy now knows the wallbox holds (None: unknown or uncapped → max_current)."""
        slot = self._slot(charger_id)
        slot.held = None if amps is None else tenths_up(amps)
        slot.exact = True
        self._dirty(slot)

    # -- the proxy's own limits ------------------------------------------------------------------------

    def sent(self, charger_id: str, amps: float | None) -> bool:
        """The proxy sends a limit (None: one whose effect is unknown, e.g. a Clear).

        Returns whether the durable record goes up with it: then it must be
        written before the frame leaves (a restart must count the higher value).
        """
        slot = self._slot(charger_id)
        slot.pending = tenths_up(slot.limits.max_current) if amps is None else tenths_up(amps)
        before = slot.recorded
        self._dirty(slot)
        peak = slot.peak()
        return before is not None and peak > before

    def is_decrease(self, charger_id: str) -> bool:
        slot = self._slot(charger_id)
        return slot.pending is not None and slot.pending < (
            tenths_up(slot.limits.max_current) if slot.held is None else slot.held)

    def accepted(self, charger_id: str, holding: float | None, known: bool = True) -> None:
        """Accepted: the wallbox holds ``holding`` now (what the proxy computes it has); not
        ``known``: the sent limit may add to what was there (the higher counts)."""
        slot = self._slot(charger_id)
        if not known:
            self._fold_own(slot)
            return
        slot.pending = None
        slot.held = None if holding is None else tenths_up(holding)
        slot.exact = True
        self._dirty(slot)

    def refused(self, charger_id: str, reason: str) -> bool:
        """Rejected or CALLERROR: nothing changed on the wallbox. Returns whether it was a decrease."""
        slot = self._slot(charger_id)
        decrease = self.is_decrease(charger_id)
        slot.pending = None
        if decrease:
            self._count(reason)
        self._dirty(slot)
        return decrease

    def unanswered(self, charger_id: str, reason: str = "unanswered") -> bool:
        """No answer: it may have applied the new limit or kept the old one (the higher counts)."""
        slot = self._slot(charger_id)
        decrease = self.is_decrease(charger_id)
        self._fold_own(slot)
        if decrease:
            self._count(reason)
        return decrease

    def withdrawn(self, charger_id: str) -> None:
        """The limit was never sent after all (its record could not be written)."""
        slot = self._slot(charger_id)
        slot.pending = None
        self._dirty(slot)

    def _count(self, reason: str) -> None:
        self.stats.failed_decreases[reason] = self.stats.failed_decreases.get(reason, 0) + 1

    # -- backend profiles forwarded (tx-default) -------------------------------------------------------

    def backend_sent(self, charger_id: str, amps: float | None) -> None:
        """A backend profile goes to the wallbox; ``amps``: its highest limit as forwarded (None: unknown)."""
        slot = self._slot(charger_id)
        value = -1 if amps is None else tenths_up(amps)
        old = slot.backend_pending
        if old is None:
            slot.backend_pending = value
        elif old < 0 or value < 0:
            slot.backend_pending = -1
        else:
            slot.backend_pending = max(old, value)
        self._dirty(slot)

    def backend_answered(self, charger_id: str, holding: float | None, known: bool = True) -> None:
        """The wallbox answered a backend profile CALL; ``holding`` as in :meth:`accepted`."""
        slot = self._slot(charger_id)
        if known:
            slot.backend_pending = None
            slot.held = None if holding is None else tenths_up(holding)
            slot.exact = True
            self._dirty(slot)
        else:
            self._fold_backend(slot)

    # -- queries -----------------------------------------------------------------------------------------

    def may_draw(self, charger_id: str, now: float) -> int:
        """Tenths per phase this charger may be drawing now."""
        slot = self._slots.get(charger_id)
        if slot is None or not slot.limits.managed:
            return 0
        if slot.connected:
            return slot.peak()
        if slot.lost_at is not None and now - slot.lost_at < self.hold:
            return slot.peak()
        return 0

    def floor(self, charger_id: str) -> int:
        """Tenths it surely may draw (0 unless known exactly): a limit up to this raises nothing on it."""
        slot = self._slots.get(charger_id)
        return 0 if slot is None else slot.floor()

    def lost(self, now: float) -> dict[str, float]:
        """Lost chargers still holding a reservation: amps each (for the engine's house load)."""
        return {cid: self.may_draw(cid, now) / 10 for cid, slot in self._slots.items()
                if not slot.connected and self.may_draw(cid, now) > 0}

    def next_event(self, now: float) -> float | None:
        """When a lost charger's hold ends (its reservation goes)."""
        times = [slot.lost_at + self.hold for slot in self._slots.values()
                 if not slot.connected and slot.lost_at is not None and now < slot.lost_at + self.hold]
        return min(times, default=None)

    def reserved(self, now: float) -> list[int]:
        """Per site phase: Σ may_draw of the connected managed chargers (tenths)."""
        out = [0] * self.phases
        for charger_id, slot in self._slots.items():
            if not slot.connected:
                continue
            amount = self.may_draw(charger_id, now)
            for ph in charger_phases(self.phases, slot.limits):
                out[ph] += amount
        return out

    def unconfirmed(self, charger_id: str, wanted: float | None, now: float) -> float:
        """Amps reserved beyond what the proxy wants the charger to have (waiting for confirmation)."""
        want = 0 if wanted is None else tenths_down(wanted)
        return max(0, self.may_draw(charger_id, now) - want) / 10

    # -- the gate ----------------------------------------------------------------------------------------

    def grant(self, targets: Mapping[str, float], budget: list[int], now: float) -> dict[str, float]:
        """What each charger may be sent now: its target when that is no increase over what it may
        draw, else as much of the increase as the room on its phases allows.

        ``budget``: per site phase, tenths, for the connected managed chargers. Room goes by
        priority (highest first), then id.
        """
        room = [b - r for b, r in zip(budget, self.reserved(now))] + self._wallbox_room(now)
        granted: dict[str, float] = {}
        increases: list[str] = []
        for charger_id, target in targets.items():
            slot = self._slots.get(charger_id)
            if slot is None or not slot.connected:
                granted[charger_id] = target
                continue
            want = tenths_down(target)
            if want > slot.peak():
                increases.append(charger_id)
            elif want <= slot.floor() or all(room[ph] >= 0 for ph in self._resources(slot)):
                granted[charger_id] = target  # a decrease (or no change): never waits
            else:
                # Below what the fuse counts, but maybe above what the wallbox has (its count is an
                # upper bound, e.g. a restored record) while the phase is over budget: it could
                # raise the real draw, so it waits for room like an increase and keeps what it surely has.
                granted[charger_id] = slot.floor() / 10
        increases.sort(key=lambda cid: (-self._slots[cid].limits.priority, cid))
        for charger_id in increases:
            granted[charger_id] = self._grant_increase(charger_id, tenths_down(targets[charger_id]), room) / 10
        return granted

    def fits(self, charger_id: str, amps: float | None, budget: list[int], now: float) -> bool:
        """Whether sending ``amps`` (None: unknown, its max_current) raises nothing past the room left now.

        The gate's grant was decided at the last recomputation; the room may have gone since (a wallbox back
        after its reservation was released counts at its maximum again), so an increase is checked again
        right before it leaves. A decrease (or no change) always fits."""
        slot = self._slots.get(charger_id)
        if slot is None or not slot.connected or not slot.limits.managed:
            return True
        want = tenths_up(slot.limits.max_current) if amps is None else tenths_up(amps)
        current = slot.peak()
        if want <= current:
            return True
        room = [b - r for b, r in zip(budget, self.reserved(now))] + self._wallbox_room(now)
        return all(room[ph] >= want - current for ph in self._resources(slot))

    def _grant_increase(self, charger_id: str, want: int, room: list[int]) -> int:
        """As much of an increase as fits: the charger's own reservation counts as its room."""
        slot = self._slots[charger_id]
        phases = self._resources(slot)
        current = slot.peak()
        top = min(want, current + min((room[ph] for ph in phases), default=0))
        if current == 0 and top < tenths_up(slot.limits.min_current):
            top = 0  # below its minimum a car cannot charge: it stays paused
        if top <= current:
            return current  # no room: it keeps what it has (and what is on its way)
        for ph in phases:
            room[ph] -= top - current
        return top

    def _resources(self, slot: Slot) -> frozenset[int]:
        """The room entries a load point uses: its site phases, and its wallbox's maximum (connectors)."""
        phases = charger_phases(self.phases, slot.limits)
        group = self._groups.get(slot.limits.wallbox) if slot.limits.wallbox else None
        return phases if group is None else phases | {group}

    def _wallbox_room(self, now: float) -> list[int]:
        """Per multi-connector wallbox: its max_current − what its connectors may draw together. The wallbox
        stays bounded by its own maximum at every instant, as the site by its fuse."""
        room = [0] * len(self._groups)
        for name, index in self._groups.items():
            top = next(lim.wallbox_max for lim in self._configured.values() if lim.wallbox == name)
            room[index - self.phases] = tenths_down(top)
        for charger_id, slot in self._slots.items():
            group = self._groups.get(slot.limits.wallbox) if slot.limits.wallbox else None
            if group is not None:
                room[group - self.phases] -= self.may_draw(charger_id, now)
        return room

    def wallbox_draw(self, wallbox: str, now: float) -> int:
        """Tenths per phase a multi-connector wallbox's connectors may draw together."""
        return sum(self.may_draw(cid, now) for cid, slot in self._slots.items() if slot.limits.wallbox == wallbox)

    # -- over budget and the durable record ------------------------------------------------------------------

    def check(self, budget: list[int], now: float) -> bool:
        """Whether the reservations exceed the budget now; accumulates ``over_budget_seconds``."""
        over = any(r > b for r, b in zip(self.reserved(now), budget))
        if self._over_since is not None and self._checked_at is not None:
            self.stats.over_budget_seconds += max(0.0, now - self._checked_at)
        self._over_since = now if over else None
        self._checked_at = now
        return over

    def records(self) -> tuple[dict[str, float], bool]:
        """Changed durable values (amps), for the store, and whether one went up (a restart must
        see that soon; one that went down may wait); marks them handed over."""
        out: dict[str, float] = {}
        raised = False
        for charger_id in sorted(self._unrecorded):
            slot = self._slots[charger_id]
            top = slot.peak()
            raised = raised or (slot.recorded is not None and top > slot.recorded)
            slot.recorded = top
            out[charger_id] = top / 10
        self._unrecorded.clear()
        return out, raised

    def charger_ids(self) -> list[str]:
        return sorted(self._slots)

    def slot(self, charger_id: str) -> Slot | None:
        return self._slots.get(charger_id)

    # -- internals ----------------------------------------------------------------------------------------

    def _dirty(self, slot: Slot) -> None:
        if slot.peak() != slot.recorded:
            self._unrecorded.add(slot.charger_id)
        else:
            self._unrecorded.discard(slot.charger_id)

    def _fold_own(self, slot: Slot) -> None:
        if slot.pending is not None:
            held = tenths_up(slot.limits.max_current) if slot.held is None else slot.held
            slot.held = max(held, slot.pending)
            slot.pending = None
            slot.exact = False
        self._dirty(slot)

    def _fold(self, slot: Slot) -> None:
        """Answers that will never come: whatever was sent may have been applied."""
        self._fold_own(slot)
        self._fold_backend(slot)

    def _fold_backend(self, slot: Slot) -> None:
        if slot.backend_pending is not None:
            held = tenths_up(slot.limits.max_current) if slot.held is None else slot.held
            slot.held = None if slot.backend_pending < 0 else max(held, slot.backend_pending)
            slot.backend_pending = None
            slot.exact = False
        self._dirty(slot)
