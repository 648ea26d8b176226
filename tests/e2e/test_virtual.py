"""A Modbus-only wallbox appears to an ``ocpp``-library central system as an OCPP 1.6 charge point (issue 6).

The wallbox is :class:`SimHeidelberg`, a real pymodbus server on 127.0.0.1 with
the vendor's register map; the central system is the ``ocpp`` library, which
validates every frame it receives against the OCPP 1.6 schemas and answers a
CallError to anything invalid, so "no CallError from the backend" below means
every frame the virtual charge point sent was schema-valid.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
import trio_websocket
from ocpp.v16 import call
from pymodbus.client import AsyncModbusTcpClient
from structlog.testing import capture_logs

from proxy.config import loads
from proxy.runtime.server import ProxyServer
from proxy.ops.logs import get_logger
from proxy.modbus.service import run_modbus
from proxy.core.session import PRIMARY
from proxy.demo.peers import LoopThread, Recorder, SimBackend, SimHeidelberg, SimSdm630, connect_wallbox
from tests.conftest import StartProxy, backend_config, proxy_url
from tests.e2e.test_limits_e2e import settle
from tests.opskit import wait_until
from tests.peers import in_loop, wait_recorded


def virtual_config(backend: SimBackend, modbus_port: int, extra: str = "") -> str:
    return backend_config(backend, chargers=()) + (
        f'[[modbus_chargers]]\nid = "HD1"\nmodbus = "127.0.0.1:{modbus_port}"\nfixed_id_tag = "FIXED-0001"\n'
        f'poll_interval = 0.05\nmeter_interval = 1\nfault_after = 0.5\ntimeout = 0.3\n{extra}')


def calls(recorder: Recorder, action: str) -> list[dict[str, Any]]:
    """Payloads of the CALLs the backend received for ``action``."""
    found = []
    for text in list(recorder.received):
        frame = json.loads(text)
        if frame[0] == 2 and frame[2] == action:
            found.append(frame[3])
    return found


def statuses(recorder: Recorder) -> list[str]:
    return [p["status"] for p in calls(recorder, "StatusNotification") if p["connectorId"] == 1]


def is_subsequence(wanted: list[str], seen: list[str]) -> bool:
    remaining = iter(seen)
    return all(item in remaining for item in wanted)


async def wait_status(recorder: Recorder, status: str) -> None:
    await wait_recorded(recorder, lambda r: bool(statuses(r)) and statuses(r)[-1] == status)


def tx_profile(limit: float, transaction_id: int) -> dict[str, Any]:
    return {"chargingProfileId": 7, "transactionId": transaction_id, "stackLevel": 1,
            "chargingProfilePurpose": "TxProfile", "chargingProfileKind": "Relative",
            "chargingSchedule": {"chargingRateUnit": "A",
                                 "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}]}}


async def start_wallbox(peers: LoopThread) -> SimHeidelberg:
    sim = SimHeidelberg()
    await in_loop(peers, sim.start())
    return sim


async def plug_and_charge(backend: SimBackend, sim: SimHeidelberg) -> tuple[Recorder, int]:
    """Plug a car in and wait until it charges; the recorder and the backend's transactionId."""
    rec = backend.recorder("HD1")
    await wait_status(rec, "Available")
    sim.plugged = True
    await wait_recorded(rec, lambda r: bool(calls(r, "StartTransaction")))
    await wait_status(rec, "Charging")
    transaction_id = json.loads(next(t for t in rec.sent if '"transactionId"' in t))[2]["transactionId"]
    return rec, transaction_id


