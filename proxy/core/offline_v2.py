"""Local answers for OCPP 2.0.1 and 2.1 stations while the backend is unreachable (sans-IO).

The same rules as for 1.6 (:mod:`proxy.core.offline`): answer the way a lenient
backend would, store the CALL's exact text before answering, replay it in order.
What differs is the shape of the answers and of authorization: 2.x names a token
``idToken`` = ``{"idToken": "...", "type": "..."}`` and answers with
``idTokenInfo``. A 2.x station makes its own ``transactionId`` (a string), so
unlike 1.6 there is no local id to hand out and nothing is ever remapped: every
TransactionEvent (seqNo, offline flag, signed meter values) reaches the backend
byte-identical. The table of answers is in docs/offline.md.

2.0.1 and 2.1 answer the actions they share identically: the responses have
the same required fields in both versions (each is checked against both
versions' schemas in tests/unit/test_offline_v2.py); 2.1 adds its own
notifications.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from proxy.core.offline import _LOCAL_ANSWERS as _V16
from proxy.core.offline import LocalAnswer, OfflineResponder
from proxy.messages.ocppj import build_result

#: idToken types that carry no identity to check: a station sends these for free vending.
_NO_AUTH_TYPES = frozenset({"NoAuthorization"})


def token_of(id_token: Any) -> str | None:
    """The token value of an ``IdTokenType`` object (None when it is not one)."""
    if isinstance(id_token, Mapping):
        value = id_token.get("idToken")
        return value if isinstance(value, str) else None
    return None


def token_status(responder: OfflineResponder, id_token: Any) -> str:
    """``idTokenInfo.status`` per ``offline_auth``; the configured ``local_list`` holds token values."""
    if isinstance(id_token, Mapping) and id_token.get("type") in _NO_AUTH_TYPES \
            and responder.settings.auth != "reject_all":
        return "Accepted"
    return responder.id_tag_status(token_of(id_token))


def learn(responder: OfflineResponder, action: str, request: Any, result: Any) -> None:
    """The authorization cache from the backend's 2.x answers (Authorize, TransactionEvent, SendLocalList)."""
    if not isinstance(request, Mapping):
        return
    cache = responder.accepted_cache
    if action in ("Authorize", "TransactionEvent"):
        token = token_of(request.get("idToken"))
        info = result.get("idTokenInfo") if isinstance(result, Mapping) else None
        if token is not None and isinstance(info, Mapping):  # a TransactionEvent answer may carry no verdict
            (cache.add if info.get("status") == "Accepted" else cache.discard)(token)
    elif action == "SendLocalList":
        if request.get("updateType") == "Full":
            cache.clear()
        for entry in request.get("localAuthorizationList") or []:
            if not isinstance(entry, Mapping):
                continue
            token, info = token_of(entry.get("idToken")), entry.get("idTokenInfo")
            if token is not None:
                accepted = isinstance(info, Mapping) and info.get("status") == "Accepted"
                (cache.add if accepted else cache.discard)(token)


def _authorize(r: OfflineResponder, msg_id: str, payload: Mapping[str, Any]) -> LocalAnswer:
    return LocalAnswer(build_result(msg_id, {"idTokenInfo": {"status": token_status(r, payload.get("idToken"))}}),
                       True)


def _transaction_event(r: OfflineResponder, msg_id: str, payload: Mapping[str, Any]) -> LocalAnswer:
    """``idTokenInfo`` is required when the request carried an idToken (OCPP 2.0.1 part 2, E01-E15)."""
    answer: dict[str, Any] = {}
    if "idToken" in payload:
        answer["idTokenInfo"] = {"status": token_status(r, payload.get("idToken"))}
    return LocalAnswer(build_result(msg_id, answer), True)


Builder = Callable[[OfflineResponder, str, Mapping[str, Any]], LocalAnswer]

# The answers whose 2.x shape is the 1.6 one (currentTime/interval/status, currentTime, {}, status).
_boot, _heartbeat, _empty, _data_transfer = (
    _V16[action] for action in ("BootNotification", "Heartbeat", "StatusNotification", "DataTransfer"))

#: Station CALL → local answer, for 2.0.1 (2.1 adds :data:`LOCAL_ANSWERS_V21`). Everything else (ISO 15118
#: negotiation and certificates, which need the CSMS's verdict) gets a CALLERROR and is not stored.
LOCAL_ANSWERS: dict[str, Builder] = {
    "BootNotification": _boot,
    "Heartbeat": _heartbeat,
    "StatusNotification": _empty,
    "Authorize": _authorize,
    "TransactionEvent": _transaction_event,
    "MeterValues": _empty,
    "NotifyEvent": _empty,
    "NotifyReport": _empty,
    "SecurityEventNotification": _empty,
    "FirmwareStatusNotification": _empty,
    "LogStatusNotification": _empty,
    "DataTransfer": _data_transfer,
    # Reports and notifications whose answer carries nothing: stored, so their data is not lost either.
    "NotifyMonitoringReport": _empty,
    "NotifyCustomerInformation": _empty,
    "NotifyDisplayMessages": _empty,
    "NotifyChargingLimit": _empty,
    "ClearedChargingLimit": _empty,
    "ReportChargingProfiles": _empty,
    "ReservationStatusUpdate": _empty,
    "PublishFirmwareStatusNotification": _empty,
}

#: OCPP 2.1 only: settlement of an ad-hoc payment (billing data), DER and battery-swap reports.
LOCAL_ANSWERS_V21: dict[str, Builder] = {
    **LOCAL_ANSWERS,
    "NotifySettlement": _empty,
    "NotifyPriorityCharging": _empty,
    "NotifyDERAlarm": _empty,
    "NotifyDERStartStop": _empty,
    "ReportDERControl": _empty,
    "BatterySwap": _empty,
}
