"""OCPP 1.6 charging profiles: model, composite limit, building and clamping (sans-IO).

The proxy reads charging profiles for one reason: to know the limit a
profile puts on a charger, so that the wallbox ends up with
min(backend's limit, local limit). It parses SetChargingProfile and
ClearChargingProfile payloads (never other frames' content), evaluates the
OCPP 1.6 composite limit at a point in time, builds its own profiles and,
under the ``tx-default`` strategy only, clamps the backend's Tx/TxDefault
profiles.

Composite (OCPP 1.6 section 3.13): within one purpose the valid profile with
the highest stackLevel wins; a TxProfile of the running transaction beats
TxDefaultProfiles; the ChargePointMaxProfile result caps the Tx/TxDefault
result. A profile with the same chargingProfileId, or the same purpose and
stackLevel, replaces an installed one.

Units: A per phase, or W for the whole charger; W ↔ A with the voltage and
the number of phases (the period's ``numberPhases``, at most the charger's
phases, default 3). Conversions round down to one decimal, so no limit ever
exceeds the one it came from in either unit.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

MAX_PROFILE = "ChargePointMaxProfile"
TX_DEFAULT = "TxDefaultProfile"
TX_PROFILE = "TxProfile"
PURPOSES = (MAX_PROFILE, TX_DEFAULT, TX_PROFILE)
DEFAULT_VOLTAGE = 230.0

_RECURRENCE = {"Daily": 86_400, "Weekly": 7 * 86_400}


class ProfileError(ValueError):
    """A payload that is not a usable charging profile (the frame is still forwarded)."""


@dataclass(frozen=True)
class Period:
    start: int
    limit: float
    phases: int | None = None


@dataclass(frozen=True)
class Profile:
    id: int
    stack_level: int
    purpose: str
    kind: str
    unit: str
    periods: tuple[Period, ...]
    transaction_id: int | None = None
    recurrency: str | None = None
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    start_schedule: datetime | None = None
    duration: int | None = None
    #: The csChargingProfiles object as received, for re-sending it (clamped).
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Installed:
    """A profile on one connector of a wallbox (0 = the whole charge point)."""

    connector: int
    profile: Profile
    installed_at: datetime


@dataclass(frozen=True)
class Transaction:
    connector: int
    transaction_id: int | None
    started: datetime


# --- parsing ------------------------------------------------------------------------

def parse_time(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProfileError(f"not a date-time: {value!r}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise ProfileError(f"not a date-time: {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_time(moment: datetime) -> str:
    """An OCPP dateTime in UTC, whole seconds (what the schemas and most backends expect)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _int(obj: Mapping[str, Any], key: str, required: bool = True) -> int | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ProfileError(f"{key} must be an integer, got {value!r}")
    return int(value)


def parse_profile(obj: Any) -> Profile:
    """A csChargingProfiles object → Profile (raises ProfileError)."""
    if not isinstance(obj, dict):
        raise ProfileError("csChargingProfiles is not an object")
    purpose = obj.get("chargingProfilePurpose")
    if purpose not in PURPOSES:
        raise ProfileError(f"unknown chargingProfilePurpose {purpose!r}")
    schedule = obj.get("chargingSchedule")
    if not isinstance(schedule, dict):
        raise ProfileError("chargingSchedule is not an object")
    unit = schedule.get("chargingRateUnit")
    if unit not in ("A", "W"):
        raise ProfileError(f"unknown chargingRateUnit {unit!r}")
    raw_periods = schedule.get("chargingSchedulePeriod")
    if not isinstance(raw_periods, list) or not raw_periods:
        raise ProfileError("chargingSchedulePeriod is empty")
    periods = []
    for item in raw_periods:
        if not isinstance(item, dict):
            raise ProfileError("a chargingSchedulePeriod is not an object")
        limit = item.get("limit")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0:
            raise ProfileError(f"limit must be a number ≥ 0, got {limit!r}")
        periods.append(Period(_int(item, "startPeriod") or 0, float(limit), _int(item, "numberPhases", False)))
    return Profile(
        id=_int(obj, "chargingProfileId") or 0,
        stack_level=_int(obj, "stackLevel") or 0,
        purpose=purpose,
        kind=str(obj.get("chargingProfileKind", "Absolute")),
        unit=unit,
        periods=tuple(sorted(periods, key=lambda p: p.start)),
        transaction_id=_int(obj, "transactionId", False),
        recurrency=obj.get("recurrencyKind"),
        valid_from=parse_time(obj.get("validFrom")),
        valid_to=parse_time(obj.get("validTo")),
        start_schedule=parse_time(schedule.get("startSchedule")),
        duration=_int(schedule, "duration", False),
        raw=obj,
    )


