"""Answering a wallbox while its backend is unreachable, and replaying afterwards (sans-IO).

While the primary upstream is down, the wallbox keeps charging and keeps
being load-managed: the proxy answers its CALLs the way a lenient backend
would and stores each one (exact text) for later. When the backend is back,
the stored CALLs are replayed in order before live traffic; the one thing
edited on the way is the transactionId the proxy handed out locally, replaced
by the one the backend returned for the replayed StartTransaction, as a
surgical edit of that number only (signed meter data stays byte-identical).

Decisions, documented in docs/offline.md:

* Local transaction ids are negative (-1, -2, ...): every backend issues
  positive ids, so a local id can never collide with a real one.
* Heartbeats answered offline are not replayed (they carry no data and the
  backend's clock answer would be stale). Of several BootNotifications only
  the last one is replayed, in its place.
* Actions the proxy cannot answer meaningfully (anything not listed in
  ``_LOCAL_ANSWERS``) get a CALLERROR and are not stored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from proxy.messages.ocppj import Frame, MessageType, build_error, build_result, classify, payload_of
from proxy.loadmgmt.profiles import format_time
from proxy.messages.versions import OcppVersion, format_violation

#: Actions whose frames carry a transactionId that must follow the mapping.
TRANSACTION_ACTIONS = frozenset({"MeterValues", "StopTransaction"})
#: Backend CALLs naming a transaction by the backend's id, which the wallbox knows by its local one.
BACKEND_TRANSACTION_ACTIONS = frozenset({"RemoteStopTransaction", "SetChargingProfile"})

_NOT_REPLAYED = frozenset({"Heartbeat"})


@dataclass(frozen=True)
class OfflineSettings:
    heartbeat_interval: int = 300
    auth: str = "local_list"  # local_list | accept_all | reject_all
    local_list: frozenset[str] = frozenset()
    data_transfer: str = "Rejected"


@dataclass(frozen=True)
class LocalAnswer:
    """What the proxy answers, and whether the CALL is stored for replay."""

    text: str
    store: bool
    #: For StartTransaction: the local transaction id handed out.
    local_transaction_id: int | None = None


def now_iso() -> str:
    return format_time(datetime.now(timezone.utc))


@dataclass
class OfflineResponder:
    """Local answers per action; keeps the authorization cache and the local id counter.

    ``version`` (the session's negotiated OCPP version) picks the answer table:
    a 2.0.1 station never gets a 1.6-shaped answer, nor the reverse.
    """

    settings: OfflineSettings = field(default_factory=OfflineSettings)
    #: idTags (2.x: idToken values) the backend accepted while online (Authorize / transaction answers,
    #: SendLocalList).
    accepted_cache: set[str] = field(default_factory=set)
    #: The last local id handed out (negative numbers, persisted by the caller; 1.6 only).
    last_local_id: int = 0
    version: OcppVersion = OcppVersion.V16

    def answer(self, frame: Frame, payload: Mapping[str, Any] | None = None) -> LocalAnswer:
        action = frame.action or ""
        msg_id = frame.msg_id or ""
        builder = _answers(self.version).get(action)
        if builder is None:
            return LocalAnswer(build_error(msg_id, "GenericError",
                                           f"backend unreachable; {action} cannot be answered offline"), False)
        format_error = format_violation(self.version)
        if payload is None:
            try:
                payload = payload_of(frame)
            except ValueError:
                return LocalAnswer(build_error(msg_id, format_error, "payload is not JSON"), False)
        if not isinstance(payload, Mapping):
            return LocalAnswer(build_error(msg_id, format_error, "payload is not an object"), False)
        return builder(self, msg_id, payload)

    def id_tag_status(self, id_tag: Any) -> str:
        policy = self.settings.auth
        if policy == "accept_all":
            return "Accepted"
        if policy == "reject_all":
            return "Invalid"
        known = id_tag in self.settings.local_list or id_tag in self.accepted_cache
        return "Accepted" if known else "Invalid"

    def learn(self, call: Frame, answer: Frame) -> None:
        """Remember idTags the backend accepted (the authorization cache)."""
        try:
            request, result = payload_of(call), payload_of(answer)
        except (ValueError, IndexError):
            return
        if self.version.is_v2:
            from proxy.core import offline_v2  # it builds on this module

            offline_v2.learn(self, call.action or "", request, result)
        elif call.action in ("Authorize", "StartTransaction"):
            status = (result.get("idTagInfo") or {}).get("status") if isinstance(result, dict) else None
            tag = request.get("idTag") if isinstance(request, dict) else None
            if isinstance(tag, str):
                (self.accepted_cache.add if status == "Accepted" else self.accepted_cache.discard)(tag)
        elif call.action == "SendLocalList" and isinstance(request, dict):
            if request.get("updateType") == "Full":
                self.accepted_cache.clear()
            for entry in request.get("localAuthorizationList") or []:
                tag, info = entry.get("idTag"), entry.get("idTagInfo")
                if isinstance(tag, str):
                    accepted = isinstance(info, dict) and info.get("status") == "Accepted"
                    (self.accepted_cache.add if accepted else self.accepted_cache.discard)(tag)

    def _next_local_id(self) -> int:
        self.last_local_id -= 1
        return self.last_local_id


def _boot(r: OfflineResponder, msg_id: str, _: Mapping[str, Any]) -> LocalAnswer:
    return LocalAnswer(build_result(msg_id, {"currentTime": now_iso(), "interval": r.settings.heartbeat_interval,
                                             "status": "Accepted"}), True)


def _heartbeat(r: OfflineResponder, msg_id: str, _: Mapping[str, Any]) -> LocalAnswer:
    return LocalAnswer(build_result(msg_id, {"currentTime": now_iso()}), True)


def _empty(r: OfflineResponder, msg_id: str, _: Mapping[str, Any]) -> LocalAnswer:
    return LocalAnswer(build_result(msg_id, {}), True)


def _authorize(r: OfflineResponder, msg_id: str, payload: Mapping[str, Any]) -> LocalAnswer:
    return LocalAnswer(build_result(msg_id, {"idTagInfo": {"status": r.id_tag_status(payload.get("idTag"))}}), True)


def _start(r: OfflineResponder, msg_id: str, payload: Mapping[str, Any]) -> LocalAnswer:
    local = r._next_local_id()
    status = r.id_tag_status(payload.get("idTag"))
    return LocalAnswer(build_result(msg_id, {"transactionId": local, "idTagInfo": {"status": status}}), True, local)


def _data_transfer(r: OfflineResponder, msg_id: str, _: Mapping[str, Any]) -> LocalAnswer:
    return LocalAnswer(build_result(msg_id, {"status": r.settings.data_transfer}), True)


_LOCAL_ANSWERS = {
    "BootNotification": _boot,
    "Heartbeat": _heartbeat,
    "StatusNotification": _empty,
    "MeterValues": _empty,
    "StopTransaction": _empty,
    "Authorize": _authorize,
    "StartTransaction": _start,
    "DataTransfer": _data_transfer,
    "FirmwareStatusNotification": _empty,
    "DiagnosticsStatusNotification": _empty,
    "SecurityEventNotification": _empty,
    "LogStatusNotification": _empty,
    "SignedFirmwareStatusNotification": _empty,
}


def _answers(version: OcppVersion) -> Mapping[str, Callable[[OfflineResponder, str, Mapping[str, Any]], LocalAnswer]]:
    if version.is_v2:
        from proxy.core import offline_v2  # it builds on this module

        return offline_v2.LOCAL_ANSWERS_V21 if version is OcppVersion.V21 else offline_v2.LOCAL_ANSWERS
    return _LOCAL_ANSWERS


#: Actions whose answers teach the authorization cache (per version: 2.x has no StartTransaction).
LEARNING_ACTIONS = frozenset({"Authorize", "StartTransaction", "TransactionEvent"})


# --- transaction id mapping ----------------------------------------------------

_TX_KEY = re.compile(r'(?<!\\)"transactionId"\s*:\s*(-?\d+)(?![\d.eE])')


def transaction_id_of(frame: Frame) -> int | None:
    """The payload's top-level (or charging profile's) transactionId, parsed."""
    try:
        payload = payload_of(frame)
    except (ValueError, IndexError):
        return None
    if not isinstance(payload, dict):
        return None
    value = payload.get("transactionId")
    if value is None and isinstance(payload.get("csChargingProfiles"), dict):
        value = payload["csChargingProfiles"].get("transactionId")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def replace_transaction_id(text: str, old: int, new: int) -> str | None:
    """``text`` with the one ``"transactionId": old`` changed to ``new``; None if not exactly one.

    Only unescaped keys match, so a ``transactionId`` inside a signed-data
    string (where its quotes are escaped) is never touched.
    """
    matches = [m for m in _TX_KEY.finditer(text) if int(m.group(1)) == old]
    if len(matches) != 1:
        return None
    start, end = matches[0].span(1)
    return text[:start] + str(new) + text[end:]


def map_transaction(frame: Frame, mapping: Mapping[int, int]) -> str:
    """The frame's text with a mapped transactionId substituted (unchanged when not mapped)."""
    old = transaction_id_of(frame)
    if old is None or old not in mapping:
        return frame.text
    replaced = replace_transaction_id(frame.text, old, mapping[old])
    return frame.text if replaced is None else replaced


