"""The limit engine, the fuse and the profile controls together (sans-IO).

The trio driver (:mod:`proxy.loadmgmt.driver`) owns sockets, timers and the
store; this object owns the decisions, so the whole chain from an input to the
CALLs it causes is testable without sockets (``tests/unit/test_fuse_machine.py``):

* :meth:`Coordinator.tick`: the engine's targets pass the fuse's gate
  (:meth:`Fuse.grant`) before they become each wallbox's local limit, so an
  increase waits for the decreases that make room for it; decreases come first
  in the returned list.
* Every CALL is recorded in the fuse before it leaves (:class:`Outgoing`) and
  every answer, refusal or silence after, so a charger's reservation is never
  below what it may apply.
* Lost chargers keep their reservation in the fuse; the engine counts it as
  house load (:meth:`LimitEngine.reserve`) so the others are planned around it.
* Engine and fuse reason in load points: a charger, or each configured connector of a
  multi-connector wallbox (``CP001#2``, :func:`~proxy.loadmgmt.engine.load_points`). Controls
  stay one per wallbox (one CALL at a time on its connection); each command says which load
  points it changes (:meth:`Coordinator.affected`), and only those are counted by the fuse.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from proxy.loadmgmt.control import MAX_STRATEGY, TX_STRATEGY, UNKNOWN, Command, Control, ControlSettings, _Unknown
from proxy.loadmgmt.engine import POINT_SEP, LimitEngine, point_id
from proxy.loadmgmt.fuse import Fuse
from proxy.loadmgmt.profiles import TX_DEFAULT, TX_PROFILE, Kept, ProfileError, parse_set, peak_amps


@dataclass(frozen=True)
class Outgoing:
    """A CALL to send to a wallbox."""

    charger_id: str
    command: Command
    #: The durable record of the charger's reservation must be written before the frame leaves.
    record_first: bool
    #: It lowers what the wallbox may draw (never waits for anything).
    decrease: bool


@dataclass(frozen=True)
class Reservation:
    """One charger's part of the fuse, for metrics and logs."""

    may_draw: float
    wanted: float | None
    unconfirmed: float