def parse_set(payload: Any) -> tuple[int, Profile]:
    """SetChargingProfile.req → (connectorId, profile)."""
    if not isinstance(payload, dict):
        raise ProfileError("payload is not an object")
    connector = _int(payload, "connectorId")
    return connector or 0, parse_profile(payload.get("csChargingProfiles"))


#: A backend Tx/TxDefault profile that may be on a wallbox: (the backend's own, the version that may be there,
#: maybe clamped). What the durable record keeps over a proxy restart (docs/load-management.md, "The backend's
#: profiles over a restart").
Kept = tuple[Installed, Installed]


def encode_kept(pairs: Iterable[Kept]) -> str:
    """``pairs`` as JSON text for the durable record: each profile as received or sent (its raw object), with
    its connector and when it was installed (a Relative schedule counts from then)."""
    return json.dumps([{"connector": origin.connector, "at": origin.installed_at.isoformat(),
                        "sent_at": sent.installed_at.isoformat(), "backend": dict(origin.profile.raw),
                        "sent": dict(sent.profile.raw)} for origin, sent in pairs],
                      separators=(",", ":"), sort_keys=True)


def decode_kept(text: str) -> list[Kept]:
    """:func:`encode_kept`'s text back (raises ProfileError on anything else)."""
    try:
        items = json.loads(text)
        pairs: list[Kept] = []
        for item in items:
            connector = int(item["connector"])
            pairs.append((Installed(connector, parse_profile(item["backend"]), datetime.fromisoformat(item["at"])),
                          Installed(connector, parse_profile(item["sent"]), datetime.fromisoformat(item["sent_at"]))))
    except (ValueError, TypeError, KeyError) as exc:  # ProfileError is a ValueError
        raise ProfileError(f"not a record of kept profiles: {exc}") from exc
    return pairs


@dataclass(frozen=True)
class ClearRequest:
    """ClearChargingProfile.req criteria (all None: clear every profile)."""

    id: int | None = None
    connector: int | None = None
    purpose: str | None = None
    stack_level: int | None = None

    @property
    def empty(self) -> bool:
        return self.id is None and self.connector is None and self.purpose is None and self.stack_level is None

    def matches(self, installed: Installed) -> bool:
        """The profiles a wallbox clears: by id, else by every criterion given."""
        if self.id is not None:
            return installed.profile.id == self.id
        return ((self.connector is None or installed.connector == self.connector)
                and (self.purpose is None or installed.profile.purpose == self.purpose)
                and (self.stack_level is None or installed.profile.stack_level == self.stack_level))

    def may_match(self, installed: Installed) -> bool:
        """Wallboxes differ (some OR the criteria): could this Clear have removed it?"""
        profile = installed.profile
        return (self.empty or self.matches(installed) or self.id == profile.id
                or self.connector == installed.connector or self.purpose == profile.purpose
                or self.stack_level == profile.stack_level)


def parse_clear(payload: Any) -> ClearRequest:
    if not isinstance(payload, dict):
        raise ProfileError("payload is not an object")
    purpose = payload.get("chargingProfilePurpose")
    if purpose is not None and purpose not in PURPOSES:
        raise ProfileError(f"unknown chargingProfilePurpose {purpose!r}")
    return ClearRequest(_int(payload, "id", False), _int(payload, "connectorId", False), purpose,
                        _int(payload, "stackLevel", False))


