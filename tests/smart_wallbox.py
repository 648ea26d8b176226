"""A smart-charging wallbox for end-to-end tests, on the ``ocpp`` library.

It keeps the charging profiles it accepts, applies the OCPP 1.6 replacement
and ClearChargingProfile rules, and computes its own composite limit
(TxProfile > TxDefaultProfile by stack level, capped by ChargePointMaxProfile).
It is written from the specification, independently of ``proxy/loadmgmt/profiles.py``,
so the tests compare two implementations rather than one with itself.

Its connection reads the socket eagerly and notes every CALL that arrives
while an earlier one is still unanswered: what a real wallbox would see as a
second outstanding CALL. Handlers answer SetChargingProfile after a short
delay, like a slow device, to widen that window.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import Action

VOLTAGE = 230.0


class WireConnection:
    """The websocket as the ocpp library sees it, read eagerly, every frame recorded."""

    def __init__(self, websocket: Any) -> None:
        self.websocket = websocket
        self.received: list[str] = []
        self.sent: list[str] = []
        #: (CALL ids unanswered, id of the CALL that arrived on top of them)
        self.overlaps: list[tuple[list[str], str]] = []
        self.open_calls: list[str] = []
        self.lock = threading.Lock()
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._closed: BaseException | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for text in self.websocket:
                message = json.loads(text)
                with self.lock:
                    self.received.append(text)
                    if message[0] == 2:
                        if self.open_calls:
                            self.overlaps.append((list(self.open_calls), message[1]))
                        self.open_calls.append(message[1])
                self._queue.put_nowait(text)
        except websockets.ConnectionClosed as exc:
            self._closed = exc
        finally:
            self._queue.put_nowait(None)

    async def recv(self) -> str:
        text = await self._queue.get()
        if text is None:
            raise self._closed or websockets.ConnectionClosedOK(None, None)
        return text

    async def send(self, text: str) -> None:
        message = json.loads(text)
        with self.lock:
            if message[0] in (3, 4) and message[1] in self.open_calls:
                self.open_calls.remove(message[1])
            self.sent.append(text)
        await self.websocket.send(text)

    def calls_received(self) -> list[tuple[str, str, dict[str, Any]]]:
        with self.lock:
            frames = [json.loads(t) for t in self.received]
        return [(m[1], m[2], m[3]) for m in frames if m[0] == 2]


@dataclass
class Stored:
    connector: int
    profile: dict[str, Any]  # camelCase, as on the wire


@dataclass
class ProfileStore:
    """Installed profiles and the composite limit, by the book."""

    phases: int = 3
    reject_max_profile: bool = False
    profiles: dict[int, Stored] = field(default_factory=dict)
    #: connector → transaction id
    transactions: dict[int, int] = field(default_factory=dict)

    def set(self, connector: int, profile: dict[str, Any]) -> str:
        purpose = profile["chargingProfilePurpose"]
        if purpose == "ChargePointMaxProfile" and (self.reject_max_profile or connector != 0):
            return "Rejected"
        if purpose == "TxProfile" and connector not in self.transactions:
            return "Rejected"
        level = profile["stackLevel"]
        for pid in [pid for pid, s in self.profiles.items()
                    if pid == profile["chargingProfileId"]
                    or (s.profile["chargingProfilePurpose"] == purpose and s.profile["stackLevel"] == level)]:
            del self.profiles[pid]
        self.profiles[profile["chargingProfileId"]] = Stored(connector, profile)
        return "Accepted"

    def clear(self, criteria: dict[str, Any]) -> str:
        def hit(pid: int, s: Stored) -> bool:
            if "id" in criteria:
                return bool(pid == criteria["id"])
            return bool(criteria.get("connectorId", s.connector) == s.connector
                    and criteria.get("chargingProfilePurpose", s.profile["chargingProfilePurpose"])
                    == s.profile["chargingProfilePurpose"]
                    and criteria.get("stackLevel", s.profile["stackLevel"]) == s.profile["stackLevel"])

        gone = [pid for pid, s in self.profiles.items() if hit(pid, s)]
        for pid in gone:
            del self.profiles[pid]
        return "Accepted" if gone else "Unknown"

    def stop(self, connector: int) -> None:
        self.transactions.pop(connector, None)
        for pid in [pid for pid, s in self.profiles.items()
                    if s.profile["chargingProfilePurpose"] == "TxProfile" and s.connector == connector]:
            del self.profiles[pid]

    def _limit(self, profile: dict[str, Any], now: datetime) -> float | None:
        schedule = profile["chargingSchedule"]
        start = schedule.get("startSchedule")
        elapsed = 0.0
        if profile["chargingProfileKind"] == "Absolute" and start:
            elapsed = (now - datetime.fromisoformat(start)).total_seconds()
            if elapsed < 0:
                return None
        if "duration" in schedule and elapsed >= schedule["duration"]:
            return None
        current = None
        for period in schedule["chargingSchedulePeriod"]:
            if period["startPeriod"] <= elapsed:
                current = period
        if current is None:
            return None
        limit = float(current["limit"])
        if schedule["chargingRateUnit"] == "W":
            limit = limit / (VOLTAGE * min(current.get("numberPhases", 3), self.phases))
        return limit

    def _best(self, candidates: list[Stored], now: datetime) -> float | None:
        ranked = sorted(candidates, key=lambda s: (s.profile["stackLevel"], s.connector), reverse=True)
        for stored in ranked:
            limit = self._limit(stored.profile, now)
            if limit is not None:
                return limit
        return None

    def composite(self, connector: int = 1, now: datetime | None = None) -> float | None:
        now = now or datetime.now(UTC)
        items = list(self.profiles.values())

        def by(purpose: str) -> list[Stored]:
            return [s for s in items if s.profile["chargingProfilePurpose"] == purpose]

        cap = self._best(by("ChargePointMaxProfile"), now)
        tx_part = None
        if connector in self.transactions:
            tx_id = self.transactions[connector]
            tx_part = self._best([s for s in by("TxProfile") if s.connector == connector
                                  and s.profile.get("transactionId", tx_id) == tx_id], now)
        if tx_part is None:
            tx_part = self._best([s for s in by("TxDefaultProfile") if s.connector in (0, connector)], now)
        limits = [v for v in (cap, tx_part) if v is not None]
        return min(limits) if limits else None


def _camel(data: Any) -> Any:
    """The ocpp library hands handlers snake_case keys and Decimal numbers; back to the wire form."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            head, *rest = key.split("_")
            out[head + "".join(part.title() for part in rest)] = _camel(value)
        return out
    if isinstance(data, list):
        return [_camel(v) for v in data]
    if type(data).__name__ == "Decimal":
        return float(data) if data != int(data) else int(data)
    return data


