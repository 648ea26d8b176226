"""Backend, disk and network faults, end to end with real processes (issue 17).

The proxy runs as ``python -m proxy run`` (JSON log on stderr); the backend is
``tests/backend_process.py`` in a process of its own, so it can be frozen with
SIGSTOP; the wallbox is a plain WebSocket client (trio-websocket) sending OCPP-J
text, or the ``ocpp``-library charge point. Each test names the numbered item
of the issue it shows.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import sys
import urllib.request
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.opskit import ROOT, BackendProcess, ProxyProcess, free_port, launch_proxy, parse, value

FAST = "reconnect_min = 0.2\nreconnect_max = 0.5\n"


def proxy_config(tmp_path: Path, backend_port: int, *, backend: str = "", server: str = "", offline: str = "",
                 charger: str = "", data: Path | None = None) -> Path:
    config = tmp_path / "proxy.toml"
    if "ping_interval" not in server:
        server += "\nping_interval = 0"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n{server}\n'
        f'[log]\nformat = "json"\n[metrics]\nlisten = "127.0.0.1:0"\n'
        f'[backend]\nurl = "ws://127.0.0.1:{backend_port}/ocpp"\nconnect_timeout = 2\n{backend}\n'
        f'[offline]\ndata_dir = "{data or tmp_path / "data"}"\nauth = "accept_all"\ndrain_delay = 0.2\n'
        f'{FAST}{offline}\n'
        f'[[chargers]]\nid = "CP1"\n{charger}\n')
    return config


async def call(ws: WebSocketConnection, msg_id: str, action: str, payload: dict[str, Any],
               timeout: float = 10) -> list[Any]:
    """Send one CALL and wait for the frame answering it."""
    await ws.send_message(json.dumps([2, msg_id, action, payload]))
    with trio.fail_after(timeout):
        while True:
            answer = json.loads(await ws.get_message())
            if answer[1] == msg_id:
                return answer  # type: ignore[no-any-return]


def status(connector: int, state: str) -> dict[str, Any]:
    return {"connectorId": connector, "status": state, "errorCode": "NoError"}


async def metrics_of(proxy: ProxyProcess) -> dict[Any, float]:
    port = (await proxy.wait_event("metrics_listening"))["ports"][0]

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    return parse(await trio.to_thread.run_sync(get))[1]


# --- item 3: a backend that answers pings but never a CALL ------------------------------------


async def test_a_backend_that_never_answers_a_call_is_given_up_and_the_call_answered_locally(
        tmp_path: Path) -> None:
    backend = await BackendProcess.start("silent")
    proxy, port = await launch_proxy(proxy_config(tmp_path, backend.port, backend="call_timeout = 2"))
    try:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ocpp/CP1", subprotocols=["ocpp1.6"]) as ws:
            started = trio.current_time()
            boot = await call(ws, "b1", "BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"})
            waited = trio.current_time() - started
            assert boot[0] == 3 and boot[2]["status"] == "Accepted"  # the local answer
            assert 2 <= waited < 8, waited  # call_timeout, well below a wallbox's own 30 s
            given_up = await proxy.wait_event("upstream_given_up")
            assert given_up["kind"] == "call_timeout" and "BootNotification 'b1' unanswered" in given_up["reason"]
            lost = await proxy.wait_event("upstream_lost")
            assert lost["reason"] == given_up["reason"]  # the real reason, not "closed with 1000"
            await proxy.wait_event("upstream_reconnected")  # reconnected with backoff, replays the boot
            assert (await backend.wait_received("CP1", 2))[:2] == [backend.received("CP1")[0]] * 2
            samples = await metrics_of(proxy)
            assert value(samples, "ocpp_proxy_upstream_lost_total", reason="call_timeout") >= 1
            hb = await call(ws, "h1", "Heartbeat", {})  # the wallbox stays connected and answered
            assert hb[0] == 3
    finally:
        await proxy.stop()
        await backend.stop()


# --- item 4: a backend frozen mid-session -----------------------------------------------------


async def test_a_frozen_backend_is_replaced_by_local_answers_within_call_timeout(tmp_path: Path) -> None:
    backend = await BackendProcess.start("answer")
    proxy, port = await launch_proxy(proxy_config(tmp_path, backend.port, backend="call_timeout = 3",
                                                  server="ping_interval = 1"))
    try:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ocpp/CP1", subprotocols=["ocpp1.6"]) as ws:
            assert (await call(ws, "s1", "StatusNotification", status(1, "Available")))[0] == 3
            assert len(await backend.wait_received("CP1", 1)) == 1  # online: the backend answered
            backend.freeze()  # SIGSTOP: reads nothing, answers nothing, no pong
            started = trio.current_time()
            answer = await call(ws, "s2", "StatusNotification", status(1, "Preparing"))
            waited = trio.current_time() - started
            assert answer == [3, "s2", {}] and waited < 3 + 5, waited
            given_up = await proxy.wait_event("upstream_given_up")
            assert given_up["kind"] in ("call_timeout", "ping_timeout"), given_up
            lost = await proxy.wait_event("upstream_lost")
            assert "closed with" not in lost["reason"], lost
            backend.thaw()
            # The frozen connection is gone; the proxy reconnects and replays the local answer's frame.
            received = await backend.wait_received("CP1", 2)
            assert '"s2"' in received[-1]
            assert (await call(ws, "s3", "StatusNotification", status(1, "Charging")))[0] == 3
    finally:
        await proxy.stop()
        await backend.stop()
    assert not [e for e in proxy.events if e.get("event") == "session_closed"
                and e.get("closed_by") != "proxy"], "the wallbox was never closed"


# --- item 2: a backend that stops reading its socket ------------------------------------------


async def test_a_backend_that_stops_reading_never_takes_the_wallbox_down(tmp_path: Path) -> None:
    backend = await BackendProcess.start("answer")
    # call_timeout long: what must trigger here is the stall (a send blocked for stall_timeout).
    proxy, port = await launch_proxy(proxy_config(
        tmp_path, backend.port, backend="call_timeout = 120\nstall_timeout = 2",
        server="max_message_bytes = 4194304"))
    big = "x" * 1_000_000  # the socket buffers on loopback hold a few MB: 40 MB cannot all be in flight
    try:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ocpp/CP1", subprotocols=["ocpp1.6"],
                                      max_message_size=8 * 1024 * 1024) as ws:
            assert (await call(ws, "s1", "StatusNotification", status(1, "Available")))[0] == 3
            await backend.wait_received("CP1", 1)
            backend.freeze()
            for n in range(40):
                await ws.send_message(json.dumps([2, f"d{n}", "DataTransfer", {"vendorId": "V", "data": big}]))
            answers: dict[str, list[Any]] = {}
            with trio.fail_after(60):
                while len(answers) < 40:
                    answer = json.loads(await ws.get_message())
                    answers[answer[1]] = answer
            assert all(a[0] == 3 and a[2] == {"status": "Rejected"} for a in answers.values())  # local answers
            with trio.fail_after(10):
                await ws.ping()  # the proxy reads the wallbox again: its pings are answered
            given_up = await proxy.wait_event("upstream_given_up")
            assert given_up["kind"] == "stall" and "not reading" in given_up["reason"]
            samples = await metrics_of(proxy)
            assert value(samples, "ocpp_proxy_upstream_lost_total", reason="stall") >= 1
    finally:
        await proxy.stop()
        await backend.stop()
    assert not any(e.get("event") == "session_closing" and e.get("closed_by") != "proxy" for e in proxy.events)


# --- item 6: a backend choosing a subprotocol nobody offered -------------------------------------


async def test_a_backend_choosing_an_unoffered_subprotocol_is_refused_with_502(tmp_path: Path) -> None:
    backend = await BackendProcess.start("subprotocol")
    proxy, port = await launch_proxy(proxy_config(tmp_path, backend.port))
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        key = base64.b64encode(b"0123456789abcdef").decode()
        await stream.send_all((f"GET /ocpp/CP1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                               f"Sec-WebSocket-Protocol: ocpp1.6\r\n\r\n").encode())
        reply = b""
        with trio.fail_after(15):
            while b"\r\n\r\n" not in reply:
                chunk = await stream.receive_some(4096)
                assert chunk
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 502"), reply[:100]
        await stream.aclose()
        refused = await proxy.wait_event("handshake_refused")
        assert refused["status"] == 502 and "not offered" in refused["detail"] and "ocpp2.0.1" in refused["detail"]
        unavailable = await proxy.wait_event("upstream_unavailable")
        assert "not offered" in unavailable["reason"]
        assert (await backend.wait_event("connected"))["offered"] == "ocpp1.6"
    finally:
        await proxy.stop()
        await backend.stop()
    assert not any(e.get("event") == "session_opened" for e in proxy.events)  # not admitted, not "offline"


# --- item 7: the upstream path carries the identity as it is --------------------------------------


async def test_the_upstream_path_carries_sub_delims_as_they_are(tmp_path: Path) -> None:
    backend = await BackendProcess.start("answer")
    proxy, port = await launch_proxy(proxy_config(
        tmp_path, backend.port, charger='upstream_id = "DE*ABC*E001"\nupstream_password = "secret-0123456789"'))
    try:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ocpp/CP1", subprotocols=["ocpp1.6"]) as ws:
            assert (await call(ws, "h1", "Heartbeat", {}))[0] == 3
        connected = await backend.wait_event("connected")
        assert connected["path"] == "/ocpp/DE*ABC*E001" and connected["user"] == "DE*ABC*E001"
    finally:
        await proxy.stop()
        await backend.stop()


# --- item 9: an unusable queue database at start-up ---------------------------------------------


async def test_an_unusable_queue_database_is_named_with_its_key_at_start_up(tmp_path: Path) -> None:
    """Refused before anything starts, by the checks check-config shares with run (issue 19): exit 2,
    the key, the file and why; the run-time path (StorageUnusable, exit 1) is for a file that goes bad
    between the check and the opening (tests/unit/test_storage.py)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "queue.sqlite3").write_bytes(b"not a database, " * 512)
    config = proxy_config(tmp_path, 9)
    with trio.fail_after(30):
        result = await trio.run_process([sys.executable, "-m", "proxy", "run", "--config", str(config)],
                                        cwd=ROOT, capture_stderr=True, check=False)
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert f"offline.data_dir: {tmp_path / 'data' / 'queue.sqlite3'}: cannot be used" in stderr
    assert "not a database" in stderr and "Traceback" not in stderr


