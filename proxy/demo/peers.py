"""Simulated wallboxes and backend built on the ``ocpp`` library (asyncio).

Used by ``ocpp-proxy demo`` and by the test suite as independent OCPP peers.
This module deliberately imports nothing from the rest of the proxy: the
peers must not share code (or bugs) with what they test. They run on their own
asyncio loop in a thread (:class:`LoopThread`), because the ``ocpp`` library
is asyncio code and the proxy is trio code, and they talk to the proxy only
over real sockets.

Every peer records the exact text of each frame it sends and receives, so a
test can compare what one peer sent with what the other received.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint as OcppPeer
from ocpp.v16 import call, call_result
from ocpp.v16.enums import Action

T = TypeVar("T")

logging.getLogger("ocpp").setLevel(logging.WARNING)
logging.getLogger("pymodbus").setLevel(logging.ERROR)

#: An Eichrecht OCMF signed meter value (S.A.F.E. format, as ABL/Phoenix meters send it).
OCMF_SAMPLE = (
    'OCMF|{"FV":"1.0","GI":"ABL SBC-301","GS":"808829900001","GV":"1.4p3","PG":"T12345",'
    '"MV":"Phoenix Contact","MM":"EEM-350-D-MCB","MS":"BQ27400330016","MF":"1.0","IS":true,'
    '"IL":"VERIFIED","IF":["RFID_PLAIN","OCPP_RS_TLS"],"IT":"ISO14443","ID":"1F2D3A4F5506C7",'
    '"TT":"Stadtwerke Köln: 0,39 €/kWh","RD":[{"TM":"2018-07-24T13:22:04,000+0200 S","TX":"B",'
    '"RV":2935.6,"RI":"1-b:1.8.0","RU":"kWh","RT":"AC","EF":"","ST":"G"}]}|'
    '{"SD":"887FABF407AC82782EEFFF2220C2F856AEB0BC22364BBCC6B55761911ED651D1A922BADA88818C9671AF'
    'EE7094D7F536","SA":"ECDSA-secp256r1-SHA256"}'
)

#: A Giro-E payment terminal result: JSON carried as a string in DataTransfer.data.
GIROE_DATA = '{"terminalId":"GE-0042","amount":"12,30","currency":"EUR","result":"Approved","receipt":"Beleg Nr. 4711 – Danke"}'


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class LoopThread:
    """An asyncio loop in a daemon thread; coroutines are submitted from other threads."""

    def __init__(self, name: str = "ocpp-peers") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            try:
                self.run(cancel_all(), timeout=10)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()  # its selector and self-pipe: not left to the garbage collector


class Recorder:
    """Exact frame texts in both directions, with a thread-safe wait."""

    def __init__(self, on_frame: Callable[[str, str], None] | None = None) -> None:
        self.sent: list[str] = []
        self.received: list[str] = []
        self._cond = threading.Condition()
        self._on_frame = on_frame

    def record(self, direction: str, text: str) -> None:
        with self._cond:
            (self.sent if direction == "sent" else self.received).append(text)
            self._cond.notify_all()
        if self._on_frame is not None:
            self._on_frame(direction, text)

    def wait_until(self, predicate: Callable[[Recorder], bool], timeout: float = 10.0) -> bool:
        """Block until ``predicate(self)`` holds; False on timeout. Call from a worker thread."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)


class RecordingConnection:
    """The websockets connection as the ocpp library sees it, recording every frame."""

    def __init__(self, websocket: Any, recorder: Recorder) -> None:
        self.websocket = websocket
        self.recorder = recorder

    async def recv(self) -> str:
        text = await self.websocket.recv()
        self.recorder.record("received", text)
        return str(text)

    async def send(self, text: str) -> None:
        self.recorder.record("sent", text)
        await self.websocket.send(text)


# --- backend -----------------------------------------------------------------------


