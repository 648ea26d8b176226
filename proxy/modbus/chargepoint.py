"""The OCPP 1.6 charge point a Modbus-only wallbox appears as (sans-IO).

:class:`VirtualChargePoint` is a plain object: the runner feeds it what
happened (the session opened or closed, a frame arrived, the wallbox's
registers were read, a read failed, time passed) and carries out what it
returns: :class:`Send` a frame towards the backend, :class:`SetCurrent` on
the wallbox, :class:`Log` an event. It never touches a socket or a clock.

Behaviour follows a real OCPP 1.6J wallbox with one connector (or two: a
two-socket wallbox is one charge point with connectors 1 and 2, each with its
own state, transaction and current), so a backend cannot tell the difference: BootNotification first (retried while Pending or
Rejected), Heartbeats, StatusNotification from the vehicle state register,
Authorize + StartTransaction with ``fixed_id_tag`` when a car plugs in (or
after RemoteStartTransaction), periodic MeterValues, StopTransaction on
unplug, RemoteStop, reset or deauthorisation. Charging profiles are kept and
evaluated like a wallbox does (:func:`proxy.loadmgmt.profiles.composite_limit`): the
backend's and the proxy's own ChargePointMaxProfile meet here, so the current
written to the wallbox is min(backend, local engine), and 0 unless a
transaction runs. With two connectors the ChargePointMaxProfile caps their sum
(:func:`share`). One CALL is outstanding at a time (OCPP-J 4.1.1); the
others wait in order, transaction messages are retried.

Errors for CALLs follow OCPP-J 1.6 section 4.2.3: an action of OCPP 1.6 this
charge point does not support gets ``NotSupported``, an unknown one
``NotImplemented``.
"""

from __future__ import annotations

import copy
import functools
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
    replaces_on_connector,
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
    """Write this limit (A per phase; 0 stops charging) to the wallbox's connector."""

    amps: float
    connector: int = 1


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
    connectors: int = 1


@dataclass
class _Call:
    action: str
    build: Callable[[], dict[str, Any]]
    #: Called with the CALLRESULT payload, ``now`` and the wall clock.
    on_result: Callable[[dict[str, Any], float, datetime], list[Action]] | None = None
    connector: int = 0  # the connector a transaction message or Authorize is for
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
        "NumberOfConnectors": str(settings.connectors),
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