async def test_whole_session_through_the_proxy(peers: LoopThread, backend: SimBackend,
                                              start_proxy: StartProxy) -> None:
    sim = await start_wallbox(peers)
    await start_proxy(virtual_config(backend, sim.port))
    rec = backend.recorder("HD1")
    await wait_recorded(rec, lambda r: bool(calls(r, "BootNotification")))
    boot = calls(rec, "BootNotification")[0]
    assert boot == {"chargePointVendor": "Heidelberg", "chargePointModel": "Energy Control"}
    assert backend.paths["HD1"] == "/ocpp/HD1"
    await wait_until(lambda: sim.limit_amps == 0.0)  # no transaction, no current

    # plug in: Authorize and StartTransaction with the fixed id tag, then charging at the wallbox's maximum
    rec, transaction_id = await plug_and_charge(backend, sim)
    start = calls(rec, "StartTransaction")[0]
    assert calls(rec, "Authorize") == [{"idTag": "FIXED-0001"}]
    assert start["idTag"] == "FIXED-0001" and start["connectorId"] == 1 and start["meterStart"] == 1_000_000
    assert transaction_id == 1001
    await wait_until(lambda: sim.limit_amps == 16.0)

    # meter values from the energy and current registers, in the transaction
    await wait_recorded(rec, lambda r: any(p.get("transactionId") == 1001 for p in calls(r, "MeterValues")))
    sample = next(p for p in calls(rec, "MeterValues") if p.get("transactionId") == 1001)
    values = {(v["measurand"], v.get("phase")): v for v in sample["meterValue"][0]["sampledValue"]}
    assert values[("Current.Import", "L1")]["value"] == "16.0" and values[("Current.Import", "L1")]["unit"] == "A"
    assert int(values[("Energy.Active.Import.Register", None)]["value"]) >= 1_000_000
    assert values[("Power.Active.Import", None)]["value"] == str(3 * 16 * 230)

    # the backend limits the transaction to 10 A: the wallbox's current register follows
    result = await in_loop(peers, backend.call("HD1", call.SetChargingProfile(
        connector_id=1, cs_charging_profiles=tx_profile(10, transaction_id))))
    assert result.status == "Accepted"
    await wait_until(lambda: sim.limit_amps == 10.0)
    assert sim.writes[-1] == (261, [100])

    # RemoteStop: StopTransaction with reason Remote, current 0, Finishing while the car is still plugged
    stop = await in_loop(peers, backend.call("HD1", call.RemoteStopTransaction(transaction_id=transaction_id)))
    assert stop.status == "Accepted"
    await wait_recorded(rec, lambda r: bool(calls(r, "StopTransaction")))
    stopped = calls(rec, "StopTransaction")[0]
    assert stopped["transactionId"] == 1001 and stopped["reason"] == "Remote" and stopped["idTag"] == "FIXED-0001"
    assert stopped["meterStop"] >= start["meterStart"]
    await wait_until(lambda: sim.limit_amps == 0.0)
    await wait_status(rec, "Finishing")

    sim.plugged = False
    await wait_status(rec, "Available")
    assert is_subsequence(["Available", "Preparing", "Charging", "Finishing", "Available"], statuses(rec))
    assert set(statuses(rec)) <= {"Available", "Preparing", "SuspendedEVSE", "Charging", "Finishing"}
    assert len(calls(rec, "StartTransaction")) == 1  # unplugging after a stop starts nothing
    assert not [t for t in rec.sent if t.startswith("[4")]  # the backend found nothing invalid
    await in_loop(peers, sim.stop())


