"""Which upstream may command the wallbox, and how (sans-IO).

With several backends per wallbox (the billing backend plus an EMS or a home
automation system) only one of them may own each kind of state on the
wallbox: two backends that both install charging profiles or both reset the
wallbox fight each other, and the user sees a wallbox that misbehaves. So
every CALL an upstream sends to the wallbox is judged per upstream and action:

``forward``
    it reaches the wallbox (the primary's default for everything);
``answer``
    the proxy answers it on the wallbox's behalf (Accepted, or an empty
    answer where the action has no status), in the OCPP version of the
    session, and the wallbox never sees it, for backends that insist on
    sending a command the site does not want;
``reject``
    the proxy answers with a CALLERROR: ``SecurityError`` for an OCPP command
    this upstream is not permitted to send, ``NotSupported`` for an action the
    proxy does not know (a vendor extension it cannot judge).

Secondaries default to ``forward`` for read-only commands and ``reject`` for
everything else. :func:`conflicts` finds configurations where two upstreams
could both change one kind of state; the configuration loader refuses them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

from proxy.messages.ocppj import Frame, build_error, build_result, payload_of
from proxy.messages.versions import OcppVersion

#: What the proxy does with one upstream's CALL towards the wallbox.
Mode = Literal["forward", "answer", "reject"]
FORWARD: Final = "forward"
ANSWER: Final = "answer"
REJECT: Final = "reject"
MODES: tuple[Mode, ...] = (FORWARD, ANSWER, REJECT)

#: In a policy table: the mode for every action not listed.
ANY = "*"

#: What the proxy answers for each command in ``answer`` mode (OCPP 1.6 and its
#: security extension): a success status, or the empty answer where the
#: response has no required field. Each payload is valid against the 1.6 schema.
LOCAL_ANSWERS: dict[str, dict[str, Any]] = {
    "CancelReservation": {"status": "Accepted"},
    "CertificateSigned": {"status": "Accepted"},
    "ChangeAvailability": {"status": "Accepted"},
    "ChangeConfiguration": {"status": "Accepted"},
    "ClearCache": {"status": "Accepted"},
    "ClearChargingProfile": {"status": "Accepted"},
    "DataTransfer": {"status": "Accepted"},
    "DeleteCertificate": {"status": "Accepted"},
    "ExtendedTriggerMessage": {"status": "Accepted"},
    "GetCompositeSchedule": {"status": "Rejected"},  # there is no schedule the proxy could report
    "GetConfiguration": {},
    "GetDiagnostics": {},
    "GetInstalledCertificateIds": {"status": "NotFound"},
    "GetLocalListVersion": {"listVersion": -1},  # -1: no local list management for this upstream
    "GetLog": {"status": "Rejected"},  # accepting would promise an upload that never happens
    "InstallCertificate": {"status": "Accepted"},
    "RemoteStartTransaction": {"status": "Accepted"},
    "RemoteStopTransaction": {"status": "Accepted"},
    "ReserveNow": {"status": "Accepted"},
    "Reset": {"status": "Accepted"},
    "SendLocalList": {"status": "Accepted"},
    "SetChargingProfile": {"status": "Accepted"},
    "SignedUpdateFirmware": {"status": "Accepted"},
    "TriggerMessage": {"status": "Accepted"},
    "UnlockConnector": {"status": "Unlocked"},
    "UpdateFirmware": {},
}

#: The same for OCPP 2.0.1 and 2.1 stations (valid against both versions' schemas). Reports and
#: uploads that would promise later messages (GetBaseReport, GetLog, CustomerInformation, ...) are
#: Rejected, as GetLog is for 1.6.
LOCAL_ANSWERS_V2: dict[str, dict[str, Any]] = {
    "CancelReservation": {"status": "Accepted"},
    "CertificateSigned": {"status": "Accepted"},
    "ChangeAvailability": {"status": "Accepted"},
    "ClearCache": {"status": "Accepted"},
    "ClearChargingProfile": {"status": "Accepted"},
    "ClearDisplayMessage": {"status": "Accepted"},
    "CostUpdated": {},
    "CustomerInformation": {"status": "Rejected"},
    "DataTransfer": {"status": "Accepted"},
    "DeleteCertificate": {"status": "Accepted"},
    "GetBaseReport": {"status": "Rejected"},
    "GetChargingProfiles": {"status": "NoProfiles"},
    "GetCompositeSchedule": {"status": "Rejected"},
    "GetDisplayMessages": {"status": "Unknown"},
    "GetInstalledCertificateIds": {"status": "NotFound"},
    "GetLocalListVersion": {"versionNumber": 0},  # 0: no local list
    "GetLog": {"status": "Rejected"},
    "GetMonitoringReport": {"status": "Rejected"},
    "GetReport": {"status": "Rejected"},
    "GetTransactionStatus": {"messagesInQueue": False},
    "InstallCertificate": {"status": "Accepted"},
    "PublishFirmware": {"status": "Accepted"},
    "RequestStartTransaction": {"status": "Accepted"},
    "RequestStopTransaction": {"status": "Accepted"},
    "ReserveNow": {"status": "Accepted"},
    "Reset": {"status": "Accepted"},
    "SendLocalList": {"status": "Accepted"},
    "SetChargingProfile": {"status": "Accepted"},
    "SetDisplayMessage": {"status": "Accepted"},
    "SetMonitoringBase": {"status": "Accepted"},
    "SetMonitoringLevel": {"status": "Accepted"},
    "SetNetworkProfile": {"status": "Accepted"},
    "TriggerMessage": {"status": "Accepted"},
    "UnlockConnector": {"status": "Unlocked"},
    "UnpublishFirmware": {"status": "Unpublished"},
    "UpdateFirmware": {"status": "Accepted"},
}


def _per_item(request: Any, key: str) -> list[Mapping[str, Any]]:
    items = request.get(key) if isinstance(request, Mapping) else None
    return [item for item in items if isinstance(item, Mapping)] if isinstance(items, list) else []


def _variables(request: Any, key: str, result: str, status: str) -> dict[str, Any] | None:
    """One result per requested variable (the schema needs at least one): None if none was requested."""
    results = [{"attributeStatus": status, "component": item.get("component"), "variable": item.get("variable")}
               for item in _per_item(request, key)]
    return {result: results} if results else None


def _monitors(request: Any) -> dict[str, Any] | None:
    results = [{"status": "Accepted", "type": item.get("type"), "severity": item.get("severity"),
                "component": item.get("component"), "variable": item.get("variable")}
               for item in _per_item(request, "setMonitoringData")]
    return {"setMonitoringResult": results} if results else None


def _cleared(request: Any) -> dict[str, Any] | None:
    ids = request.get("id") if isinstance(request, Mapping) else None
    results = [{"status": "Accepted", "id": i} for i in ids or [] if isinstance(i, int)] if isinstance(ids, list) \
        else []
    return {"clearMonitoringResult": results} if results else None


#: 2.x commands whose answer lists what was asked for: built from the request.
BUILT_ANSWERS_V2: dict[str, Callable[[Any], dict[str, Any] | None]] = {
    "GetVariables": lambda r: _variables(r, "getVariableData", "getVariableResult", "Rejected"),
    "SetVariables": lambda r: _variables(r, "setVariableData", "setVariableResult", "Accepted"),
    "SetVariableMonitoring": _monitors,
    "ClearVariableMonitoring": _cleared,
}

#: Every command a backend sends to a 1.6 wallbox or a 2.0.1 / 2.1 station (2.1-only commands
#: such as SetDERControl are forwarded or rejected; ``answer`` mode rejects them with NotSupported).
COMMANDS = frozenset(LOCAL_ANSWERS) | frozenset(LOCAL_ANSWERS_V2) | frozenset(BUILT_ANSWERS_V2)

#: Commands that change nothing on the wallbox: secondaries may send them by default.
#: (TriggerMessage makes the wallbox send a message it would send anyway; every
#: upstream receives it, as it does the 2.x reports that GetBaseReport / GetReport start.)
#: GetDiagnostics/GetLog are not here: they make the wallbox upload files to a URL of the caller's choosing.
READ_ONLY = frozenset({"GetConfiguration", "GetCompositeSchedule", "GetLocalListVersion",
                       "TriggerMessage", "ExtendedTriggerMessage",
                       "GetVariables", "GetBaseReport", "GetReport", "GetChargingProfiles", "GetMonitoringReport",
                       "GetTransactionStatus", "GetDisplayMessages"})

#: State only one upstream may change per wallbox: name → commands (1.6 and 2.x names).
EXCLUSIVE: dict[str, frozenset[str]] = {
    "charging profiles": frozenset({"SetChargingProfile", "ClearChargingProfile"}),
    "Reset": frozenset({"Reset"}),
    "firmware": frozenset({"UpdateFirmware", "SignedUpdateFirmware"}),
    "availability": frozenset({"ChangeAvailability"}),
    "configuration changes": frozenset({"ChangeConfiguration", "SetVariables", "SetNetworkProfile"}),
}


@functools.cache
def known_actions() -> frozenset[str]:
    """Every OCPP 1.6, 2.0.1 and 2.1 action name (for checking configured action lists)."""
    from ocpp.v16.enums import Action as Action16
    from ocpp.v201.enums import Action as Action201
    from ocpp.v21.enums import Action as Action21

    return frozenset(a.value for enum in (Action16, Action201, Action21) for a in enum)


def default_mode(action: str, *, primary: bool) -> str:
    if primary:
        return FORWARD
    return FORWARD if action in READ_ONLY else REJECT


def mode_for(table: Mapping[str, str], action: str, *, primary: bool) -> str:
    """The mode of ``action`` under one upstream's table (explicit, then ``*``, then default)."""
    mode = table.get(action)
    if mode is None:
        mode = table.get(ANY)
    return mode if mode is not None else default_mode(action, primary=primary)


