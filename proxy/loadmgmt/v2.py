"""Load management in OCPP 2.0.1 and 2.1 sessions: the 2.x wire shapes ↔ the control's model (sans-IO).

The profile control (:mod:`proxy.loadmgmt.control`) and the profile model
(:mod:`proxy.loadmgmt.profiles`) reason in one model: a profile with an id,
stack level, purpose, kind, unit and periods, on a connector (0: the whole
charge point). 2.0.1 has the same model under other names, which this module
translates in both directions so every rule (min(backend, local), the reserved
id and stack level, clear by id only, the TxDefault fallback) holds unchanged:

========================  =====================================================
OCPP 1.6 (the model)      OCPP 2.0.1 / 2.1 (the wire)
========================  =====================================================
connectorId               evseId (0: the whole station)
csChargingProfiles        chargingProfile
chargingProfileId         id
ChargePointMaxProfile     ChargingStationMaxProfile
chargingSchedule          chargingSchedule[] (1-3 schedules; each is clamped)
transactionId (integer)   transactionId (the station's string): numbered here
ClearChargingProfile id   chargingProfileId (criteria: chargingProfileCriteria)
========================  =====================================================

Measurements come from TransactionEvent and MeterValues (numeric values,
``unitOfMeasure`` with a power-of-ten multiplier); the charging state of a
TransactionEvent stands in for 1.6's Charging / SuspendedEV statuses.

Frames the proxy cannot model (a 2.1 period without ``limit``, a purpose such
as PriorityCharging) raise :class:`~proxy.loadmgmt.profiles.ProfileError`: the
driver then leaves them as they are (forwarded byte for byte, not tracked).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.loadmgmt.profiles import DEFAULT_VOLTAGE, MAX_PROFILE, ProfileError, clamp
from proxy.messages.versions import OcppVersion

MAX_PROFILE_V2 = "ChargingStationMaxProfile"
#: 2.x purpose → the model's (TxDefaultProfile and TxProfile keep their names).
_PURPOSE_IN = {MAX_PROFILE_V2: MAX_PROFILE, "TxDefaultProfile": "TxDefaultProfile", "TxProfile": "TxProfile"}
_PURPOSE_OUT = {v: k for k, v in _PURPOSE_IN.items()}

#: A TransactionEvent's chargingState → the connector status the limit engine understands.
CHARGING_STATES = {"Charging": "Charging", "SuspendedEV": "SuspendedEV", "SuspendedEVSE": "SuspendedEVSE",
                   "EVConnected": "Preparing", "Idle": "Available"}
#: A 2.x StatusNotification's connectorStatus → the same (Occupied: a car is plugged in).
CONNECTOR_STATUSES = {"Available": "Available", "Occupied": "Preparing", "Reserved": "Reserved",
                      "Unavailable": "Unavailable", "Faulted": "Faulted"}

_PROFILE_KEYS = ("stackLevel", "chargingProfileKind", "recurrencyKind", "validFrom", "validTo")
_SCHEDULE_KEYS = ("startSchedule", "duration", "chargingRateUnit", "minChargingRate")


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProfileError(f"{what} is not an object")
    return value


@dataclass
class V2Profiles:
    """Translation for one station's session; numbers the station's transaction ids."""

    version: OcppVersion
    #: The station's transactionId → the number the model knows it by.
    transaction_numbers: dict[str, int] = field(default_factory=dict)
    #: The evseId a transaction runs on (only its first TransactionEvent must name it).
    transaction_evses: dict[str, int] = field(default_factory=dict)

    def transaction_number(self, transaction_id: Any) -> int | None:
        if not isinstance(transaction_id, str):
            return None
        return self.transaction_numbers.setdefault(transaction_id, len(self.transaction_numbers) + 1)

    # -- the backend's frames, into the model -----------------------------------------------------

    def set_request(self, payload: Any) -> dict[str, Any]:
        """A 2.x SetChargingProfile request as the model's (connectorId, csChargingProfiles)."""
        payload = _object(payload, "payload")
        evse = payload.get("evseId")
        if isinstance(evse, bool) or not isinstance(evse, int):
            raise ProfileError(f"evseId must be an integer, got {evse!r}")
        return {"connectorId": evse, "csChargingProfiles": self.profile_in(payload.get("chargingProfile"))}

    def profile_in(self, raw: Any) -> dict[str, Any]:
        profile = _object(raw, "chargingProfile")
        purpose = profile.get("chargingProfilePurpose")
        if purpose not in _PURPOSE_IN:
            raise ProfileError(f"chargingProfilePurpose {purpose!r} is not load-managed")
        schedules = profile.get("chargingSchedule")
        if not isinstance(schedules, list) or not schedules:
            raise ProfileError("chargingSchedule is not a non-empty list")
        out: dict[str, Any] = {"chargingProfileId": profile.get("id"),
                               "chargingProfilePurpose": _PURPOSE_IN[purpose]}
        out.update({k: profile[k] for k in _PROFILE_KEYS if k in profile})
        number = self.transaction_number(profile.get("transactionId"))
        if number is not None:
            out["transactionId"] = number
        out["chargingSchedule"] = _schedule_in(schedules[0])  # the strictest is on the station anyway
        return out

    def clear_request(self, payload: Any) -> dict[str, Any]:
        """A 2.x ClearChargingProfile request as the model's criteria."""
        payload = _object(payload, "payload")
        if payload.get("chargingProfileId") is not None:
            return {"id": payload["chargingProfileId"]}
        criteria = payload.get("chargingProfileCriteria")
        out: dict[str, Any] = {}
        if isinstance(criteria, Mapping):
            ids = criteria.get("chargingProfileId")
            if isinstance(ids, list) and len(ids) == 1:
                return {"id": ids[0]}
            if criteria.get("evseId") is not None:
                out["connectorId"] = criteria["evseId"]
            purpose = criteria.get("chargingProfilePurpose")
            if purpose is not None:
                if purpose not in _PURPOSE_IN:
                    raise ProfileError(f"chargingProfilePurpose {purpose!r} is not load-managed")
                out["chargingProfilePurpose"] = _PURPOSE_IN[purpose]
            if criteria.get("stackLevel") is not None:
                out["stackLevel"] = criteria["stackLevel"]
        return out

    # -- the proxy's CALLs, out of the model ---------------------------------------------------------

    def command(self, action: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The proxy's own SetChargingProfile / ClearChargingProfile in 2.x shape."""
        if action == "ClearChargingProfile":
            return {"chargingProfileId": payload["id"]}  # by id only: never the backend's profiles
        if action != "SetChargingProfile":
            raise ProfileError(f"{action} is not a load-management command")
        return {"evseId": payload["connectorId"], "chargingProfile": self.profile_out(payload["csChargingProfiles"])}

    def profile_out(self, model: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"id": model["chargingProfileId"],
                               "chargingProfilePurpose": _PURPOSE_OUT[model["chargingProfilePurpose"]]}
        out.update({k: model[k] for k in _PROFILE_KEYS if k in model})
        if "transactionId" in model:
            numbers = {n: t for t, n in self.transaction_numbers.items()}
            if model["transactionId"] in numbers:
                out["transactionId"] = numbers[model["transactionId"]]
        schedule = model["chargingSchedule"]
        out["chargingSchedule"] = [{"id": model["chargingProfileId"] % 1_000_000,
                                    **{k: schedule[k] for k in _SCHEDULE_KEYS if k in schedule},
                                    "chargingSchedulePeriod": [dict(p) for p in schedule["chargingSchedulePeriod"]]}]
        return out

    @staticmethod
    def clamped(original: Any, amps: float, *, charger_phases: int = 3, voltage: float = DEFAULT_VOLTAGE,
                ) -> dict[str, Any]:
        """The backend's 2.x SetChargingProfile with every schedule's periods at most ``amps`` per phase.

        Only ``limit`` values change; every other field (several schedules,
        sales tariffs, 2.1 additions) stays as the backend sent it.
        """
        out = copy.deepcopy(dict(_object(original, "payload")))
        for schedule in _object(out.get("chargingProfile"), "chargingProfile")["chargingSchedule"]:
            capped = clamp({"chargingSchedule": _schedule_in(schedule)}, amps, charger_phases=charger_phases,
                           voltage=voltage)
            for period, limited in zip(schedule["chargingSchedulePeriod"],
                                       capped["chargingSchedule"]["chargingSchedulePeriod"]):
                period["limit"] = limited["limit"]
        return out

    # -- what the station measures ----------------------------------------------------------------------

    @staticmethod
    def meter_values(payload: Any) -> dict[str, Any]:
        """``meterValue`` of a TransactionEvent or MeterValues in the model's MeterValues shape."""
        values = payload.get("meterValue") if isinstance(payload, Mapping) else None
        samples = []
        for sample in values if isinstance(values, list) else []:
            sampled = sample.get("sampledValue") if isinstance(sample, Mapping) else None
            items = []
            for item in sampled if isinstance(sampled, list) else []:
                if not isinstance(item, Mapping) or isinstance(item.get("value"), bool) \
                        or not isinstance(item.get("value"), (int, float)):
                    continue
                raw_unit = item.get("unitOfMeasure")
                unit: Mapping[str, Any] = raw_unit if isinstance(raw_unit, Mapping) else {}
                multiplier = unit.get("multiplier", 0)
                multiplier = multiplier if isinstance(multiplier, int) else 0
                converted = {"value": str(item["value"] * 10.0 ** multiplier),
                             "measurand": item.get("measurand", "Energy.Active.Import.Register")}
                if "phase" in item:
                    converted["phase"] = item["phase"]
                if "unit" in unit:
                    converted["unit"] = unit["unit"]
                items.append(converted)
            samples.append({"sampledValue": items})
        return {"meterValue": samples}

    def transaction_evse(self, payload: Mapping[str, Any]) -> tuple[str | None, int]:
        """(the station's transactionId, the EVSE it runs on; 1 when never named)."""
        info = payload.get("transactionInfo")
        tx = info.get("transactionId") if isinstance(info, Mapping) else None
        evse = payload.get("evse")
        evse_id = evse.get("id") if isinstance(evse, Mapping) else None
        if isinstance(tx, str) and isinstance(evse_id, int) and not isinstance(evse_id, bool):
            self.transaction_evses[tx] = evse_id
        return (tx if isinstance(tx, str) else None), self.transaction_evses.get(tx, 1) if isinstance(tx, str) else 1


def _schedule_in(raw: Any) -> dict[str, Any]:
    schedule = _object(raw, "chargingSchedule")
    periods = schedule.get("chargingSchedulePeriod")
    if not isinstance(periods, list) or not periods:
        raise ProfileError("chargingSchedulePeriod is empty")
    out: dict[str, Any] = {k: schedule[k] for k in _SCHEDULE_KEYS if k in schedule}
    converted = []
    for period in periods:
        period = _object(period, "chargingSchedulePeriod")
        if "limit" not in period:
            raise ProfileError("a chargingSchedulePeriod without limit (2.1 setpoints) cannot be load-managed")
        converted.append({k: period[k] for k in ("startPeriod", "limit", "numberPhases") if k in period})
    out["chargingSchedulePeriod"] = converted
    return out


_VALIDATED: set[str] = set()


def validate_v2(version: OcppVersion, action: str, payload: Mapping[str, Any]) -> None:
    """Check a 2.x CALL the proxy builds against its version's schema (once per shape; raises ProfileError)."""
    shape = json.dumps(_shape(payload), sort_keys=True) + version.value + action
    if shape in _VALIDATED:
        return
    from ocpp.exceptions import OCPPError
    from ocpp.messages import Call, _validate_payload

    try:
        _validate_payload(Call("validate", action, copy.deepcopy(dict(payload))), version.value)
    except OCPPError as exc:
        raise ProfileError(f"{action}: {exc}") from exc
    if len(_VALIDATED) < 1024:
        _VALIDATED.add(shape)


def _shape(value: Any) -> Any:
    """The payload with every number and time blanked: profiles differ only there between sends."""
    if isinstance(value, Mapping):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 0
    if isinstance(value, str) and value[:2].isdigit() and "T" in value:
        return ""
    return value
