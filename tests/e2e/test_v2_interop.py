"""OCPP 2.0.1 and 2.1 through the proxy with a second, independent implementation (issue 18).

Station and CSMS are ocpp-rpc peers (Node.js, tests/interop): their own framing
and their own copy of the OCPP schemas, validating in strict mode everything
they send and receive, so a local answer the proxy shapes wrongly fails the
station's call here too.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from tests.conftest import StartProxy, proxy_url
from tests.opskit import free_port, wait_until
from tests.e2e.test_v2 import config
from tests.interop import NodePeer

T = "2026-11-27T05:00:00.000Z"
SIGNED = {"signedMeterData": ('OCMF|{"FV":"1.0","GI":"ABL SBC-301","TT":"Köln: 0,39 €/kWh"}'
                              '|{"SD":"887F"}'),
          "signingMethod": "ECDSA-secp256r1-SHA256", "encodingMethod": "OCMF", "publicKey": "3059301306072A"}
TOKEN = {"idToken": "04A2B3C4D5E6F7", "type": "ISO14443"}


def transaction(tx_id: str) -> list[tuple[str, dict[str, Any]]]:
    """A whole signed transaction with the messages around it, as a 2.x station sends them."""
    def event(kind: str, seq: int, trigger: str, values: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        info = {"transactionId": tx_id, **({"stoppedReason": "EVDisconnected"} if kind == "Ended" else {})}
        return {"eventType": kind, "timestamp": T, "triggerReason": trigger, "seqNo": seq,
                "transactionInfo": info, "evse": {"id": 1, "connectorId": 1},
                "meterValue": [{"timestamp": T, "sampledValue": values}], **extra}

    energy = {"value": 1000.5, "context": "Transaction.Begin", "measurand": "Energy.Active.Import.Register",
              "signedMeterValue": SIGNED}
    return [
        ("BootNotification", {"chargingStation": {"model": "RPC", "vendorName": "node"}, "reason": "PowerUp"}),
        ("StatusNotification", {"timestamp": T, "connectorStatus": "Occupied", "evseId": 1, "connectorId": 1}),
        ("Authorize", {"idToken": TOKEN}),
        ("TransactionEvent", event("Started", 0, "Authorized", [energy], idToken=TOKEN, offline=True)),
        ("Heartbeat", {}),
        ("TransactionEvent", event("Updated", 1, "MeterValuePeriodic", [
            {"value": 15.5, "measurand": "Current.Import", "phase": "L1"}])),
        ("TransactionEvent", event("Ended", 2, "EVDeparted", [{**energy, "context": "Transaction.End",
                                                               "value": 2200.25}])),
        ("NotifyEvent", {"generatedAt": T, "seqNo": 0, "eventData": [{
            "eventId": 1, "timestamp": T, "trigger": "Delta", "actualValue": "Available",
            "eventNotificationType": "HardWiredNotification", "component": {"name": "Connector"},
            "variable": {"name": "AvailabilityState"}}]}),
        ("SecurityEventNotification", {"type": "StartupOfTheDevice", "timestamp": T}),
        ("DataTransfer", {"vendorId": "com.giro-e", "messageId": "payment", "data": "{\"amount\":\"12,30\"}"}),
    ]


@pytest.mark.parametrize("subprotocol", ["ocpp2.0.1", "ocpp2.1"])
async def test_ocpp_rpc_relay_is_byte_exact(nursery: trio.Nursery, start_proxy: StartProxy, subprotocol: str) -> None:
    csms = await NodePeer.start(nursery, "csms", subprotocol)
    port = (await csms.wait_for("listening"))["port"]
    server = await start_proxy(config(port))
    station = await NodePeer.start(nursery, "station", subprotocol, proxy_url(server, "CS1").rpartition("/")[0],
                                   "CS1")
    assert (await station.wait_for("connected"))["protocol"] == subprotocol
    with pytest.raises(AssertionError, match="additional properties"):  # strict mode is on in this version
        await station.call("Heartbeat", {"bogus": 1})
    for action, params in transaction("rpc-tx-1"):
        await station.call(action, params)
    profile = {"evseId": 0, "chargingProfile": {
        "id": 9, "stackLevel": 0, "chargingProfilePurpose": "TxDefaultProfile", "chargingProfileKind": "Absolute",
        "chargingSchedule": [{"id": 1, "chargingRateUnit": "A",
                              "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 20.0}]}]}}
    assert (await csms.call("SetChargingProfile", profile))["status"] == "Accepted"
    # the CSMS may report the answer before the station's own line about sending it is read
    await wait_until(lambda: len(station.sent) == 11)  # 10 CALLs, 1 answer
    assert csms.received == station.sent
    assert station.received == csms.sent
    await station.stop()
    await csms.stop()


@pytest.mark.parametrize("subprotocol", ["ocpp2.0.1", "ocpp2.1"])
async def test_ocpp_rpc_signed_transaction_during_outage_is_replayed_byte_identical(
        nursery: trio.Nursery, start_proxy: StartProxy, subprotocol: str) -> None:
    port = free_port()
    server = await start_proxy(config(port, offline='auth = "local_list"\nlocal_list = ["04A2B3C4D5E6F7"]\n'))
    station = await NodePeer.start(nursery, "station", subprotocol, proxy_url(server, "CS1").rpartition("/")[0],
                                   "CS1")
    assert (await station.wait_for("connected"))["protocol"] == subprotocol
    answers: dict[str, list[Any]] = {}
    for action, params in transaction("rpc-tx-offline"):
        answers.setdefault(action, []).append(await station.call(action, params))  # strict-validated by ocpp-rpc
    assert answers["Authorize"] == [{"idTokenInfo": {"status": "Accepted"}}]
    assert answers["TransactionEvent"] == [{"idTokenInfo": {"status": "Accepted"}}, {}, {}]
    assert answers["DataTransfer"] == [{"status": "Rejected"}]
    paired = server.sessions["CS1"]
    expected = [t for t in station.sent if '"Heartbeat"' not in t]

    with capture_logs() as logs:
        csms = await NodePeer.start(nursery, "csms", subprotocol, str(port))
        await csms.wait_for("listening")
        await csms.wait_frames(len(expected), timeout=20)
        await wait_until(lambda: not paired.session.offline_mode)  # replay finished
    assert csms.received == expected
    assert sum('"signedMeterData"' in t for t in csms.received) == 2
    assert server.sessions["CS1"] is paired and paired.queued == 0  # the station stayed connected
    assert not any(e["event"] == "replay_refused" for e in logs)
    await station.stop()
    await csms.stop()
