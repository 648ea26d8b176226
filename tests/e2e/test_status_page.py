"""The status page's JSON (``GET /api/status``, docs/status.md) against the proxy as ``run`` starts it
(:func:`proxy.cli.start`), with ocpp-library wallboxes and backend, a real pymodbus EMS client and
a simulated Modbus grid meter on 127.0.0.1 (issue 21)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from ocpp.v16 import call
from pymodbus.client import AsyncModbusTcpClient

from proxy.cli import Started, start
from proxy.config import loads
from proxy.demo.peers import LoopThread, SimBackend, SimHeidelberg, SimModbusDevice, connect_wallbox, now_iso
from proxy.ops.status import VERSION
from tests.e2e.test_limits_e2e import Backend, profile
from tests.e2e.test_meter import sdm630
from tests.e2e.test_tls import Pki, client_ssl
from tests.opskit import free_port, http_get
from tests.peers import in_loop
from tests.smart_wallbox import connect_smart

SECRET = "status-page-secret-0001"
TIMING = "ramp_up_interval = 0\nhysteresis = 0\nmin_hold_time = 0\ninterval = 0.5\n"
Status = dict[str, Any]


def base_config(backend_port: int, chargers: str, extra: str = "", data_dir: str = "") -> str:
    return (f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\ncall_timeout = 10\n'
            f'[backend]\nurl = "ws://127.0.0.1:{backend_port}/ocpp"\nconnect_timeout = 2\n'
            f'[metrics]\nlisten = "127.0.0.1:0"\n'
            f'[offline]\ndata_dir = "{data_dir}"\nauth = "accept_all"\nreconnect_min = 0.05\nreconnect_max = 0.2\n'
            f'{extra}{chargers}')


async def status(started: Started) -> Status:
    reply = await http_get(f"http://127.0.0.1:{started.monitor.ports[0]}/api/status")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json", reply
    assert SECRET not in reply.body  # never a password, whatever the state
    body: Status = json.loads(reply.body)
    assert body["version"] == VERSION
    return body


def charger(body: Status, charger_id: str) -> Status:
    found: list[Status] = [c for c in body["chargers"] if c["id"] == charger_id]
    assert len(found) == 1, body
    return found[0]


async def wait_status(started: Started, predicate: Callable[[Status], bool], timeout: float = 15.0) -> Status:
    """Poll /api/status until ``predicate`` holds (fails with the last answer after ``timeout``)."""
    body: Status = {}
    with trio.move_on_after(timeout):
        while True:
            body = await status(started)
            if predicate(body):
                return body
            await trio.sleep(0.1)
    raise AssertionError(f"status never matched; last: {json.dumps(body, indent=1)}")


def set_by(charger_id: str, source: str) -> Callable[[Status], bool]:
    def check(body: Status) -> bool:
        limit = charger(body, charger_id)["limit"]
        return limit is not None and limit["set_by"] == source
    return check


async def ems_write(peers: LoopThread, port: int, address: int, value: int) -> None:
    async def write() -> None:
        client = AsyncModbusTcpClient("127.0.0.1", port=port)
        await client.connect()
        try:
            assert not (await client.write_register(address, value, device_id=1)).isError()
        finally:
            client.close()

    await in_loop(peers, write())


async def test_limits_by_backend_site_fuse_and_ems(peers: LoopThread, backend: SimBackend, nursery: trio.Nursery,
                                                  tmp_path: Any) -> None:
    ems_port = free_port()
    text = base_config(backend.port, f'[[chargers]]\nid = "CP1"\npassword = "{SECRET}"\nmax_current = 32\n'
                                     '[[chargers]]\nid = "CP2"\nmax_current = 32\n',
                       f'[ems]\nmodbus_listen = "127.0.0.1:{ems_port}"\n[site]\nmax_current = 20\n{TIMING}',
                       str(tmp_path))
    started = await start(loads(text), nursery)
    url = f"ws://127.0.0.1:{started.server.ports[0]}/ocpp"

    before = await status(started)
    assert [c["connected"] for c in before["chargers"]] == [False, False]
    assert charger(before, "CP1")["backend"]["state"] == "disconnected"
    assert before["site"]["limit_a"] == 20.0 and before["site"]["meter"]["state"] == "not_configured"

    cp1 = await in_loop(peers, connect_wallbox(f"{url}/CP1", "CP1", password=SECRET))
    await in_loop(peers, cp1.wallbox.call(call.StatusNotification(connector_id=1, error_code="NoError",
                                                                  status="Charging")))
    await in_loop(peers, cp1.wallbox.call(call.StartTransaction(connector_id=1, id_tag="T", meter_start=0,
                                                                timestamp=now_iso())))
    cp2 = await in_loop(peers, connect_smart(f"{url}/CP2", "CP2"))
    await in_loop(peers, cp2.wallbox.start_transaction())

    # Two cars share the 20 A fuse.
    body = await wait_status(started, lambda b: all(set_by(c, "site_fuse")(b) for c in ("CP1", "CP2")))
    one, two = charger(body, "CP1"), charger(body, "CP2")
    assert (one["connected"], one["ocpp_version"], one["subprotocol"]) == (True, "1.6", "ocpp1.6")
    assert one["security_profile"] == "SP1" and two["security_profile"] == "none"
    assert one["backend"] == {"state": "online", "queued_frames": 0, "oldest_queued_age_seconds": None}
    assert one["connectors"] == {"1": "Charging"} and one["transaction"] is True
    assert one["limit"]["amps"] + two["limit"]["amps"] <= 20.0
    assert body["site"]["reserved_a"] == [one["limit"]["reserved_a"] + two["limit"]["reserved_a"]] * 3

    # The backend's own profile caps CP1 below its share; CP2 gets the rest of the fuse.
    assert await Backend(peers, backend, "CP1", cp2).set(0, profile(11, 1, "TxDefaultProfile", 6)) == "Accepted"
    body = await wait_status(started, lambda b: set_by("CP1", "backend")(b)
                             and charger(b, "CP2")["limit"]["amps"] == 14.0)
    assert charger(body, "CP1")["limit"]["amps"] == 6.0 and charger(body, "CP1")["limit"]["backend_a"] == 6.0
    assert set_by("CP2", "site_fuse")(body)

    # The energy manager limits CP2 (charger index 1) to 8 A.
    await ems_write(peers, ems_port, 100 + 20 * 1, 80)
    body = await wait_status(started, set_by("CP2", "ems"))
    assert charger(body, "CP2")["limit"]["amps"] == 8.0 and charger(body, "CP2")["limit"]["ems_a"] == 8.0

    # The EMS lowers the site limit: the share it leaves is the EMS's doing.
    await ems_write(peers, ems_port, 100 + 20 * 1, 65535)  # CP2's own EMS limit off again
    await ems_write(peers, ems_port, 0, 120)  # site limit 12 A: CP1 keeps 6, CP2 gets the 6 left
    body = await wait_status(started, lambda b: set_by("CP2", "ems")(b) and charger(b, "CP2")["limit"]["amps"] == 6.0)
    assert body["site"]["ems_limit_a"] == 12.0 and body["site"]["limit_a"] == 12.0
    assert body["site"]["config_limit_a"] == 20.0 and charger(body, "CP2")["limit"]["ems_a"] is None

    await in_loop(peers, cp1.close())
    body = await wait_status(started, lambda b: not charger(b, "CP1")["connected"])
    assert charger(body, "CP1")["last_error"] is None  # a normal close is no error
    await in_loop(peers, cp2.websocket.close(4000, "wallbox reboots"))
    body = await wait_status(started, lambda b: not charger(b, "CP2")["connected"])
    assert charger(body, "CP2")["last_error"]["message"] == "closed by wallbox: 4000 wallbox reboots"
    assert charger(body, "CP2")["limit"]["reserved_a"] is not None  # a lost charger keeps its reservation
    await in_loop(peers, cp2.close())


async def test_meter_headroom_then_fallback(peers: LoopThread, backend: SimBackend, nursery: trio.Nursery,
                                           tmp_path: Any) -> None:
    meter = SimModbusDevice(input=sdm630(22.0, 22.0, 22.0))
    meter_port = await in_loop(peers, meter.start())
    text = base_config(backend.port, '[[chargers]]\nid = "CP1"\nmax_current = 16\n',
                       f'[meter]\nmodbus = "127.0.0.1:{meter_port}"\nmap = "sdm630"\npoll_interval = 0.1\n'
                       f'[site]\nmax_current = 32\nmeter_timeout = 1\n{TIMING}', str(tmp_path))
    started = await start(loads(text), nursery)
    handle = await in_loop(peers, connect_smart(f"ws://127.0.0.1:{started.server.ports[0]}/ocpp/CP1", "CP1"))
    await in_loop(peers, handle.wallbox.start_transaction())

    # The grid meter shows 22 A of a 32 A fuse: the car gets the 10 A the meter leaves. Once a reading
    # is taken while it is allowed them, they come off it (one taken before does not contain them).
    body = await wait_status(started, lambda b: set_by("CP1", "meter_headroom")(b)
                             and charger(b, "CP1")["limit"]["amps"] == 10.0 and b["site"]["house_load_a"][0] < 22.0)
    site = body["site"]
    assert site["meter"]["state"] == "ok" and site["meter"]["currents_a"] == [22.0, 22.0, 22.0]
    # The grid reading includes what the car is estimated to draw: house load = grid - car.
    assert [h + r for h, r in zip(site["house_load_a"], site["headroom_a"])] == [32.0] * 3
    assert site["budget_a"] == site["headroom_a"] and site["house_load_a"][0] < 22.0
    assert site["reserved_a"] == [10.0, 10.0, 10.0] and site["fallback"] is False

    meter.silent = True  # the meter stops answering: after meter_timeout each charger gets its fallback
    body = await wait_status(started, set_by("CP1", "fallback"))
    assert body["site"]["fallback"] is True and body["site"]["meter"]["state"] == "stale"
    assert charger(body, "CP1")["limit"]["amps"] == 6.0  # fallback_current default: the charger's minimum
    await in_loop(peers, handle.close())
    meter.silent = False
    await in_loop(peers, meter.stop())


async def test_offline_with_queue_draining_then_online(peers: LoopThread, nursery: trio.Nursery, tmp_path: Any) -> None:
    port = free_port()  # no backend there yet
    started = await start(loads(base_config(port, '[[chargers]]\nid = "CP1"\n', data_dir=str(tmp_path))), nursery)
    handle = await in_loop(peers, connect_wallbox(f"ws://127.0.0.1:{started.server.ports[0]}/ocpp/CP1", "CP1"))
    outcome = await in_loop(peers, handle.wallbox.run_session())
    assert outcome["transaction_id"] == -1  # answered locally

    body = await wait_status(started, lambda b: charger(b, "CP1")["backend"]["queued_frames"] >= 9)
    entry = charger(body, "CP1")
    assert entry["connected"] is True and entry["backend"]["state"] == "offline"
    assert entry["backend"]["oldest_queued_age_seconds"] >= 0.0
    assert entry["last_error"] is not None and entry["last_error"]["message"].startswith("backend: ")
    assert body["site"] is None and entry["limit"] is None  # no load management configured

    # The wallbox leaves with its frames still queued: the proxy drains the queue without it.
    await in_loop(peers, handle.close(4000, "wallbox reboots"))
    body = await wait_status(started, lambda b: charger(b, "CP1")["backend"]["state"] == "draining")
    entry = charger(body, "CP1")
    assert entry["connected"] is False and entry["backend"]["queued_frames"] >= 9
    assert entry["last_error"]["message"].startswith("backend: ")  # the drain's attempts, after the close
    assert entry["security_profile"] is None and entry["ocpp_version"] is None

    sim = SimBackend(port=port)  # the backend is back: the drain delivers everything and ends
    await in_loop(peers, sim.start())
    await wait_status(started, lambda b: charger(b, "CP1")["backend"] == {
        "state": "disconnected", "queued_frames": 0, "oldest_queued_age_seconds": None})
    assert len(sim.recorder("CP1").received) >= 9
    handle = await in_loop(peers, connect_wallbox(f"ws://127.0.0.1:{started.server.ports[0]}/ocpp/CP1", "CP1"))
    await wait_status(started, lambda b: charger(b, "CP1")["backend"] == {
        "state": "online", "queued_frames": 0, "oldest_queued_age_seconds": None})
    await in_loop(peers, handle.close())
    await in_loop(peers, sim.stop())


async def test_read_only_and_served_files(backend: SimBackend, nursery: trio.Nursery, tmp_path: Any) -> None:
    text = base_config(backend.port, f'[[chargers]]\nid = "CP1"\npassword = "{SECRET}"\n', data_dir=str(tmp_path))
    started = await start(loads(text), nursery)
    base = f"http://127.0.0.1:{started.monitor.ports[0]}"
    for path in ("/", "/api/status", "/status.js", "/status.css", "/metrics"):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            reply = await http_get(base + path, method=method)
            assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD", (path, method, reply)
    page = await http_get(base + "/")
    assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "/status.js" in page.body and "/api/status" in page.body and "http" not in page.body.split("<body>")[0]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = await http_get(base + "/status.js")
    assert script.headers["content-type"].startswith("text/javascript") and 'fetch("/api/status"' in script.body
    assert (await http_get(base + "/status.css")).headers["content-type"].startswith("text/css")
    head = await http_get(base + "/api/status", method="HEAD")
    assert head.status == 200 and head.body == "" and int(head.headers["content-length"]) > 100
    assert SECRET not in (await http_get(base + "/")).body + (await http_get(base + "/readyz")).body


async def test_modbus_wallbox_link(peers: LoopThread, backend: SimBackend, nursery: trio.Nursery,
                                   tmp_path: Any) -> None:
    sim = SimHeidelberg()
    await in_loop(peers, sim.start())
    chargers = (f'[[modbus_chargers]]\nid = "HD1"\nmodbus = "127.0.0.1:{sim.port}"\nfixed_id_tag = "FIXED-0001"\n'
                'poll_interval = 0.05\nmeter_interval = 1\nfault_after = 0.5\ntimeout = 0.3\n')
    started = await start(loads(base_config(backend.port, chargers, f"[site]\nmax_current = 32\n{TIMING}",
                                            str(tmp_path))), nursery)
    body = await wait_status(started, lambda b: (charger(b, "HD1").get("modbus") or {}).get("link") == "up"
                             and charger(b, "HD1")["connected"])
    entry = charger(body, "HD1")
    assert entry["kind"] == "modbus" and entry["security_profile"] == "local" and entry["ocpp_version"] == "1.6"
    assert entry["modbus"] == {"address": f"127.0.0.1:{sim.port}", "transport": "tcp", "map": "heidelberg",
                               "link": "up"}
    assert entry["backend"]["state"] == "online" and entry["last_error"] is None

    sim.silent = True  # the wallbox stops answering Modbus
    body = await wait_status(started, lambda b: charger(b, "HD1")["modbus"]["link"] == "down")
    assert charger(body, "HD1")["last_error"]["message"] == "Modbus link lost or readings bad"
    sim.silent = False
    await wait_status(started, lambda b: charger(b, "HD1")["modbus"]["link"] == "up")
    await in_loop(peers, sim.stop())


async def test_security_profile_of_each_connection(peers: LoopThread, backend: SimBackend, nursery: trio.Nursery,
                                                   tmp_path: Path) -> None:
    """SP1 (Basic auth over ws) and SP2 (over wss) on one detect port; SP3 (client certificate) on another."""
    pki = Pki(tmp_path / "pki")
    cert, key = pki.server()
    chargers = "".join(f'[[chargers]]\nid = "{cp}"\npassword = "{SECRET}"\n' for cp in ("CP1", "CP2"))
    plain_and_tls = f'[server]\ntls = "detect"\ncert = "{cert}"\nkey = "{key}"\n'
    first = await start(loads(base_config(backend.port, chargers, data_dir=str(tmp_path / "a"))
                              .replace("[server]\n", plain_and_tls, 1)), nursery)
    trust = client_ssl(pki.ca_file)
    port = first.server.ports[0]
    sp1 = await in_loop(peers, connect_wallbox(f"ws://127.0.0.1:{port}/ocpp/CP1", "CP1", password=SECRET))
    sp2 = await in_loop(peers, connect_wallbox(f"wss://127.0.0.1:{port}/ocpp/CP2", "CP2", password=SECRET,
                                               ssl=trust))
    body = await wait_status(first, lambda b: all(c["connected"] for c in b["chargers"]))
    assert [c["security_profile"] for c in body["chargers"]] == ["SP1", "SP2"]

    certificates = f'{plain_and_tls}client_ca = ["{pki.ca_file}"]\n'.replace('"detect"', '"on"')
    second = await start(loads(base_config(backend.port, '[[chargers]]\nid = "CP3"\n', data_dir=str(tmp_path / "b"))
                               .replace("[server]\n", certificates, 1)), nursery)
    sp3 = await in_loop(peers, connect_wallbox(f"wss://127.0.0.1:{second.server.ports[0]}/ocpp/CP3", "CP3",
                                               ssl=client_ssl(pki.ca_file, pki.client("CP3"))))
    body = await wait_status(second, lambda b: charger(b, "CP3")["connected"])
    assert charger(body, "CP3")["security_profile"] == "SP3"
    for monitor in (first, second):
        text = (await http_get(f"http://127.0.0.1:{monitor.monitor.ports[0]}/api/status")).body
        assert "BEGIN CERTIFICATE" not in text and "PRIVATE KEY" not in text and str(pki.dir) not in text
    for handle in (sp1, sp2, sp3):
        await in_loop(peers, handle.close())
