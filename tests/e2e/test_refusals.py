"""Handshake refusals and close mirroring, each with its log line (issue 3)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import trio
import websockets
from ocpp.v16 import call
from structlog.testing import capture_logs

from proxy.demo.peers import LoopThread, SimBackend, connect_wallbox
from tests.conftest import StartProxy, backend_config, proxy_url
from tests.opskit import free_port
from tests.peers import in_loop, wait_recorded


async def refused_status(peers: LoopThread, url: str, cp_id: str, **kwargs: Any) -> int:
    async def attempt() -> int:
        try:
            handle = await connect_wallbox(url, cp_id, **kwargs)
        except websockets.InvalidStatus as exc:
            return int(exc.response.status_code)
        await handle.close()
        return 101

    return await in_loop(peers, attempt())


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def test_unknown_charge_point_gets_404(peers: LoopThread, backend: SimBackend,
                                             start_proxy: StartProxy) -> None:
    with capture_logs() as logs:
        server = await start_proxy(backend_config(backend))
        assert await refused_status(peers, proxy_url(server, "NOPE"), "NOPE") == 404
    refused = events(logs, "handshake_refused")
    assert refused[0]["status"] == 404 and refused[0]["charger"] == "NOPE"
    assert refused[0]["reason"] == "unknown_charge_point"
    assert "NOPE" not in backend.handlers


async def test_accept_unknown_admits_with_backend_defaults(peers: LoopThread, backend: SimBackend,
                                                           start_proxy: StartProxy) -> None:
    server = await start_proxy(backend_config(backend, "accept_unknown = true"))
    assert await refused_status(peers, proxy_url(server, "NEW%7C1"), "NEW|1") == 101
    assert backend.paths["NEW|1"] == "/ocpp/NEW%7C1"


@pytest.mark.parametrize("password,reason", [(None, "password_missing"), ("wrong-password-123", "password_wrong")])
async def test_bad_password_gets_401(peers: LoopThread, backend: SimBackend, start_proxy: StartProxy,
                                     password: str | None, reason: str) -> None:
    text = backend_config(backend).replace('id = "CP1"', 'id = "CP1"\npassword = "0123456789abcdef0123"')
    with capture_logs() as logs:
        server = await start_proxy(text)
        assert await refused_status(peers, proxy_url(server, "CP1"), "CP1", password=password) == 401
        assert await refused_status(peers, proxy_url(server, "CP1"), "CP1",
                                    password="0123456789abcdef0123") == 101
    refused = events(logs, "handshake_refused")
    assert [r["reason"] for r in refused] == [reason]
    assert "0123456789abcdef0123" not in repr(logs)


async def test_global_password_and_upstream_basic_auth(peers: LoopThread, backend: SimBackend,
                                                       start_proxy: StartProxy) -> None:
    text = backend_config(backend, 'password = "global-secret-0001"').replace(
        'id = "CP1"', 'id = "CP1"\nupstream_id = "DE*ABC*E1"\nupstream_password = "up-secret"')
    server = await start_proxy(text)
    assert await refused_status(peers, proxy_url(server, "CP1"), "CP1", password="nope") == 401
    assert await refused_status(peers, proxy_url(server, "CP1"), "CP1", password="global-secret-0001") == 101
    import base64

    assert backend.paths["DE*ABC*E1"] == "/ocpp/DE*ABC*E1"  # the path segment equals the Basic-auth user
    assert backend.headers["DE*ABC*E1"]["authorization"] == "Basic " + base64.b64encode(
        b"DE*ABC*E1:up-secret").decode()


async def test_no_supported_subprotocol_is_refused(peers: LoopThread, backend: SimBackend,
                                                   start_proxy: StartProxy) -> None:
    with capture_logs() as logs:
        server = await start_proxy(backend_config(backend))
        status = await refused_status(peers, proxy_url(server, "CP1"), "CP1", subprotocols=("ocpp1.2",))
    assert status == 400
    assert events(logs, "handshake_refused")[0]["reason"] == "no_subprotocol"


async def test_upstream_down_refuses_wallbox(peers: LoopThread, start_proxy: StartProxy) -> None:
    port = free_port()  # nobody listens there
    text = (f'[server]\n[backend]\nurl = "ws://127.0.0.1:{port}/ocpp"\nconnect_timeout = 2\n[[chargers]]\nid = "CP1"\n'
            '[offline]\nenabled = false\n')  # with offline mode the wallbox is admitted (test_offline.py)
    with capture_logs() as logs:
        server = await start_proxy(text)
        assert await refused_status(peers, proxy_url(server, "CP1"), "CP1") == 502
    unavailable = events(logs, "upstream_unavailable")
    assert unavailable and unavailable[0]["charger"] == "CP1"
    assert server.sessions == {}


async def test_backend_refusal_status_is_passed_on(peers: LoopThread, start_proxy: StartProxy) -> None:
    async def refuse_all(connection: Any, request: Any) -> Any:
        return connection.respond(404, "unknown here\n")

    async def start() -> Any:
        return await websockets.serve(lambda ws: asyncio.sleep(0), "127.0.0.1", 0, process_request=refuse_all)

    refusing = await in_loop(peers, start())
    port = refusing.sockets[0].getsockname()[1]
    server = await start_proxy(f'[server]\n[backend]\nurl = "ws://127.0.0.1:{port}/x"\n[[chargers]]\nid = "CP1"\n')
    assert await refused_status(peers, proxy_url(server, "CP1"), "CP1") == 404
    refusing.close()


async def test_backend_close_is_mirrored_to_wallbox(peers: LoopThread, backend: SimBackend,
                                                    start_proxy: StartProxy) -> None:
    """Without offline mode a backend close ends the pair (with it, see test_offline.py)."""
    server = await start_proxy(backend_config(backend) + "[offline]\nenabled = false\n")
    with capture_logs() as logs:
        handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
        await in_loop(peers, backend.handlers["CP1"]._connection.websocket.close(4010, "maintenance"))
        await in_loop(peers, handle.websocket.wait_closed())
        with trio.fail_after(5):
            await server.wait_sessions(0)
    assert handle.websocket.close_code == 4010 and handle.websocket.close_reason == "maintenance"
    closed = events(logs, "session_closed")
    assert closed[0]["closed_by"] == "primary" and closed[0]["code"] == 4010


async def test_wallbox_close_is_mirrored_to_backend(peers: LoopThread, backend: SimBackend,
                                                    start_proxy: StartProxy) -> None:
    server = await start_proxy(backend_config(backend))
    handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
    await in_loop(peers, handle.close(1000, "unplugged network"))
    upstream = backend.handlers["CP1"]._connection.websocket
    await in_loop(peers, upstream.wait_closed())
    assert (upstream.close_code, upstream.close_reason) == (1000, "unplugged network")
    with trio.fail_after(5):
        await server.wait_sessions(0)


async def test_wallbox_vanishing_without_close_frame(peers: LoopThread, backend: SimBackend,
                                                     start_proxy: StartProxy) -> None:
    """TCP drops (1006) cannot be mirrored as such: the backend gets 1001 with a reason."""
    server = await start_proxy(backend_config(backend))
    handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))

    async def drop() -> None:
        handle.websocket.transport.abort()

    await in_loop(peers, drop())
    upstream = backend.handlers["CP1"]._connection.websocket
    await in_loop(peers, upstream.wait_closed())
    assert upstream.close_code == 1001 and upstream.close_reason == "wallbox connection lost"


@pytest.mark.parametrize("frame,code", [
    (b"\x00\x01binary", 1003),
    ("x" * 2000, 1009),
    ("\u20ac" * 600, 1009),  # 600 characters but 1800 bytes of UTF-8
])
async def test_binary_and_oversized_frames_close_with_right_code(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy, frame: str | bytes, code: int) -> None:
    with capture_logs() as logs:
        server = await start_proxy(backend_config(backend, "max_message_bytes = 1000"))
        handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
        await in_loop(peers, handle.websocket.send('[2,"1","Heartbeat",{}]'))
        await wait_recorded(backend.recorders["CP1"], lambda r: len(r.received) == 1)
        await in_loop(peers, handle.websocket.send(frame))
        await in_loop(peers, handle.websocket.wait_closed())
        with trio.fail_after(5):
            await server.wait_sessions(0)
    assert handle.websocket.close_code == code
    upstream = backend.handlers["CP1"]._connection.websocket
    await in_loop(peers, upstream.wait_closed())
    assert upstream.close_code == 1001 and str(code) in upstream.close_reason
    assert backend.recorders["CP1"].received == ['[2,"1","Heartbeat",{}]']
    assert events(logs, "frame_refused")[0]["code"] == code


async def test_a_wallbox_closing_with_1009_is_mirrored_not_taken_for_the_proxys_own_refusal(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy) -> None:
    """The relay knows its own 1009 by the exception's type, not by the reason text the peer chose."""
    server = await start_proxy(backend_config(backend))
    with capture_logs() as logs:
        handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
        await in_loop(peers, handle.close(1009, "Exceeded maximum message size: 10 bytes"))
        upstream = backend.handlers["CP1"]._connection.websocket
        await in_loop(peers, upstream.wait_closed())
        with trio.fail_after(10):
            await server.wait_sessions(0)
    assert (upstream.close_code, upstream.close_reason) == (1009, "Exceeded maximum message size: 10 bytes")
    assert events(logs, "frame_refused") == []
    closed = events(logs, "session_closed")
    assert closed[0]["closed_by"] == "wallbox" and closed[0]["code"] == 1009