async def test_composite_limit_is_min_of_backend_and_local_engine(peers: LoopThread, backend: SimBackend,
                                                                  start_proxy: StartProxy,
                                                                  nursery: trio.Nursery) -> None:
    sim = await start_wallbox(peers)
    text = virtual_config(backend, sim.port) + (
        '[site]\nmax_current = 7\nramp_up_interval = 0\n[ems]\nmodbus_listen = "127.0.0.1:0"\n')
    server = await start_proxy(text)
    ems = await nursery.start(run_modbus, server.config, server.limiter.engine, server.limiter.poke, get_logger())
    rec, transaction_id = await plug_and_charge(backend, sim)
    await wait_until(lambda: sim.limit_amps == 7.0)  # the site's 7 A, not the wallbox's 16 A
    result = await in_loop(peers, backend.call("HD1", call.SetChargingProfile(
        connector_id=1, cs_charging_profiles=tx_profile(10, transaction_id))))
    assert result.status == "Accepted"
    # the proxy's ChargePointMaxProfile reached the virtual charge point; the backend never saw it or its answer
    assert not any("ocpp-proxy:" in t for t in rec.received)
    await settle(server.limiter)
    view = server.limiter.engine.charger_view("HD1")
    assert view is not None and view.local_limit == 7.0
    assert sim.limit_amps == 7.0  # min(backend 10 A, local 7 A)

    async def ems_read() -> list[int]:  # a virtual charge point is an EMS charger like any other
        client = AsyncModbusTcpClient("127.0.0.1", port=ems.ports[0])
        await client.connect()
        try:
            return list((await client.read_input_registers(100, count=13, device_id=1)).registers)
        finally:
            client.close()

    registers = await in_loop(peers, ems_read())
    assert registers[2] == 3 and registers[10] == 70  # state Charging, effective limit 7.0 A
    await in_loop(peers, sim.stop())


async def test_unplug_stops_and_commands_are_answered_like_a_wallbox(peers: LoopThread, backend: SimBackend,
                                                                     start_proxy: StartProxy) -> None:
    sim = await start_wallbox(peers)
    await start_proxy(virtual_config(backend, sim.port))
    rec, transaction_id = await plug_and_charge(backend, sim)

    config = await in_loop(peers, backend.call("HD1", call.GetConfiguration(key=["MeterValueSampleInterval", "Nope"])))
    assert config.configuration_key == [{"key": "MeterValueSampleInterval", "readonly": False, "value": "1"}]
    assert config.unknown_key == ["Nope"]
    change = await in_loop(peers, backend.call("HD1", call.ChangeConfiguration(key="NumberOfConnectors", value="2")))
    assert change.status == "Rejected"  # read-only
    change = await in_loop(peers, backend.call("HD1", call.ChangeConfiguration(key="Nope", value="1")))
    assert change.status == "NotSupported"
    availability = await in_loop(peers, backend.call("HD1", call.ChangeAvailability(connector_id=0,
                                                                                     type="Inoperative")))
    assert availability.status == "Scheduled"  # a transaction runs
    hard = await in_loop(peers, backend.call("HD1", call.Reset(type="Hard")))
    assert hard.status == "Rejected"

    # an action of OCPP 1.6 it does not offer, and one that does not exist
    await in_loop(peers, backend.send_raw("HD1", '[2,"u1","UpdateFirmware",{"location":"ftp://x","retrieveDate":'
                                                 '"2026-01-01T00:00:00Z"}]'))
    await in_loop(peers, backend.send_raw("HD1", '[2,"u2","FlyToTheMoon",{}]'))
    await wait_recorded(rec, lambda r: sum(t.startswith("[4") for t in r.received) >= 2)
    errors = {json.loads(t)[1]: json.loads(t)[2] for t in rec.received if t.startswith("[4")}
    assert errors == {"u1": "NotSupported", "u2": "NotImplemented"}

    sim.plugged = False  # unplugging ends the transaction
    await wait_recorded(rec, lambda r: bool(calls(r, "StopTransaction")))
    stopped = calls(rec, "StopTransaction")[0]
    assert stopped["reason"] == "EVDisconnected" and stopped["transactionId"] == transaction_id
    await wait_status(rec, "Unavailable")  # the scheduled availability change applies after the transaction
    await wait_until(lambda: sim.limit_amps == 0.0)

    operative = await in_loop(peers, backend.call("HD1", call.ChangeAvailability(connector_id=1, type="Operative")))
    assert operative.status == "Accepted"
    await wait_status(rec, "Available")
    soft = await in_loop(peers, backend.call("HD1", call.Reset(type="Soft")))
    assert soft.status == "Accepted"
    await wait_recorded(rec, lambda r: len(calls(r, "BootNotification")) == 2)  # boots again
    await in_loop(peers, sim.stop())