class BackendChargePointHandler(OcppPeer):  # type: ignore[misc]
    """The central system's view of one connected charge point."""

    def __init__(self, cp_id: str, connection: RecordingConnection, backend: SimBackend) -> None:
        super().__init__(cp_id, connection, response_timeout=15)
        self.backend = backend

    @on(Action.boot_notification)
    def on_boot(self, **_: Any) -> Any:
        return call_result.BootNotification(current_time=now_iso(), interval=300, status="Accepted")

    @on(Action.heartbeat)
    def on_heartbeat(self, **_: Any) -> Any:
        return call_result.Heartbeat(current_time=now_iso())

    @on(Action.status_notification)
    def on_status(self, **_: Any) -> Any:
        return call_result.StatusNotification()

    @on(Action.authorize)
    def on_authorize(self, id_tag: str, **_: Any) -> Any:
        return call_result.Authorize(id_tag_info={"status": self.backend.auth_status(id_tag)})

    @on(Action.start_transaction)
    def on_start(self, id_tag: str, **_: Any) -> Any:
        return call_result.StartTransaction(transaction_id=self.backend.next_transaction_id(),
                                            id_tag_info={"status": self.backend.auth_status(id_tag)})

    @on(Action.stop_transaction)
    def on_stop(self, **_: Any) -> Any:
        return call_result.StopTransaction()

    @on(Action.meter_values)
    def on_meter_values(self, **_: Any) -> Any:
        return call_result.MeterValues()

    @on(Action.data_transfer)
    def on_data_transfer(self, vendor_id: str, **_: Any) -> Any:
        return call_result.DataTransfer(status="Accepted", data='{"ack":true}')

    @on(Action.firmware_status_notification)
    def on_firmware_status(self, **_: Any) -> Any:
        return call_result.FirmwareStatusNotification()

    @on(Action.diagnostics_status_notification)
    def on_diagnostics_status(self, **_: Any) -> Any:
        return call_result.DiagnosticsStatusNotification()


@dataclass
class SimBackend:
    """A central system accepting any charge point id on ws://host:port/<prefix>/<id>."""

    host: str = "127.0.0.1"
    port: int = 0
    subprotocols: tuple[str, ...] = ("ocpp1.6",)
    on_frame: Callable[[str, str, str], None] | None = None
    #: An ssl.SSLContext for wss:// (server side), None for ws://.
    ssl: Any = None
    #: The first transactionId it hands out (several backends in one test hand out different ones).
    first_transaction_id: int = 1001
    handlers: dict[str, BackendChargePointHandler] = field(default_factory=dict)
    recorders: dict[str, Recorder] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    connected: threading.Event = field(default_factory=threading.Event)
    _server: Any = None
    _tx: Any = field(default_factory=lambda: itertools.count(1001))

    def __post_init__(self) -> None:
        self._tx = itertools.count(self.first_transaction_id)

    def auth_status(self, id_tag: str) -> str:
        return "Blocked" if id_tag.startswith("BLOCKED") else "Accepted"

    def next_transaction_id(self) -> int:
        return int(next(self._tx))

    def recorder(self, cp_id: str) -> Recorder:
        if cp_id not in self.recorders:
            hook = self.on_frame
            self.recorders[cp_id] = Recorder(
                None if hook is None else lambda d, t: hook(cp_id, d, t))
        return self.recorders[cp_id]

    async def start(self) -> int:
        self._server = await websockets.serve(self._handle, self.host, self.port,
                                              subprotocols=list(self.subprotocols),  # type: ignore[arg-type]
                                              max_size=8 * 1024 * 1024, ping_interval=None, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, websocket: Any) -> None:
        path = websocket.request.path
        cp_id = unquote(urlsplit(path).path.rstrip("/").rpartition("/")[2])
        self.paths[cp_id] = path
        self.headers[cp_id] = {k.lower(): v for k, v in websocket.request.headers.raw_items()}
        handler = self._handler(cp_id, RecordingConnection(websocket, self.recorder(cp_id)))
        self.handlers[cp_id] = handler
        self.connected.set()
        try:
            await handler.start()
        except websockets.ConnectionClosed:
            pass

    def _handler(self, cp_id: str, connection: RecordingConnection) -> Any:
        """The central system's side of one charge point (a 2.x CSMS makes another kind)."""
        return BackendChargePointHandler(cp_id, connection, self)

    async def call(self, cp_id: str, payload: Any) -> Any:
        """A CALL from the backend to a connected charge point; returns the parsed result."""
        return await self.handlers[cp_id].call(payload)

    async def send_raw(self, cp_id: str, text: str) -> None:
        await self.handlers[cp_id]._connection.send(text)


