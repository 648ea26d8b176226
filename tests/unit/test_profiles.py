"""Charging profiles: parsing, the OCPP 1.6 composite limit, conversion, building, clamping."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from proxy.messages.ocppj import classify
from proxy.loadmgmt.profiles import (
    MAX_PROFILE,
    TX_DEFAULT,
    TX_PROFILE,
    ClearRequest,
    Installed,
    ProfileError,
    Transaction,
    build_profile,
    clamp,
    clear_payload,
    composite_limit,
    decode_kept,
    encode_kept,
    from_amps,
    parse_clear,
    parse_profile,
    parse_set,
    replace_payload,
    replaces,
    set_payload,
    to_amps,
    validate,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def profile(pid: int, level: int, purpose: str, *limits: float, unit: str = "A", kind: str = "Absolute",
            tx: int | None = None, **extra: Any) -> dict[str, Any]:
    periods = [{"startPeriod": 3600 * i, "limit": limit} for i, limit in enumerate(limits)]
    schedule: dict[str, Any] = {"chargingRateUnit": unit, "chargingSchedulePeriod": periods}
    if kind == "Absolute":
        schedule["startSchedule"] = "2026-11-25T11:30:00Z"
    schedule.update(extra.pop("schedule", {}))
    raw: dict[str, Any] = {"chargingProfileId": pid, "stackLevel": level, "chargingProfilePurpose": purpose,
                           "chargingProfileKind": kind, "chargingSchedule": schedule, **extra}
    if tx is not None:
        raw["transactionId"] = tx
    return raw


def installed(connector: int, raw: dict[str, Any]) -> Installed:
    return Installed(connector, parse_profile(raw), NOW - timedelta(minutes=1))


def test_parse_and_reject_bad_profiles() -> None:
    connector, parsed = parse_set({"connectorId": 1, "csChargingProfiles": profile(7, 2, TX_DEFAULT, 16, 10)})
    assert (connector, parsed.id, parsed.stack_level, parsed.purpose) == (1, 7, 2, TX_DEFAULT)
    assert [p.limit for p in parsed.periods] == [16.0, 10.0]
    for bad in ({}, {"connectorId": 1}, {"connectorId": "x", "csChargingProfiles": profile(1, 0, TX_DEFAULT, 6)},
                {"connectorId": 1, "csChargingProfiles": profile(1, 0, "Nonsense", 6)},
                {"connectorId": 1, "csChargingProfiles": profile(1, 0, TX_DEFAULT, -1)}):
        with pytest.raises(ProfileError):
            parse_set(bad)


def test_composite_stack_levels_purposes_and_cap() -> None:
    items = [installed(0, profile(1, 0, TX_DEFAULT, 20)), installed(0, profile(2, 3, TX_DEFAULT, 12)),
             installed(1, profile(3, 1, TX_DEFAULT, 14))]
    assert composite_limit(items, NOW) == 12  # highest stack level among TxDefault
    tx = Transaction(1, 42, NOW - timedelta(minutes=5))
    items.append(installed(1, profile(4, 0, TX_PROFILE, 25, tx=42)))
    assert composite_limit(items, NOW, transactions=[tx]) == 25  # TxProfile beats TxDefault
    assert composite_limit(items, NOW) == 12  # ... only while its transaction runs
    items.append(installed(0, profile(5, 0, MAX_PROFILE, 18)))
    assert composite_limit(items, NOW, transactions=[tx]) == 18  # ChargePointMaxProfile caps
    items.append(installed(1, profile(6, 1, TX_PROFILE, 8, tx=99)))
    assert composite_limit(items, NOW, transactions=[tx]) == 18  # another transaction's profile


def test_schedules_in_time() -> None:
    two = installed(0, profile(1, 0, MAX_PROFILE, 20, 10))  # 20 A from 11:30, 10 A from 12:30
    assert composite_limit([two], NOW) == 20
    assert composite_limit([two], NOW + timedelta(hours=1)) == 10
    later = installed(0, profile(2, 5, MAX_PROFILE, 6, validFrom="2026-11-25T13:00:00Z"))
    assert composite_limit([two, later], NOW) == 20  # not valid yet: the lower level applies
    assert composite_limit([two, later], NOW + timedelta(hours=2)) == 6
    short = installed(0, profile(3, 9, MAX_PROFILE, 4, schedule={"duration": 600}))
    assert composite_limit([two, short], NOW) == 20  # 11:30 + 10 min is over
    relative = installed(1, profile(4, 0, TX_PROFILE, 10, 7, kind="Relative"))
    tx = Transaction(1, None, NOW - timedelta(hours=2))
    assert composite_limit([relative], NOW, transactions=[tx]) == 7
    assert composite_limit([], NOW) is None


def test_watts_and_amps() -> None:
    assert to_amps(11040, "W", 3) == 16.0
    assert to_amps(3680, "W", 1) == 16.0
    assert from_amps(16, "W", 3) == 11040.0
    assert from_amps(10.55, "A", 3) == 10.5
    watts = installed(0, profile(1, 0, MAX_PROFILE, 7000, unit="W"))
    assert composite_limit([watts], NOW) == 10.1  # 7000 / 690 = 10.14 → down
    assert composite_limit([watts], NOW, charger_phases=1) == 30.4
    # Never above the W limit after conversion, for any phase count.
    for phases in (1, 2, 3):
        amps = to_amps(7000, "W", phases)
        assert amps * 230 * phases <= 7000


def test_replacement_rule() -> None:
    a = installed(0, profile(1, 2, TX_DEFAULT, 10))
    assert replaces(installed(1, profile(9, 2, TX_DEFAULT, 6)), a)  # same purpose + stack level
    assert replaces(installed(0, profile(1, 5, MAX_PROFILE, 6)), a)  # same id
    assert not replaces(installed(0, profile(2, 2, MAX_PROFILE, 6)), a)


def test_clear_matching() -> None:
    ours = installed(0, profile(990001, 8, MAX_PROFILE, 10))
    theirs = installed(1, profile(5, 1, TX_DEFAULT, 16))
    assert ClearRequest().empty and ClearRequest().matches(ours) and ClearRequest().matches(theirs)
    by_purpose = parse_clear({"chargingProfilePurpose": MAX_PROFILE})
    assert by_purpose.matches(ours) and not by_purpose.matches(theirs)
    by_id = parse_clear({"id": 5})
    assert by_id.matches(theirs) and not by_id.matches(ours) and not by_id.may_match(ours)
    by_connector = parse_clear({"connectorId": 0, "chargingProfilePurpose": TX_DEFAULT})
    assert not by_connector.matches(ours) and by_connector.may_match(ours)  # some wallboxes OR criteria
    assert clear_payload(990001) == {"id": 990001}


def test_proxy_profile_is_schema_valid_in_both_units() -> None:
    for unit in ("A", "W"):
        built = build_profile(990001, 8, MAX_PROFILE, 10.37, unit=unit, phases=3, now=NOW)
        validate("SetChargingProfile", set_payload(0, built))
        assert built["chargingSchedule"]["startSchedule"] == "2026-11-24T00:00:00Z"
        limit = built["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"]
        assert limit == (10.3 if unit == "A" else 7155.3)
    with pytest.raises(ProfileError):
        validate("SetChargingProfile", {"connectorId": 0})
    validate("ClearChargingProfile", clear_payload(3))


def test_clamp_changes_only_limits_above_the_local_limit() -> None:
    raw = profile(7, 1, TX_DEFAULT, 32, 10, 20)
    clamped = clamp(raw, 16)
    assert [p["limit"] for p in clamped["chargingSchedule"]["chargingSchedulePeriod"]] == [16, 10, 16]
    assert raw["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"] == 32  # a copy
    watts = clamp(profile(8, 1, TX_PROFILE, 22000, unit="W"), 16)
    assert watts["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"] == 11040.0
    assert clamp(raw, 40) == raw


def test_replace_payload_keeps_prefix_and_tail_bytes() -> None:
    text = ' [2 , "b\\"1" ,\n"SetChargingProfile", {"connectorId":1,"csChargingProfiles":{"x":"}]"}} ]\n'
    out = replace_payload(text, {"connectorId": 1, "csChargingProfiles": {"limit": 16}})
    assert out == ' [2 , "b\\"1" ,\n"SetChargingProfile", {"connectorId":1,"csChargingProfiles":{"limit":16}} ]\n'
    frame = classify(out)
    assert frame.msg_id == 'b"1' and frame.action == "SetChargingProfile" and frame.problem is None
    assert json.loads(out)[3]["csChargingProfiles"] == {"limit": 16}


def test_kept_profiles_round_trip_through_their_record_text() -> None:
    """The durable record's text of the backend profiles that may be on a wallbox (decode_kept(encode_kept(...))):
    each pair's connector, both install times, both versions (the backend's and the clamped one, raw objects
    included, for re-sending); anything else is a ProfileError."""
    backend = parse_profile(profile(77, 20, TX_DEFAULT, 16, 32, kind="Relative"))
    sent = parse_profile(clamp(backend.raw, 10.0))
    later = NOW + timedelta(minutes=5)
    whole = Installed(0, backend, NOW)
    pairs = [(Installed(1, backend, NOW), Installed(1, sent, later)), (whole, whole)]
    text = encode_kept(pairs)
    again = decode_kept(text)
    assert again == pairs
    assert [dict(s.profile.raw) for _, s in again] == [dict(sent.raw), dict(backend.raw)]
    assert [s.profile.periods[-1].limit for _, s in again] == [10.0, 32.0]
    assert [s.installed_at for _, s in again] == [later, NOW]
    assert decode_kept(encode_kept([])) == []
    odd = '[{"connector":1,"at":"x","sent_at":"x","backend":{},"sent":{}}]'
    for bad in ("", "{", "[1]", '[{"connector": 1}]', "7", odd):
        with pytest.raises(ProfileError):
            decode_kept(bad)