async def test_remote_start_without_fixed_tag(peers: LoopThread, backend: SimBackend,
                                              start_proxy: StartProxy) -> None:
    sim = await start_wallbox(peers)
    await start_proxy(virtual_config(backend, sim.port).replace('fixed_id_tag = "FIXED-0001"\n', ""))
    rec = backend.recorder("HD1")
    await wait_status(rec, "Available")
    sim.plugged = True
    await wait_status(rec, "Preparing")
    assert not calls(rec, "Authorize")  # no reader and no fixed tag: it waits for the backend
    result = await in_loop(peers, backend.call("HD1", call.RemoteStartTransaction(id_tag="APP-USER-7")))
    assert result.status == "Accepted"
    await wait_recorded(rec, lambda r: bool(calls(r, "StartTransaction")))
    assert calls(rec, "StartTransaction")[0]["idTag"] == "APP-USER-7"
    await wait_status(rec, "Charging")
    await wait_until(lambda: sim.limit_amps == 16.0)
    await in_loop(peers, sim.stop())


async def test_modbus_trouble_is_logged_and_ends_no_session(peers: LoopThread, backend: SimBackend,
                                                           start_proxy: StartProxy, nursery: trio.Nursery) -> None:
    """Garbage, exception responses and timeouts from the wallbox, negative currents from the grid meter."""
    sim = await start_wallbox(peers)
    meter = SimSdm630()
    meter.set_currents(5.0, 5.0, 5.0)
    meter_port = await in_loop(peers, meter.start())
    text = virtual_config(backend, sim.port).replace("[backend]", '[[chargers]]\nid = "CP1"\n[backend]', 1) + (
        f'[meter]\nmodbus = "127.0.0.1:{meter_port}"\npoll_interval = 0.05\ntimeout = 0.3\n'
        "[site]\nmax_current = 32\nmeter_timeout = 60\n")
    with capture_logs() as logs:
        server = await start_proxy(text)
        await nursery.start(run_modbus, server.config, server.limiter.engine, server.limiter.poke, get_logger())
        ocpp_wallbox = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
        rec, transaction_id = await plug_and_charge(backend, sim)
        sessions = dict(server.sessions)

        meter.set_currents(-5.0, 5.0, 5.0)  # a negative current: refused, logged
        await wait_until(lambda: any(e["event"] == "meter_read_failed" for e in logs))
        sim.raw = {6: 5000}  # 500 A from the wallbox: garbage, refused, logged
        await wait_until(lambda: any("implausible" in e.get("error", "") for e in logs
                                     if e["event"] == "virtual_read_failed"))
        sim.failing = True  # Modbus exception responses: Faulted after fault_after
        await wait_status(rec, "Faulted")
        faulted = [p for p in calls(rec, "StatusNotification") if p["status"] == "Faulted"][-1]
        assert faulted["errorCode"] == "OtherError" and "not answering" in faulted["info"]
        sim.failing, sim.raw = False, {}
        meter.set_currents(5.0, 5.0, 5.0)
        await wait_status(rec, "Charging")  # back: the same transaction continues
        sim.silent = True  # timeouts
        await wait_status(rec, "Faulted")
        sim.silent = False
        await wait_status(rec, "Charging")
        sim.fault = 99  # a state value the vendor never defined
        await wait_status(rec, "Faulted")
        sim.fault = None
        await wait_status(rec, "Charging")
    failures = [e["error"] for e in logs if e["event"] == "virtual_read_failed"]
    assert any("exception" in f for f in failures) and any("no answer" in f for f in failures)
    assert any("unknown state register value 99" in f for f in failures)
    assert any("implausible phase current -5" in e["error"] for e in logs if e["event"] == "meter_read_failed")
    assert server.sessions == sessions  # neither session ended
    assert not calls(rec, "StopTransaction") and len(calls(rec, "StartTransaction")) == 1
    await in_loop(peers, ocpp_wallbox.close())
    await in_loop(peers, sim.stop())
    await in_loop(peers, meter.stop())