# --- wallbox -------------------------------------------------------------------------


class SimWallbox(OcppPeer):  # type: ignore[misc]
    """A charge point that accepts the backend's commands and keeps what it was told."""

    def __init__(self, cp_id: str, connection: RecordingConnection) -> None:
        super().__init__(cp_id, connection, response_timeout=15)
        self.profiles: list[dict[str, Any]] = []
        self.commands: list[str] = []
        self.configuration = {"HeartbeatInterval": "300", "MeterValueSampleInterval": "60"}

    @on(Action.remote_start_transaction)
    def on_remote_start(self, **_: Any) -> Any:
        self.commands.append("RemoteStartTransaction")
        return call_result.RemoteStartTransaction(status="Accepted")

    @on(Action.remote_stop_transaction)
    def on_remote_stop(self, **_: Any) -> Any:
        self.commands.append("RemoteStopTransaction")
        return call_result.RemoteStopTransaction(status="Accepted")

    @on(Action.set_charging_profile)
    def on_set_charging_profile(self, cs_charging_profiles: dict[str, Any], **_: Any) -> Any:
        self.commands.append("SetChargingProfile")
        self.profiles.append(cs_charging_profiles)
        return call_result.SetChargingProfile(status="Accepted")

    @on(Action.clear_charging_profile)
    def on_clear_charging_profile(self, **_: Any) -> Any:
        self.commands.append("ClearChargingProfile")
        self.profiles.clear()
        return call_result.ClearChargingProfile(status="Accepted")

    @on(Action.get_configuration)
    def on_get_configuration(self, key: list[str] | None = None, **_: Any) -> Any:
        self.commands.append("GetConfiguration")
        keys = key or list(self.configuration)
        return call_result.GetConfiguration(
            configuration_key=[{"key": k, "readonly": False, "value": self.configuration[k]}
                               for k in keys if k in self.configuration],
            unknown_key=[k for k in keys if k not in self.configuration] or None)

    @on(Action.data_transfer)
    def on_data_transfer(self, vendor_id: str, **_: Any) -> Any:
        self.commands.append("DataTransfer")
        return call_result.DataTransfer(status="Accepted")

    @on(Action.reset)
    def on_reset(self, type: str, **_: Any) -> Any:
        self.commands.append("Reset")
        return call_result.Reset(status="Accepted")

    @on(Action.change_availability)
    def on_change_availability(self, **_: Any) -> Any:
        self.commands.append("ChangeAvailability")
        return call_result.ChangeAvailability(status="Accepted")

    @on(Action.trigger_message)
    def on_trigger_message(self, **_: Any) -> Any:
        self.commands.append("TriggerMessage")
        return call_result.TriggerMessage(status="Accepted")

    async def run_session(self, id_tag: str = "04A2B3C4D5E6F7", charging_time: float = 0.0) -> dict[str, Any]:
        """Boot, heartbeat, status, authorize, a transaction with signed meter values,
        a Giro-E DataTransfer, stop. Returns what the backend answered.

        ``charging_time``: seconds the car charges between start and stop (the demo's
        load management needs time to show)."""
        boot = await self.call(call.BootNotification(charge_point_model="Sim-22", charge_point_vendor="ocpp-proxy"))
        await self.call(call.Heartbeat())
        await self.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Preparing"))
        auth = await self.call(call.Authorize(id_tag=id_tag))
        start = await self.call(call.StartTransaction(connector_id=1, id_tag=id_tag, meter_start=2935600,
                                                      timestamp=now_iso()))
        tx = start.transaction_id
        await self.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Charging"))
        if charging_time:
            await asyncio.sleep(charging_time)
        await self.call(call.MeterValues(connector_id=1, transaction_id=tx, meter_value=[{
            "timestamp": now_iso(),
            "sampledValue": [
                {"value": "16.0", "measurand": "Current.Import", "phase": "L1", "unit": "A"},
                {"value": OCMF_SAMPLE, "format": "SignedData", "context": "Sample.Periodic"},
            ]}]))
        giro = await self.call(call.DataTransfer(vendor_id="com.girocard", message_id="PaymentResult",
                                                 data=GIROE_DATA))
        await self.call(call.StopTransaction(meter_stop=2947800, timestamp=now_iso(), transaction_id=tx,
                                             id_tag=id_tag, transaction_data=[{
                                                 "timestamp": now_iso(),
                                                 "sampledValue": [{"value": OCMF_SAMPLE, "format": "SignedData",
                                                                   "context": "Transaction.End"}]}]))
        await self.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Available"))
        return {"boot": boot.status, "auth": auth.id_tag_info["status"], "transaction_id": tx,
                "datatransfer": giro.status}


