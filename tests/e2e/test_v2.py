"""OCPP 2.0.1 and 2.1 stations end to end with `ocpp`-library peers (issue 18).

The station and the CSMS are the ``ocpp`` library's v201/v21 ChargePoints; they
validate every payload they send and receive against their version's JSON
schemas, so a local answer of the wrong shape fails the station's call.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from proxy.demo.peers import LoopThread
from proxy.demo.peers_v2 import SimCsms, StationHandle, connect_station
from tests.conftest import StartProxy, proxy_url
from tests.e2e.test_offline import FAST_RECONNECT
from tests.opskit import free_port, wait_until
from tests.peers import in_loop, wait_recorded

VERSIONS = ("ocpp2.0.1", "ocpp2.1")


def config(port: int, extra: str = "", offline: str = "") -> str:
    """The default configuration: no ``subprotocols`` key, so the default offer is what is tested."""
    return (f'[server]\n{extra}\n[backend]\nurl = "ws://127.0.0.1:{port}/ocpp"\nconnect_timeout = 2\n'
            f'[[chargers]]\nid = "CS1"\n[offline]\n{FAST_RECONNECT}{offline}')


async def every_station_message(handle: StationHandle, tx_id: str) -> list[Any]:
    """Each station CALL the issue lists, a whole signed transaction among them."""
    c = handle.calls
    answers = [await handle.boot(),
               await handle.send(c.Heartbeat()),
               await handle.send(c.StatusNotification(timestamp="2026-11-27T05:00:00Z", connector_status="Occupied",
                                                      evse_id=1, connector_id=1))]
    answers += await handle.signed_transaction(tx_id)
    answers += [
        await handle.send(c.MeterValues(evse_id=1, meter_value=[{"timestamp": "2026-11-27T05:00:00Z",
                                                                 "sampledValue": [{"value": 230.1}]}])),
        await handle.send(c.NotifyEvent(generated_at="2026-11-27T05:00:00Z", seq_no=0, event_data=[{
            "event_id": 1, "timestamp": "2026-11-27T05:00:00Z", "trigger": "Delta", "actual_value": "Occupied",
            "event_notification_type": "HardWiredNotification", "component": {"name": "Connector"},
            "variable": {"name": "AvailabilityState"}}])),
        await handle.send(c.NotifyReport(request_id=1, generated_at="2026-11-27T05:00:00Z", seq_no=0)),
        await handle.send(c.SecurityEventNotification(type="StartupOfTheDevice", timestamp="2026-11-27T05:00:00Z")),
        await handle.send(c.FirmwareStatusNotification(status="Idle")),
        await handle.send(c.LogStatusNotification(status="Idle")),
        await handle.send(c.DataTransfer(vendor_id="com.example", message_id="m", data='{"k":"v"}')),
    ]
    if handle.subprotocol == "ocpp2.1":  # where 2.1 differs: the settlement of an ad-hoc payment
        answers.append(await handle.send(c.NotifySettlement(
            psp_ref="PSP-4711", status="Settled", settlement_amount=12.3, settlement_time="2026-11-27T05:10:00Z",
            transaction_id=tx_id, receipt_id="Beleg 4711")))
    return answers


@pytest.mark.parametrize("subprotocol", VERSIONS)
async def test_relay_is_byte_exact_both_ways(peers: LoopThread, start_proxy: StartProxy, subprotocol: str) -> None:
    csms = SimCsms(subprotocol=subprotocol)
    await in_loop(peers, csms.start())
    server = await start_proxy(config(csms.port))
    handle = await in_loop(peers, connect_station(proxy_url(server, "CS1"), "CS1", subprotocol=subprotocol))
    assert handle.websocket.subprotocol == subprotocol  # offered by default, negotiated end to end
    await in_loop(peers, every_station_message(handle, "tx-relay-1"))
    # The CSMS's own command reaches the station as sent.
    c = handle.calls
    profile = {"id": 7, "stack_level": 0, "charging_profile_purpose": "TxDefaultProfile",
               "charging_profile_kind": "Absolute",
               "charging_schedule": [{"id": 1, "charging_rate_unit": "A",
                                      "charging_schedule_period": [{"start_period": 0, "limit": 20.0}]}]}
    answer = await in_loop(peers, csms.call("CS1", c.SetChargingProfile(evse_id=0, charging_profile=profile)))
    assert answer.status == "Accepted"
    station, backend = handle.recorder, csms.recorders["CS1"]
    assert backend.received == station.sent and len(station.sent) == (16 if subprotocol == "ocpp2.1" else 15)
    assert station.received == backend.sent
    await in_loop(peers, handle.close())
    await in_loop(peers, csms.stop())


@pytest.mark.parametrize("subprotocol", VERSIONS)
async def test_signed_transaction_while_csms_is_down_arrives_in_order_byte_identical(
        peers: LoopThread, start_proxy: StartProxy, subprotocol: str) -> None:
    port = free_port()
    server = await start_proxy(config(port, offline='auth = "local_list"\nlocal_list = ["04A2B3C4D5E6F7"]\n'))
    handle = await in_loop(peers, connect_station(proxy_url(server, "CS1"), "CS1", subprotocol=subprotocol))
    assert handle.websocket.subprotocol == subprotocol  # the proxy answers in the version offered
    answers = await in_loop(peers, every_station_message(handle, "tx-offline-1"))
    boot, authorize, started, ended = answers[0], answers[3], answers[4], answers[6]
    assert boot.status == "Accepted" and boot.interval == 300
    assert authorize.id_token_info == {"status": "Accepted"}  # in local_list
    assert started.id_token_info == {"status": "Accepted"} and ended.id_token_info is None
    assert answers[13].status == "Rejected"  # DataTransfer: the backend did not process it
    unknown = await in_loop(peers, handle.send(handle.calls.Authorize(id_token={"id_token": "NOT-LISTED",
                                                                                  "type": "ISO14443"})))
    assert unknown.id_token_info == {"status": "Invalid"}
    sent = list(handle.recorder.sent)
    paired = server.sessions["CS1"]

    csms = SimCsms(subprotocol=subprotocol, port=port)
    with capture_logs() as logs:
        await in_loop(peers, csms.start())
        expected = [text for text in sent if '"Heartbeat"' not in text]
        await wait_recorded(csms.recorder("CS1"), lambda r: len(r.received) >= len(expected))
        await wait_until(lambda: not paired.session.offline_mode)  # replay finished
    assert csms.recorders["CS1"].received == expected  # in order, every byte as the station sent it
    assert any('"NotifySettlement"' in t for t in expected) == (subprotocol == "ocpp2.1")  # 2.1 billing data too
    signed = [t for t in expected if '"signedMeterData"' in t]
    assert len(signed) == 2 and '"Started"' in signed[0] and '"Ended"' in signed[1]
    assert server.sessions["CS1"] is paired and paired.queued == 0  # connected throughout, queue drained
    assert not any(e["event"] == "replay_refused" for e in logs)
    # Live again: the next frame goes straight through.
    await in_loop(peers, handle.send(handle.calls.Heartbeat()))
    assert csms.recorders["CS1"].received[-1] == handle.recorder.sent[-1]
    await in_loop(peers, handle.close())
    await in_loop(peers, csms.stop())


async def test_relay_only_subprotocol_gets_no_local_answers_and_is_logged_once(
        peers: LoopThread, start_proxy: StartProxy) -> None:
    """ocpp2.0 (withdrawn) is relayed byte for byte; with the backend down the proxy cannot answer: 502."""
    csms = SimCsms(subprotocol="ocpp2.0", speaks="ocpp2.0.1")
    await in_loop(peers, csms.start())
    server = await start_proxy(config(csms.port, 'subprotocols = ["ocpp2.0", "ocpp2.0.1"]'))
    with capture_logs() as logs:
        for _ in range(2):
            handle = await in_loop(peers, connect_station(proxy_url(server, "CS1"), "CS1", offered=("ocpp2.0",)))
            assert handle.websocket.subprotocol == "ocpp2.0"
            await in_loop(peers, handle.boot())
            assert csms.recorders["CS1"].received[-1] == handle.recorder.sent[-1]
            assert server.sessions["CS1"].session.offline is None
            await in_loop(peers, handle.close())
            await wait_until(lambda: "CS1" not in server.sessions)
        await in_loop(peers, csms.stop())
        with pytest.raises(Exception, match="502"):
            await in_loop(peers, connect_station(proxy_url(server, "CS1"), "CS1", offered=("ocpp2.0",)))
    assert [e["subprotocol"] for e in logs if e["event"] == "subprotocol_relay_only"] == ["ocpp2.0"]


async def test_backend_down_offers_the_first_version_the_proxy_speaks(
        peers: LoopThread, start_proxy: StartProxy) -> None:
    port = free_port()
    server = await start_proxy(config(port, 'subprotocols = ["ocpp2.0", "ocpp2.0.1", "ocpp1.6"]'))
    handle = await in_loop(peers, connect_station(proxy_url(server, "CS1"), "CS1",
                                                  offered=("ocpp2.0", "ocpp2.0.1", "ocpp1.6")))
    assert handle.websocket.subprotocol == "ocpp2.0.1"
    assert (await in_loop(peers, handle.boot())).status == "Accepted"
    with trio.fail_after(10):
        assert server.sessions["CS1"].queued == 1
    await in_loop(peers, handle.close())


@pytest.mark.parametrize("subprotocol", VERSIONS)
async def test_secondary_gets_the_stations_frames_and_is_policed_in_2x(
        peers: LoopThread, start_proxy: StartProxy, subprotocol: str) -> None:
    """A 2.x station with a secondary CSMS: copies byte for byte (nothing to remap), 2.x commands judged."""
    primary, ems = SimCsms(subprotocol=subprotocol), SimCsms(subprotocol=subprotocol)
    for sim in (primary, ems):
        await in_loop(peers, sim.start())
    text = config(primary.port).replace('id = "CS1"\n', 'id = "CS1"\nsecondaries = ["ems"]\n')
    server = await start_proxy(text + f'[backends.ems]\nurl = "ws://127.0.0.1:{ems.port}/ocpp"\n')
    handle = await in_loop(peers, connect_station(proxy_url(server, "CS1"), "CS1", subprotocol=subprotocol))
    await wait_until(lambda: "CS1" in ems.handlers)
    await in_loop(peers, handle.boot())
    await in_loop(peers, handle.signed_transaction("tx-mirrored"))
    calls = [t for t in handle.recorder.sent if t.startswith("[2,")]
    await wait_recorded(ems.recorder("CS1"), lambda r: len(r.received) >= len(calls))
    assert primary.recorders["CS1"].received == calls
    assert ems.recorders["CS1"].received == calls  # the station's own transactionId: copies stay byte-identical
    c = handle.calls
    # Read-only 2.x commands from the secondary reach the station; changing its variables does not.
    trigger = await in_loop(peers, ems.call("CS1", c.TriggerMessage(requested_message="Heartbeat")))
    assert trigger.status == "Accepted"
    refused = await in_loop(peers, ems.call("CS1", c.SetVariables(set_variable_data=[{
        "attribute_value": "60", "component": {"name": "OCPPCommCtrlr"}, "variable": {"name": "HeartbeatInterval"}}])))
    assert refused is None  # the ocpp library returns None for a CALLERROR
    assert json.loads(ems.recorders["CS1"].received[-1])[2] == "SecurityError"
    assert not any('"SetVariables"' in t for t in handle.recorder.received)
    await in_loop(peers, handle.close())
    for sim in (primary, ems):
        await in_loop(peers, sim.stop())