class Coordinator:
    def __init__(self, engine: LimitEngine, fuse: Fuse) -> None:
        self.engine = engine
        self.fuse = fuse
        self.controls: dict[str, Control] = {}
        self.connected: set[str] = set()
        #: What each connected charger was last allowed (the fuse's grant of the engine's target).
        self.granted: dict[str, float] = {}
        self.targets: dict[str, float] = {}
        self.over_budget = False
        self.active = True
        #: This process holds the site's lease (docs/cluster.md); without it every charger it serves is
        #: paused: it cannot know what the site's owner grants, so it grants nothing.
        self.site_owner = True
        self._waiting = False
        #: The durable record's backend profiles of wallboxes without a control yet (:meth:`restore_kept`).
        self._kept: dict[str, list[Kept]] = {}

    # -- the wallboxes' lives ----------------------------------------------------------------

    def control(self, charger_id: str, settings: ControlSettings) -> Control:
        control = self.controls.get(charger_id)
        if control is None:
            control = self.controls[charger_id] = Control(charger_id, settings)
            control.restore_kept(self._kept.pop(charger_id, []))
        return control

    def kept(self, charger_id: str) -> list[Kept]:
        """The backend profiles that may be on the wallbox, for the durable record (:meth:`Control.kept`)."""
        control = self.controls.get(charger_id)
        return control.kept() if control is not None else list(self._kept.get(charger_id, []))

    def restore_kept(self, charger_id: str, pairs: list[Kept]) -> None:
        """The durable record's backend profiles of a wallbox (a proxy restart, or its lease moved here): maybe
        installed (:meth:`Control.restore_kept`), from the moment its control exists."""
        control = self.controls.get(charger_id)
        if control is None:
            waiting = self._kept.setdefault(charger_id, [])
            waiting += [pair for pair in pairs if pair not in waiting]
        else:
            control.restore_kept(pairs)

    def points(self, charger_id: str) -> list[tuple[str, int]]:
        """(load point, connector) of a charger: itself (connector 0), or its configured connectors."""
        return self.engine.points(charger_id)

    def attach(self, charger_id: str, settings: ControlSettings, now: float) -> Control:
        control = self.control(charger_id, settings)
        control.wallbox_connected(now)
        if not self.site_owner:  # nothing granted here: a backend profile is clamped to 0 from the start
            control.set_local(0.0)
            control.set_connector_limits(dict.fromkeys(control.settings.connectors, 0.0))
        self.connected.add(charger_id)
        points = self.points(charger_id)
        self._retire_other_layouts(charger_id, [pid for pid, _ in points], now)
        for pid, _ in points:
            self.fuse.connected(pid, now)
        control.undecided = {connector: self.fuse.floor(pid) / 10 for pid, connector in points}
        self.engine.charger_connected(charger_id, now)
        return control

    def _retire_other_layouts(self, charger_id: str, points: list[str], now: float) -> None:
        """The wallbox is back with another connector layout (a reload changed it): its old load points go;
        its new ones count at what they may hold (first contact: their max_current) from now on."""
        for old in self.fuse.charger_ids():
            if (old == charger_id or old.startswith(charger_id + POINT_SEP)) and old not in points:
                self.fuse.retire(old)
                self.engine.reserve(old, 0.0, now)

    def detach(self, charger_id: str, now: float) -> None:
        self.connected.discard(charger_id)
        points = self.points(charger_id)
        for pid, _ in points:
            self.granted.pop(pid, None)
        self.controls[charger_id].wallbox_disconnected()
        for pid, _ in points:
            self.fuse.disconnected(pid, now)
        self.engine.charger_disconnected(charger_id, now)
        for pid, _ in points:
            self.engine.reserve(pid, self.fuse.may_draw(pid, now) / 10, now)

    @staticmethod
    def _holding(control: Control, connector: int) -> float | None | _Unknown:
        return control.holding_at(connector) if connector else control.holding()

    def sync(self, charger_id: str) -> None:
        """After a frame changed what the proxy knows is on the wallbox (Boot, a backend profile)."""
        control = self.controls[charger_id]
        for pid, connector in self.points(charger_id):
            holding = self._holding(control, connector)
            if not isinstance(holding, _Unknown):
                self.fuse.installed(pid, holding)

    def rewrite(self, charger_id: str, msg_id: str, payload: Any, wall: datetime) -> dict[str, Any] | None:
        """A backend SetChargingProfile on its way to a wallbox: under tx-default clamped to the local
        limit (None: forwarded unchanged) and counted by the fuse, as forwarded, from now."""
        control = self.controls[charger_id]
        out = control.rewrite(msg_id, payload, wall)
        try:
            _, profile = parse_set(out if out is not None else payload)
        except ProfileError:
            return out  # the wallbox will refuse it
        peak = peak_amps(profile, control.settings.phases, control.settings.voltage)
        if control.per_connector:
            # counted on the connectors where it may decide over the proxy's TxDefaultProfile
            connector = _connector_of(out if out is not None else payload)
            for n in control.clamp_connectors(connector, profile):
                self.fuse.backend_sent(point_id(charger_id, n), peak)
        elif profile.purpose in (TX_DEFAULT, TX_PROFILE) and control.strategy == TX_STRATEGY:
            self.fuse.backend_sent(charger_id, peak)
        elif profile.purpose in (TX_DEFAULT, TX_PROFILE) and control.strategy == MAX_STRATEGY \
                and control.settings.managed and control.connected:
            # the proxy's ChargePointMaxProfile caps it, unless the wallbox refuses that before this is
            # answered: remembered, and counted by the fuse if the strategy switches (_uncapped)
            control.uncapped[msg_id] = (peak, wall)
        return out

    def backend_answered(self, charger_id: str) -> None:
        """The wallbox answered a backend SetChargingProfile/ClearChargingProfile (after the control saw it)."""
        control = self.controls[charger_id]
        for pid, connector in self.points(charger_id):
            holding = self._holding(control, connector)
            if isinstance(holding, _Unknown):
                self.fuse.backend_answered(pid, None, known=False)
            else:
                self.fuse.backend_answered(pid, holding)
        self._uncapped(charger_id)  # the others still on their way count on

    def _uncapped(self, charger_id: str) -> None:
        """The strategy switched to tx-default (the wallbox refused the proxy's ChargePointMaxProfile, or the
        backend outranked it): backend profiles forwarded uncapped and not answered yet may now decide what the
        wallbox draws, so the fuse counts them from here until their answer (as forwarded, like tx-default's)."""
        control = self.controls[charger_id]
        if control.strategy != TX_STRATEGY or control.per_connector:
            return
        for peak, _ in control.uncapped.values():  # again after every answer: backend_sent keeps the highest
            self.fuse.backend_sent(charger_id, peak)

    # -- deciding ---------------------------------------------------------------------------------

    def tick(self, now: float, wall: datetime) -> list[Outgoing]:
        """Recompute: targets through the gate, then each wallbox's next CALL (decreases first)."""
        engine, fuse = self.engine, self.fuse
        connected_points: set[str] = set()
        for charger_id in self.connected:
            control = self.controls[charger_id]
            for pid, connector in self.points(charger_id):
                connected_points.add(pid)
                limit = control.backend_limit_at(connector, wall) if connector else control.backend_limit(wall)
                engine.backend_limit(charger_id, limit, now, connector=connector)
        for pid in fuse.charger_ids():
            if pid not in connected_points:
                engine.reserve(pid, fuse.may_draw(pid, now) / 10, now)
        self.targets = engine.targets(now) if self.active else {}
        budget = engine.budget(now)
        if not self.site_owner:
            self.targets = dict.fromkeys(self.targets, 0.0)
        room = budget if self.site_owner else [0] * len(budget)
        self.granted = fuse.grant(self.targets, room, now) if self.active else {}
        self._waiting = any(self.granted.get(cid, 0.0) < target for cid, target in self.targets.items())
        order = sorted(self.connected, key=lambda cid: (not self._lowers(cid, now), cid))
        out: list[Outgoing] = []
        for charger_id in order:
            self._set_limits(charger_id)
            outgoing = self.next(charger_id, now, wall)
            if outgoing is not None:
                out.append(outgoing)
        self.over_budget = fuse.check(budget, now)
        return out

    def waiting(self) -> bool:
        """At the last recomputation a charger was granted less than its target: an increase waits for room."""
        return self._waiting

    def _set_limits(self, charger_id: str) -> None:
        """The granted limits into the wallbox's control: one, or one per connector load point (then the
        wallbox's own profile on connector 0 carries its max_current, under the backend's maximum)."""
        control = self.controls[charger_id]
        if not control.per_connector:
            control.set_local(self.granted.get(charger_id))
            return
        limits = {connector: self.granted.get(pid) for pid, connector in self.points(charger_id) if connector}
        control.set_connector_limits(limits)
        decided = any(v is not None for v in limits.values())
        control.set_local(self.engine.wallbox_max(charger_id) if decided else None)

    def _lowers(self, charger_id: str, now: float) -> bool:
        for pid, _ in self.points(charger_id):
            granted = self.granted.get(pid)
            if granted is not None and granted * 10 < self.fuse.may_draw(pid, now):
                return True
        return False

    def affected(self, charger_id: str, command: Command) -> list[tuple[str, int]]:
        """The load points (with their connector) whose may-draw a command changes. A wallbox that is one
        load point: always itself. Connector load points: the connector's own profile, or a backend profile
        re-sent where it may decide; the ChargePointMaxProfile only lowers, and is not counted."""
        control = self.controls[charger_id]
        if not control.per_connector:
            return [(charger_id, 0)]
        if command.kind == "restore":
            assert command.installed is not None
            connectors = control.clamp_connectors(command.installed.connector, command.installed.profile)
        else:
            connectors = [command.connector] if command.connector else []
        return [(point_id(charger_id, n), n) for n in connectors]

    def counting(self, charger_id: str, command: Command, now: float) -> float:
        """What the fuse counts (A) for the load points a command is about (for logs)."""
        return sum(self.fuse.may_draw(pid, now) for pid, _ in self.affected(charger_id, command)) / 10

    def next(self, charger_id: str, now: float, wall: datetime) -> Outgoing | None:
        """The wallbox's next CALL, if any (one at a time: its control waits for the answer).

        An increase the last recomputation granted waits for the next one when the room has gone since
        (:meth:`Fuse.fits`): the driver asks for the next CALL after every answer, between recomputations."""
        control = self.controls[charger_id]
        planned = control.peek(now, wall)
        if planned is None:
            return None
        if self.active and not self._fits(charger_id, planned, now):
            self._waiting = True
            return None
        command = control.take(planned)
        if command is None:
            return None
        points = self.affected(charger_id, command)
        record_first = False
        for pid, _ in points:
            record_first = self.fuse.sent(pid, command.amps) or record_first
        decrease = bool(points) and all(self.fuse.is_decrease(pid) for pid, _ in points)
        return Outgoing(charger_id, command, record_first, decrease)

    def _fits(self, charger_id: str, command: Command, now: float) -> bool:
        """A limit (or a backend profile re-sent clamped) that raises a load point past the room left waits; a
        Clear of the proxy's own profile is not a grant (its effect is unknown: counted at the maximum)."""
        if command.amps is None:
            return True
        budget = self.engine.budget(now) if self.site_owner else [0] * self.fuse.phases
        return all(self.fuse.fits(pid, command.amps, budget, now) for pid, _ in self.affected(charger_id, command))

    # -- answers --------------------------------------------------------------------------------------

    def answered(self, charger_id: str, command: Command, status: str | None, error: str | None,
                 now: float) -> bool:
        """The wallbox answered the proxy's CALL. Returns whether a decrease was refused."""
        control = self.controls[charger_id]
        current = command.generation == control.generation
        points = self.affected(charger_id, command)
        control.answered(command, status, error, now)
        self._uncapped(charger_id)
        if not current:
            for pid, _ in points:
                self.fuse.unanswered(pid, "stale")
            return False
        if status == "Accepted" or (command.kind == "clear" and status == "Unknown"):
            for pid, connector in points:
                holding = self._holding(control, connector)
                if isinstance(holding, _Unknown):
                    self.fuse.unanswered(pid, "accepted")  # what it holds is unknown: the higher counts
                else:
                    self.fuse.accepted(pid, holding)
            return False
        refused = [self.fuse.refused(pid, "rejected" if status is not None else "error") for pid, _ in points]
        return any(refused)

    def failed(self, charger_id: str, command: Command, reason: str, now: float) -> bool:
        """No answer (timeout, connection gone). Returns whether it was a decrease."""
        points = self.affected(charger_id, command)
        self.controls[charger_id].failed(command, reason, now)
        return any([self.fuse.unanswered(pid) for pid, _ in points])

    def withdrawn(self, charger_id: str, command: Command, reason: str, now: float) -> None:
        """The CALL was not sent (its reservation could not be recorded): tried again after the backoff."""
        points = self.affected(charger_id, command)
        self.controls[charger_id].failed(command, reason, now)
        for pid, _ in points:
            self.fuse.withdrawn(pid)

    # -- views ------------------------------------------------------------------------------------------

    def reservations(self, now: float, charger_ids: Iterable[str] | None = None) -> dict[str, Reservation]:
        out = {}
        for charger_id in charger_ids if charger_ids is not None else self.fuse.charger_ids():
            wallbox = charger_id.split(POINT_SEP, 1)[0]
            wanted = self.granted.get(charger_id) if wallbox in self.connected else None
            out[charger_id] = Reservation(self.fuse.may_draw(charger_id, now) / 10, wanted,
                                          self.fuse.unconfirmed(charger_id, wanted, now))
        return out

    def next_event(self, now: float) -> float | None:
        times = [t for t in (self.engine.next_event(now), self.fuse.next_event(now)) if t is not None]
        times += [t for cid in self.connected if (t := self.controls[cid].next_event()) is not None]
        return min(times, default=None)


def _connector_of(payload: Any) -> int:
    connector = payload.get("connectorId") if isinstance(payload, dict) else None
    return connector if isinstance(connector, int) and not isinstance(connector, bool) else 0
