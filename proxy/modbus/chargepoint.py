"""The OCPP 1.6 charge point a Modbus-only wallbox appears as (sans-IO).

:class:`VirtualChargePoint` is a plain object: the runner feeds it what
happened (the session opened or closed, a frame arrived, the wallbox's
registers were read, a read failed, time passed) and carries out what it
returns: :class:`Send` a frame towards the backend, :class:`SetCurrent` on
the wallbox, :class:`Log` an event. It never touches a socket or a clock.

Behaviour follows a real OCPP 1.6J wallbox with one connector, so a backend
cannot tell the difference: BootNotification first (retried while Pending or
Rejected), Heartbeats, StatusNotification from the vehicle state register,
Authorize + StartTransaction with ``fixed_id_tag`` when a car plugs in (or
after RemoteStartTransaction), periodic MeterValues, StopTransaction on
unplug, RemoteStop, reset or deauthorisation. Charging profiles are kept and
evaluated like a wallbox does (:func:`proxy.loadmgmt.profiles.composite_limit`): the
backend's and the proxy's own ChargePointMaxProfile meet here, so the current
written to the wallbox is min(backend, local engine), and 0 unless a
transaction runs. One CALL is outstanding at a time (OCPP-J 4.1.1); the
others wait in order, transaction messages are retried.

Errors for CALLs follow OCPP-J 1.6 section 4.2.3: an action of OCPP 1.6 this
charge point does not support gets ``NotSupported``, an unknown one
``NotImplemented``.
"""

from __future__ import annotations

import copy
import math
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from ocpp.exceptions import NotImplementedError as OcppNotImplemented
from ocpp.exceptions import NotSupportedError, OCPPError, PropertyConstraintViolationError
from ocpp.messages import Call, CallError, CallResult, _validate_payload, unpack
from ocpp.v16.enums import Action as V16Action

from proxy.modbus.maps import WallboxReading
from proxy.loadmgmt.profiles import (
    MAX_PROFILE,
    TX_PROFILE,
    Installed,
    ProfileError,
    Transaction,
    composite_limit,
    composite_schedule,
    format_time,
    from_amps,
    parse_clear,
    parse_set,
    parse_time,
    replaces,
)

CONNECTOR = 1
#: Transaction messages are retried this often (OCPP key TransactionMessageAttempts).
ATTEMPTS = 3
MAX_STACK_LEVEL = 99
MAX_PROFILES = 20
MEASURANDS = "Energy.Active.Import.Register,Current.Import,Power.Active.Import"
_TRANSACTION_ACTIONS = frozenset({"StartTransaction", "StopTransaction", "MeterValues"})


# --- actions ------------------------------------------------------------------------

@dataclass(frozen=True)
class Send:
    text: str


@dataclass(frozen=True)
class SetCurrent:
    """Write this limit (A per phase; 0 stops charging) to the wallbox."""

    amps: float


@dataclass(frozen=True)
class Log:
    event: str
    level: str = "info"
    fields: dict[str, Any] = field(default_factory=dict)


Action = Send | SetCurrent | Log


# --- settings and state -------------------------------------------------------------------

@dataclass(frozen=True)
class VirtualSettings:
    charger_id: str
    vendor: str
    model: str
    serial_number: str = ""
    fixed_id_tag: str = ""
    min_current: float = 6.0
    max_current: float = 16.0
    phases: int = 3
    meter_interval: int = 60
    call_timeout: float = 30.0
    fault_after: float = 10.0
    connection_timeout: int = 60
    heartbeat_interval: int = 300


@dataclass
class _Call:
    action: str
    build: Callable[[], dict[str, Any]]
    #: Called with the CALLRESULT payload, ``now`` and the wall clock.
    on_result: Callable[[dict[str, Any], float, datetime], list[Action]] | None = None
    attempts: int = 0


@dataclass
class _Outstanding:
    msg_id: str
    call: _Call
    deadline: float


@dataclass
class _Tx:
    id_tag: str
    meter_start: int
    started: datetime
    transaction_id: int | None = None
    #: reason, meterStop and timestamp once the transaction ends (the StopTransaction to deliver).
    stop: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None  # a RemoteStart's TxProfile, installed once the id is known

    @property
    def stopping(self) -> bool:
        return self.stop is not None

    def record(self) -> dict[str, Any]:
        return {"id_tag": self.id_tag, "meter_start": self.meter_start, "started": format_time(self.started),
                "transaction_id": self.transaction_id, "stop": self.stop}


