"""Load management of OCPP 2.0.1 / 2.1 stations: min(backend, local) on the 2.0.1 model (issue 18).

The station's composite limit is computed (tests/station_v2.py) from what the
station was told, not from the proxy's model, for an ``ocpp``-library station
and an ocpp-rpc station.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from proxy.demo.peers import LoopThread
from proxy.demo.peers_v2 import SimCsms, StationHandle, connect_station, current_values
from proxy.runtime.server import ProxyServer
from tests.conftest import StartProxy, proxy_url
from tests.interop import NodePeer
from tests.opskit import free_port
from tests.peers import in_loop, wait_recorded
from tests.station_v2 import backend_profile, composite, installed

VERSIONS = ("ocpp2.0.1", "ocpp2.1")
PROXY_ID = "ocpp-proxy:"


def site_config(port: int, site: str = "max_current = 10", charger: str = "") -> str:
    return (f'[server]\nping_interval = 0\n[backend]\nurl = "ws://127.0.0.1:{port}/ocpp"\n'
            f'[site]\n{site}\nramp_up_interval = 0\nhysteresis = 0\nmin_hold_time = 0\ninterval = 1\n'
            f'[[chargers]]\nid = "CS1"\nmax_current = 16\n{charger}')


async def settled(server: ProxyServer) -> None:
    with trio.fail_after(10):
        await server.limiter.next_progress()
        await server.limiter.wait_settled()


def local_limit(server: ProxyServer) -> float:
    view = server.limiter.views()["CS1"]
    assert view is not None and view.local_limit is not None
    return float(view.local_limit)


def snake(payload: dict[str, Any]) -> dict[str, Any]:
    """The ocpp library's call dataclasses take snake_case arguments (nested dicts may stay camelCase)."""
    return {"evse_id": payload["evseId"], "charging_profile": payload["chargingProfile"]}


async def drive_station(peers: LoopThread, handle: StationHandle) -> None:
    """Boot, a car plugged in, a transaction charging at 16 A per phase."""
    c = handle.calls
    await in_loop(peers, handle.boot())
    await in_loop(peers, handle.send(c.StatusNotification(timestamp="2026-11-27T05:00:00Z",
                                                          connector_status="Occupied", evse_id=1, connector_id=1)))
    await in_loop(peers, handle.transaction_event("Started", "lm-tx-1", [current_values((16.0, 16.0, 16.0))],
                                                  "Authorized", {"id_token": "T1", "type": "ISO14443"}))
    # ISO 15118: the car's needs and the schedule it chose pass untouched (checked byte for byte by the callers).
    await in_loop(peers, handle.send(c.NotifyEVChargingNeeds(evse_id=1, charging_needs={
        "requested_energy_transfer": "AC_three_phase", "ac_charging_parameters": {
            "energy_amount": 20000, "ev_min_current": 6, "ev_max_current": 32, "ev_max_voltage": 400}})))
    await in_loop(peers, handle.send(c.NotifyEVChargingSchedule(time_base="2026-11-27T05:00:00Z", evse_id=1,
        charging_schedule={"id": 1, "charging_rate_unit": "A",
                           "charging_schedule_period": [{"start_period": 0, "limit": 16.0}]})))