def queued(data: Path, charger: str = "CP1") -> list[tuple[int, str, int]]:
    """(row, action, attempts) of the charger's queued frames, read from the proxy's file."""
    with sqlite3.connect(data / "queue.sqlite3", timeout=10) as db:
        return [(int(r), str(a), int(n)) for r, a, n in db.execute(
            "SELECT row, action, attempts FROM frames WHERE charger = ? ORDER BY row", (charger,))]


# --- item 1: disk full while the backend returns ------------------------------------------------


async def test_a_full_disk_during_replay_ends_no_session_and_loses_nothing(tmp_path: Path) -> None:
    """A real tmpfs of 2 MB holds the queue; it is filled while frames wait for the backend."""
    from tests.diskfull import small_disk

    with small_disk(tmp_path / "disk") as disk:
        backend_port = free_port()  # nothing listens yet: the backend is down
        config = proxy_config(tmp_path, backend_port, data=disk.path)
        proxy, port = await launch_proxy(config)
        backend: BackendProcess | None = None
        try:
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ocpp/CP1", subprotocols=["ocpp1.6"]) as ws:
                sent = []
                for n, state in enumerate(("Available", "Preparing", "Charging", "Finishing", "Available")):
                    sent.append(json.dumps([2, f"q{n}", "StatusNotification", status(1, state)]))
                    assert (await call(ws, f"q{n}", "StatusNotification", status(1, state)))[0] == 3
                assert [a for _, a, _ in queued(disk.path)] == ["StatusNotification"] * 5
                disk.fill(disk.path / "queue.sqlite3")  # every write must now grow the WAL: ENOSPC
                mark = len(proxy.events)
                backend = await BackendProcess.start("answer", port=backend_port)
                await proxy.wait_event("replay_finished", after=mark)
                # Marks and deletes failed and are retried; the session goes on, online.
                errors = [e for e in proxy.events[mark:] if e.get("event") == "storage_error"]
                assert {e["operation"] for e in errors} >= {"deliver"} and "full" in errors[0]["error"]
                assert (await call(ws, "h1", "Heartbeat", {}))[0] == 3  # relayed to the backend
                samples = await metrics_of(proxy)
                assert value(samples, "ocpp_proxy_storage_errors_total", operation="deliver") >= 1
                assert value(samples, "ocpp_proxy_storage_failing") == 1
                assert len(queued(disk.path)) == 5  # not deleted on disk yet ...
                disk.free()
                await proxy.wait_event("storage_recovered", after=mark)  # ... until the retry
                assert queued(disk.path) == []
                assert value(await metrics_of(proxy), "ocpp_proxy_storage_failing") == 0
                assert (await backend.wait_received("CP1", 6))[:5] == sent  # each queued frame once, in order
                # Backend down again and the disk full: a frame that cannot be stored is refused, nothing else.
                await backend.stop()
                backend = None
                await proxy.wait_event("upstream_lost", after=mark)
                disk.fill(disk.path / "queue.sqlite3")
                refused = await call(ws, "r1", "StatusNotification", status(1, "Preparing"))
                assert refused[0] == 4 and refused[2] == "InternalError"
                assert (await call(ws, "h2", "Heartbeat", {}))[0] in (3, 4)  # still connected, still answered
                disk.free()
                assert (await call(ws, "r2", "StatusNotification", status(1, "Preparing")))[0] == 3
        finally:
            await proxy.stop()
            if backend is not None:
                await backend.stop()
        assert not any(e.get("event") == "session_closing" and e.get("closed_by") != "wallbox"
                       for e in proxy.events), "no session ended because of the disk"


