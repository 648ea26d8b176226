"""A backend profile forwarded unchanged under max-profile, while the wallbox refuses the proxy's
ChargePointMaxProfile (docs/load-management.md, strategies): counted from the switch, and the proxy's own
TxDefaultProfile waits for its answer, at most UNCAPPED_WAIT (tests/unit/test_cluster_machine.py has the
state machine and the counterexamples; this pins the bookkeeping the driver relies on)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from proxy.loadmgmt.control import UNCAPPED_WAIT, ControlSettings
from proxy.loadmgmt.coordinator import Coordinator
from proxy.loadmgmt.engine import ChargerLimits, LimitEngine, SiteLimits
from proxy.loadmgmt.fuse import Fuse, Slot
from tests.unit.test_fuse_machine import WALL, backend_payload


def _refused_with_a_backend_default_on_its_way() -> tuple[Coordinator, dict[str, Any]]:
    limits = {"CP1": ChargerLimits(max_current=16.0, min_current=6.0, phases=1)}
    fuse = Fuse(phases=3, hold=600.0)
    fuse.configure(3, limits, ChargerLimits(), 600.0)
    coordinator = Coordinator(LimitEngine(SiteLimits(max_current=10.0, phases=3), limits), fuse)
    control = coordinator.attach("CP1", ControlSettings(phases=1), 0.0)
    control.wallbox_call()
    control.status(1)
    coordinator.engine.status("CP1", 1, "Charging", 0.0)
    (sent,) = coordinator.tick(0.0, WALL)  # the proxy's ChargePointMaxProfile
    original = backend_payload(6.0)
    assert coordinator.rewrite("CP1", "b1", original, WALL) is None  # max-profile: forwarded unchanged
    assert set(control.uncapped) == {"b1"}
    coordinator.answered("CP1", sent.command, "Rejected", None, 0.0)  # (it may have applied it all the same)
    assert control.strategy == "tx-default"
    return coordinator, original


def _slot(coordinator: Coordinator) -> Slot:
    slot = coordinator.fuse.slot("CP1")
    assert slot is not None
    return slot


def test_counted_from_the_switch_and_the_proxys_default_waits_for_its_answer() -> None:
    coordinator, _ = _refused_with_a_backend_default_on_its_way()
    assert _slot(coordinator).backend_pending == 60
    assert coordinator.next("CP1", 0.0, WALL) is None  # its TxDefaultProfile would replace the maximum by id
    later = coordinator.next("CP1", 0.0, WALL + timedelta(seconds=UNCAPPED_WAIT))
    assert later is not None and later.command.payload["csChargingProfiles"]["chargingProfilePurpose"] \
        == "TxDefaultProfile"  # bounded: an answer that never comes does not hold the limit back for ever


def test_a_callerror_ends_the_wait_and_the_restore_goes_first_after_acceptance() -> None:
    coordinator, _ = _refused_with_a_backend_default_on_its_way()
    control = coordinator.controls["CP1"]
    control.backend_set_answered("b1", None, None, WALL)  # the driver's CALLERROR path
    coordinator.backend_answered("CP1")
    assert control.uncapped == {} and _slot(coordinator).backend_pending is None
    coordinator2, original2 = _refused_with_a_backend_default_on_its_way()
    control2 = coordinator2.controls["CP1"]
    control2.backend_set_answered("b1", original2, "Accepted", WALL)
    coordinator2.backend_answered("CP1")
    assert coordinator2.fuse.may_draw("CP1", 0.0) >= 60  # the backend's 6 A counts until re-sent clamped
    first = coordinator2.next("CP1", 0.0, WALL)
    assert first is not None and first.command.kind == "restore" and first.command.amps == 0.0