@pytest.mark.parametrize("subprotocol", VERSIONS)
async def test_composite_is_min_of_backend_and_local(peers: LoopThread, start_proxy: StartProxy,
                                                     subprotocol: str) -> None:
    csms = SimCsms(subprotocol=subprotocol)
    await in_loop(peers, csms.start())
    server = await start_proxy(site_config(csms.port))
    handle = await in_loop(peers, connect_station(proxy_url(server, "CS1"), "CS1", subprotocol=subprotocol))
    await drive_station(peers, handle)
    await settled(server)
    own = handle.station.profiles[990001]
    assert own[0] == 0 and own[1]["charging_profile_purpose"] == "ChargingStationMaxProfile"
    assert own[1]["stack_level"] == 8
    assert server.limiter.views()["CS1"].currents == (16.0, 16.0, 16.0)  # measured from TransactionEvent
    local = local_limit(server)
    assert composite(installed(handle.recorder.received)) == local

    c = handle.calls
    backend: dict[int, float] = {}  # the CSMS's profiles: id → limit (11: TxDefault, 12: station max)
    # A backend station-wide maximum below the local limit must be carried by the proxy's profile
    # (stack level 8 wins over the backend's), one above it must not raise anything.
    for purpose, limit, pid in (("TxDefaultProfile", 14.0, 11), ("ChargingStationMaxProfile", 7.5, 12),
                                ("TxDefaultProfile", 6.0, 11), ("ChargingStationMaxProfile", 40.0, 12)):
        profile = snake(backend_profile(purpose, limit, pid))
        assert (await in_loop(peers, csms.call("CS1", c.SetChargingProfile(**profile)))).status == "Accepted"
        backend[pid] = limit
        await settled(server)
        expected = min(*backend.values(), local_limit(server))
        assert composite(installed(handle.recorder.received)) == expected, (purpose, limit)
    answer = await in_loop(peers, csms.call("CS1", c.ClearChargingProfile(charging_profile_id=11)))
    assert answer.status == "Accepted"
    await settled(server)
    assert composite(installed(handle.recorder.received)) == local_limit(server)  # only the proxy's max is left

    # Nothing of the proxy's reaches the CSMS, and the CSMS's frames arrive as sent.
    station, backend_side = handle.recorder, csms.recorders["CS1"]
    assert all(PROXY_ID not in text for text in backend_side.received)
    assert backend_side.received == [t for t in station.sent if PROXY_ID not in t]
    assert [t for t in station.received if PROXY_ID not in t] == backend_side.sent
    clears = [json.loads(t)[3] for t in station.received if PROXY_ID in t and '"ClearChargingProfile"' in t]
    assert all(set(c) == {"chargingProfileId"} for c in clears)  # by id only
    await in_loop(peers, handle.close())
    await in_loop(peers, csms.stop())


@pytest.mark.parametrize("subprotocol", VERSIONS)
async def test_station_refusing_the_station_wide_profile_gets_tx_default(
        peers: LoopThread, start_proxy: StartProxy, subprotocol: str) -> None:
    csms = SimCsms(subprotocol=subprotocol)
    await in_loop(peers, csms.start())
    server = await start_proxy(site_config(csms.port))
    handle = await in_loop(peers, connect_station(proxy_url(server, "CS1"), "CS1", subprotocol=subprotocol,
                                                  refuse_purposes=frozenset({"ChargingStationMaxProfile"})))
    await drive_station(peers, handle)
    await settled(server)
    await settled(server)  # the refusal, then the fallback
    own = handle.station.profiles[990001]
    assert own[1]["charging_profile_purpose"] == "TxDefaultProfile" and own[1]["stack_level"] == 0
    local = local_limit(server)
    assert composite({pid: {**p, "chargingProfilePurpose": p["charging_profile_purpose"],
                            "stackLevel": p["stack_level"],
                            "chargingSchedule": [{"chargingRateUnit": "A", "chargingSchedulePeriod": [
                                {"limit": p["charging_schedule"][0]["charging_schedule_period"][0]["limit"]}]}]}
                      for pid, (_, p) in handle.station.profiles.items()}) == local
    # The backend's TxDefaultProfile reaches the station clamped; the CSMS sees its own frame and the answer.
    answer = await in_loop(peers, csms.call("CS1", handle.calls.SetChargingProfile(
        **snake(backend_profile("TxDefaultProfile", 30.0, 21, stack_level=1)))))
    assert answer.status == "Accepted"
    got = handle.station.profiles[21][1]["charging_schedule"][0]["charging_schedule_period"][0]["limit"]
    assert got == local_limit(server) < 30.0
    sent = [t for t in csms.recorders["CS1"].sent if '"SetChargingProfile"' in t]
    assert '"limit":30.0' in sent[-1]
    assert all(PROXY_ID not in text for text in csms.recorders["CS1"].received)
    assert csms.recorders["CS1"].received == [t for t in handle.recorder.sent if PROXY_ID not in t]
    assert sum('"NotifyEVCharging' in t for t in csms.recorders["CS1"].received) == 2  # ISO 15118, as sent
    await in_loop(peers, handle.close())
    await in_loop(peers, csms.stop())