async def charging_then_backend_gone(peers: LoopThread, start_proxy: StartProxy,
                                     offline: str) -> tuple[ProxyServer, SimHeidelberg, int, int]:
    """A car charging at HD1, then the backend stops: (server, wallbox, backend port, transactionId)."""
    backend = SimBackend()
    await in_loop(peers, backend.start())
    sim = await start_wallbox(peers)
    text = virtual_config(backend, sim.port).replace("[backend]\n", "[backend]\nconnect_timeout = 1\n") + (
        f"[offline]\n{offline}")
    server = await start_proxy(text)
    _, transaction_id = await plug_and_charge(backend, sim)
    await in_loop(peers, backend.stop())
    return server, sim, backend.port, transaction_id


async def stop_after_backend_returns(peers: LoopThread, port: int, transaction_id: int) -> tuple[SimBackend, Recorder]:
    """The backend is back on ``port``; the unplug's StopTransaction reaches it with the original id."""
    back = SimBackend(port=port, first_transaction_id=5000)
    await in_loop(peers, back.start())
    rec = back.recorder("HD1")
    await wait_recorded(rec, lambda r: bool(calls(r, "StopTransaction")), timeout=15)
    stopped = calls(rec, "StopTransaction")[0]
    assert stopped["transactionId"] == transaction_id and stopped["reason"] == "EVDisconnected"
    return back, rec


async def test_backend_outage_is_bridged_by_the_offline_queue(peers: LoopThread, start_proxy: StartProxy) -> None:
    server, sim, port, transaction_id = await charging_then_backend_gone(
        peers, start_proxy, 'auth = "accept_all"\nreconnect_min = 0.1\nreconnect_max = 0.2\n')
    session = server.sessions["HD1"]
    await wait_until(lambda: PRIMARY not in session.upstreams)
    sim.plugged = False  # the transaction ends while the backend is away: answered locally, queued
    await wait_until(lambda: session.queued > 0)
    back, _ = await stop_after_backend_returns(peers, port, transaction_id)
    assert server.sessions["HD1"] is session  # the charge point never noticed the outage
    await in_loop(peers, back.stop())
    await in_loop(peers, sim.stop())


async def test_without_offline_mode_the_charge_point_keeps_its_transaction(peers: LoopThread,
                                                                           start_proxy: StartProxy) -> None:
    """Offline mode off: the session ends with the backend, the charge point queues and delivers later."""
    server, sim, port, transaction_id = await charging_then_backend_gone(
        peers, start_proxy, "enabled = false\nreconnect_max = 0.3\n")
    core = server.virtual["HD1"].core
    await wait_until(lambda: "HD1" not in server.sessions or not core.online)
    sim.plugged = False  # ends while nobody listens: the StopTransaction waits in the charge point
    await wait_until(lambda: core.tx is not None and core.tx.stopping)
    back, rec = await stop_after_backend_returns(peers, port, transaction_id)
    assert calls(rec, "BootNotification") and not calls(rec, "StartTransaction")  # booted again, no new start
    await wait_until(lambda: core.record() is None)  # answered: the transaction is closed
    await in_loop(peers, back.stop())
    await in_loop(peers, sim.stop())


def restartable(text: str, tmp_path: Path, nursery: trio.Nursery) -> Callable[[], Awaitable[ProxyServer]]:
    """Starts a proxy on ``text`` with its data in ``tmp_path``; each call is a restart of the same box."""
    text = text.replace("[server]", '[server]\nlisten = "127.0.0.1:0"', 1) + f'[offline]\ndata_dir = "{tmp_path}/data"\n'

    async def run_proxy() -> ProxyServer:
        server = ProxyServer(loads(text))
        await nursery.start(server.serve)
        return server
    return run_proxy


