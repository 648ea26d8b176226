"""A wallbox that survives its proxy: raw OCPP 1.6J on trio-websocket, for the cluster tests and bench.

It runs a transaction with signed meter values, one CALL at a time, and records every CALL it
sent (exact text) and every answer. When its connection drops it reconnects (through HAProxy,
to whichever proxy serves it now; a 503 or a refused connection is retried) and sends the CALL
it had no answer for again, with the same message id, as OCPP asks of a charge point for
transaction messages. Charging profiles from the proxy's limit engine are applied to a
:class:`tests.smart_wallbox.ProfileStore` (the book's rules, written independently of the
proxy) and every change of the composite limit is reported, so a test can check the site's
fuse from the wallboxes' side.

Meter values are paced by ``meter_interval`` (a wallbox's MeterValueSampleInterval): the pace
of the simulated device, not a wait for the system under test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket

from tests.smart_wallbox import ProfileStore

RECONNECT_FIRST, RECONNECT_MAX = 0.1, 1.0
#: ``OCMF|{...}|{...}``: a signed reading as Eichrecht meters send it; the proxy must relay it byte for byte.
OCMF = ('OCMF|{"FV":"1.0","GI":"TEST","GS":"%s","PG":"T%d","RD":[{"TM":"2026-11-27T08:%02d:00,000+0000 S",'
        '"RV":%d.%03d,"RI":"1-b:1.8.0","RU":"kWh","ST":"G"}]}|{"SA":"ECDSA-secp256r1-SHA256","SD":"3045%040x"}')


def _frame(msg_id: str, action: str, payload: dict[str, Any]) -> str:
    return json.dumps([2, msg_id, action, payload], separators=(",", ":"))


@dataclass
class ClusterWallbox:
    """One wallbox; :meth:`run` drives it from boot to StopTransaction."""

    charger: str
    url: str
    meters: int = 10
    meter_interval: float = 0.2
    max_current: float = 16.0
    on_limit: Callable[[str, float], None] | None = None
    #: Every CALL text this wallbox sent, in order (a resent CALL appears again).
    sent: list[str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    #: trio.current_time() of each answer received.
    answered_at: list[float] = field(default_factory=list)
    #: CALL ids sent again after a reconnect (unanswered when the connection dropped).
    resent: list[str] = field(default_factory=list)
    connections: int = 0
    #: trio.current_time() of each WebSocket opened.
    connected_at: list[float] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    store: ProfileStore = field(default_factory=ProfileStore)
    profiles_received: int = 0
    meters_answered: int = 0
    transaction_id: int | None = None
    done: trio.Event = field(default_factory=trio.Event)
    progressed: trio.Event = field(default_factory=trio.Event)
    _ws: trio_websocket.WebSocketConnection | None = None
    _answers: dict[str, trio.MemorySendChannel[list[Any]]] = field(default_factory=dict)
    _seq: int = 0

    def limit(self) -> float:
        """What the wallbox allows a car now: its composite limit, or its own maximum without one."""
        composite = self.store.composite()
        return self.max_current if composite is None else min(self.max_current, composite)

    def _changed(self) -> None:
        self.progressed.set()
        self.progressed = trio.Event()

    # -- the transaction ------------------------------------------------------------------------

    async def run(self) -> None:
        await self.call("BootNotification", {"chargePointVendor": "Cluster", "chargePointModel": "KW-22"})
        await self.call("StatusNotification", {"connectorId": 1, "errorCode": "NoError", "status": "Preparing"})
        answer = await self.call("StartTransaction", {"connectorId": 1, "idTag": f"TAG-{self.charger}",
                                                      "meterStart": 0, "timestamp": "2026-11-27T08:00:00Z"})
        self.transaction_id = int(answer["transactionId"])
        self.store.transactions[1] = self.transaction_id
        await self.call("StatusNotification", {"connectorId": 1, "errorCode": "NoError", "status": "Charging"})
        for n in range(1, self.meters + 1):
            await trio.sleep(self.meter_interval)  # the meter's sample interval (see the module docstring)
            await self.call("MeterValues", self._meter_values(n))
            self.meters_answered += 1
            self._changed()
        await self.call("StopTransaction", {"transactionId": self.transaction_id, "meterStop": 1000 * self.meters,
                                            "timestamp": "2026-11-27T09:00:00Z", "reason": "EVDisconnected"})
        await self.call("StatusNotification", {"connectorId": 1, "errorCode": "NoError", "status": "Available"})
        self.store.stop(1)
        self.done.set()
        self._changed()

    def _meter_values(self, n: int) -> dict[str, Any]:
        wh = 1000 * n
        signed = OCMF % (self.charger, n, n % 60, wh // 1000, wh % 1000, hash((self.charger, n)) & (16 ** 40 - 1))
        return {"connectorId": 1, "transactionId": self.transaction_id, "meterValue": [{
            "timestamp": f"2026-11-27T08:{n % 60:02d}:00Z",
            "sampledValue": [
                {"value": f"{wh}", "context": "Sample.Periodic", "measurand": "Energy.Active.Import.Register",
                 "unit": "Wh"},
                {"value": signed, "context": "Sample.Periodic", "format": "SignedData",
                 "measurand": "Energy.Active.Import.Register", "unit": "Wh"}]}]}

    # -- one CALL, through any number of reconnects ----------------------------------------------

    async def call(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Send a CALL and wait for its answer; after a reconnect the same text goes again."""
        self._seq += 1
        msg_id = f"{self.charger}-{self._seq}"
        text = _frame(msg_id, action, payload)
        first = True
        while True:
            ws = await self._connected()
            send, receive = trio.open_memory_channel[list[Any]](1)
            self._answers[msg_id] = send
            try:
                if not first:
                    self.resent.append(msg_id)
                self.sent.append(text)
                first = False
                await ws.send_message(text)
                answer = await receive.receive()
            except (trio_websocket.ConnectionClosed, trio.EndOfChannel, trio.BrokenResourceError):
                continue  # the connection dropped: reconnect, send it again
            finally:
                self._answers.pop(msg_id, None)
            self.answered.append(msg_id)
            self.answered_at.append(trio.current_time())
            if answer[0] == 4:
                raise AssertionError(f"{self.charger}: {action} refused: {answer}")
            result: dict[str, Any] = answer[2]
            return result

    async def _connected(self) -> trio_websocket.WebSocketConnection:
        if self._ws is not None and not self._ws.closed:
            return self._ws
        delay = RECONNECT_FIRST
        while True:
            try:
                self._ws = await self._nursery.start(self._connection)
                return self._ws
            except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed) as exc:
                self.refusals.append(_refusal(exc))
            await trio.sleep(delay)  # a wallbox's reconnect backoff (the simulated device's pace)
            delay = min(RECONNECT_MAX, delay * 2)

    async def _connection(self, *, task_status: trio.TaskStatus[trio_websocket.WebSocketConnection]) -> None:
        """One WebSocket: opened, then read until it closes (answers to our CALLs, the proxy's CALLs)."""
        async with trio_websocket.open_websocket_url(self.url, subprotocols=["ocpp1.6"],
                                                     connect_timeout=10, disconnect_timeout=2) as ws:
            self.connections += 1
            self.connected_at.append(trio.current_time())
            task_status.started(ws)
            try:
                while True:
                    message = json.loads(await ws.get_message())
                    if message[0] == 2:
                        await ws.send_message(json.dumps([3, message[1], self._handle(message[2], message[3])]))
                    elif message[1] in self._answers:
                        await self._answers[message[1]].send(message)
            except trio_websocket.ConnectionClosed:
                pass
            finally:
                for channel in list(self._answers.values()):
                    await channel.aclose()

    def _handle(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        if action == "SetChargingProfile":
            status = self.store.set(payload["connectorId"], payload["csChargingProfiles"])
            self.profiles_received += 1
            self._report()
            return {"status": status}
        if action == "ClearChargingProfile":
            status = self.store.clear(payload)
            self._report()
            return {"status": status}
        if action == "GetConfiguration":
            return {"configurationKey": [], "unknownKey": payload.get("key", [])}
        return {"status": "Accepted"}

    def _report(self) -> None:
        if self.on_limit is not None:
            self.on_limit(self.charger, self.limit())
        self._changed()

    _nursery: trio.Nursery = field(init=False)

    async def heartbeats(self, interval: float) -> None:
        """Another script: a Heartbeat every ``interval`` seconds, for ever (bench/cluster.py)."""
        while True:
            await self.call("Heartbeat", {})
            await trio.sleep(interval)  # the wallbox's heartbeat interval (the simulated device's pace)

    async def serve(self, script: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run the wallbox (:meth:`run`, or ``script``) in a nursery of its own (its connections live there)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await (script or self.run)()
            if self._ws is not None:
                await self._ws.aclose()
            nursery.cancel_scope.cancel()


def _refusal(exc: BaseException) -> str:
    """``ConnectionRejected 503 retry-after=3`` (a proxy's lease refusal), ``ConnectionRejected 502
    from haproxy`` (a proxy closed the connection without an answer), ``OSError`` ..."""
    if not isinstance(exc, trio_websocket.ConnectionRejected):
        return type(exc).__name__
    retry = [value.decode() for name, value in exc.headers if name.lower() == b"retry-after"]
    haproxy = b"</h1>\nThe server returned an invalid or incomplete response." in (exc.body or b"")
    return (f"ConnectionRejected {exc.status_code}" + (f" retry-after={retry[0]}" if retry else "")
            + (" from haproxy" if haproxy else ""))


def worst_sum(history: list[tuple[float, dict[str, float]]]) -> float:
    """The highest total over a history of (time, limit per wallbox)."""
    return max((sum(limits.values()) for _, limits in history), default=math.nan)