# --- evaluation ------------------------------------------------------------------------

def active_period(profile: Profile, now: datetime, installed_at: datetime,
                  tx_started: datetime | None = None) -> Period | None:
    """The period in force at ``now``, or None (not valid, not started, expired)."""
    if profile.valid_from is not None and now < profile.valid_from:
        return None
    if profile.valid_to is not None and now >= profile.valid_to:
        return None
    if profile.kind == "Relative":
        start = tx_started or now
    else:
        start = profile.start_schedule or profile.valid_from or installed_at
    elapsed = (now - start).total_seconds()
    if elapsed < 0:
        return None
    if profile.kind == "Recurring":
        elapsed %= _RECURRENCE.get(profile.recurrency or "Daily", 86_400)
    if profile.duration is not None and elapsed >= profile.duration:
        return None
    chosen = None
    for period in profile.periods:
        if period.start <= elapsed:
            chosen = period
    return chosen


def phases_used(period_phases: int | None, charger_phases: int) -> int:
    return max(1, min(period_phases or 3, charger_phases))


def to_amps(limit: float, unit: str, phases: int, voltage: float = DEFAULT_VOLTAGE) -> float:
    """A period's limit as amperes per phase (rounded down to 0.1 A)."""
    if unit == "A":
        return limit
    return _down(limit / (voltage * phases))


def peak_amps(profile: Profile, charger_phases: int = 3, voltage: float = DEFAULT_VOLTAGE) -> float:
    """The highest limit of any period, A per phase: what the profile may allow at some time."""
    return max((to_amps(p.limit, profile.unit, phases_used(p.phases, charger_phases), voltage)
                for p in profile.periods), default=0.0)


def from_amps(amps: float, unit: str, phases: int, voltage: float = DEFAULT_VOLTAGE) -> float:
    """Amperes per phase in ``unit`` (rounded down to 0.1)."""
    return _down(amps if unit == "A" else amps * voltage * phases)


def _down(value: float) -> float:
    return math.floor(value * 10 + 1e-6) / 10


def _purpose_limit(candidates: Iterable[Installed], now: datetime, charger_phases: int, voltage: float,
                   tx_started: datetime | None) -> float | None:
    """Highest stack level with a period in force wins (connector-specific on a tie)."""
    best: tuple[int, int, float] | None = None
    for item in candidates:
        period = active_period(item.profile, now, item.installed_at, tx_started)
        if period is None:
            continue
        amps = to_amps(period.limit, item.profile.unit, phases_used(period.phases, charger_phases), voltage)
        rank = (item.profile.stack_level, 1 if item.connector > 0 else 0)
        if best is None or rank > best[:2]:
            best = (*rank, amps)
    return None if best is None else best[2]


def composite_limit(installed: Iterable[Installed], now: datetime, *, charger_phases: int = 3,
                    voltage: float = DEFAULT_VOLTAGE, transactions: Iterable[Transaction] = (),
                    connectors: Iterable[int] = ()) -> float | None:
    """The charger's limit in A per phase at ``now`` (None: no profile limits it).

    Per connector: TxProfile of its running transaction, else TxDefault; the
    connectors add up and ChargePointMaxProfile caps the sum.
    """
    items = list(installed)
    running = {t.connector: t for t in transactions}
    known = set(connectors) | set(running) | {i.connector for i in items if i.connector > 0}
    max_limit = _purpose_limit((i for i in items if i.profile.purpose == MAX_PROFILE), now, charger_phases,
                               voltage, None)
    total: float | None = 0.0
    for connector in sorted(known or {1}):
        tx = running.get(connector)
        limit = None
        if tx is not None:
            limit = _purpose_limit(
                (i for i in items if i.profile.purpose == TX_PROFILE and i.connector == connector
                 and i.profile.transaction_id in (None, tx.transaction_id)),
                now, charger_phases, voltage, tx.started)
        if limit is None:
            limit = _purpose_limit(
                (i for i in items if i.profile.purpose == TX_DEFAULT and i.connector in (0, connector)),
                now, charger_phases, voltage, tx.started if tx else None)
        total = None if limit is None or total is None else total + limit
    if total is None:
        return max_limit
    return total if max_limit is None else min(total, max_limit)