@pytest.mark.parametrize("subprotocol", VERSIONS)
async def test_ocpp_rpc_station_composite_is_min_of_backend_and_local(
        nursery: trio.Nursery, start_proxy: StartProxy, subprotocol: str) -> None:
    csms = await NodePeer.start(nursery, "csms", subprotocol)
    server = await start_proxy(site_config((await csms.wait_for("listening"))["port"]))
    station = await NodePeer.start(nursery, "station", subprotocol, proxy_url(server, "CS1").rpartition("/")[0],
                                   "CS1")
    await station.wait_for("connected")
    await station.call("BootNotification", {"chargingStation": {"model": "RPC", "vendorName": "node"},
                                            "reason": "PowerUp"})
    await station.call("TransactionEvent", {
        "eventType": "Started", "timestamp": "2026-11-27T05:00:00Z", "triggerReason": "Authorized", "seqNo": 0,
        "transactionInfo": {"transactionId": "rpc-lm-1", "chargingState": "Charging"}, "evse": {"id": 1},
        "idToken": {"idToken": "T1", "type": "ISO14443"}, "meterValue": [{"timestamp": "2026-11-27T05:00:00Z",
        "sampledValue": [{"value": 9.5, "measurand": "Current.Import", "unitOfMeasure": {"unit": "A"}}]}]})
    await settled(server)
    assert server.limiter.views()["CS1"].currents == (9.5, 9.5, 9.5)
    assert composite(installed(station.received)) == local_limit(server)
    for purpose, limit in (("TxDefaultProfile", 5.0), ("ChargingStationMaxProfile", 4.0)):
        assert (await csms.call("SetChargingProfile", backend_profile(purpose, limit, 31)))["status"] == "Accepted"
        await settled(server)
        assert composite(installed(station.received)) == min(limit, local_limit(server))
    assert all(PROXY_ID not in text for text in csms.received)
    assert csms.received == [t for t in station.sent if PROXY_ID not in t]
    await station.stop()
    await csms.stop()


async def test_station_is_load_managed_while_the_csms_is_down(peers: LoopThread, start_proxy: StartProxy) -> None:
    """Offline mode and load management together: limits keep coming, none of them reaches the CSMS later."""
    port = free_port()
    server = await start_proxy(site_config(port) + "[offline]\nreconnect_min = 0.05\nreconnect_max = 0.2\n")
    handle = await in_loop(peers, connect_station(proxy_url(server, "CS1"), "CS1"))
    await drive_station(peers, handle)  # every answer local
    await settled(server)
    assert server.sessions["CS1"].session.offline_mode
    assert composite(installed(handle.recorder.received)) == local_limit(server)
    csms = SimCsms(subprotocol="ocpp2.0.1", port=port)
    await in_loop(peers, csms.start())
    # ISO 15118 negotiation needs the CSMS: answered GenericError while it is down, not stored.
    refused = [json.loads(t) for t in handle.recorder.received if t.startswith("[4,")]
    assert [m[2] for m in refused] == ["GenericError", "GenericError"]
    expected = [t for t in handle.recorder.sent if PROXY_ID not in t and '"NotifyEVCharging' not in t]
    await wait_recorded(csms.recorder("CS1"), lambda r: len(r.received) >= len(expected))
    assert csms.recorders["CS1"].received == expected
    await in_loop(peers, handle.close())
    await in_loop(peers, csms.stop())