# --- item 5: queues drain without their wallbox -------------------------------------------------


def transaction_frames() -> list[tuple[str, str, dict[str, Any]]]:
    return [("t1", "StartTransaction", {"connectorId": 1, "idTag": "TAG1", "meterStart": 0,
                                        "timestamp": "2026-11-27T05:00:00Z"}),
            ("t2", "MeterValues", {"connectorId": 1, "transactionId": -1, "meterValue": [
                {"timestamp": "2026-11-27T05:10:00Z", "sampledValue": [{"value": "1500"}]}]}),
            ("t3", "StopTransaction", {"transactionId": -1, "meterStop": 3000, "timestamp": "2026-11-27T05:20:00Z"})]


async def test_a_transaction_queued_while_the_backend_was_down_is_billed_after_the_wallbox_left(
        tmp_path: Path) -> None:
    backend_port = free_port()  # the backend is down
    proxy, port = await launch_proxy(proxy_config(tmp_path, backend_port))
    backend: BackendProcess | None = None
    try:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ocpp/CP1", subprotocols=["ocpp1.6"]) as ws:
            start = await call(ws, "t1", *transaction_frames()[0][1:])
            assert start[2]["transactionId"] == -1  # a local id
            for msg_id, action, payload in transaction_frames()[1:]:
                assert (await call(ws, msg_id, action, payload))[0] == 3
        closed_at = await proxy.wait_event("session_closed")  # the wallbox is gone (and stays gone)
        mark = proxy.events.index(closed_at) + 1  # what follows may already have been read with it
        backend = await BackendProcess.start("answer", port=backend_port)
        started = await proxy.wait_event("drain_started", after=mark)
        assert started["queued"] == 3 and started["charger"] == "CP1"
        received = await backend.wait_received("CP1", 3)
        assert [json.loads(t)[2] for t in received] == ["StartTransaction", "MeterValues", "StopTransaction"]
        assert json.loads(received[1])[3]["transactionId"] == 1001  # mapped to the backend's id
        assert json.loads(received[2])[3]["transactionId"] == 1001
        closed = await proxy.wait_event("drain_closed", after=mark)
        assert (closed["code"], closed["reason"]) == (1000, "queue delivered")
        assert (await backend.wait_event("connected"))["path"] == "/ocpp/CP1"  # under the charger's identity
        assert queued(tmp_path / "data") == []
    finally:
        await proxy.stop()
        if backend is not None:
            await backend.stop()