def started_transaction(answer: Frame) -> int | None:
    """The backend's transactionId from a StartTransaction CALLRESULT (None for a CALLERROR or garbage)."""
    if answer.kind is not MessageType.CALLRESULT:
        return None
    try:
        payload = payload_of(answer)
    except (ValueError, IndexError):
        return None
    value = payload.get("transactionId") if isinstance(payload, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- replay planning -------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """One stored CALL: queue row id, action, exact text, local transaction id it started.

    ``attempts``: how often it was marked sent (see :class:`InFlight`); more
    than 0 means it may have reached the backend without its answer being
    committed (the proxy was killed, or the connection was lost, meanwhile).
    """

    row: int
    action: str
    text: str
    local_transaction_id: int | None = None
    attempts: int = 0


class InFlight:
    """What a replay does with a frame that may already have reached the backend (docs/offline.md).

    A frame is marked sent (durably) before it goes out, so after a restart
    or a lost connection the proxy knows which frames the backend may have
    processed without their answer being committed. Per action:

    * ``RESEND`` (everything billing depends on, and anything unknown): sent
      again with its original message id. At-least-once is kept; the backend
      may see it twice. StartTransaction is the costly case: a backend that
      does not recognise the repeated message id opens a second transaction,
      so it is resent (without it the stored MeterValues and StopTransaction
      would name a transaction the backend never heard of) and reported as a
      possible duplicate (log ``replay_possible_duplicate``, metric).
    * ``SUPERSEDED`` (state reports: BootNotification, StatusNotification,
      firmware/diagnostics/log status): dropped when a later queued frame
      reports the same state (the same action, for StatusNotification the same
      connector), which the backend gets anyway; resent otherwise.
    """

    RESEND = "resend"
    SUPERSEDED = "superseded"


#: State reports: an in-flight one is dropped when a later queued frame reports the same state.
_STATE_REPORTS = frozenset({"BootNotification", "StatusNotification", "FirmwareStatusNotification",
                            "DiagnosticsStatusNotification", "LogStatusNotification",
                            "SignedFirmwareStatusNotification"})


def in_flight_policy(action: str) -> str:
    """:class:`InFlight` decision for a frame of ``action`` that was marked sent before."""
    return InFlight.SUPERSEDED if action in _STATE_REPORTS else InFlight.RESEND


def _state_key(entry: Stored) -> tuple[str, object] | None:
    """What state a report describes (action, connector), or None for frames that are not state reports."""
    if entry.action not in _STATE_REPORTS:
        return None
    if entry.action != "StatusNotification":
        return entry.action, None
    try:
        payload = payload_of(classify(entry.text))
    except (ValueError, IndexError):
        return None
    if not isinstance(payload, dict):
        return None
    return entry.action, (payload.get("evseId"), payload.get("connectorId"))  # 1.6: no evseId


def replay_plan(entries: Iterable[Stored]) -> tuple[list[Stored], list[Stored]]:
    """(to replay in order, to drop).

    Heartbeats are dropped, only the last BootNotification is kept, and a
    state report that was already sent once is dropped when a later frame
    reports the same state (:class:`InFlight`).
    """
    entries = list(entries)
    last_boot = max((e.row for e in entries if e.action == "BootNotification"), default=None)
    latest: dict[tuple[str, object], int] = {}
    for entry in entries:
        key = _state_key(entry)
        if key is not None:
            latest[key] = entry.row
    keep: list[Stored] = []
    drop: list[Stored] = []
    for entry in entries:
        skip = entry.action in _NOT_REPLAYED or (entry.action == "BootNotification" and entry.row != last_boot)
        if not skip and entry.attempts and in_flight_policy(entry.action) == InFlight.SUPERSEDED:
            key = _state_key(entry)
            skip = key is not None and latest[key] != entry.row
        (drop if skip else keep).append(entry)
    return keep, drop