@dataclass
class WallboxHandle:
    wallbox: SimWallbox
    websocket: Any
    recorder: Recorder
    task: asyncio.Task[None]

    @property
    def subprotocol(self) -> str | None:
        return self.websocket.subprotocol  # type: ignore[no-any-return]

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.websocket.close(code, reason)
        await asyncio.gather(self.task, return_exceptions=True)


async def connect_wallbox(url: str, cp_id: str, *, subprotocols: tuple[str, ...] = ("ocpp1.6",),
                          password: str | None = None, ssl: Any = None,
                          on_frame: Callable[[str, str], None] | None = None) -> WallboxHandle:
    """Open a wallbox connection and start its message loop (raises on HTTP refusal)."""
    headers = {}
    if password is not None:
        import base64

        headers["Authorization"] = "Basic " + base64.b64encode(f"{cp_id}:{password}".encode()).decode()
    websocket = await websockets.connect(url, subprotocols=list(subprotocols),  # type: ignore[arg-type,unused-ignore]
                                         additional_headers=headers, ssl=ssl, max_size=8 * 1024 * 1024,
                                         ping_interval=None, open_timeout=15)
    recorder = Recorder(on_frame)
    wallbox = SimWallbox(cp_id, RecordingConnection(websocket, recorder))

    async def serve() -> None:
        try:
            await wallbox.start()
        except websockets.ConnectionClosed:
            pass

    return WallboxHandle(wallbox, websocket, recorder, asyncio.get_running_loop().create_task(serve()))


# --- Modbus devices ------------------------------------------------------------------


class SimModbusDevice:
    """A Modbus TCP device (meter, wallbox) on pymodbus's server, with registers a test can change.

    Registers live in two dicts (``input``, ``holding``) read and written by the
    server's action hook, so changing a value from the test thread is one dict
    assignment. ``failing`` answers every request with a Modbus exception;
    ``silent`` stops answering (a timeout for the client).
    """

    def __init__(self, input: dict[int, int] | None = None, holding: dict[int, int] | None = None,
                 unit: int = 1, size: int = 1000) -> None:
        self.input = dict(input or {})
        self.holding = dict(holding or {})
        self.unit, self.size = unit, size
        self.failing = False
        self.silent = False
        self.writes: list[tuple[int, list[int]]] = []
        self.port = 0
        self._server: Any = None

    async def _action(self, function_code: int, start: int, address: int, count: int,
                      registers: list[int], values: list[int] | None) -> Any:
        from pymodbus.constants import ExcCodes

        if self.silent:
            await asyncio.sleep(3600)
        if self.failing:
            return ExcCodes.DEVICE_FAILURE
        table = self.input if function_code == 4 else self.holding
        if values is not None:
            self.writes.append((address, list(values)))
            for offset, value in enumerate(values):
                table[address + offset] = int(value)
            return None
        for offset in range(count):
            registers[address - start + offset] = table.get(address + offset, 0)
        return None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        def block(kind: DataType) -> list[SimData]:
            return [SimData(0, count=self.size, values=False if kind == DataType.BITS else 0, datatype=kind)]

        device = SimDevice(self.unit, simdata=(block(DataType.BITS), block(DataType.BITS),
                                               block(DataType.REGISTERS), block(DataType.REGISTERS)),
                           action=self._action)  # type: ignore[arg-type]
        self._server = ModbusTcpServer(device, address=(host, port))
        await self._server.serve_forever(background=True)
        self.port = self._server.transport.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()


