"""The transparent relay with real ocpp-library peers over real sockets (issue 3)."""

from __future__ import annotations

import json

import trio
from ocpp.v16 import call

from proxy.demo.peers import GIROE_DATA, OCMF_SAMPLE, LoopThread, SimBackend, connect_wallbox
from tests.conftest import StartProxy, backend_config, proxy_url
from tests.peers import in_loop, wait_recorded


async def test_full_session_and_backend_commands(peers: LoopThread, backend: SimBackend,
                                                 start_proxy: StartProxy) -> None:
    server = await start_proxy(backend_config(backend))
    handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
    assert handle.subprotocol == "ocpp1.6"

    outcome = await in_loop(peers, handle.wallbox.run_session())
    assert outcome == {"boot": "Accepted", "auth": "Accepted", "transaction_id": 1001,
                       "datatransfer": "Accepted"}

    profile = {"chargingProfileId": 7, "stackLevel": 1, "chargingProfilePurpose": "TxDefaultProfile",
               "chargingProfileKind": "Absolute",
               "chargingSchedule": {"chargingRateUnit": "A",
                                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16.0}]}}
    commands = [
        call.RemoteStartTransaction(id_tag="04A2B3C4D5E6F7", connector_id=1),
        call.RemoteStopTransaction(transaction_id=1001),
        call.SetChargingProfile(connector_id=1, cs_charging_profiles=profile),
        call.GetConfiguration(key=["HeartbeatInterval"]),
        call.DataTransfer(vendor_id="com.girocard", message_id="Display", data=GIROE_DATA),
        call.Reset(type="Soft"),
    ]
    statuses = [await in_loop(peers, backend.call("CP1", command)) for command in commands]
    assert [getattr(s, "status", None) for s in statuses] == ["Accepted"] * 3 + [None] + ["Accepted"] * 2
    assert statuses[3].configuration_key[0]["value"] == "300"
    assert handle.wallbox.commands == ["RemoteStartTransaction", "RemoteStopTransaction", "SetChargingProfile",
                                       "GetConfiguration", "DataTransfer", "Reset"]

    # What each peer sent is exactly what the other received, in order.
    backend_side = backend.recorders["CP1"]
    assert handle.recorder.sent == backend_side.received
    assert backend_side.sent == handle.recorder.received
    assert len(handle.recorder.sent) == 10 + 6  # its own CALLs + answers to the backend

    await in_loop(peers, handle.close())
    with trio.fail_after(5):
        await server.wait_sessions(0)


ODD_FRAMES_FROM_WALLBOX = [
    '[2,"odd-1","MeterValues",{"connectorId":1,"transactionId":1001,"meterValue":[{"timestamp":'
    '"2026-11-25T10:00:00Z","sampledValue":[{"value":' + json.dumps(OCMF_SAMPLE, ensure_ascii=False)
    + ',"format":"SignedData","context":"Sample.Periodic"}]}]}]',
    '[2,"odd-2","DataTransfer",{"vendorId":"com.girocard","messageId":"PaymentResult","data":'
    + json.dumps(GIROE_DATA) + "}]",
    '[2,"odd-3","DataTransfer",{"vendorId":"K\\u00f6ln\\/Bonn","data":"Gr\u00fc\u00dfe \U0001F697"}]',
    '  [ 2 ,\t"odd-4" ,\n "Heartbeat" , { } ]  ',
    '[2,"odd-5","StatusNotification",{"status":"Available","errorCode":"NoError","connectorId":1,'
    '"vendorErrorCode":"x"}]',
    '[2,"odd-6","MeterValues",{"connectorId":1,"meterValue":[{"timestamp":"2026-11-25T10:00:00Z",'
    '"sampledValue":[{"value":"16.0"},{"value":"2.50e3"}]}],"vendorField":16.0,"n":2.50e3}]',
    '[2,"odd-7","ExoticVendorAction",{"foo":[1,2,{"bar":null}]}]',
    '[2,"odd-8","DataTransfer",{"vendorId":"big","data":"' + "x" * (100 * 1024) + '"}]',
    '[3,"unknown-answer-id",{"status":"Accepted"}]',
    '{"not":"an OCPP array"}',
]