class SmartWallbox(ChargePoint):  # type: ignore[misc]
    def __init__(self, cp_id: str, connection: WireConnection, store: ProfileStore, answer_delay: float) -> None:
        super().__init__(cp_id, connection, response_timeout=15)
        self.wire = connection
        self.store = store
        self.answer_delay = answer_delay
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    @on(Action.set_charging_profile)
    async def on_set_charging_profile(self, connector_id: int, cs_charging_profiles: dict[str, Any],
                                      **_: Any) -> Any:
        await asyncio.sleep(self.answer_delay)  # a slow device: keeps the CALL outstanding a while
        with self.changed:
            status = self.store.set(connector_id, _camel(cs_charging_profiles))
            self.changed.notify_all()
        return call_result.SetChargingProfile(status=status)

    @on(Action.clear_charging_profile)
    async def on_clear_charging_profile(self, **criteria: Any) -> Any:
        await asyncio.sleep(self.answer_delay)
        with self.changed:
            status = self.store.clear(_camel(criteria))
            self.changed.notify_all()
        return call_result.ClearChargingProfile(status=status)

    @on(Action.get_configuration)
    def on_get_configuration(self, **_: Any) -> Any:
        return call_result.GetConfiguration(configuration_key=[])

    def composite(self) -> float | None:
        with self.lock:
            return self.store.composite()

    def wait_composite(self, value: float | None, timeout: float = 15.0) -> bool:
        """Block (in a worker thread) until the composite limit is ``value``; False on timeout."""
        with self.changed:
            return self.changed.wait_for(lambda: self.store.composite() == value, timeout)

    def profiles(self) -> dict[int, Stored]:
        with self.lock:
            return dict(self.store.profiles)

    async def boot(self) -> str:
        result = await self.call(call.BootNotification(charge_point_model="Smart-22", charge_point_vendor="test"))
        return str(result.status)

    async def start_transaction(self, connector: int = 1) -> int:
        await self.call(call.StatusNotification(connector_id=connector, error_code="NoError", status="Preparing"))
        result = await self.call(call.StartTransaction(connector_id=connector, id_tag="TAG", meter_start=0,
                                                       timestamp="2026-11-25T10:00:00Z"))
        with self.lock:
            self.store.transactions[connector] = result.transaction_id
        await self.call(call.StatusNotification(connector_id=connector, error_code="NoError", status="Charging"))
        return int(result.transaction_id)

    async def stop_transaction(self, connector: int = 1) -> None:
        with self.lock:
            tx = self.store.transactions.get(connector)
        await self.call(call.StopTransaction(meter_stop=1000, timestamp="2026-11-25T11:00:00Z",
                                             transaction_id=tx or 0))
        with self.lock:
            self.store.stop(connector)
        await self.call(call.StatusNotification(connector_id=connector, error_code="NoError", status="Available"))

    async def reboot(self) -> str:
        """Profiles in RAM only: a reboot loses them (and the transaction); then Boot again."""
        with self.lock:
            self.store.profiles.clear()
            self.store.transactions.clear()
        return await self.boot()


@dataclass
class SmartHandle:
    wallbox: SmartWallbox
    wire: WireConnection
    websocket: Any
    task: asyncio.Task[None]

    async def close(self) -> None:
        await self.websocket.close()
        await asyncio.gather(self.task, return_exceptions=True)


async def connect_smart(url: str, cp_id: str, *, store: ProfileStore | None = None,
                        answer_delay: float = 0.02, boot: bool = True) -> SmartHandle:
    websocket = await websockets.connect(url, subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                                         ping_interval=None, open_timeout=15)
    wire = WireConnection(websocket)
    wallbox = SmartWallbox(cp_id, wire, store or ProfileStore(), answer_delay)

    async def serve() -> None:
        try:
            await wallbox.start()
        except websockets.ConnectionClosed:
            pass

    handle = SmartHandle(wallbox, wire, websocket, asyncio.get_running_loop().create_task(serve()))
    if boot:
        await wallbox.boot()
    return handle