@dataclass
class _Config:
    """The OCPP configuration keys; ``None`` writable type means read-only."""

    values: dict[str, str]
    writable: dict[str, type]


def _keys(settings: VirtualSettings) -> _Config:
    values = {
        "HeartbeatInterval": str(settings.heartbeat_interval),
        "MeterValueSampleInterval": str(settings.meter_interval),
        "ConnectionTimeOut": str(settings.connection_timeout),
        "AuthorizeRemoteTxRequests": "false",
        "MeterValuesSampledData": MEASURANDS,
        "NumberOfConnectors": "1",
        "SupportedFeatureProfiles": "Core,SmartCharging,RemoteTrigger",
        "ChargeProfileMaxStackLevel": str(MAX_STACK_LEVEL),
        "ChargingScheduleAllowedChargingRateUnit": "Current,Power",
        "ChargingScheduleMaxPeriods": "24",
        "MaxChargingProfilesInstalled": str(MAX_PROFILES),
        "StopTransactionOnEVSideDisconnect": "true",
        "StopTransactionOnInvalidId": "true",
        "UnlockConnectorOnEVSideDisconnect": "true",
        "LocalPreAuthorize": "false",
        "LocalAuthorizeOffline": "false",
        "TransactionMessageAttempts": str(ATTEMPTS),
    }
    writable = {"HeartbeatInterval": int, "MeterValueSampleInterval": int, "ConnectionTimeOut": int,
                "AuthorizeRemoteTxRequests": bool}
    return _Config(values, writable)