async def test_an_oversized_frame_from_the_backend_is_refused_by_the_proxy(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy) -> None:
    server = await start_proxy(backend_config(backend, "max_message_bytes = 1000")
                               + "[offline]\nenabled = false\n")
    with capture_logs() as logs:
        handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
        upstream = backend.handlers["CP1"]._connection.websocket
        await in_loop(peers, upstream.send('[2,"b1","DataTransfer",{"data":"' + "x" * 2000 + '"}]'))
        await in_loop(peers, upstream.wait_closed())
        await in_loop(peers, handle.websocket.wait_closed())
        with trio.fail_after(10):
            await server.wait_sessions(0)
    assert upstream.close_code == 1009
    assert handle.websocket.close_code == 1001 and "1009" in handle.websocket.close_reason
    refused = events(logs, "frame_refused")
    assert refused and refused[0]["side"] == "primary" and refused[0]["code"] == 1009


async def test_reconnecting_wallbox_replaces_old_session(peers: LoopThread, backend: SimBackend,
                                                         start_proxy: StartProxy) -> None:
    server = await start_proxy(backend_config(backend))
    first = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
    second = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
    await in_loop(peers, first.websocket.wait_closed())
    assert first.websocket.close_code == 1001
    assert len(server.sessions) == 1
    answer = await in_loop(peers, second.wallbox.call(call.Heartbeat()))
    assert answer.current_time