async def test_a_secondary_behind_is_caught_up_without_the_wallbox_and_backend_calls_are_refused(
        tmp_path: Path) -> None:
    primary = await BackendProcess.start("answer")
    ems_port = free_port()  # the secondary is down
    config = proxy_config(tmp_path, primary.port, charger='secondaries = ["ems"]')
    config.write_text(config.read_text() + f'[backends.ems]\nurl = "ws://127.0.0.1:{ems_port}/ems"\n'
                      'connect_timeout = 2\n')
    proxy, port = await launch_proxy(config)
    ems: BackendProcess | None = None
    try:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ocpp/CP1", subprotocols=["ocpp1.6"]) as ws:
            for n in range(6):
                assert (await call(ws, f"s{n}", "StatusNotification", status(1, "Charging")))[0] == 3
        closed_at = await proxy.wait_event("session_closed")
        mark = proxy.events.index(closed_at) + 1  # what follows may already have been read with it
        await proxy.wait_event("drain_started", after=mark)  # six frames behind: the proxy stays for them
        await primary.wait_for(lambda e: e.get("event") == "connected" and len(
            [c for c in primary.events if c.get("event") == "connected"]) >= 2)
        remote = '[2,"r1","RemoteStartTransaction",{"idTag":"TAG1"}]'
        await primary.send("CP1", remote)  # the backend asks for the charge point meanwhile
        answer = await primary.wait_for(lambda e: e.get("event") == "frame" and '"r1"' in e["text"]
                                        and e["direction"] == "received")
        error = json.loads(answer["text"])
        assert error[0] == 4 and error[2] == "GenericError" and "not connected" in error[3]
        refused = await proxy.wait_event("drain_call_refused", after=mark)
        assert refused["action"] == "RemoteStartTransaction"
        ems = await BackendProcess.start("answer", port=ems_port)
        received = await ems.wait_received("CP1", 6)
        assert [json.loads(t)[1] for t in received if '"StatusNotification"' in t][-6:] == [f"s{n}" for n in range(6)]
        closed = await proxy.wait_event("drain_closed", after=mark)
        assert closed["reason"] == "queue delivered"
    finally:
        await proxy.stop()
        await primary.stop()
        if ems is not None:
            await ems.stop()
