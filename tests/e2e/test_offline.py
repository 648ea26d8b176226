"""Backend outages without loss: local answers, durable queue, ordered replay (issue 7)."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import psycopg
import pytest
import trio
import trio_websocket
import websockets
from ocpp.v16 import call
from structlog.testing import capture_logs

from proxy.runtime.server import ProxyServer
from proxy.storage.offline_queue import DB_NAME
from proxy.demo.peers import OCMF_SAMPLE, LoopThread, SimBackend, connect_wallbox, now_iso
from tests.conftest import StartProxy, proxy_url
from tests.opskit import free_port, launch_proxy, wait_until
from tests.peers import in_loop, wait_recorded

FAST_RECONNECT = "reconnect_min = 0.05\nreconnect_max = 0.2\n"


def offline_config(port: int, extra: str = "") -> str:
    return (f'[server]\n[backend]\nurl = "ws://127.0.0.1:{port}/ocpp"\nconnect_timeout = 2\n'
            f'[[chargers]]\nid = "CP1"\n[offline]\nauth = "accept_all"\n{FAST_RECONNECT}{extra}')


def replayed_expectation(sent: list[str], local: int, backend: int) -> list[str]:
    """What the backend must receive: every CALL but Heartbeats, the local transactionId mapped."""
    return [text.replace(f'"transactionId":{local}', f'"transactionId":{backend}')
            for text in sent if '"Heartbeat"' not in text]


def queued_frames(tmp_path: Path, store_url: str) -> int:
    """Frames in the queue, read from the database itself: PostgreSQL's (no file) or SQLite's file."""
    if store_url:
        assert not (tmp_path / "data" / DB_NAME).exists()
        with psycopg.connect(store_url) as db:
            row = db.execute("SELECT count(*) FROM frames").fetchone()
        assert row is not None
        return int(row[0])
    with closing(sqlite3.connect(tmp_path / "data" / DB_NAME)) as db:
        return int(db.execute("SELECT count(*) FROM frames").fetchone()[0])


async def test_backend_down_for_a_whole_transaction(peers: LoopThread, start_proxy: StartProxy) -> None:
    port = free_port()
    server = await start_proxy(offline_config(port))
    handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
    outcome = await in_loop(peers, handle.wallbox.run_session())
    assert outcome == {"boot": "Accepted", "auth": "Accepted", "transaction_id": -1, "datatransfer": "Rejected"}
    sent = list(handle.recorder.sent)
    assert len(sent) == 10

    backend = SimBackend(port=port)
    with capture_logs() as logs:
        await in_loop(peers, backend.start())
        await wait_recorded(backend.recorder("CP1"), lambda r: len(r.received) >= 9)
        await wait_until(lambda: any(e["event"] == "replay_finished" for e in logs))
    received = backend.recorders["CP1"].received
    assert received == replayed_expectation(sent, -1, 1001)
    actions = [text.split('"')[3] for text in received]
    assert actions.index("StartTransaction") < actions.index("MeterValues") < actions.index("StopTransaction")
    signed = [t for t in received if '"SignedData"' in t]
    assert len(signed) == 2 and all("OCMF|" in t for t in signed)  # MeterValues and StopTransaction

    # Live frames that still carry the local id reach the backend with its id.
    await in_loop(peers, handle.wallbox.call(call.MeterValues(connector_id=1, transaction_id=-1, meter_value=[{
        "timestamp": now_iso(), "sampledValue": [{"value": "1.0"}]}])))
    live = backend.recorders["CP1"].received[-1]
    assert '"transactionId":1001' in live and '"transactionId":-1' not in live
    await in_loop(peers, handle.close())
    await in_loop(peers, backend.stop())


async def test_backend_drops_mid_transaction_and_returns(peers: LoopThread, start_proxy: StartProxy) -> None:
    port = free_port()
    first = SimBackend(port=port)
    await in_loop(peers, first.start())
    server = await start_proxy(offline_config(port))
    handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
    wallbox = handle.wallbox
    await in_loop(peers, wallbox.call(call.BootNotification(charge_point_model="M", charge_point_vendor="V")))
    start = await in_loop(peers, wallbox.call(call.StartTransaction(connector_id=1, id_tag="T", meter_start=0,
                                                                     timestamp=now_iso())))
    assert start.transaction_id == 1001

    await in_loop(peers, first.stop())  # the backend goes away mid-transaction
    paired = server.sessions["CP1"]
    await wait_until(lambda: paired.session.offline_mode)
    signed = [{"timestamp": now_iso(), "sampledValue": [{"value": OCMF_SAMPLE, "format": "SignedData"}]}]
    await in_loop(peers, wallbox.call(call.MeterValues(connector_id=1, transaction_id=1001, meter_value=signed)))
    await in_loop(peers, wallbox.call(call.StopTransaction(meter_stop=5, timestamp=now_iso(), transaction_id=1001,
                                                           transaction_data=signed)))
    offline_frames = handle.recorder.sent[-2:]
    assert paired.queued == 2

    second = SimBackend(port=port)
    await in_loop(peers, second.start())
    await wait_recorded(second.recorder("CP1"), lambda r: len(r.received) >= 2)
    await wait_until(lambda: not paired.session.offline_mode)
    assert second.recorders["CP1"].received == offline_frames  # byte-identical, the backend's own id kept
    starts = [t for b in (first, second) for t in b.recorders["CP1"].received if '"StartTransaction"' in t]
    assert len(starts) == 1  # no duplicate StartTransaction
    assert paired.queued == 0
    await in_loop(peers, handle.close())
    await in_loop(peers, second.stop())


async def test_outstanding_call_is_answered_locally_when_backend_vanishes(
        peers: LoopThread, start_proxy: StartProxy) -> None:
    """A CALL in flight when the backend dies is answered and stored, never lost."""
    port = free_port()
    backend = SimBackend(port=port)
    await in_loop(peers, backend.start())
    server = await start_proxy(offline_config(port))
    handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))

    transport = backend.handlers["CP1"]._connection.websocket.transport

    async def freeze() -> None:
        transport.pause_reading()  # the backend never answers

    async def vanish() -> None:
        transport.abort()

    async def status() -> object:
        return await handle.wallbox.call(call.StatusNotification(connector_id=1, error_code="NoError",
                                                                 status="Charging"))

    await in_loop(peers, freeze())
    pending = peers.submit(status())
    paired = server.sessions["CP1"]
    await wait_until(lambda: paired.session.upstream_outstanding == 1)  # forwarded, unanswered: in flight
    await in_loop(peers, vanish())
    answer = await trio.to_thread.run_sync(pending.result, 20)
    assert answer is not None
    assert paired.queued == 1 and paired.session.upstream_outstanding == 0
    await in_loop(peers, handle.close())
    await in_loop(peers, backend.stop())


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_kill_9_with_frames_queued_delivers_them_exactly_once(
        peers: LoopThread, tmp_path: Path, store: str, request: pytest.FixtureRequest) -> None:
    """The same outage, kill -9 and replay with the queue in SQLite and in PostgreSQL (``[store] url``)."""
    backend_port = free_port()
    config = tmp_path / "proxy.toml"
    store_url = str(request.getfixturevalue("pg_url")) if store == "postgres" else ""
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\n[log]\nformat = "json"\n'
                      f'[metrics]\nlisten = ""\n{offline_config(backend_port).split("[server]")[1]}'
                      f'data_dir = "{tmp_path}/data"\n[store]\nurl = "{store_url}"\n'
                      # one process restarted under its own name takes its charger leases back at once
                      f'process = "proxy-1"\n')

    proxy, port = await launch_proxy(config)
    handle = await in_loop(peers, connect_wallbox(f"ws://127.0.0.1:{port}/ocpp/CP1", "CP1"))
    await in_loop(peers, handle.wallbox.run_session())
    sent = list(handle.recorder.sent)
    proxy.process.send_signal(signal.SIGKILL)  # every answer the wallbox saw was committed first
    assert await proxy.process.wait() == -signal.SIGKILL
    await in_loop(peers, handle.websocket.wait_closed())
    # The frames are where [store] says: every CALL the wallbox sent (the replay leaves out Heartbeats).
    assert queued_frames(tmp_path, store_url) == len(sent)

    backend = SimBackend(port=backend_port)
    await in_loop(peers, backend.start())
    proxy, port = await launch_proxy(config)
    try:
        again = await in_loop(peers, connect_wallbox(f"ws://127.0.0.1:{port}/ocpp/CP1", "CP1"))
        await proxy.wait_event("replay_finished")
        assert backend.recorders["CP1"].received == replayed_expectation(sent, -1, 1001)
        await in_loop(peers, again.close())
        assert await proxy.stop() == 0
    finally:
        await proxy.close()
        await in_loop(peers, backend.stop())
    assert len(backend.recorders["CP1"].received) == 9  # exactly once, nothing after the replay
    assert queued_frames(tmp_path, store_url) == 0


async def test_five_hundred_wallboxes_reconnect_after_proxy_restart(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy, nursery: trio.Nursery,
        tmp_path: Path) -> None:
    port = free_port()
    # 500 wallboxes from one address: more than the per-address defaults allow at once (256), and
    # their handshakes all at once (not 8 at a time) as the figure in the README was measured
    text = (f'[server]\nlisten = "127.0.0.1:{port}"\nping_interval = 0\naccept_unknown = true\n'
            f'per_address_pending = 600\nper_address_burst = 600\nper_address_handshakes = 0\n'
            f'[backend]\nurl = "ws://127.0.0.1:{backend.port}/ocpp"\n')
    first = await start_proxy(text)
    ids = [f"R{n:03d}" for n in range(500)]
    reconnected: dict[str, float] = {}

    async def wallbox(cp_id: str, go: asyncio.Event) -> None:
        handle = await connect_wallbox(f"ws://127.0.0.1:{port}/ocpp/{cp_id}", cp_id)
        await handle.websocket.wait_closed()  # the proxy restarts
        await go.wait()
        while True:  # real wallboxes retry; these retry at once, all together
            try:
                again = await connect_wallbox(f"ws://127.0.0.1:{port}/ocpp/{cp_id}", cp_id)
                break
            except OSError:
                await asyncio.sleep(0.05)
        await again.wallbox.call(call.Heartbeat())
        reconnected[cp_id] = asyncio.get_running_loop().time()
        await again.close()

    go = peers.submit(_make_event())
    event = go.result(5)
    futures = [peers.submit(wallbox(cp, event)) for cp in ids]
    await wait_until(lambda: len(first.sessions) == 500, timeout=60)
    with trio.fail_after(30):
        await first.stop()
    second = ProxyServer(first.config)
    await nursery.start(second.serve)
    started = peers.run(_now())
    peers.loop.call_soon_threadsafe(event.set)
    for future in futures:
        await trio.to_thread.run_sync(future.result, 120, abandon_on_cancel=True)
    assert sorted(reconnected) == ids
    took = max(reconnected.values()) - started
    print(f"\n500 wallboxes reconnected (handshake, upstream, Heartbeat) in {took:.2f} s")
    with trio.fail_after(30):
        await second.wait_sessions(0)


async def _make_event() -> asyncio.Event:
    return asyncio.Event()


async def _now() -> float:
    return asyncio.get_running_loop().time()


async def test_frames_sent_back_to_back_share_commits_and_are_answered_in_order_each_after_its_commit(
        start_proxy: StartProxy, tmp_path: Path) -> None:
    """A wallbox that sends before its answers arrive: its frames are read while earlier ones commit
    (pipelined), go to the disk together, and each answer leaves only once its frame is committed, in order."""
    server = await start_proxy(offline_config(free_port()))  # nothing listens there: offline at once
    store = server.store
    assert store is not None
    count = 40
    ids = [f"mv{k}" for k in range(count)]
    async with trio_websocket.open_websocket_url(proxy_url(server, "CP1"), subprotocols=["ocpp1.6"]) as ws:
        with trio.fail_after(10):
            await ws.send_message(f'[2,"boot","BootNotification",{{"chargePointVendor":"V","chargePointModel":"M"}}]')
            assert '"boot"' in await ws.get_message()
        commits_before = store.commits
        for msg_id in ids:  # all sent before any answer is read
            await ws.send_message(f'[2,"{msg_id}","MeterValues",{{"connectorId":1,"meterValue":[{{"timestamp":'
                                  f'"2026-11-27T08:00:00Z","sampledValue":[{{"value":"{msg_id[2:]}"}}]}}]}}]')
        answered: list[str] = []
        with closing(sqlite3.connect(tmp_path / "data" / DB_NAME)) as db, trio.fail_after(10):
            while len(answered) < count:
                msg_id = json.loads(await ws.get_message())[1]
                stored = db.execute("SELECT count(*) FROM frames WHERE text LIKE ?", (f'%"{msg_id}"%',)).fetchone()[0]
                assert stored == 1, f"{msg_id} answered before it was committed"
                answered.append(msg_id)
    assert answered == ids
    # One commit per frame would be 40; read ahead, they share commits (the first one may go alone).
    assert store.commits - commits_before < count / 2, store.commits - commits_before


async def _call_raw(ws: trio_websocket.WebSocketConnection, msg_id: str, action: str,
                    payload: dict[str, object]) -> str:
    """Send one CALL as text and return its text (the answer is awaited, not checked here)."""
    text = json.dumps([2, msg_id, action, payload], separators=(",", ":"))
    await ws.send_message(text)
    with trio.fail_after(10):
        answer = json.loads(await ws.get_message())
    assert answer[0] == 3 and answer[1] == msg_id, answer
    return text


async def _connect_and_send(url: str, text: str) -> websockets.ClientConnection:
    """Open a wallbox connection and send ``text`` at once; return once its answer is in."""
    ws = await websockets.connect(url, subprotocols=[websockets.Subprotocol("ocpp1.6")])
    await ws.send(text)
    answer = json.loads(await ws.recv())
    assert answer[0] == 3 and answer[1] == json.loads(text)[1], answer
    return ws


async def test_a_call_sent_right_after_the_handshake_never_overtakes_the_queue(
        peers: LoopThread, start_proxy: StartProxy) -> None:
    """A wallbox that reconnects with frames queued sends its next CALL at once: the backend gets the
    queue first. (The session used to read the wallbox's first frame before the upstream's link had
    told it to replay, and forwarded it live ahead of the queue: seen as a StopTransaction before the
    MeterValues queued by a killed process: about one round in two.) Five rounds, each a fresh queue."""
    port = free_port()
    server = await start_proxy(offline_config(port, "drain_delay = 600\n"))  # the wallbox replays, no drain
    url = proxy_url(server, "CP1")
    backend = SimBackend(port=port)
    expected: list[str] = []
    for round_ in range(5):
        async with trio_websocket.open_websocket_url(url, subprotocols=["ocpp1.6"]) as ws:  # backend down
            for n in range(3):
                expected.append(await _call_raw(ws, f"q{round_}-{n}", "MeterValues", {
                    "connectorId": 1, "transactionId": 7, "meterValue": [{"timestamp": now_iso(), "sampledValue": [
                        {"value": str(100 * round_ + n)}]}]}))
        await wait_until(lambda: "CP1" not in server.sessions)
        await in_loop(peers, backend.start())
        # From the peers' thread: the CALL leaves the moment the handshake is answered, while the
        # proxy is still setting the session up.
        live = json.dumps([2, f"live{round_}", "StatusNotification", {
            "connectorId": 1, "errorCode": "NoError", "status": "Available"}], separators=(",", ":"))
        client = await in_loop(peers, _connect_and_send(url, live))
        expected.append(live)
        await wait_recorded(backend.recorder("CP1"), lambda r: len(r.received) >= len(expected))
        paired = server.sessions["CP1"]  # closed once the replay is answered: no frame left in flight
        await wait_until(lambda: paired.queued == 0 and not paired.session.offline_mode)
        await in_loop(peers, client.close())
        await in_loop(peers, backend.stop())
        await wait_until(lambda: "CP1" not in server.sessions)
    assert backend.recorders["CP1"].received == expected, "\n".join(t[:40] for t in backend.recorders["CP1"].received)


async def test_kill_9_while_checkpoints_run_under_load_loses_no_answered_frame(tmp_path: Path) -> None:
    """Checkpoints copy the WAL back on their own connection and thread while commits go on (docs/storage.md,
    "Checkpoints"): a proxy killed -9 in the middle of both, eight wallboxes sending, has every frame it
    answered on disk (the database file growing shows that checkpoints ran)."""
    config = tmp_path / "proxy.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\naccept_unknown = true\n'
                      f'[log]\nformat = "json"\n[metrics]\nlisten = ""\n'
                      f'[backend]\nurl = "ws://127.0.0.1:{free_port()}/ocpp"\nconnect_timeout = 2\n'
                      f'[offline]\nauth = "accept_all"\n{FAST_RECONNECT}data_dir = "{tmp_path}/data"\n')
    proxy, port = await launch_proxy(config)
    db_file = tmp_path / "data" / DB_NAME
    answered: set[str] = set()
    reading = "7" * 1000

    async def wallbox(name: str) -> None:
        url = f"ws://127.0.0.1:{port}/ocpp/{name}"
        try:
            async with trio_websocket.open_websocket_url(url, subprotocols=["ocpp1.6"]) as ws:
                for k in range(1_000_000):
                    ids = [f"{name}-{k}-{j}" for j in range(4)]
                    for msg_id in ids:  # four in flight: they share commits
                        await ws.send_message(f'[2,"{msg_id}","MeterValues",{{"connectorId":1,"meterValue":[{{'
                                              f'"timestamp":"2026-11-27T08:00:00Z","sampledValue":[{{"value":'
                                              f'"{reading}"}}]}}]}}]')
                    for _ in ids:
                        answered.add(json.loads(await ws.get_message())[1])
        except (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError, OSError):
            return  # the proxy was killed

    try:
        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(wallbox, f"K{n}")
            await wait_until(lambda: db_file.exists() and len(answered) > 0, timeout=30)
            start = db_file.stat().st_size
            # Checkpoints copied at least 1 MiB back into the database file while commits went on...
            await wait_until(lambda: db_file.stat().st_size > start + 1024 * 1024, timeout=60)
            seen = len(answered)
            await wait_until(lambda: len(answered) > seen + 200, timeout=30)  # ...and the load goes on
            proxy.process.send_signal(signal.SIGKILL)  # mid-commit, mid-checkpoint or between: all the same
            assert await proxy.process.wait() == -signal.SIGKILL
    finally:
        await proxy.close()
    with closing(sqlite3.connect(db_file)) as db:
        stored = {json.loads(text)[1] for (text,) in db.execute("SELECT text FROM frames")}
    assert len(answered) > 400
    assert answered <= stored, sorted(answered - stored)[:5]
