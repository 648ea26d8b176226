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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from proxy.loadmgmt.control import TX_STRATEGY, UNKNOWN, Command, Control, ControlSettings
from proxy.loadmgmt.engine import LimitEngine
from proxy.loadmgmt.fuse import Fuse
from proxy.loadmgmt.profiles import TX_DEFAULT, TX_PROFILE, ProfileError, parse_set, peak_amps


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
        self._waiting = False

    # -- the wallboxes' lives ----------------------------------------------------------------

    def control(self, charger_id: str, settings: ControlSettings) -> Control:
        control = self.controls.get(charger_id)
        if control is None:
            control = self.controls[charger_id] = Control(charger_id, settings)
        return control

    def attach(self, charger_id: str, settings: ControlSettings, now: float) -> Control:
        control = self.control(charger_id, settings)
        control.wallbox_connected(now)
        self.connected.add(charger_id)
        self.fuse.connected(charger_id, now)
        self.engine.charger_connected(charger_id, now)
        return control

    def detach(self, charger_id: str, now: float) -> None:
        self.connected.discard(charger_id)
        self.granted.pop(charger_id, None)
        self.controls[charger_id].wallbox_disconnected()
        self.fuse.disconnected(charger_id, now)
        self.engine.charger_disconnected(charger_id, now)
        self.engine.reserve(charger_id, self.fuse.may_draw(charger_id, now) / 10, now)

    def sync(self, charger_id: str) -> None:
        """After a frame changed what the proxy knows is on the wallbox (Boot, a backend profile)."""
        holding = self.controls[charger_id].holding()
        if holding is not UNKNOWN:
            self.fuse.installed(charger_id, holding if isinstance(holding, float) else None)

    def rewrite(self, charger_id: str, msg_id: str, payload: Any, wall: datetime) -> dict[str, Any] | None:
        """A backend SetChargingProfile on its way to a wallbox: under tx-default clamped to the local
        limit (None: forwarded unchanged) and counted by the fuse, as forwarded, from now."""
        control = self.controls[charger_id]
        out = control.rewrite(msg_id, payload, wall)
        try:
            _, profile = parse_set(out if out is not None else payload)
        except ProfileError:
            return out  # the wallbox will refuse it
        if profile.purpose in (TX_DEFAULT, TX_PROFILE) and control.strategy == TX_STRATEGY:
            # (under max-profile the proxy's ChargePointMaxProfile caps whatever the backend installs)
            self.fuse.backend_sent(charger_id, peak_amps(profile, control.settings.phases, control.settings.voltage))
        return out

    def backend_answered(self, charger_id: str) -> None:
        """The wallbox answered a backend SetChargingProfile/ClearChargingProfile (after the control saw it)."""
        holding = self.controls[charger_id].holding()
        if holding is UNKNOWN:
            self.fuse.backend_answered(charger_id, None, known=False)
        else:
            self.fuse.backend_answered(charger_id, holding if isinstance(holding, float) else None)

    # -- deciding ---------------------------------------------------------------------------------

    def tick(self, now: float, wall: datetime) -> list[Outgoing]:
        """Recompute: targets through the gate, then each wallbox's next CALL (decreases first)."""
        engine, fuse = self.engine, self.fuse
        for charger_id in self.connected:
            engine.backend_limit(charger_id, self.controls[charger_id].backend_limit(wall), now)
        for charger_id in fuse.charger_ids():
            if charger_id not in self.connected:
                engine.reserve(charger_id, fuse.may_draw(charger_id, now) / 10, now)
        self.targets = engine.targets(now) if self.active else {}
        budget = engine.budget(now)
        self.granted = fuse.grant(self.targets, budget, now) if self.active else {}
        self._waiting = any(self.granted.get(cid, 0.0) < target for cid, target in self.targets.items())
        order = sorted(self.connected, key=lambda cid: (not self._lowers(cid, now), cid))
        out: list[Outgoing] = []
        for charger_id in order:
            self.controls[charger_id].set_local(self.granted.get(charger_id))
            outgoing = self.next(charger_id, now, wall)
            if outgoing is not None:
                out.append(outgoing)
        self.over_budget = fuse.check(budget, now)
        return out

    def waiting(self) -> bool:
        """At the last recomputation a charger was granted less than its target: an increase waits for room."""
        return self._waiting

    def _lowers(self, charger_id: str, now: float) -> bool:
        granted = self.granted.get(charger_id)
        return granted is not None and granted * 10 < self.fuse.may_draw(charger_id, now)

    def next(self, charger_id: str, now: float, wall: datetime) -> Outgoing | None:
        """The wallbox's next CALL, if any (one at a time: its control waits for the answer)."""
        command = self.controls[charger_id].next_command(now, wall)
        if command is None:
            return None
        record_first = self.fuse.sent(charger_id, command.amps)
        return Outgoing(charger_id, command, record_first, self.fuse.is_decrease(charger_id))

    # -- answers --------------------------------------------------------------------------------------

    def answered(self, charger_id: str, command: Command, status: str | None, error: str | None,
                 now: float) -> bool:
        """The wallbox answered the proxy's CALL. Returns whether a decrease was refused."""
        control = self.controls[charger_id]
        current = command.generation == control.generation
        control.answered(command, status, error, now)
        if not current:
            self.fuse.unanswered(charger_id, "stale")
            return False
        if status == "Accepted" or (command.kind == "clear" and status == "Unknown"):
            holding = control.holding()
            if holding is UNKNOWN:
                self.fuse.unanswered(charger_id, "accepted")  # what it holds is unknown: the higher counts
            else:
                self.fuse.accepted(charger_id, holding if isinstance(holding, float) else None)
            return False
        return self.fuse.refused(charger_id, "rejected" if status is not None else "error")

    def failed(self, charger_id: str, command: Command, reason: str, now: float) -> bool:
        """No answer (timeout, connection gone). Returns whether it was a decrease."""
        self.controls[charger_id].failed(command, reason, now)
        return self.fuse.unanswered(charger_id)

    def withdrawn(self, charger_id: str, command: Command, reason: str, now: float) -> None:
        """The CALL was not sent (its reservation could not be recorded): tried again after the backoff."""
        self.controls[charger_id].failed(command, reason, now)
        self.fuse.withdrawn(charger_id)

    # -- views ------------------------------------------------------------------------------------------

    def reservations(self, now: float, charger_ids: Iterable[str] | None = None) -> dict[str, Reservation]:
        out = {}
        for charger_id in charger_ids if charger_ids is not None else self.fuse.charger_ids():
            wanted = self.granted.get(charger_id) if charger_id in self.connected else None
            out[charger_id] = Reservation(self.fuse.may_draw(charger_id, now) / 10, wanted,
                                          self.fuse.unconfirmed(charger_id, wanted, now))
        return out

    def next_event(self, now: float) -> float | None:
        times = [t for t in (self.engine.next_event(now), self.fuse.next_event(now)) if t is not None]
        times += [t for cid in self.connected if (t := self.controls[cid].next_event()) is not None]
        return min(times, default=None)