@dataclass(frozen=True, slots=True)
class Decision:
    """``reply`` is the frame the proxy sends back to the upstream instead of forwarding."""

    mode: Mode
    reply: str | None = None


#: The table of an upstream without one (read only).
_DEFAULTS: Mapping[str, str] = MappingProxyType({})


class CommandPolicy:
    """Per-upstream tables for one wallbox; upstreams not listed get the defaults."""

    def __init__(self, primary: str, tables: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.primary = primary
        # An empty table is the defaults: not kept (one policy per session, most with no table).
        self.tables: dict[str, dict[str, str]] = {name: dict(t) for name, t in (tables or {}).items() if t}

    def mode(self, upstream: str, action: str) -> str:
        return mode_for(self.tables.get(upstream, _DEFAULTS), action, primary=upstream == self.primary)

    def decide(self, upstream: str, frame: Frame, version: OcppVersion | None = OcppVersion.V16) -> Decision:
        """Judge one CALL from ``upstream`` towards the wallbox; answers are shaped for ``version``."""
        action = frame.action or ""
        mode = self.mode(upstream, action)
        if mode == FORWARD:
            return Decision(FORWARD)
        msg_id = frame.msg_id or ""
        if mode == ANSWER:
            if version is OcppVersion.V16:
                return Decision(ANSWER, build_result(msg_id, LOCAL_ANSWERS.get(action, {})))
            payload = answer_v2(action, frame) if version is not None else None
            if payload is not None:
                return Decision(ANSWER, build_result(msg_id, payload))
            return Decision(ANSWER, build_error(msg_id, "NotSupported",
                                                f"ocpp-proxy: no local answer to {action} in this OCPP version"))
        return Decision(REJECT, rejection(msg_id, upstream, action))


def answer_v2(action: str, frame: Frame) -> dict[str, Any] | None:
    """The 2.0.1 / 2.1 answer to a command in ``answer`` mode; None when the proxy has none."""
    if action in LOCAL_ANSWERS_V2:
        return LOCAL_ANSWERS_V2[action]
    builder = BUILT_ANSWERS_V2.get(action)
    if builder is None:
        return None
    try:
        return builder(payload_of(frame))
    except (ValueError, IndexError):
        return None


def rejection(msg_id: str, upstream: str, action: str) -> str:
    if action in COMMANDS:
        return build_error(msg_id, "SecurityError",
                           f"ocpp-proxy: {action} from upstream {upstream!r} is not permitted by its policy")
    return build_error(msg_id, "NotSupported", f"ocpp-proxy: {action} is not forwarded from upstream {upstream!r}")


# --- start-up check ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Conflict:
    """Two upstreams of one wallbox may both change ``state`` (via ``actions``)."""

    state: str
    first: str
    second: str
    #: The commands of ``state`` that ``second`` forwards (first such key names the line).
    actions: tuple[str, ...]


def forwarding(table: Mapping[str, str], actions: frozenset[str], *, primary: bool) -> tuple[str, ...]:
    return tuple(sorted(a for a in actions if mode_for(table, a, primary=primary) == FORWARD))


def conflicts(upstreams: Sequence[tuple[str, Mapping[str, str], bool]]) -> Iterator[Conflict]:
    """Pairs of upstreams (name, policy table, is primary) that may both send one kind of state."""
    for state, actions in EXCLUSIVE.items():
        senders = [(name, forwarding(table, actions, primary=primary)) for name, table, primary in upstreams]
        senders = [(name, found) for name, found in senders if found]
        first = senders[0][0] if senders else ""
        for name, found in senders[1:]:
            yield Conflict(state, first, name, found)
