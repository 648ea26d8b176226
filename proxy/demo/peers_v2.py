"""Simulated OCPP 2.0.1 / 2.1 station and CSMS on the ``ocpp`` library (asyncio).

The 2.x counterparts of :mod:`proxy.demo.peers`, for ``ocpp-proxy demo`` and the
test suite. Like those, they import nothing from the proxy (they are the
independent peers the proxy is tested against), record the exact text of every
frame, and run on a :class:`~proxy.demo.peers.LoopThread`. The ``ocpp`` library
validates every payload it sends and receives against the JSON schemas of the
peer's version, so a wrongly shaped answer from the proxy fails the call here.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import websockets
from ocpp.routing import on
from ocpp.v201 import ChargePoint as Peer201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from ocpp.v21 import ChargePoint as Peer21
from ocpp.v21 import call as call21
from ocpp.v21 import call_result as result21

from proxy.demo.peers import OCMF_SAMPLE, Recorder, RecordingConnection, SimBackend, now_iso

#: Subprotocol → (peer base class, call module, call_result module).
VERSIONS: dict[str, tuple[type[Any], ModuleType, ModuleType]] = {
    "ocpp2.0.1": (Peer201, call201, result201),
    "ocpp2.1": (Peer21, call21, result21),
}


def calls(subprotocol: str) -> ModuleType:
    """The ``call`` payload module of a version (for tests building requests)."""
    return VERSIONS[subprotocol][1]


def signed_value(value: float, context: str = "Transaction.Begin") -> dict[str, Any]:
    """A meter value with an Eichrecht (OCMF) signature, as a calibration-law meter sends it."""
    return {"timestamp": now_iso(), "sampledValue": [{
        "value": value, "context": context, "measurand": "Energy.Active.Import.Register",
        "unitOfMeasure": {"unit": "Wh"},
        "signedMeterValue": {"signedMeterData": OCMF_SAMPLE, "signingMethod": "ECDSA-secp256r1-SHA256",
                             "encodingMethod": "OCMF", "publicKey": "3059301306072A8648CE3D0201"}}]}


def current_values(amps: tuple[float, float, float]) -> dict[str, Any]:
    """Per-phase Current.Import, the way stations report what the car draws."""
    return {"timestamp": now_iso(), "sampledValue": [
        {"value": a, "measurand": "Current.Import", "phase": p, "unitOfMeasure": {"unit": "A"}}
        for a, p in zip(amps, ("L1", "L2", "L3"))]}


# --- CSMS ----------------------------------------------------------------------------


def _csms_handler(subprotocol: str) -> type[Any]:
    base, _, results = VERSIONS[subprotocol]

    class Handler(base):  # type: ignore[misc, valid-type]
        """The CSMS's view of one connected 2.x station: accepts everything."""

        backend: SimCsms

        @on("BootNotification")
        def on_boot(self, **_: Any) -> Any:
            return results.BootNotification(current_time=now_iso(), interval=300, status="Accepted")

        @on("Heartbeat")
        def on_heartbeat(self, **_: Any) -> Any:
            return results.Heartbeat(current_time=now_iso())

        @on("Authorize")
        def on_authorize(self, id_token: dict[str, Any], **_: Any) -> Any:
            return results.Authorize(id_token_info={"status": "Accepted"})

        @on("TransactionEvent")
        def on_transaction_event(self, **kwargs: Any) -> Any:
            if kwargs.get("id_token"):
                return results.TransactionEvent(id_token_info={"status": "Accepted"})
            return results.TransactionEvent()

        @on("DataTransfer")
        def on_data_transfer(self, **_: Any) -> Any:
            return results.DataTransfer(status="Accepted")

        @on("StatusNotification")
        def on_status(self, **_: Any) -> Any:
            return results.StatusNotification()

        @on("MeterValues")
        def on_meter_values(self, **_: Any) -> Any:
            return results.MeterValues()

        @on("NotifyEvent")
        def on_notify_event(self, **_: Any) -> Any:
            return results.NotifyEvent()

        @on("NotifyReport")
        def on_notify_report(self, **_: Any) -> Any:
            return results.NotifyReport()

        @on("SecurityEventNotification")
        def on_security_event(self, **_: Any) -> Any:
            return results.SecurityEventNotification()

        @on("FirmwareStatusNotification")
        def on_firmware_status(self, **_: Any) -> Any:
            return results.FirmwareStatusNotification()

        @on("LogStatusNotification")
        def on_log_status(self, **_: Any) -> Any:
            return results.LogStatusNotification()

        @on("NotifyEVChargingNeeds")  # ISO 15118: the car's needs, the CSMS's schedule follows
        def on_ev_charging_needs(self, **_: Any) -> Any:
            return results.NotifyEVChargingNeeds(status="Accepted")

        @on("NotifyEVChargingSchedule")
        def on_ev_charging_schedule(self, **_: Any) -> Any:
            return results.NotifyEVChargingSchedule(status="Accepted")

        @on("NotifySettlement")  # 2.1 only (a 2.0.1 station never sends it)
        def on_settlement(self, **_: Any) -> Any:
            return results.NotifySettlement()

    return Handler