class SimHeidelberg(SimModbusDevice):
    """A Heidelberg Energy Control wallbox and its car, on the vendor's register map.

    Written from the vendor's register table, independently of the proxy's map:
    input 5 charging state (A1=2 … C2=7), 6-8 phase currents (0.1 A), 14 power
    (VA), 17-18 energy (VAh, high word first); holding 259 remote lock, 261 max
    current (0.1 A, 0 or 60-160). The car draws min(its own limit, the register)
    on every phase while it requests current and the wallbox allows it; energy
    grows with real time. ``fault`` forces a state value (9 E, 10 F, 11 error, or
    any garbage) and ``raw`` overrides single input registers.
    """

    def __init__(self, unit: int = 1, car_amps: float = 16.0, voltage: float = 230.0) -> None:
        super().__init__(input={4: 0x0108}, holding={257: 0, 258: 0, 259: 1, 261: 160, 262: 0}, unit=unit)
        self.plugged = False
        self.requesting = True      # a plugged car asks for current
        self.car_amps = car_amps
        self.voltage = voltage
        self.energy_vah = 1_000_000.0
        self.fault: int | None = None
        self.raw: dict[int, int] = {}
        self._last = time.monotonic()
        self.refresh()

    @property
    def limit_amps(self) -> float:
        return self.holding.get(261, 0) / 10

    def refresh(self) -> None:
        now = time.monotonic()
        allowed = self.limit_amps >= 6.0 and self.holding.get(259, 1) == 1
        amps = min(self.car_amps, self.limit_amps) if self.plugged and self.requesting and allowed else 0.0
        self.energy_vah += 3 * amps * self.voltage * (now - self._last) / 3600
        self._last = now
        if not self.plugged:
            state = 3 if allowed else 2
        elif not self.requesting:
            state = 5 if allowed else 4
        else:
            state = 7 if allowed else 6
        tenths = round(amps * 10)
        energy = int(self.energy_vah)
        self.input.update({5: self.fault if self.fault is not None else state, 6: tenths, 7: tenths, 8: tenths,
                           10: round(self.voltage), 11: round(self.voltage), 12: round(self.voltage),
                           14: round(3 * amps * self.voltage), 17: energy >> 16, 18: energy & 0xFFFF})
        self.input.update(self.raw)

    async def _action(self, function_code: int, start: int, address: int, count: int,
                      registers: list[int], values: list[int] | None) -> Any:
        self.refresh()  # integrate energy up to now with the old limit
        result = await super()._action(function_code, start, address, count, registers, values)
        if values is not None:
            self.refresh()
        return result


class SimSdm630(SimModbusDevice):
    """An Eastron SDM630 grid meter: phase currents as IEEE 754 floats (input registers 30007-30012)."""

    def set_currents(self, l1: float, l2: float, l3: float) -> None:
        for address, value in ((6, l1), (8, l2), (10, l3)):
            data = struct.pack(">f", value)
            self.input[address], self.input[address + 1] = (int.from_bytes(data[:2], "big"),
                                                            int.from_bytes(data[2:], "big"))