ODD_FRAMES_FROM_BACKEND = [
    '[2,"b-1","DataTransfer",{"vendorId":"com.girocard","messageId":"Display","data":'
    + json.dumps(GIROE_DATA, ensure_ascii=False) + "}]",
    '[2,"b-2","SetChargingProfile",{"connectorId":0,"csChargingProfiles":{"chargingProfileId":1,'
    '"stackLevel":0,"chargingProfilePurpose":"ChargePointMaxProfile","chargingProfileKind":"Absolute",'
    '"chargingSchedule":{"chargingRateUnit":"A","chargingSchedulePeriod":[{"startPeriod":0,'
    '"limit":16.0},{"startPeriod":3600,"limit":2.50e1}]}}}]',
    '[2,"b-3","UnknownBackendExtension",{"K\\u00f6ln":"\\/path"}]',
    '[ 2, "b-4", "GetConfiguration", {} ]\n',
]


async def test_frames_arrive_byte_identical(peers: LoopThread, backend: SimBackend,
                                            start_proxy: StartProxy) -> None:
    server = await start_proxy(backend_config(backend))
    handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
    for text in ODD_FRAMES_FROM_WALLBOX:
        await in_loop(peers, handle.websocket.send(text))
    backend_side = backend.recorders["CP1"]
    await wait_recorded(backend_side, lambda r: len(r.received) >= len(ODD_FRAMES_FROM_WALLBOX))
    assert backend_side.received[:len(ODD_FRAMES_FROM_WALLBOX)] == ODD_FRAMES_FROM_WALLBOX

    for text in ODD_FRAMES_FROM_BACKEND:
        await in_loop(peers, backend.send_raw("CP1", text))
    await wait_recorded(handle.recorder, lambda r: all(t in r.received for t in ODD_FRAMES_FROM_BACKEND))
    received = [t for t in handle.recorder.received if t in ODD_FRAMES_FROM_BACKEND]
    assert received == ODD_FRAMES_FROM_BACKEND

    # The wallbox offered permessage-deflate (websockets does by default); the proxy
    # strips it, so the exact text travels uncompressed on both legs.
    assert handle.websocket.protocol.extensions == []
    await in_loop(peers, handle.close())


async def test_two_hundred_wallboxes_each_with_own_upstream(peers: LoopThread, backend: SimBackend,
                                                           start_proxy: StartProxy) -> None:
    ids = [f"CP{n:03d}" for n in range(200)]
    server = await start_proxy(backend_config(backend, "accept_unknown = true"))

    async def scripted(cp_id: str) -> tuple[str, int]:
        handle = await connect_wallbox(proxy_url(server, cp_id), cp_id)
        boot = await handle.wallbox.call(call.BootNotification(charge_point_model="M", charge_point_vendor="V"))
        await handle.wallbox.call(call.Heartbeat())
        await handle.wallbox.call(call.StatusNotification(connector_id=1, error_code="NoError",
                                                          status="Available"))
        start = await handle.wallbox.call(call.StartTransaction(connector_id=1, id_tag="T", meter_start=0,
                                                                timestamp="2026-11-25T10:00:00Z"))
        await handle.wallbox.call(call.StopTransaction(meter_stop=10, timestamp="2026-11-25T10:01:00Z",
                                                       transaction_id=start.transaction_id))
        sent = len(handle.recorder.sent)
        await handle.close()
        return boot.status, sent

    async def everyone() -> list[tuple[str, int]]:
        import asyncio

        return list(await asyncio.gather(*(scripted(cp) for cp in ids)))

    results = await in_loop(peers, everyone(), timeout=120)
    assert results == [("Accepted", 5)] * 200
    assert sorted(backend.handlers) == ids
    assert {cp: len(backend.recorders[cp].received) for cp in ids} == {cp: 5 for cp in ids}
    with trio.fail_after(20):
        await server.wait_sessions(0)