async def test_transaction_survives_a_proxy_restart(peers: LoopThread, backend: SimBackend, tmp_path: Path,
                                                    nursery: trio.Nursery) -> None:
    """Stopped with a car charging; restarted twice: it goes on, then stops with PowerLoss after an unplug."""
    sim = await start_wallbox(peers)
    run_proxy = restartable(virtual_config(backend, sim.port), tmp_path, nursery)
    first = await run_proxy()
    rec, transaction_id = await plug_and_charge(backend, sim)
    await first.stop()
    assert json.loads((tmp_path / "data" / "virtual" / "HD1.json").read_text())["transaction"]["transaction_id"] == transaction_id

    second = await run_proxy()  # the car is still plugged in: the same transaction goes on
    await wait_recorded(rec, lambda r: len(calls(r, "BootNotification")) == 2)
    await wait_until(lambda: sim.limit_amps == 16.0)
    await wait_recorded(rec, lambda r: any(p.get("transactionId") == transaction_id
                                           for p in calls(r, "MeterValues")[-1:]))
    assert len(calls(rec, "StartTransaction")) == 1 and not calls(rec, "StopTransaction")
    await second.stop()

    sim.plugged = False  # unplugged while the proxy is down
    await run_proxy()
    await wait_recorded(rec, lambda r: bool(calls(r, "StopTransaction")))
    stopped = calls(rec, "StopTransaction")[0]
    assert stopped["transactionId"] == transaction_id and stopped["reason"] == "PowerLoss"
    assert len(calls(rec, "StartTransaction")) == 1
    await wait_until(lambda: not (tmp_path / "data" / "virtual" / "HD1.json").exists())
    await in_loop(peers, sim.stop())


async def test_availability_and_configuration_survive_a_proxy_restart(peers: LoopThread, backend: SimBackend,
                                                                      tmp_path: Path, nursery: trio.Nursery) -> None:
    """As on a real wallbox (OCPP 1.6 section 5.2), Inoperative stays Inoperative across a reboot."""
    sim = await start_wallbox(peers)
    run_proxy = restartable(virtual_config(backend, sim.port), tmp_path, nursery)
    first = await run_proxy()
    rec = backend.recorder("HD1")
    await wait_status(rec, "Available")
    inoperative = await in_loop(peers, backend.call("HD1", call.ChangeAvailability(connector_id=0, type="Inoperative")))
    changed = await in_loop(peers, backend.call("HD1", call.ChangeConfiguration(key="MeterValueSampleInterval",
                                                                                value="20")))
    assert inoperative.status == "Accepted" and changed.status == "Accepted"
    await wait_status(rec, "Unavailable")
    await first.stop()
    before = len(calls(rec, "StatusNotification"))

    second = await run_proxy()
    await wait_recorded(rec, lambda r: len(calls(r, "StatusNotification")) >= before + 2)
    assert len(calls(rec, "BootNotification")) == 2
    assert calls(rec, "StatusNotification")[before:] == [  # connector 0 and 1, both still out of service
        {"connectorId": 0, "status": "Unavailable", "errorCode": "NoError"},
        {"connectorId": 1, "status": "Unavailable", "errorCode": "NoError"}]
    config = await in_loop(peers, backend.call("HD1", call.GetConfiguration(key=["MeterValueSampleInterval"])))
    assert config.configuration_key[0]["value"] == "20"
    sim.plugged = True
    core = second.virtual["HD1"].core
    await wait_until(lambda: core.plugged)  # seen, and not started: the connector is Unavailable
    assert not calls(rec, "Authorize") and not calls(rec, "StartTransaction")
    operative = await in_loop(peers, backend.call("HD1", call.ChangeAvailability(connector_id=0, type="Operative")))
    assert operative.status == "Accepted"
    await wait_recorded(rec, lambda r: bool(calls(r, "StartTransaction")))
    await wait_status(rec, "Charging")
    await in_loop(peers, sim.stop())