@dataclass
class SimCsms(SimBackend):
    """A 2.0.1 or 2.1 CSMS accepting any station id on ws://host:port/<prefix>/<id> (SimBackend's server)."""

    subprotocol: str = "ocpp2.0.1"
    #: The version it speaks, when the subprotocol it accepts is another name (a relay-only test).
    speaks: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.subprotocols = (self.subprotocol,)

    def _handler(self, cp_id: str, connection: RecordingConnection) -> Any:
        handler = _csms_handler(self.speaks or self.subprotocol)(cp_id, connection, response_timeout=15)
        handler.backend = self
        return handler


# --- station --------------------------------------------------------------------------


def _station_class(subprotocol: str) -> type[Any]:
    base, _, results = VERSIONS[subprotocol]

    class Station(base):  # type: ignore[misc, valid-type]
        """A 2.x charging station keeping the charging profiles it was given (OCPP 2.0.1 part 2, K01/K10)."""

        #: chargingProfile id → (evseId, the profile as received).
        profiles: dict[int, tuple[int, dict[str, Any]]]
        #: Purposes this station refuses (a station without ChargingStationMaxProfile support).
        refuse_purposes: frozenset[str] = frozenset()

        @on("SetChargingProfile")
        def on_set_charging_profile(self, evse_id: int, charging_profile: dict[str, Any], **_: Any) -> Any:
            if charging_profile.get("charging_profile_purpose") in self.refuse_purposes:
                return results.SetChargingProfile(status="Rejected")
            self.profiles[int(charging_profile["id"])] = (evse_id, charging_profile)
            return results.SetChargingProfile(status="Accepted")

        @on("ClearChargingProfile")
        def on_clear_charging_profile(self, charging_profile_id: int | None = None, **_: Any) -> Any:
            if charging_profile_id is None or self.profiles.pop(charging_profile_id, None) is None:
                return results.ClearChargingProfile(status="Unknown")
            return results.ClearChargingProfile(status="Accepted")

        @on("TriggerMessage")
        def on_trigger(self, **_: Any) -> Any:
            return results.TriggerMessage(status="Accepted")

    return Station


@dataclass
class StationHandle:
    station: Any
    websocket: Any
    recorder: Recorder
    task: asyncio.Task[None]
    subprotocol: str
    _seq: Any = field(default_factory=itertools.count)

    @property
    def calls(self) -> ModuleType:
        return calls(self.subprotocol)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.websocket.close(code, reason)
        await asyncio.gather(self.task, return_exceptions=True)

    async def send(self, payload: Any) -> Any:
        return await self.station.call(payload)

    async def boot(self) -> Any:
        return await self.send(self.calls.BootNotification(
            charging_station={"model": "Sim-2", "vendor_name": "ocpp-proxy demo"}, reason="PowerUp"))

    async def transaction_event(self, event_type: str, tx_id: str, meter_value: list[dict[str, Any]] | None,
                                trigger: str, id_token: dict[str, Any] | None = None) -> Any:
        return await self.send(self.calls.TransactionEvent(
            event_type=event_type, timestamp=now_iso(), trigger_reason=trigger, seq_no=next(self._seq),
            transaction_info={"transaction_id": tx_id}, evse={"id": 1, "connector_id": 1}, id_token=id_token,
            meter_value=meter_value))

    async def signed_transaction(self, tx_id: str, token: str = "04A2B3C4D5E6F7",
                                 charging_time: float = 0.0) -> list[Any]:
        """Authorize, Started (signed), Updated (currents), Ended (signed): the answers, in order."""
        id_token = {"id_token": token, "type": "ISO14443"}
        answers = [
            await self.send(self.calls.Authorize(id_token=id_token)),
            await self.transaction_event("Started", tx_id, [signed_value(1000.0)], "Authorized", id_token),
            await self.transaction_event("Updated", tx_id, [current_values((16.0, 16.0, 16.0))], "MeterValuePeriodic"),
        ]
        await asyncio.sleep(charging_time)
        answers.append(await self.transaction_event("Ended", tx_id, [signed_value(2200.0, "Transaction.End")],
                                                    "EVDeparted"))
        return answers


async def connect_station(url: str, cp_id: str, *, subprotocol: str = "ocpp2.0.1",
                          offered: tuple[str, ...] | None = None,
                          refuse_purposes: frozenset[str] = frozenset(),
                          on_frame: Callable[[str, str], None] | None = None) -> StationHandle:
    """Open a 2.x station connection and start its message loop (raises on HTTP refusal)."""
    websocket = await websockets.connect(url, subprotocols=list(offered or (subprotocol,)),  # type: ignore[arg-type]
                                         max_size=8 * 1024 * 1024, ping_interval=None, open_timeout=15)
    recorder = Recorder(on_frame)
    station = _station_class(subprotocol)(cp_id, RecordingConnection(websocket, recorder), response_timeout=15)
    station.profiles = {}
    station.refuse_purposes = refuse_purposes

    async def serve() -> None:
        try:
            await station.start()
        except websockets.ConnectionClosed:
            pass

    task = asyncio.get_running_loop().create_task(serve())
    return StationHandle(station, websocket, recorder, task, subprotocol)
