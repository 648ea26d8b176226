"""What a 2.0.1 / 2.1 station holds and limits itself to, written from the specification.

Independent of proxy/loadmgmt: the profiles a station keeps after the
SetChargingProfile / ClearChargingProfile CALLs it received (OCPP 2.0.1 part 2,
K01 and K10: a profile replaces one with the same id, or the same purpose and
stack level on the same EVSE; a Clear by id removes that one), and the
composite limit (part 2, 3.5: per purpose the highest stack level wins; the
minimum of the station-wide maximum and the transaction's profile).
"""

from __future__ import annotations

import json
from typing import Any


def installed(frames: list[str]) -> dict[int, dict[str, Any]]:
    """The profiles a station holds after the Set/Clear CALLs it received (each taken as accepted)."""
    profiles: dict[int, dict[str, Any]] = {}
    for text in frames:
        message = json.loads(text)
        if message[0] != 2:
            continue
        if message[2] == "SetChargingProfile":
            profile = message[3]["chargingProfile"]
            for pid in [pid for pid, old in profiles.items()  # same purpose and stack level on an EVSE replaces
                        if (old["chargingProfilePurpose"], old["stackLevel"], old["evse"])
                        == (profile["chargingProfilePurpose"], profile["stackLevel"], message[3]["evseId"])]:
                del profiles[pid]
            profiles[profile["id"]] = {**profile, "evse": message[3]["evseId"]}
        elif message[2] == "ClearChargingProfile":
            profiles.pop(message[3].get("chargingProfileId"), None)
    return profiles


def composite(profiles: dict[int, dict[str, Any]], evse: int | None = None) -> float | None:
    """min(the winning ChargingStationMaxProfile, the winning TxProfile else TxDefaultProfile) in A.

    Per purpose the highest stackLevel wins (single-period Absolute profiles in A). ``evse``: the
    composite of that EVSE (its own Tx/TxDefault profiles and the station-wide ones on EVSE 0; on a
    tie the EVSE's own wins); None: every profile counts, as for a one-EVSE station.
    """
    def winner(purpose: str) -> float | None:
        candidates = [p for p in profiles.values() if p["chargingProfilePurpose"] == purpose
                      and (evse is None or purpose == "ChargingStationMaxProfile" or p.get("evse", 0) in (0, evse))]
        if not candidates:
            return None
        best = max(candidates, key=lambda p: (p["stackLevel"], p.get("evse", 0) != 0))
        schedule = best["chargingSchedule"][0]
        assert schedule["chargingRateUnit"] == "A"
        return float(schedule["chargingSchedulePeriod"][0]["limit"])

    limits = [winner("ChargingStationMaxProfile"), winner("TxProfile") or winner("TxDefaultProfile")]
    present = [limit for limit in limits if limit is not None]
    return min(present) if present else None


def backend_profile(purpose: str, limit: float, profile_id: int, stack_level: int = 0) -> dict[str, Any]:
    return {"evseId": 0, "chargingProfile": {
        "id": profile_id, "stackLevel": stack_level, "chargingProfilePurpose": purpose,
        "chargingProfileKind": "Absolute",
        "chargingSchedule": [{"id": 1, "chargingRateUnit": "A", "startSchedule": "2026-01-01T00:00:00Z",
                              "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}]}]}}