class VirtualChargePoint:
    def __init__(self, settings: VirtualSettings) -> None:
        self.settings = settings
        self.keys = _keys(settings)
        self.online = False
        self.booted = False
        self._queue: deque[_Call] = deque()
        self._outstanding: _Outstanding | None = None
        self._boot_retry: float | None = None
        self._last_call = -math.inf
        self.reading: WallboxReading | None = None
        self.plugged = False
        self._failing_since: float | None = None
        self._last_error: str | None = None
        self.lost = False  # no good reading for fault_after
        self.inoperative = False
        self._scheduled_inoperative = False
        self._changed_keys: dict[str, str] = {}  # by ChangeConfiguration: kept across restarts
        self.tx: _Tx | None = None
        self._plug_used = False    # this plug-in already started its transaction (or tried to)
        self._finished = False     # this plug-in's transaction has ended: Finishing until unplugged
        self._authorizing = False
        self._remote: tuple[str, float, dict[str, Any] | None] | None = None  # idTag, deadline, profile
        self.profiles: list[Installed] = []
        self.status: str | None = None  # last StatusNotification sent for the connector
        self._next_meter: float | None = None
        self.current: float | None = None  # last SetCurrent
        self._restored = False  # a transaction from before a restart waits for the first reading

    # -- durability: what a wallbox keeps across a restart ------------------------------------

    def record(self) -> dict[str, Any] | None:
        """What a real wallbox keeps across a reboot, or None when there is nothing to keep.

        The open transaction; the availability (OCPP 1.6 section 5.2: "Connector set to
        Unavailable shall persist a reboot"); configuration keys the backend changed; the
        installed charging profiles. The runner stores it whenever it changes.
        """
        state: dict[str, Any] = {}
        if self.tx is not None:
            state["transaction"] = self.tx.record()
        if self.inoperative or self._scheduled_inoperative:
            state["availability"] = "Inoperative" if self.inoperative else "Scheduled"
        if self._changed_keys:
            state["configuration"] = dict(self._changed_keys)
        if self.profiles:
            state["profiles"] = [{"connector": i.connector, "installed_at": format_time(i.installed_at),
                                  "profile": dict(i.profile.raw)} for i in self.profiles]
        return state or None

    def restore(self, record: dict[str, Any]) -> list[Action]:
        """Take back what :meth:`record` kept before a restart.

        A transaction goes on at the first reading if the car is still plugged in, and
        stops with reason ``PowerLoss`` if it is not (at-least-once: an unanswered
        message is sent again). Keys and profiles pass the same checks as from the backend.
        """
        if "id_tag" in record:  # written when the record held only the transaction
            record = {"transaction": record}
        actions = self._restore_transaction(record["transaction"]) if "transaction" in record else []
        availability = record.get("availability")
        self.inoperative, self._scheduled_inoperative = availability == "Inoperative", availability == "Scheduled"
        for key, value in dict(record.get("configuration", {})).items():
            if self._change_key(str(key), str(value)) != "Accepted":
                actions.append(Log("virtual_record_key_dropped", "warning", {"key": key}))
        for item in record.get("profiles", []):
            installed_at = parse_time(item["installed_at"])
            if installed_at is None or self._install(item["connector"], item["profile"], installed_at) != "Accepted":
                actions.append(Log("virtual_record_profile_dropped", "warning", {"profile": item.get("profile")}))
        return actions + [Log("virtual_state_restored", "info", {
            "availability": availability or "Operative", "keys": len(self._changed_keys),
            "profiles": len(self.profiles)})]

    def _restore_transaction(self, record: dict[str, Any]) -> list[Action]:
        started = parse_time(record["started"])
        if started is None:
            raise ValueError("the record has no start time")
        tx = self.tx = _Tx(str(record["id_tag"]), int(record["meter_start"]), started,
                           record.get("transaction_id"), record.get("stop"))
        self._plug_used = self._restored = True
        if tx.transaction_id is None:
            self._queue.append(self._start_call(tx))
        if tx.stop is not None:
            self._queue.append(self._stop_call(tx))
        return [Log("virtual_transaction_restored", "info", {"transaction_id": tx.transaction_id,
                                                             "stopping": tx.stopping})]

    # -- the session ---------------------------------------------------------------------

    def connected(self, now: float) -> list[Action]:
        """A session opened: boot first; what was queued while away follows."""
        self.online, self.booted = True, False
        self.status = None
        if self._outstanding is not None:  # unanswered when the session ended: send again
            self._queue.appendleft(self._outstanding.call)
            self._outstanding = None
        self._queue.appendleft(self._boot_call())
        return self._pump(now)

    def disconnected(self) -> None:
        self.online = self.booted = False

    # -- frames from the backend (or the proxy's limit engine) ---------------------------------------

    def received(self, text: str, now: float, wall: datetime) -> list[Action]:
        try:
            message = unpack(text)
        except OCPPError as exc:
            return [Log("virtual_bad_frame", "warning", {"error": str(exc)[:200]})]
        if isinstance(message, Call):
            return self._handle_call(message, now, wall)
        outstanding = self._outstanding
        if outstanding is None or message.unique_id != outstanding.msg_id:
            return [Log("virtual_unexpected_answer", "warning", {"id": str(message.unique_id)[:40]})]
        self._outstanding = None
        if isinstance(message, CallError):
            actions = self._failed(outstanding.call, f"{message.error_code}: {message.error_description}")
        else:
            on_result = outstanding.call.on_result
            actions = on_result(message.payload, now, wall) if on_result else []
        return actions + self._apply(now, wall) + self._pump(now)

    def _handle_call(self, call: Call, now: float, wall: datetime) -> list[Action]:
        handler = _HANDLERS.get(call.action)
        try:
            if handler is None:
                if call.action in _KNOWN_ACTIONS:
                    raise NotSupportedError(details={"cause": f"{call.action} is not supported by this charge point"})
                raise OcppNotImplemented(details={"cause": f"unknown action {call.action!r}"})
            # a copy: the validator turns the profile's floats into Decimals in place
            _validate_payload(Call(call.unique_id, call.action, copy.deepcopy(call.payload)), "1.6")
            payload, actions = handler(self, call.payload, now, wall)
        except OCPPError as exc:
            return [Send(call.create_call_error(exc).to_json()),
                    Log("virtual_call_refused", "info", {"action": call.action, "error": exc.code})]
        result = CallResult(call.unique_id, payload, call.action).to_json()
        return [Send(result), *actions, *self._pump(now)]

    # -- the wallbox -----------------------------------------------------------------------------

    def read(self, reading: WallboxReading, now: float, wall: datetime) -> list[Action]:
        actions: list[Action] = []
        if self.lost:
            actions.append(Log("virtual_wallbox_back"))
        self.reading, self._failing_since, self.lost, self._last_error = reading, None, False, None
        fault = reading.state.fault
        if fault is None and reading.state.plugged != self.plugged:
            actions += self._plug_changed(reading.state.plugged, now, wall)
        if self._restored and fault is None:
            self._restored = False
            if not reading.state.plugged and self.tx is not None and not self.tx.stopping:
                actions += self._stop("PowerLoss", now, wall)  # unplugged while the proxy was down
        actions += self._apply(now, wall)  # Preparing goes out before the Authorize, as on a real wallbox
        actions += self._maybe_start(now, wall)
        actions += self._apply(now, wall)
        return actions + self._pump(now)

    def read_failed(self, reason: str, now: float, wall: datetime) -> list[Action]:
        actions: list[Action] = []
        if reason != self._last_error:  # a wallbox that is off fails every poll: one line per kind of failure
            actions.append(Log("virtual_read_failed", "warning", {"error": reason}))
        self._last_error = reason
        if self._failing_since is None:
            self._failing_since = now
        if not self.lost and now - self._failing_since >= self.settings.fault_after:
            self.lost = True
            actions.append(Log("virtual_wallbox_lost", "error", {"seconds": self.settings.fault_after}))
        return actions + self._apply(now, wall) + self._pump(now)

    def _plug_changed(self, plugged: bool, now: float, wall: datetime) -> list[Action]:
        self.plugged = plugged
        if plugged:
            return [Log("virtual_plugged")]
        self._plug_used = self._finished = False
        actions: list[Action] = [Log("virtual_unplugged")]
        if self.tx is not None and not self.tx.stopping:
            actions += self._stop("EVDisconnected", now, wall)
        return actions

    # -- time --------------------------------------------------------------------------------

    def tick(self, now: float, wall: datetime) -> list[Action]:
        actions: list[Action] = []
        outstanding = self._outstanding
        if outstanding is not None and now >= outstanding.deadline:
            self._outstanding = None
            actions += self._failed(outstanding.call, "no answer")
        if self._boot_retry is not None and now >= self._boot_retry and self.online and not self.booted:
            self._boot_retry = None
            self._queue.appendleft(self._boot_call())
        if self._remote is not None and now >= self._remote[1]:
            actions.append(Log("virtual_remote_start_expired", "info", {"id_tag": self._remote[0]}))
            self._remote = None
        if self._meter_due(now):
            self._queue.append(self._meter_call(wall, "Sample.Periodic"))
        if self.booted and now - self._last_call >= self._heartbeat_interval and not self._queue:
            self._queue.append(_Call("Heartbeat", dict))
        return actions + self._apply(now, wall) + self._pump(now)

    def next_deadline(self) -> float:
        """When :meth:`tick` has something to do (the runner also ticks after every poll)."""
        times = [self._last_call + self._heartbeat_interval]
        for t in (self._outstanding.deadline if self._outstanding else None, self._boot_retry, self._next_meter,
                  self._remote[1] if self._remote else None):
            if t is not None:
                times.append(t)
        return min(times)

    @property
    def _heartbeat_interval(self) -> float:
        return max(1, int(self.keys.values["HeartbeatInterval"]) or 86_400)

    # -- outgoing CALLs ---------------------------------------------------------------------------

    def _pump(self, now: float) -> list[Action]:
        if not self.online or self._outstanding is not None or not self._queue:
            return []
        if not self.booted and self._queue[0].action != "BootNotification":
            return []
        call = self._queue.popleft()
        call.attempts += 1
        msg_id = str(uuid.uuid4())  # unique across restarts, as the ocpp library's charge points do
        self._outstanding = _Outstanding(msg_id, call, now + self.settings.call_timeout)
        self._last_call = now
        return [Send(Call(msg_id, call.action, call.build()).to_json())]

    def _failed(self, call: _Call, reason: str) -> list[Action]:
        log = Log("virtual_call_failed", "warning", {"action": call.action, "reason": reason[:200],
                                                     "attempt": call.attempts})
        if call.action == "BootNotification":
            self._boot_retry = self._last_call + self.settings.call_timeout
        elif call.action in _TRANSACTION_ACTIONS and call.attempts < ATTEMPTS:
            self._queue.appendleft(call)  # in order, before anything newer
        elif call.action == "StartTransaction" and self.tx is not None:
            self.tx, self._finished = None, True  # never confirmed: no charging without a transaction
            return [log, Log("virtual_transaction_abandoned", "error", {"attempts": call.attempts})]
        elif call.action == "StopTransaction" and self.tx is not None:
            self.tx = None  # undeliverable: logged loudly rather than blocking the connector forever
            return [log, Log("virtual_stop_undelivered", "error", {"attempts": call.attempts})]
        elif call.action == "Authorize":
            self._authorizing = False
        return [log]

    def _boot_call(self) -> _Call:
        def build() -> dict[str, Any]:
            payload = {"chargePointVendor": self.settings.vendor[:20], "chargePointModel": self.settings.model[:20]}
            if self.settings.serial_number:
                payload["chargePointSerialNumber"] = self.settings.serial_number[:25]
            return payload
        return _Call("BootNotification", build, self._booted)

    def _booted(self, payload: dict[str, Any], now: float, wall: datetime) -> list[Action]:
        status, interval = payload.get("status"), payload.get("interval")
        if isinstance(interval, int) and interval > 0:
            self.keys.values["HeartbeatInterval"] = str(interval)
        if status != "Accepted":
            self._boot_retry = self._last_call + (interval if isinstance(interval, int) and interval > 0 else 30)
            return [Log("virtual_boot_not_accepted", "warning", {"status": status})]
        self.booted = True
        self.status = None
        self._queue.appendleft(self._status_call(0, self._charge_point_status))
        return [Log("virtual_booted", "info", {"heartbeat": self._heartbeat_interval})]

    def _status_call(self, connector: int, status: str | Callable[[], str]) -> _Call:
        """A status known now is sent as it is now (with its fault code); a callable is asked at send time."""
        if isinstance(status, str):
            payload = self._status_payload(connector, status)
            return _Call("StatusNotification", lambda: payload)
        return _Call("StatusNotification", lambda: self._status_payload(connector, status()))

    def _status_payload(self, connector: int, status: str) -> dict[str, Any]:
        payload = {"connectorId": connector, "status": status, "errorCode": "NoError"}
        if status == "Faulted":
            payload["errorCode"] = "OtherError"
            code = self.reading.state.fault if self.reading and not self.lost else None
            payload["vendorErrorCode" if code else "info"] = code or "Modbus wallbox not answering"
        return payload

    # -- status and current ---------------------------------------------------------------------

    def _charge_point_status(self) -> str:
        """Connector 0, the charge point as a whole: only its availability (OCPP 1.6 section 4.9)."""
        return "Unavailable" if self.inoperative else "Available"

    def connector_status(self) -> str:
        reading = self.reading
        if self.lost or reading is None or reading.state.fault is not None:
            return "Faulted" if self.lost or reading is not None else "Unavailable"
        if self.tx is not None and not self.tx.stopping:
            if reading.state.requesting:
                return "Charging" if reading.state.charging else "SuspendedEVSE"
            return "SuspendedEV" if (self.current or 0) > 0 else "SuspendedEVSE"
        if self.inoperative:
            return "Unavailable"
        if self.plugged:
            return "Finishing" if self._finished else "Preparing"
        return "Preparing" if self._remote else "Available"

    def _apply(self, now: float, wall: datetime) -> list[Action]:
        actions: list[Action] = []
        amps = self._target(wall)
        if amps != self.current:
            self.current = amps
            actions.append(SetCurrent(amps))
        status = self.connector_status()
        known = self.reading is not None or self.lost  # before the first reading the connector's state is unknown
        if status != self.status and self.booted and known:
            self.status = status
            self._queue.append(self._status_call(CONNECTOR, status))
        return actions

    def _target(self, wall: datetime) -> float:
        tx = self.tx
        if tx is None or tx.stopping or tx.transaction_id is None or self.inoperative or self.lost:
            return 0.0
        running = [Transaction(CONNECTOR, tx.transaction_id, tx.started)]
        limit = composite_limit(self.profiles, wall, charger_phases=self.settings.phases, transactions=running,
                                connectors=(CONNECTOR,))
        amps = self.settings.max_current if limit is None else min(limit, self.settings.max_current)
        return math.floor(amps * 10 + 1e-6) / 10 if amps >= self.settings.min_current else 0.0

    # -- transactions -----------------------------------------------------------------------------

    def _maybe_start(self, now: float, wall: datetime) -> list[Action]:
        if (not self.plugged or self._plug_used or self.tx is not None or self.inoperative or self.lost
                or self.reading is None or self.reading.state.fault):
            return []
        if self._remote is not None:
            id_tag, _, profile = self._remote
            self._remote = None
            self._plug_used = True
            if self.keys.values["AuthorizeRemoteTxRequests"] == "true":
                return self._authorize(id_tag, wall, profile)
            return self._begin(id_tag, wall, profile)
        if self.settings.fixed_id_tag:
            self._plug_used = True
            return self._authorize(self.settings.fixed_id_tag, wall, None)
        return []

    def _authorize(self, id_tag: str, wall: datetime, profile: dict[str, Any] | None) -> list[Action]:
        def answered(payload: dict[str, Any], now: float, wall: datetime) -> list[Action]:
            self._authorizing = False
            status = (payload.get("idTagInfo") or {}).get("status")
            if status != "Accepted":
                return [Log("virtual_authorize_refused", "warning", {"id_tag": id_tag, "status": status})]
            if not self.plugged:
                return [Log("virtual_unplugged_before_start")]
            return self._begin(id_tag, wall, profile)
        self._authorizing = True
        self._queue.append(_Call("Authorize", lambda: {"idTag": id_tag}, answered))
        return [Log("virtual_authorizing", "info", {"id_tag": id_tag})]

    def _begin(self, id_tag: str, wall: datetime, profile: dict[str, Any] | None) -> list[Action]:
        energy = int(self.reading.energy_wh) if self.reading else 0
        tx = self.tx = _Tx(id_tag, energy, wall, profile=profile)
        self._queue.append(self._start_call(tx))
        self._next_meter = None
        return [Log("virtual_transaction_starting", "info", {"id_tag": id_tag, "meter_start": energy})]

    def _start_call(self, tx: _Tx) -> _Call:
        def answered(payload: dict[str, Any], now: float, wall: datetime) -> list[Action]:
            tx.transaction_id = int(payload.get("transactionId") or 0)
            status = (payload.get("idTagInfo") or {}).get("status")
            actions: list[Action] = [Log("virtual_transaction_started", "info",
                                         {"transaction_id": tx.transaction_id, "id_tag": tx.id_tag})]
            if tx.profile is not None:
                self._install(CONNECTOR, {**tx.profile, "transactionId": tx.transaction_id}, wall)
            if status != "Accepted" and self.tx is tx and not tx.stopping:
                actions += self._stop("DeAuthorized", now, wall)
            return actions

        def build() -> dict[str, Any]:
            return {"connectorId": CONNECTOR, "idTag": tx.id_tag, "meterStart": tx.meter_start,
                    "timestamp": format_time(tx.started)}
        return _Call("StartTransaction", build, answered)

    def _stop(self, reason: str, now: float, wall: datetime) -> list[Action]:
        tx = self.tx
        assert tx is not None
        meter_stop = int(self.reading.energy_wh) if self.reading else tx.meter_start
        tx.stop = {"reason": reason, "meter_stop": meter_stop, "timestamp": format_time(wall)}
        self._finished = self.plugged
        self._queue.append(self._stop_call(tx))
        self.profiles = [i for i in self.profiles if i.profile.purpose != TX_PROFILE]
        self._next_meter = None
        if self._scheduled_inoperative:
            self._scheduled_inoperative, self.inoperative = False, True
        return [Log("virtual_transaction_stopping", "info", {"reason": reason, "meter_stop": meter_stop})]

    def _stop_call(self, tx: _Tx) -> _Call:
        def build() -> dict[str, Any]:
            stop = tx.stop or {}
            return {"transactionId": tx.transaction_id or 0, "idTag": tx.id_tag, "meterStop": stop["meter_stop"],
                    "timestamp": stop["timestamp"], "reason": stop["reason"]}

        def answered(payload: dict[str, Any], now: float, wall: datetime) -> list[Action]:
            if self.tx is tx:
                self.tx = None
            return [Log("virtual_transaction_stopped", "info", {"transaction_id": tx.transaction_id})]
        return _Call("StopTransaction", build, answered)

    def _meter_due(self, now: float) -> bool:
        tx, interval = self.tx, int(self.keys.values["MeterValueSampleInterval"])
        if tx is None or tx.stopping or interval <= 0 or self.reading is None or self.lost:
            self._next_meter = None
            return False
        if self._next_meter is None:
            self._next_meter = now + interval
            return False
        if now < self._next_meter:
            return False
        self._next_meter = now + interval
        return True

    def _meter_call(self, wall: datetime, context: str) -> _Call:
        reading, tx = self.reading, self.tx

        def build() -> dict[str, Any]:
            values = []
            if reading is not None:
                values.append(_sample(f"{reading.energy_wh:.0f}", "Energy.Active.Import.Register", "Wh", context))
                for phase, amps in zip(("L1", "L2", "L3"), reading.currents):
                    values.append({**_sample(f"{amps:.1f}", "Current.Import", "A", context), "phase": phase})
                if reading.power_w is not None:
                    values.append(_sample(f"{reading.power_w:.0f}", "Power.Active.Import", "W", context))
            payload: dict[str, Any] = {"connectorId": CONNECTOR,
                                       "meterValue": [{"timestamp": format_time(wall), "sampledValue": values}]}
            if tx is not None and tx.transaction_id:
                payload["transactionId"] = tx.transaction_id
            return payload
        return _Call("MeterValues", build)

    # -- charging profiles -------------------------------------------------------------------------

    def _install(self, connector: int, profile: dict[str, Any], wall: datetime) -> str:
        try:
            _, parsed = parse_set({"connectorId": connector, "csChargingProfiles": profile})
        except ProfileError:
            return "Rejected"
        tx = self.tx
        if parsed.stack_level > MAX_STACK_LEVEL or connector not in (0, CONNECTOR):
            return "Rejected"
        if parsed.purpose == MAX_PROFILE and connector != 0:
            return "Rejected"
        if parsed.purpose == TX_PROFILE:
            active = tx is not None and not tx.stopping and tx.transaction_id is not None
            if connector == 0 or not active or parsed.transaction_id not in (None, tx.transaction_id if tx else None):
                return "Rejected"
        item = Installed(connector, parsed, wall)
        kept = [old for old in self.profiles if not replaces(item, old)]
        if len(kept) >= MAX_PROFILES:
            return "Rejected"
        self.profiles = [*kept, item]
        return "Accepted"

    # -- handlers: payload → (answer payload, actions) -----------------------------------------------

    def _on_set_profile(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        status = self._install(payload["connectorId"], payload["csChargingProfiles"], wall)
        return {"status": status}, [Log("virtual_profile", "info", {"status": status})] + self._apply(now, wall)

    def _on_clear_profile(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        try:
            request = parse_clear(payload)
        except ProfileError as exc:
            raise PropertyConstraintViolationError(details={"cause": str(exc)}) from None
        kept = [i for i in self.profiles if not request.matches(i)]
        status = "Accepted" if len(kept) < len(self.profiles) else "Unknown"
        self.profiles = kept
        return {"status": status}, self._apply(now, wall)

    def _on_composite(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        if payload["connectorId"] not in (0, CONNECTOR):
            return {"status": "Rejected"}, []
        tx = self.tx
        running = [Transaction(CONNECTOR, tx.transaction_id, tx.started)] if tx and tx.transaction_id else []
        start = wall.replace(microsecond=0)
        unit = payload.get("chargingRateUnit", "A")
        steps = composite_schedule(self.profiles, start, payload["duration"], charger_phases=self.settings.phases,
                                   transactions=running, connectors=(CONNECTOR,))
        periods = [{"startPeriod": offset,
                    "limit": from_amps(self.settings.max_current if amps is None else amps, unit,
                                       self.settings.phases)} for offset, amps in steps]
        schedule = {"duration": payload["duration"], "startSchedule": format_time(start), "chargingRateUnit": unit,
                    "chargingSchedulePeriod": periods}
        return {"status": "Accepted", "connectorId": payload["connectorId"], "scheduleStart": format_time(start),
                "chargingSchedule": schedule}, []

    def _on_remote_start(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        connector = payload.get("connectorId", CONNECTOR)
        profile = payload.get("chargingProfile")
        busy = self.tx is not None or self._remote is not None or self._authorizing
        if (connector != CONNECTOR or busy or self.inoperative or self.lost
                or (profile is not None and profile.get("chargingProfilePurpose") != TX_PROFILE)):
            return {"status": "Rejected"}, []
        id_tag = payload["idTag"]
        self._remote = (id_tag, now + int(self.keys.values["ConnectionTimeOut"]), profile)
        if self.plugged and self.tx is None:
            self._plug_used = self._finished = False  # a new start on a plug-in whose transaction ended
        return {"status": "Accepted"}, [Log("virtual_remote_start", "info", {"id_tag": id_tag}),
                                        *self._maybe_start(now, wall), *self._apply(now, wall)]

    def _on_remote_stop(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        tx = self.tx
        if tx is None or tx.stopping or tx.transaction_id != payload["transactionId"]:
            return {"status": "Rejected"}, []
        return {"status": "Accepted"}, self._stop("Remote", now, wall) + self._apply(now, wall)

    def _on_availability(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        if payload["connectorId"] not in (0, CONNECTOR):
            return {"status": "Rejected"}, []
        operative = payload["type"] == "Operative"
        if not operative and self.tx is not None and not self.tx.stopping:
            self._scheduled_inoperative = True
            return {"status": "Scheduled"}, []
        self._scheduled_inoperative = False
        self.inoperative = not operative
        actions = self._apply(now, wall)
        if payload["connectorId"] == 0:
            self._queue.append(self._status_call(0, self._charge_point_status))
        return {"status": "Accepted"}, actions + self._maybe_start(now, wall)

    def _on_reset(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        if payload["type"] != "Soft":  # no way to power-cycle a wallbox over Modbus
            return {"status": "Rejected"}, [Log("virtual_hard_reset_refused", "warning")]
        actions: list[Action] = [Log("virtual_soft_reset")]
        if self.tx is not None and not self.tx.stopping:
            actions += self._stop("SoftReset", now, wall)
        boot = self._boot_call()
        build = boot.build

        def reboot() -> dict[str, Any]:
            self.booted, self.status = False, None  # nothing but the Boot until it is accepted
            return build()
        self._queue.append(replace(boot, build=reboot))
        return {"status": "Accepted"}, actions + self._apply(now, wall)

    def _on_get_configuration(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        wanted = payload.get("key") or list(self.keys.values)
        known = [{"key": k, "readonly": k not in self.keys.writable, "value": self.keys.values[k]}
                 for k in wanted if k in self.keys.values]
        answer: dict[str, Any] = {"configurationKey": known}
        unknown = [k for k in wanted if k not in self.keys.values]
        if unknown:
            answer["unknownKey"] = unknown
        return answer, []

    def _on_change_configuration(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        key, value = payload["key"], payload["value"]
        status = self._change_key(key, value)
        if status != "Accepted":
            return {"status": status}, []
        return {"status": status}, [Log("virtual_configuration_changed", "info",
                                        {"key": key, "value": self.keys.values[key]})]

    def _change_key(self, key: str, value: str) -> str:
        """ChangeConfiguration's status; an accepted value is kept across restarts, as a wallbox does."""
        if key not in self.keys.values:
            return "NotSupported"
        kind = self.keys.writable.get(key)
        if kind is None:
            return "Rejected"
        if kind is bool:
            if value.lower() not in ("true", "false"):
                return "Rejected"
            value = value.lower()
        elif not value.isdigit():
            return "Rejected"
        self.keys.values[key] = self._changed_keys[key] = value
        if key == "MeterValueSampleInterval":
            self._next_meter = None
        return "Accepted"

    def _on_trigger(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        requested = payload["requestedMessage"]
        if requested == "BootNotification":
            self._queue.append(self._boot_call())
        elif requested == "Heartbeat":
            self._queue.append(_Call("Heartbeat", dict))
        elif requested == "StatusNotification":
            connector = payload.get("connectorId", CONNECTOR)
            if connector not in (0, CONNECTOR):
                return {"status": "Rejected"}, []
            self._queue.append(self._status_call(connector, self._charge_point_status if connector == 0
                                                 else self.connector_status))
        elif requested == "MeterValues":
            self._queue.append(self._meter_call(wall, "Trigger"))
        else:
            return {"status": "NotImplemented"}, []
        return {"status": "Accepted"}, []

    def _on_unlock(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        return {"status": "NotSupported"}, []  # a fixed cable: nothing to unlock

    def _on_clear_cache(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        return {"status": "Rejected"}, []  # no authorization cache

    def _on_data_transfer(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        return {"status": "UnknownVendorId"}, []


_Handled = tuple[dict[str, Any], list[Action]]
_HANDLERS: dict[str, Callable[[VirtualChargePoint, dict[str, Any], float, datetime], _Handled]] = {
    "SetChargingProfile": VirtualChargePoint._on_set_profile,
    "ClearChargingProfile": VirtualChargePoint._on_clear_profile,
    "GetCompositeSchedule": VirtualChargePoint._on_composite,
    "RemoteStartTransaction": VirtualChargePoint._on_remote_start,
    "RemoteStopTransaction": VirtualChargePoint._on_remote_stop,
    "ChangeAvailability": VirtualChargePoint._on_availability,
    "Reset": VirtualChargePoint._on_reset,
    "GetConfiguration": VirtualChargePoint._on_get_configuration,
    "ChangeConfiguration": VirtualChargePoint._on_change_configuration,
    "TriggerMessage": VirtualChargePoint._on_trigger,
    "UnlockConnector": VirtualChargePoint._on_unlock,
    "ClearCache": VirtualChargePoint._on_clear_cache,
    "DataTransfer": VirtualChargePoint._on_data_transfer,
}
#: Every OCPP 1.6 action: one without a handler here is NotSupported, anything else NotImplemented.
_KNOWN_ACTIONS = frozenset(a.value for a in V16Action)


def _sample(value: str, measurand: str, unit: str, context: str) -> dict[str, Any]:
    return {"value": value, "context": context, "measurand": measurand, "unit": unit}