@dataclass
class _Connector:
    """One socket: its wallbox readings, plug, transaction, availability and current."""

    id: int
    reading: WallboxReading | None = None
    plugged: bool = False
    failing_since: float | None = None
    last_error: str | None = None
    lost: bool = False              # no good reading for fault_after
    inoperative: bool = False
    scheduled_inoperative: bool = False
    tx: _Tx | None = None
    plug_used: bool = False         # this plug-in already started its transaction (or tried to)
    finished: bool = False          # this plug-in's transaction has ended: Finishing until unplugged
    authorizing: bool = False
    remote: tuple[str, float, dict[str, Any] | None] | None = None  # idTag, deadline, profile
    status: str | None = None       # last StatusNotification sent for the connector
    next_meter: float | None = None
    current: float | None = None    # last SetCurrent
    restored: bool = False          # a transaction from before a restart waits for the first reading

    @property
    def running(self) -> Transaction | None:
        """The transaction the charging profiles see (confirmed by the backend, not stopping)."""
        tx = self.tx
        if tx is None or tx.stopping or tx.transaction_id is None:
            return None
        return Transaction(self.id, tx.transaction_id, tx.started)

    def record(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.tx is not None:
            state["transaction"] = self.tx.record()
        if self.inoperative or self.scheduled_inoperative:
            state["availability"] = "Inoperative" if self.inoperative else "Scheduled"
        return state


def share(limit: float | None, wanted: dict[int, float], minimum: float) -> dict[int, float]:
    """Split a charge point's limit over its charging connectors (water-filling).

    Each connector gets at most what it wants; what one does not use goes to the
    others; one that would get less than ``minimum`` gets 0 (the latest-numbered
    first) so the rest can charge. Without a limit everyone gets what it wants.
    """
    if limit is None:
        return dict(wanted)
    active = sorted(wanted)
    while True:
        result: dict[int, float] = {c: 0.0 for c in wanted}
        remaining = limit
        order = sorted(active, key=lambda c: wanted[c])
        for i, connector in enumerate(order):
            given = min(wanted[connector], remaining / (len(order) - i))
            result[connector] = given
            remaining -= given
        starved = [c for c in active if result[c] < minimum]
        if not starved or len(active) == 1:
            return result
        active.remove(max(starved))


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
        self.connectors = {n: _Connector(n) for n in range(1, settings.connectors + 1)}
        self._changed_keys: dict[str, str] = {}  # by ChangeConfiguration: kept across restarts
        self.profiles: list[Installed] = []

    # -- connector 1, as a one-socket wallbox's state ------------------------------------------

    def connector(self, number: int = CONNECTOR) -> _Connector:
        return self.connectors[number]

    @property
    def tx(self) -> _Tx | None:
        return self.connectors[CONNECTOR].tx

    @property
    def current(self) -> float | None:
        return self.connectors[CONNECTOR].current

    @property
    def reading(self) -> WallboxReading | None:
        return self.connectors[CONNECTOR].reading

    @property
    def plugged(self) -> bool:
        return self.connectors[CONNECTOR].plugged

    @property
    def lost(self) -> bool:
        return self.connectors[CONNECTOR].lost

    @property
    def inoperative(self) -> bool:
        return all(c.inoperative for c in self.connectors.values())

    def current_for(self, number: int) -> float | None:
        return self.connectors[number].current

    # -- durability: what a wallbox keeps across a restart ------------------------------------

    def record(self) -> dict[str, Any] | None:
        """What a real wallbox keeps across a reboot, or None when there is nothing to keep.

        The open transactions; the availability (OCPP 1.6 section 5.2: "Connector set to
        Unavailable shall persist a reboot"); configuration keys the backend changed; the
        installed charging profiles. Connector 1 is kept at the top level (as a one-socket
        wallbox always was), others under ``connectors``. The runner stores it whenever it changes.
        """
        state: dict[str, Any] = dict(self.connectors[CONNECTOR].record())
        others = {str(n): kept for n, c in self.connectors.items() if n != CONNECTOR and (kept := c.record())}
        if others:
            state["connectors"] = others
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
        actions: list[Action] = []
        kept = {CONNECTOR: record, **{int(n): v for n, v in dict(record.get("connectors", {})).items()}}
        for number, entry in kept.items():
            connector = self.connectors.get(number)
            if connector is None:
                actions.append(Log("virtual_record_connector_dropped", "warning", {"connector": number}))
                continue
            if "transaction" in entry:
                actions += self._restore_transaction(connector, entry["transaction"])
            availability = entry.get("availability")
            connector.inoperative = availability == "Inoperative"
            connector.scheduled_inoperative = availability == "Scheduled"
        for key, value in dict(record.get("configuration", {})).items():
            if self._change_key(str(key), str(value)) != "Accepted":
                actions.append(Log("virtual_record_key_dropped", "warning", {"key": key}))
        for item in record.get("profiles", []):
            installed_at = parse_time(item["installed_at"])
            if installed_at is None or self._install(item["connector"], item["profile"], installed_at) != "Accepted":
                actions.append(Log("virtual_record_profile_dropped", "warning", {"profile": item.get("profile")}))
        return actions + [Log("virtual_state_restored", "info", {
            "availability": record.get("availability") or "Operative", "keys": len(self._changed_keys),
            "profiles": len(self.profiles)})]

    def _restore_transaction(self, connector: _Connector, record: dict[str, Any]) -> list[Action]:
        started = parse_time(record["started"])
        if started is None:
            raise ValueError("the record has no start time")
        tx = connector.tx = _Tx(str(record["id_tag"]), int(record["meter_start"]), started,
                                record.get("transaction_id"), record.get("stop"))
        connector.plug_used = connector.restored = True
        if tx.transaction_id is None:
            self._queue.append(self._start_call(connector, tx))
        if tx.stop is not None:
            self._queue.append(self._stop_call(connector, tx))
        return [Log("virtual_transaction_restored", "info", {"transaction_id": tx.transaction_id,
                                                             "stopping": tx.stopping, "connector": connector.id})]

    # -- the session ---------------------------------------------------------------------

    def connected(self, now: float) -> list[Action]:
        """A session opened: boot first; what was queued while away follows."""
        self.online, self.booted = True, False
        for connector in self.connectors.values():
            connector.status = None
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

    def read(self, reading: WallboxReading, now: float, wall: datetime, connector: int = CONNECTOR) -> list[Action]:
        c = self.connectors[connector]
        actions: list[Action] = []
        if c.lost:
            actions.append(Log("virtual_wallbox_back", "info", {"connector": c.id}))
        c.reading, c.failing_since, c.lost, c.last_error = reading, None, False, None
        fault = reading.state.fault
        if fault is None and reading.state.plugged != c.plugged:
            actions += self._plug_changed(c, reading.state.plugged, now, wall)
        if c.restored and fault is None:
            c.restored = False
            if not reading.state.plugged and c.tx is not None and not c.tx.stopping:
                actions += self._stop(c, "PowerLoss", now, wall)  # unplugged while the proxy was down
        actions += self._apply(now, wall)  # Preparing goes out before the Authorize, as on a real wallbox
        actions += self._maybe_start(c, now, wall)
        actions += self._apply(now, wall)
        return actions + self._pump(now)

    def read_failed(self, reason: str, now: float, wall: datetime, connector: int = CONNECTOR) -> list[Action]:
        c = self.connectors[connector]
        actions: list[Action] = []
        if reason != c.last_error:  # a wallbox that is off fails every poll: one line per kind of failure
            actions.append(Log("virtual_read_failed", "warning", {"error": reason, "connector": c.id}))
        c.last_error = reason
        if c.failing_since is None:
            c.failing_since = now
        if not c.lost and now - c.failing_since >= self.settings.fault_after:
            c.lost = True
            actions.append(Log("virtual_wallbox_lost", "error", {"seconds": self.settings.fault_after,
                                                                  "connector": c.id}))
        return actions + self._apply(now, wall) + self._pump(now)

    def _plug_changed(self, c: _Connector, plugged: bool, now: float, wall: datetime) -> list[Action]:
        c.plugged = plugged
        if plugged:
            return [Log("virtual_plugged", "info", {"connector": c.id})]
        c.plug_used = c.finished = False
        actions: list[Action] = [Log("virtual_unplugged", "info", {"connector": c.id})]
        if c.tx is not None and not c.tx.stopping:
            actions += self._stop(c, "EVDisconnected", now, wall)
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
        for c in self.connectors.values():
            if c.remote is not None and now >= c.remote[1]:
                actions.append(Log("virtual_remote_start_expired", "info", {"id_tag": c.remote[0],
                                                                             "connector": c.id}))
                c.remote = None
            if self._meter_due(c, now):
                self._queue.append(self._meter_call(c, wall, "Sample.Periodic"))
        if self.booted and now - self._last_call >= self._heartbeat_interval and not self._queue:
            self._queue.append(_Call("Heartbeat", dict))
        return actions + self._apply(now, wall) + self._pump(now)

    def next_deadline(self) -> float:
        """When :meth:`tick` has something to do (the runner also ticks after every poll)."""
        times = [self._last_call + self._heartbeat_interval]
        for t in (self._outstanding.deadline if self._outstanding else None, self._boot_retry):
            if t is not None:
                times.append(t)
        for c in self.connectors.values():
            times += [t for t in (c.next_meter, c.remote[1] if c.remote else None) if t is not None]
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
        c = self.connectors.get(call.connector) if call.connector else None
        if call.action == "BootNotification":
            self._boot_retry = self._last_call + self.settings.call_timeout
        elif call.action in _TRANSACTION_ACTIONS and call.attempts < ATTEMPTS:
            self._queue.appendleft(call)  # in order, before anything newer
        elif call.action == "StartTransaction" and c is not None and c.tx is not None:
            c.tx, c.finished = None, True  # never confirmed: no charging without a transaction
            return [log, Log("virtual_transaction_abandoned", "error", {"attempts": call.attempts,
                                                                         "connector": c.id})]
        elif call.action == "StopTransaction" and c is not None and c.tx is not None:
            c.tx = None  # undeliverable: logged loudly rather than blocking the connector forever
            return [log, Log("virtual_stop_undelivered", "error", {"attempts": call.attempts, "connector": c.id})]
        elif call.action == "Authorize" and c is not None:
            c.authorizing = False
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
        for connector in self.connectors.values():
            connector.status = None
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
            c = self.connectors.get(connector)
            code = c.reading.state.fault if c and c.reading and not c.lost else None
            payload["vendorErrorCode" if code else "info"] = code or "Modbus wallbox not answering"
        return payload

    # -- status and current ---------------------------------------------------------------------

    def _charge_point_status(self) -> str:
        """Connector 0, the charge point as a whole: only its availability (OCPP 1.6 section 4.9)."""
        return "Unavailable" if self.inoperative else "Available"

    def connector_status(self, connector: int = CONNECTOR) -> str:
        c = self.connectors[connector]
        reading = c.reading
        if c.lost or reading is None or reading.state.fault is not None:
            return "Faulted" if c.lost or reading is not None else "Unavailable"
        if c.tx is not None and not c.tx.stopping:
            if reading.state.requesting:
                return "Charging" if reading.state.charging else "SuspendedEVSE"
            return "SuspendedEV" if (c.current or 0) > 0 else "SuspendedEVSE"
        if c.inoperative:
            return "Unavailable"
        if c.plugged:
            return "Finishing" if c.finished else "Preparing"
        return "Preparing" if c.remote else "Available"

    def _apply(self, now: float, wall: datetime) -> list[Action]:
        actions: list[Action] = []
        targets = self._targets(wall)
        for c in self.connectors.values():
            amps = targets[c.id]
            if amps != c.current:
                c.current = amps
                actions.append(SetCurrent(amps, c.id))
            status = self.connector_status(c.id)
            known = c.reading is not None or c.lost  # before the first reading the connector's state is unknown
            if status != c.status and self.booted and known:
                c.status = status
                self._queue.append(self._status_call(c.id, status))
        return actions

    def _targets(self, wall: datetime) -> dict[int, float]:
        """Each connector's current: its own profiles, then the charge point's maximum shared between them."""
        phases, top, low = self.settings.phases, self.settings.max_current, self.settings.min_current
        own = [i for i in self.profiles if i.profile.purpose != MAX_PROFILE]
        wanted: dict[int, float] = {}
        for c in self.connectors.values():
            running = c.running
            if running is None or c.inoperative or c.lost:
                continue
            here = [i for i in own if i.connector in (0, c.id)]  # another socket's profiles are not this one's
            limit = composite_limit(here, wall, charger_phases=phases, transactions=[running], connectors=(c.id,))
            wanted[c.id] = top if limit is None else min(limit, top)
        maximum = composite_limit([i for i in self.profiles if i.profile.purpose == MAX_PROFILE], wall,
                                  charger_phases=phases)
        shares = share(maximum, wanted, low)
        result = {n: 0.0 for n in self.connectors}
        for n, amps in shares.items():
            result[n] = math.floor(amps * 10 + 1e-6) / 10 if amps >= low else 0.0
        return result

    # -- transactions -----------------------------------------------------------------------------

    def _maybe_start(self, c: _Connector, now: float, wall: datetime) -> list[Action]:
        if (not c.plugged or c.plug_used or c.tx is not None or c.inoperative or c.lost
                or c.reading is None or c.reading.state.fault):
            return []
        if c.remote is not None:
            id_tag, _, profile = c.remote
            c.remote = None
            c.plug_used = True
            if self.keys.values["AuthorizeRemoteTxRequests"] == "true":
                return self._authorize(c, id_tag, wall, profile)
            return self._begin(c, id_tag, wall, profile)
        if self.settings.fixed_id_tag:
            c.plug_used = True
            return self._authorize(c, self.settings.fixed_id_tag, wall, None)
        return []

    def _authorize(self, c: _Connector, id_tag: str, wall: datetime, profile: dict[str, Any] | None) -> list[Action]:
        def answered(payload: dict[str, Any], now: float, wall: datetime) -> list[Action]:
            c.authorizing = False
            status = (payload.get("idTagInfo") or {}).get("status")
            if status != "Accepted":
                return [Log("virtual_authorize_refused", "warning", {"id_tag": id_tag, "status": status,
                                                                      "connector": c.id})]
            if not c.plugged:
                return [Log("virtual_unplugged_before_start", "info", {"connector": c.id})]
            return self._begin(c, id_tag, wall, profile)
        c.authorizing = True
        self._queue.append(_Call("Authorize", lambda: {"idTag": id_tag}, answered, connector=c.id))
        return [Log("virtual_authorizing", "info", {"id_tag": id_tag, "connector": c.id})]

    def _begin(self, c: _Connector, id_tag: str, wall: datetime, profile: dict[str, Any] | None) -> list[Action]:
        energy = int(c.reading.energy_wh) if c.reading else 0
        tx = c.tx = _Tx(id_tag, energy, wall, profile=profile)
        self._queue.append(self._start_call(c, tx))
        c.next_meter = None
        return [Log("virtual_transaction_starting", "info", {"id_tag": id_tag, "meter_start": energy,
                                                              "connector": c.id})]

    def _start_call(self, c: _Connector, tx: _Tx) -> _Call:
        def answered(payload: dict[str, Any], now: float, wall: datetime) -> list[Action]:
            tx.transaction_id = int(payload.get("transactionId") or 0)
            status = (payload.get("idTagInfo") or {}).get("status")
            actions: list[Action] = [Log("virtual_transaction_started", "info",
                                         {"transaction_id": tx.transaction_id, "id_tag": tx.id_tag,
                                          "connector": c.id})]
            if tx.profile is not None:
                self._install(c.id, {**tx.profile, "transactionId": tx.transaction_id}, wall)
            if status != "Accepted" and c.tx is tx and not tx.stopping:
                actions += self._stop(c, "DeAuthorized", now, wall)
            return actions

        def build() -> dict[str, Any]:
            return {"connectorId": c.id, "idTag": tx.id_tag, "meterStart": tx.meter_start,
                    "timestamp": format_time(tx.started)}
        return _Call("StartTransaction", build, answered, connector=c.id)

    def _stop(self, c: _Connector, reason: str, now: float, wall: datetime) -> list[Action]:
        tx = c.tx
        assert tx is not None
        meter_stop = int(c.reading.energy_wh) if c.reading else tx.meter_start
        tx.stop = {"reason": reason, "meter_stop": meter_stop, "timestamp": format_time(wall)}
        c.finished = c.plugged
        self._queue.append(self._stop_call(c, tx))
        self.profiles = [i for i in self.profiles if not (i.profile.purpose == TX_PROFILE and i.connector == c.id)]
        c.next_meter = None
        if c.scheduled_inoperative:
            c.scheduled_inoperative, c.inoperative = False, True
        return [Log("virtual_transaction_stopping", "info", {"reason": reason, "meter_stop": meter_stop,
                                                              "connector": c.id})]

    def _stop_call(self, c: _Connector, tx: _Tx) -> _Call:
        def build() -> dict[str, Any]:
            stop = tx.stop or {}
            return {"transactionId": tx.transaction_id or 0, "idTag": tx.id_tag, "meterStop": stop["meter_stop"],
                    "timestamp": stop["timestamp"], "reason": stop["reason"]}

        def answered(payload: dict[str, Any], now: float, wall: datetime) -> list[Action]:
            if c.tx is tx:
                c.tx = None
            return [Log("virtual_transaction_stopped", "info", {"transaction_id": tx.transaction_id,
                                                                 "connector": c.id})]
        return _Call("StopTransaction", build, answered, connector=c.id)

    def _meter_due(self, c: _Connector, now: float) -> bool:
        tx, interval = c.tx, int(self.keys.values["MeterValueSampleInterval"])
        if tx is None or tx.stopping or interval <= 0 or c.reading is None or c.lost:
            c.next_meter = None
            return False
        if c.next_meter is None:
            c.next_meter = now + interval
            return False
        if now < c.next_meter:
            return False
        c.next_meter = now + interval
        return True

    def _meter_call(self, c: _Connector, wall: datetime, context: str) -> _Call:
        reading, tx = c.reading, c.tx

        def build() -> dict[str, Any]:
            values = []
            if reading is not None:
                values.append(_sample(f"{reading.energy_wh:.0f}", "Energy.Active.Import.Register", "Wh", context))
                for phase, amps in zip(("L1", "L2", "L3"), reading.currents):
                    values.append({**_sample(f"{amps:.1f}", "Current.Import", "A", context), "phase": phase})
                if reading.power_w is not None:
                    values.append(_sample(f"{reading.power_w:.0f}", "Power.Active.Import", "W", context))
            payload: dict[str, Any] = {"connectorId": c.id,
                                       "meterValue": [{"timestamp": format_time(wall), "sampledValue": values}]}
            if tx is not None and tx.transaction_id:
                payload["transactionId"] = tx.transaction_id
            return payload
        return _Call("MeterValues", build, connector=c.id)

    # -- charging profiles -------------------------------------------------------------------------

    def _install(self, connector: int, profile: dict[str, Any], wall: datetime) -> str:
        try:
            _, parsed = parse_set({"connectorId": connector, "csChargingProfiles": profile})
        except ProfileError:
            return "Rejected"
        if parsed.stack_level > MAX_STACK_LEVEL or (connector != 0 and connector not in self.connectors):
            return "Rejected"
        if parsed.purpose == MAX_PROFILE and connector != 0:
            return "Rejected"
        if parsed.purpose == TX_PROFILE:
            tx = self.connectors[connector].tx if connector in self.connectors else None
            active = tx is not None and not tx.stopping and tx.transaction_id is not None
            if connector == 0 or not active or parsed.transaction_id not in (None, tx.transaction_id if tx else None):
                return "Rejected"
        item = Installed(connector, parsed, wall)
        kept = [old for old in self.profiles if not replaces_on_connector(item, old)]
        if len(kept) >= MAX_PROFILES:
            return "Rejected"
        self.profiles = [*kept, item]
        return "Accepted"

    # -- handlers: payload → (answer payload, actions) -----------------------------------------------

    def _known(self, connector: int) -> bool:
        return connector == 0 or connector in self.connectors

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
        connector = payload["connectorId"]
        if not self._known(connector):
            return {"status": "Rejected"}, []
        numbers = tuple(self.connectors) if connector == 0 else (connector,)
        running = [t for n in numbers if (t := self.connectors[n].running) is not None]
        items = self.profiles if connector == 0 else [i for i in self.profiles if i.connector in (0, connector)]
        start = wall.replace(microsecond=0)
        unit = payload.get("chargingRateUnit", "A")
        steps = composite_schedule(items, start, payload["duration"], charger_phases=self.settings.phases,
                                   transactions=running, connectors=numbers)
        periods = [{"startPeriod": offset,
                    "limit": from_amps(self.settings.max_current if amps is None else amps, unit,
                                       self.settings.phases)} for offset, amps in steps]
        schedule = {"duration": payload["duration"], "startSchedule": format_time(start), "chargingRateUnit": unit,
                    "chargingSchedulePeriod": periods}
        return {"status": "Accepted", "connectorId": connector, "scheduleStart": format_time(start),
                "chargingSchedule": schedule}, []

    def _free_connector(self) -> _Connector | None:
        """For a RemoteStart without connectorId: a plugged idle connector first, else any idle one."""
        idle = [c for c in self.connectors.values()
                if c.tx is None and c.remote is None and not c.authorizing and not c.inoperative and not c.lost]
        plugged = [c for c in idle if c.plugged and not c.finished]
        if plugged:
            return plugged[0]
        return idle[0] if idle else None

    def _on_remote_start(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        number = payload.get("connectorId")
        c = self._free_connector() if number is None else self.connectors.get(number)
        profile = payload.get("chargingProfile")
        if (c is None or c.tx is not None or c.remote is not None or c.authorizing or c.inoperative or c.lost
                or (profile is not None and profile.get("chargingProfilePurpose") != TX_PROFILE)):
            return {"status": "Rejected"}, []
        id_tag = payload["idTag"]
        c.remote = (id_tag, now + int(self.keys.values["ConnectionTimeOut"]), profile)
        if c.plugged and c.tx is None:
            c.plug_used = c.finished = False  # a new start on a plug-in whose transaction ended
        return {"status": "Accepted"}, [Log("virtual_remote_start", "info", {"id_tag": id_tag, "connector": c.id}),
                                        *self._maybe_start(c, now, wall), *self._apply(now, wall)]

    def _on_remote_stop(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        for c in self.connectors.values():
            tx = c.tx
            if tx is not None and not tx.stopping and tx.transaction_id == payload["transactionId"]:
                return {"status": "Accepted"}, self._stop(c, "Remote", now, wall) + self._apply(now, wall)
        return {"status": "Rejected"}, []

    def _on_availability(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        number = payload["connectorId"]
        if not self._known(number):
            return {"status": "Rejected"}, []
        operative = payload["type"] == "Operative"
        targets = list(self.connectors.values()) if number == 0 else [self.connectors[number]]
        scheduled = False
        for c in targets:
            if not operative and c.tx is not None and not c.tx.stopping:
                c.scheduled_inoperative = scheduled = True
            else:
                c.scheduled_inoperative, c.inoperative = False, not operative
        actions = self._apply(now, wall)
        if number == 0:
            self._queue.append(self._status_call(0, self._charge_point_status))
        for c in targets:
            actions += self._maybe_start(c, now, wall)
        return {"status": "Scheduled" if scheduled else "Accepted"}, actions

    def _on_reset(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        if payload["type"] != "Soft":  # no way to power-cycle a wallbox over Modbus
            return {"status": "Rejected"}, [Log("virtual_hard_reset_refused", "warning")]
        actions: list[Action] = [Log("virtual_soft_reset")]
        for c in self.connectors.values():
            if c.tx is not None and not c.tx.stopping:
                actions += self._stop(c, "SoftReset", now, wall)
        boot = self._boot_call()
        build = boot.build

        def reboot() -> dict[str, Any]:
            self.booted = False  # nothing but the Boot until it is accepted
            for connector in self.connectors.values():
                connector.status = None
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
            for c in self.connectors.values():
                c.next_meter = None
        return "Accepted"

    def _on_trigger(self, payload: dict[str, Any], now: float, wall: datetime) -> _Handled:
        requested = payload["requestedMessage"]
        number = payload.get("connectorId")
        if number is not None and not self._known(number):
            return {"status": "Rejected"}, []
        if requested == "BootNotification":
            self._queue.append(self._boot_call())
        elif requested == "Heartbeat":
            self._queue.append(_Call("Heartbeat", dict))
        elif requested == "StatusNotification":
            if number is None:
                numbers = [0, *self.connectors] if len(self.connectors) > 1 else [CONNECTOR]
            else:
                numbers = [number]
            for n in numbers:
                self._queue.append(self._status_call(n, self._charge_point_status if n == 0
                                                     else functools.partial(self.connector_status, n)))
        elif requested == "MeterValues":
            for n in ([number] if number else list(self.connectors)):
                self._queue.append(self._meter_call(self.connectors[n], wall, "Trigger"))
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