def replaces(new: Installed, old: Installed) -> bool:
    """Same id, or same purpose and stack level (OCPP 1.6 SetChargingProfile): what ``new`` **may** replace.

    Wallboxes differ: some look at the connector, some do not. This is the loose reading, for what may be
    gone (the proxy's own profile: re-installed); what surely is gone is :func:`replaces_on_connector`."""
    return (new.profile.id == old.profile.id
            or (new.profile.purpose == old.profile.purpose and new.profile.stack_level == old.profile.stack_level))


def replaces_on_connector(new: Installed, old: Installed) -> bool:
    """Same id, or same purpose and stack level **on the same connector**: what ``new`` surely replaces.

    A charge point that keeps one profile stack per connector (as OCPP 2.0.1 says per EVSE, and as the
    Modbus charge point does, docs/modbus.md) keeps another connector's profile of the same purpose and stack
    level, so the fuse stops counting only what is replaced on every reading (docs/load-management.md)."""
    return new.profile.id == old.profile.id or (new.connector == old.connector and replaces(new, old))


# --- building and clamping ------------------------------------------------------------------

def build_profile(profile_id: int, stack_level: int, purpose: str, amps: float, *, unit: str = "A",
                  phases: int = 3, voltage: float = DEFAULT_VOLTAGE, now: datetime | None = None) -> dict[str, Any]:
    """The proxy's own profile: one period from a day ago, no end.

    ``Absolute`` with a start a day in the past (at midnight UTC) applies at
    once even on a wallbox whose clock is a little off.
    """
    now = now or datetime.now(UTC)
    start = (now - timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return {
        "chargingProfileId": profile_id,
        "stackLevel": stack_level,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": "Absolute",
        "chargingSchedule": {
            "startSchedule": format_time(start),
            "chargingRateUnit": unit,
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": from_amps(amps, unit, phases, voltage),
                                        "numberPhases": phases}],
        },
    }


def clamp(raw: Mapping[str, Any], amps: float, *, charger_phases: int = 3,
          voltage: float = DEFAULT_VOLTAGE) -> dict[str, Any]:
    """A copy of a csChargingProfiles object with every period at most ``amps`` per phase."""
    out = copy.deepcopy(dict(raw))
    schedule = out["chargingSchedule"]
    unit = schedule["chargingRateUnit"]
    for period in schedule["chargingSchedulePeriod"]:
        cap = from_amps(amps, unit, phases_used(period.get("numberPhases"), charger_phases), voltage)
        period["limit"] = min(period["limit"], cap)
    return out


def set_payload(connector: int, profile: Mapping[str, Any]) -> dict[str, Any]:
    return {"connectorId": connector, "csChargingProfiles": dict(profile)}


def clear_payload(profile_id: int) -> dict[str, Any]:
    """Clear exactly one profile by id: never empty, never by purpose (that would hit the backend's)."""
    return {"id": profile_id}


def replace_payload(text: str, payload: Mapping[str, Any]) -> str:
    """A CALL's text with only its payload object replaced; prefix and tail stay as received."""
    start = _payload_start(text)
    close = text.rstrip().rfind("]")
    obj_end = text.rfind("}", start, close) + 1 if start >= 0 else 0
    if start < 0 or obj_end <= start:
        raise ProfileError("cannot locate the payload")
    return text[:start] + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + text[obj_end:]


def _payload_start(text: str) -> int:
    """Index of the payload's ``{``: the fourth element of ``[2, "id", "Action", {...}]``."""
    commas = 0
    in_string = False
    i = text.find("[")
    while 0 <= i < len(text):
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == ",":
            commas += 1
        elif ch == "{":
            return i if commas == 3 else -1
        i += 1
    return -1


