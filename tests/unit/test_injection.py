"""The per-wallbox profile control: which CALL the proxy sends, and when not."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from proxy.loadmgmt.control import (
    BOOT_WAIT,
    UNKNOWN,
    Command,
    Control,
    ControlSettings,
    read_meter_values,
)
from proxy.loadmgmt.profiles import MAX_PROFILE, TX_DEFAULT, TX_PROFILE

WALL = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
PID = 990001


def ready_control(**settings: Any) -> Control:
    control = Control("CP1", ControlSettings(**settings))
    control.wallbox_connected(0.0)
    control.wallbox_call()  # e.g. a Heartbeat: booted already
    return control


def limit_of(command: Command) -> float:
    return float(command.payload["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"])


def purpose_of(command: Command) -> str:
    return str(command.payload["csChargingProfiles"]["chargingProfilePurpose"])


def accept(control: Control, command: Command | None, now: float = 1.0) -> Command:
    assert command is not None
    control.answered(command, "Accepted", None, now)
    return command


def backend_profile(pid: int, level: int, purpose: str, limit: float, connector: int = 0,
                    tx: int | None = None) -> dict[str, Any]:
    profile: dict[str, Any] = {
        "chargingProfileId": pid, "stackLevel": level, "chargingProfilePurpose": purpose,
        "chargingProfileKind": "Relative",
        "chargingSchedule": {"chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}]}}
    if tx is not None:
        profile["transactionId"] = tx
    return {"connectorId": connector, "csChargingProfiles": profile}


def test_waits_for_boot_then_installs_once_and_skips_unchanged() -> None:
    control = Control("CP1", ControlSettings())
    control.wallbox_connected(0.0)
    control.set_local(10.0)
    control.boot(0.0)
    assert control.next_command(1.0, WALL) is None  # BootNotification not answered yet
    control.boot_answered("Accepted")
    command = accept(control, control.next_command(1.0, WALL))
    assert command.action == "SetChargingProfile" and command.payload["connectorId"] == 0
    assert purpose_of(command) == MAX_PROFILE and limit_of(command) == 10.0
    assert command.payload["csChargingProfiles"]["chargingProfileId"] == PID
    assert command.payload["csChargingProfiles"]["stackLevel"] == 8
    assert control.next_command(2.0, WALL) is None  # unchanged: nothing to send
    control.set_local(10.04)
    assert control.next_command(2.0, WALL) is None  # same after rounding to 0.1 A
    control.set_local(6.0)
    assert limit_of(accept(control, control.next_command(3.0, WALL))) == 6.0


def test_boot_rejected_or_unanswered() -> None:
    control = Control("CP1", ControlSettings())
    control.wallbox_connected(0.0)
    control.set_local(10.0)
    control.boot(1.0)
    control.boot_answered("Rejected")
    assert control.next_command(100.0, WALL) is None  # never to a rejected wallbox
    control.boot(101.0)
    assert control.next_command(102.0, WALL) is None
    assert control.next_command(101.0 + BOOT_WAIT, WALL) is not None  # the backend never answered


def test_without_boot_a_wallbox_is_ready_after_the_wait() -> None:
    control = Control("CP1", ControlSettings())
    control.wallbox_connected(0.0)
    control.set_local(10.0)
    assert control.next_command(1.0, WALL) is None
    assert control.next_event() == BOOT_WAIT
    assert control.next_command(BOOT_WAIT, WALL) is not None


def test_one_call_at_a_time_and_stale_answers_ignored() -> None:
    control = ready_control()
    control.set_local(10.0)
    first = control.next_command(1.0, WALL)
    assert first is not None
    control.set_local(8.0)
    assert control.next_command(1.0, WALL) is None  # first still in flight
    control.wallbox_connected(2.0)  # reconnect: the old answer means nothing now
    control.wallbox_call()
    control.answered(first, "Accepted", None, 2.0)
    assert control.own is UNKNOWN
    assert limit_of(accept(control, control.next_command(2.0, WALL))) == 8.0


def test_backend_max_profile_lowers_the_proxy_profile() -> None:
    control = ready_control()
    control.set_local(16.0)
    accept(control, control.next_command(1.0, WALL))
    control.backend_set_answered("b1", backend_profile(5, 1, MAX_PROFILE, 10.0), "Accepted", WALL)
    assert control.backend_limit(WALL) == 10.0
    assert limit_of(accept(control, control.next_command(2.0, WALL))) == 10.0
    # A backend Tx/TxDefault does not change the proxy's ChargePointMaxProfile:
    # the wallbox takes the minimum itself.
    control.backend_set_answered("b2", backend_profile(6, 0, TX_DEFAULT, 6.0), "Accepted", WALL)
    assert control.backend_limit(WALL) == 6.0
    assert control.next_command(3.0, WALL) is None
    # Rejected backend profiles are not tracked.
    control.backend_set_answered("b3", backend_profile(7, 2, MAX_PROFILE, 4.0), "Rejected", WALL)
    assert control.backend_limit(WALL) == 6.0


def test_backend_clear_that_hits_the_proxy_profile_reinstalls_it() -> None:
    control = ready_control()
    control.set_local(12.0)
    accept(control, control.next_command(1.0, WALL))
    control.backend_clear_answered({"id": 5}, "Accepted")  # someone else's
    assert control.next_command(2.0, WALL) is None
    control.backend_clear_answered({"chargingProfilePurpose": MAX_PROFILE}, "Unknown")  # matched nothing
    assert control.next_command(2.0, WALL) is None
    control.backend_clear_answered({"chargingProfilePurpose": MAX_PROFILE}, "Accepted")
    again = control.next_command(3.0, WALL)
    assert again is not None and limit_of(again) == 12.0 and purpose_of(again) == MAX_PROFILE
    accept(control, again)
    control.backend_clear_answered({}, "Accepted")  # an empty Clear wipes everything
    assert control.next_command(4.0, WALL) is not None


def test_backend_profile_with_proxy_level_replaces_it_and_is_put_back() -> None:
    control = ready_control()
    control.set_local(12.0)
    accept(control, control.next_command(1.0, WALL))
    control.backend_set_answered("b1", backend_profile(5, 8, MAX_PROFILE, 20.0), "Accepted", WALL)
    again = control.next_command(2.0, WALL)
    assert again is not None and limit_of(again) == 12.0


def test_rejected_max_profile_switches_to_tx_default() -> None:
    control = ready_control()
    control.set_local(10.0)
    rejected = control.next_command(1.0, WALL)
    assert rejected is not None
    control.answered(rejected, "Rejected", None, 1.0)
    assert control.strategy == "tx-default" and control.rewrites
    assert [n.event for n in control.drain_notes()] == ["strategy_switched"]
    own = accept(control, control.next_command(2.0, WALL))
    assert purpose_of(own) == TX_DEFAULT and limit_of(own) == 10.0
    assert own.payload["csChargingProfiles"]["stackLevel"] == 0
    assert own.payload["csChargingProfiles"]["chargingProfileId"] == PID


def test_callerror_not_supported_also_switches() -> None:
    control = ready_control()
    control.set_local(10.0)
    command = control.next_command(1.0, WALL)
    assert command is not None
    control.answered(command, None, "NotSupported", 1.0)
    assert control.strategy == "tx-default"


def test_tx_default_clamps_rewrites_and_restores_backend_profiles() -> None:
    control = ready_control(strategy="tx-default")
    control.set_local(10.0)
    own = accept(control, control.next_command(1.0, WALL))
    assert purpose_of(own) == TX_DEFAULT
    # A backend TxDefault at 16 A is clamped on its way to the wallbox.
    call = backend_profile(7, 2, TX_DEFAULT, 16.0)
    rewritten = control.rewrite("b1", call, WALL)
    assert rewritten is not None
    assert rewritten["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"] == 10.0
    assert rewritten["csChargingProfiles"]["chargingProfileId"] == 7  # only the limit changes
    control.backend_set_answered("b1", call, "Accepted", WALL)
    assert control.backend_limit(WALL) == 16.0  # the backend's own intent
    # The backend has a TxDefault now: the proxy's own goes (by id only).
    clear = accept(control, control.next_command(2.0, WALL))
    assert clear.action == "ClearChargingProfile" and clear.payload == {"id": PID}
    assert control.next_command(3.0, WALL) is None
    # The local limit rises: the backend's profile is re-sent with the new clamp.
    control.set_local(12.0)
    restore = accept(control, control.next_command(4.0, WALL))
    assert restore.kind == "restore" and restore.payload["connectorId"] == 0
    assert restore.payload["csChargingProfiles"]["chargingProfileId"] == 7 and limit_of(restore) == 12.0
    control.set_local(20.0)  # above the backend's: its own limit, unclamped
    assert limit_of(accept(control, control.next_command(5.0, WALL))) == 16.0
    assert control.next_command(6.0, WALL) is None
    # Profiles below the local limit are forwarded untouched.
    assert control.rewrite("b2", backend_profile(8, 3, TX_DEFAULT, 6.0), WALL) is None
    # ChargePointMaxProfile frames are never rewritten.
    assert control.rewrite("b3", backend_profile(9, 1, MAX_PROFILE, 32.0), WALL) is None


def test_tx_profile_ends_with_its_transaction() -> None:
    control = ready_control(strategy="tx-default")
    control.set_local(10.0)
    accept(control, control.next_command(1.0, WALL))
    control.transaction_starting("s1", 1, WALL)
    control.transaction_started("s1", 77)
    call = backend_profile(3, 0, TX_PROFILE, 32.0, connector=1, tx=77)
    assert control.rewrite("b1", call, WALL) is not None
    control.backend_set_answered("b1", call, "Accepted", WALL)
    assert control.backend_limit(WALL) == 32.0
    assert control.next_command(2.0, WALL) is None
    assert control.transaction_stopped(77) == 1
    assert control.backend_limit(WALL) is None


def test_disable_clear_removes_only_the_proxy_profile() -> None:
    control = ready_control()
    control.set_local(10.0)
    accept(control, control.next_command(1.0, WALL))
    control.backend_set_answered("b1", backend_profile(5, 1, TX_DEFAULT, 16.0), "Accepted", WALL)
    control.configure(ControlSettings(managed=False))
    control.set_local(None)
    clear = accept(control, control.next_command(2.0, WALL))
    assert clear.payload == {"id": PID}  # never empty, never by purpose or connector
    assert control.next_command(3.0, WALL) is None
    # A reconnect: the wallbox may have kept the profile from before; clear again once.
    control.wallbox_connected(4.0)
    control.wallbox_call()
    assert accept(control, control.next_command(4.0, WALL)).payload == {"id": PID}
    assert control.next_command(5.0, WALL) is None


def test_lost_answer_retries_later() -> None:
    control = ready_control(retry=5.0)
    control.set_local(10.0)
    command = control.next_command(1.0, WALL)
    assert command is not None
    control.failed(command, "timeout", 31.0)
    assert control.next_command(32.0, WALL) is None
    assert control.next_event() == 36.0
    assert control.next_command(36.0, WALL) is not None


def test_watts_profile_for_wallboxes_that_want_watts() -> None:
    control = ready_control(unit="W", phases=1)
    control.set_local(16.0)
    command = control.next_command(1.0, WALL)
    assert command is not None
    assert command.payload["csChargingProfiles"]["chargingSchedule"]["chargingRateUnit"] == "W"
    assert limit_of(command) == 3680.0


def test_meter_values_reading() -> None:
    payload = {"connectorId": 1, "meterValue": [{"timestamp": "2026-11-25T10:00:00Z", "sampledValue": [
        {"value": "15.9", "measurand": "Current.Import", "phase": "L1", "unit": "A"},
        {"value": "16.1", "measurand": "Current.Import", "phase": "L2", "unit": "A"},
        {"value": "11.0", "measurand": "Power.Active.Import", "unit": "kW"},
        {"value": "2935.6", "unit": "kWh"},
        {"value": "OCMF|{...}|{...}", "format": "SignedData"},
        {"value": "x", "measurand": "Current.Import", "phase": "L3"}]}]}
    meter = read_meter_values(payload)
    assert meter.currents == (15.9, 16.1, 0.0)
    assert meter.power_w == 11000.0 and meter.energy_wh == 2935600.0
    single = read_meter_values({"meterValue": [{"sampledValue": [{"value": "8", "measurand": "Current.Import"}]}]},
                               charger_phases=1)
    assert single.currents == (8.0, 0.0, 0.0)
    assert read_meter_values({"meterValue": "nonsense"}).currents is None


def test_backend_max_profile_above_the_proxy_level_switches_to_tx_default() -> None:
    control = ready_control(stack_level=8)
    control.set_local(10.0)
    accept(control, control.next_command(1.0, WALL))
    control.backend_set_answered("b1", backend_profile(5, 9, MAX_PROFILE, 32.0), "Accepted", WALL)
    # Its profile outranks the proxy's on the wallbox: the local limit must go through Tx/TxDefault.
    assert control.strategy == "tx-default"
    assert [n.event for n in control.drain_notes()] == ["strategy_switched"]
    own = accept(control, control.next_command(2.0, WALL))
    assert purpose_of(own) == TX_DEFAULT and limit_of(own) == 10.0


def test_clamped_backend_profile_also_gets_the_local_transaction_id() -> None:
    """tx-default clamping and offline transaction-id mapping both apply to one frame."""
    import json as _json

    from proxy.loadmgmt.profiles import replace_payload
    from proxy.core.session import PRIMARY, Session, Tap, ToWallbox

    control = ready_control(strategy="tx-default")
    control.set_local(10.0)

    def rewriter(source: str, destination: str, frame: Any) -> str:
        payload = control.rewrite(frame.msg_id, _json.loads(frame.text)[3], WALL)
        return frame.text if payload is None else replace_payload(frame.text, payload)

    session = Session("CP1", taps={"limiter": Tap(rewriters={"SetChargingProfile": rewriter})},
                      transactions={-1: 4711})
    call = _json.dumps([2, "b1", "SetChargingProfile", backend_profile(3, 0, TX_PROFILE, 32.0, connector=1, tx=4711)])
    sent = [a.text for a in session.from_upstream(PRIMARY, call, 0.0) if isinstance(a, ToWallbox)]
    profile = _json.loads(sent[0])[3]["csChargingProfiles"]
    assert profile["transactionId"] == -1  # the id the wallbox knows
    assert profile["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"] == 10.0  # and clamped