async def test_backend_refusing_the_charge_point_is_logged_and_retried(peers: LoopThread, start_proxy: StartProxy,
                                                                       nursery: trio.Nursery) -> None:
    """A backend that answers 404 (it does not know the id): no crash, logged, tried again later."""

    async def refuse(request: trio_websocket.WebSocketRequest) -> None:
        await request.reject(404, body=b"unknown charge point\n")

    backend = await nursery.start(trio_websocket.serve_websocket, refuse, "127.0.0.1", 0, None)
    sim = await start_wallbox(peers)
    text = (f'[backend]\nurl = "ws://127.0.0.1:{backend.port}/ocpp"\n[offline]\nreconnect_max = 0.2\n'
            f'[[modbus_chargers]]\nid = "HD1"\nmodbus = "127.0.0.1:{sim.port}"\npoll_interval = 0.05\n')
    with capture_logs() as logs:
        server = await start_proxy(text)
        await wait_until(lambda: sum(e["event"] == "virtual_session_ended" for e in logs) >= 2)
    refused = [e for e in logs if e["event"] == "upstream_unavailable"]
    assert refused and all(e["status"] == 404 for e in refused)
    ended = [e for e in logs if e["event"] == "virtual_session_ended"]
    assert ended[0]["code"] == 1008 and "404" in ended[0]["reason"]
    assert "HD1" in server.virtual and sim.limit_amps == 0.0  # the wallbox is still polled, and not charging
    await in_loop(peers, sim.stop())


async def test_reload_changes_the_current_of_a_charging_virtual_charge_point(peers: LoopThread, backend: SimBackend,
                                                                             start_proxy: StartProxy) -> None:
    sim = await start_wallbox(peers)
    text = virtual_config(backend, sim.port)
    server = await start_proxy(text)
    await plug_and_charge(backend, sim)
    await wait_until(lambda: sim.limit_amps == 16.0)
    server.reload(loads(text.replace('fixed_id_tag = "FIXED-0001"\n', 'fixed_id_tag = "FIXED-0001"\nmax_current = 10\n')
                        .replace("[server]", f'[server]\nlisten = "127.0.0.1:0"', 1)
                        + f'[offline]\ndata_dir = "{server.config.offline.data_dir}"\n'))
    await wait_until(lambda: sim.limit_amps == 10.0)
    assert server.sessions["HD1"] and len(calls(backend.recorder("HD1"), "StartTransaction")) == 1
    await in_loop(peers, sim.stop())


async def test_an_unwritable_record_is_logged_and_charging_goes_on(peers: LoopThread, backend: SimBackend,
                                                                   start_proxy: StartProxy, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "virtual").write_text("not a directory")  # the record cannot be written
    sim = await start_wallbox(peers)
    with capture_logs() as logs:
        server = await start_proxy(virtual_config(backend, sim.port))
        await plug_and_charge(backend, sim)
        await wait_until(lambda: sim.limit_amps == 16.0)
    assert any(e["event"] == "virtual_record_write_failed" for e in logs)
    assert not any(e["event"] == "virtual_charge_point_failed" for e in logs) and "HD1" in server.sessions
    await in_loop(peers, sim.stop())


async def test_a_new_current_is_answered_only_once_the_register_reads_it_back(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy) -> None:
    """A lower limit counts as applied (Accepted) only when the wallbox's register shows it: the
    fuse lets other wallboxes have the freed current from that answer on (docs/load-management.md)."""
    sim = await start_wallbox(peers)
    await start_proxy(virtual_config(backend, sim.port))
    _, transaction_id = await plug_and_charge(backend, sim)
    await wait_until(lambda: sim.limit_amps == 16.0)
    for limit in (10.0, 6.0):
        result = await in_loop(peers, backend.call("HD1", call.SetChargingProfile(
            connector_id=1, cs_charging_profiles=tx_profile(limit, transaction_id))))
        assert result.status == "Accepted"
        assert sim.limit_amps == limit  # written and read back before the answer left
    await in_loop(peers, sim.stop())