# --- validation of what the proxy builds ------------------------------------------------------

_VALIDATED: set[str] = set()


def validate_own(action: str, payload: Mapping[str, Any]) -> None:
    """:func:`validate` once per shape of the proxy's own CALLs.

    The proxy's own profiles differ between sends only in the limit and the
    start time, which :func:`build_profile` produces in schema-valid form
    (one decimal, ``YYYY-MM-DDThh:mm:ssZ``); a schema check costs ~80 µs, so
    it runs for the first profile of each shape, not for every limit change.
    """
    shape = _shape(payload)
    if shape in _VALIDATED:
        return
    validate(action, payload)
    if len(_VALIDATED) < 1024:
        _VALIDATED.add(shape)


def _shape(payload: Mapping[str, Any]) -> str:
    profile = payload.get("csChargingProfiles")
    if not isinstance(profile, dict):
        return json.dumps(payload, sort_keys=True)
    schedule = dict(profile.get("chargingSchedule") or {})
    schedule["chargingSchedulePeriod"] = [{**p, "limit": 0} for p in schedule.get("chargingSchedulePeriod") or ()]
    if "startSchedule" in schedule:
        schedule["startSchedule"] = ""
    return json.dumps({**payload, "csChargingProfiles": {**profile, "chargingSchedule": schedule}}, sort_keys=True)


def validate(action: str, payload: Mapping[str, Any]) -> None:
    """Check a CALL the proxy is about to send against the OCPP 1.6 schema.

    The ocpp library's public validator is async (an executor); its sync core
    is ``_validate_payload``. Only the proxy's own CALLs are validated.
    """
    from ocpp.exceptions import OCPPError
    from ocpp.messages import Call, _validate_payload

    try:
        _validate_payload(Call("validate", action, copy.deepcopy(dict(payload))), "1.6")
    except OCPPError as exc:
        raise ProfileError(f"{action}: {exc}") from exc


# --- composite schedule (GetCompositeSchedule of a virtual charge point) -----------------------

def composite_schedule(installed: Iterable[Installed], start: datetime, duration: int, *, charger_phases: int = 3,
                       voltage: float = DEFAULT_VOLTAGE, transactions: Iterable[Transaction] = (),
                       connectors: Iterable[int] = ()) -> list[tuple[int, float | None]]:
    """(seconds after ``start``, limit in A or None) at each change of the composite limit.

    The limit can only change where a profile's period, validity or duration
    starts or ends, so evaluating :func:`composite_limit` at those instants is exact.
    """
    items, running = list(installed), list(transactions)
    end = start + timedelta(seconds=duration)
    instants = {start}
    for item in items:
        instants.update(t for t in _edges(item, start, end, running) if start <= t < end)
    result: list[tuple[int, float | None]] = []
    for instant in sorted(instants):
        limit = composite_limit(items, instant, charger_phases=charger_phases, voltage=voltage,
                                transactions=running, connectors=connectors)
        if not result or result[-1][1] != limit:
            result.append((int((instant - start).total_seconds()), limit))
    return result


def _edges(item: Installed, start: datetime, end: datetime, running: list[Transaction]) -> Iterable[datetime]:
    profile = item.profile
    yield from (t for t in (profile.valid_from, profile.valid_to) if t is not None)
    if profile.kind == "Relative":
        bases = [t.started for t in running] or [start]
    else:
        bases = [profile.start_schedule or profile.valid_from or item.installed_at]
    if profile.kind == "Recurring":
        cycle = timedelta(seconds=_RECURRENCE.get(profile.recurrency or "Daily", 86_400))
        first = bases[0] + cycle * ((start - bases[0]) // cycle)
        bases = [first + cycle * n for n in range(int((end - first) / cycle) + 1)]
    for base in bases:
        yield from (base + timedelta(seconds=p.start) for p in profile.periods)
        if profile.duration is not None:
            yield base + timedelta(seconds=profile.duration)
