"""/healthz and /readyz before, during and after start-up and with the backend down (issue 8)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error

import pytest
import trio
import trio_websocket
from trio_websocket import open_websocket_url

from proxy.ops.health import Heartbeat
from tests.opskit import (build_stack, config_text, free_port, http_get, read_to_end, scrape, start_backend,
                          start_stack, value, wait_until)


async def test_readiness_follows_start_up_and_shutdown(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    stack = build_stack(config_text(backend.port))
    await nursery.start(stack.monitor.serve)

    # Monitor up, wallbox port not yet listening: alive but not ready.
    health, ready = await http_get(stack.http("/healthz")), await http_get(stack.http("/readyz"))
    assert health.status == 200 and health.body.startswith("ok")
    assert ready.status == 503
    body = json.loads(ready.body)
    assert body["ready"] is False and body["reason"] == "wallbox port not listening yet"
    assert body["config"] == {"source": "test.toml", "chargers": 1}

    await nursery.start(stack.server.serve)
    ready = await http_get(stack.http("/readyz"))
    assert ready.status == 200 and ready.headers["content-type"] == "application/json"
    body = json.loads(ready.body)
    assert body["ready"] is True and body["listening"] == stack.server.ports
    assert body["upstream"] == {"state": "idle", "connected": 0}
    assert body["meter"] == {"state": "not_configured"}

    async with open_websocket_url(stack.url("CP1"), subprotocols=["ocpp1.6"]):
        with trio.fail_after(5):
            await stack.server.wait_sessions(1)
        body = json.loads((await http_get(stack.http("/readyz"))).body)
        assert body["wallboxes"] == 1 and body["upstream"]["state"] == "connected"
        assert body["upstream"]["connected"] == 1

        # Shutdown as cli.run_proxy does it: readiness drops first, then sessions close.
        stack.monitor.stopping = True
        ready = await http_get(stack.http("/readyz"))
        assert ready.status == 503 and json.loads(ready.body)["reason"] == "shutting down"
        with trio.fail_after(10):
            await stack.server.stop()
    assert (await http_get(stack.http("/healthz"))).status == 200
    body = json.loads((await http_get(stack.http("/readyz"))).body)
    assert body["wallboxes"] == 0 and body["upstream"] == {"state": "idle", "connected": 0}


async def test_backend_down_keeps_the_proxy_ready_and_says_why(nursery: trio.Nursery) -> None:
    port = free_port()  # nothing listens here until the backend starts below
    stack = await start_stack(nursery, config_text(port, offline="reconnect_min = 0.05\nreconnect_max = 0.2"))

    # Offline mode: the wallbox is admitted although its backend is down.
    async with open_websocket_url(stack.url("CP1"), subprotocols=["ocpp1.6"]) as wallbox:
        with trio.fail_after(5):
            await stack.server.wait_sessions(1)
        health, ready = await http_get(stack.http("/healthz")), await http_get(stack.http("/readyz"))
        assert health.status == 200
        assert ready.status == 200
        upstream = json.loads(ready.body)["upstream"]
        assert upstream["state"] == "unreachable" and upstream["connected"] == 0
        assert upstream["last_failure"]["charger"] == "CP1"
        assert "connected" in upstream["last_failure"]["reason"]
        await wallbox.send_message('[2,"h1","Heartbeat",{}]')
        assert json.loads(await wallbox.get_message())[1] == "h1"  # answered locally

        # The backend comes back: the session reconnects by itself and readiness says so.
        backend = RawBackendOnPort(port)
        await nursery.start(backend.serve)
        async def connected() -> bool:
            return bool(json.loads((await http_get(stack.http("/readyz"))).body)["upstream"]["state"] == "connected")

        await wait_until(connected, interval=0.05)
        _, samples = await scrape(stack)
        assert value(samples, "ocpp_proxy_upstream_reconnects_total", charger="CP1") == 0  # first connect
        assert value(samples, "ocpp_proxy_connections", side="backend") == 1


class RawBackendOnPort:
    def __init__(self, port: int) -> None:
        self.port = port

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async def handler(request: trio_websocket.WebSocketRequest) -> None:
            ws = await request.accept(subprotocol="ocpp1.6")
            try:
                while True:
                    await ws.get_message()
            except trio_websocket.ConnectionClosed:
                return

        async with trio.open_nursery() as nursery:
            await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", self.port, None)
            task_status.started()


async def _raw_request(port: int, request: bytes) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(request)
    return stream


async def test_healthz_fails_after_the_event_loop_was_blocked(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    stack = build_stack(config_text(backend.port))
    stack.monitor.heartbeat = Heartbeat(interval=0.05, max_silence=0.3)
    await nursery.start(stack.monitor.serve)
    port = stack.monitor.ports[0]

    # The stimulus: this task blocks the whole trio loop, as a stuck callback would. The
    # request is sent from a blocking socket meanwhile, so it can only be answered afterwards.
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    time.sleep(0.6)  # noqa: ASYNC251 - blocking is the point
    sock.setblocking(False)
    answer = await read_to_end(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"event loop s" in answer  # "silent" or "stalled", whichever task ran first

    with trio.fail_after(5):  # healthy again once the stall is max_silence in the past
        while not stack.monitor.heartbeat.check(trio.current_time())[0]:
            await stack.monitor.wait_beat()
    assert (await http_get(stack.http("/healthz"))).status == 200


def test_heartbeat_rules() -> None:
    beat = Heartbeat(interval=1.0, max_silence=10.0)
    assert beat.check(0.0) == (False, "event loop heartbeat not started")
    beat.beat(now=100.0, scheduled=100.0)
    assert beat.check(105.0)[0] is True
    assert beat.check(110.5) == (False, "event loop silent for 10.5 s")
    beat.beat(now=125.0, scheduled=111.0)  # woke 14 s late: the loop was stuck
    assert beat.check(125.0) == (False, "event loop stalled for 14.0 s, 0.0 s ago")
    beat.beat(now=126.0, scheduled=126.0)
    assert beat.check(126.0) == (False, "event loop stalled for 14.0 s, 1.0 s ago")
    beat.beat(now=135.5, scheduled=135.5)
    assert beat.check(135.5) == (True, "ok (loop lag 0.0 ms)")


async def test_http_details(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    stack = await start_stack(nursery, config_text(backend.port))
    port = stack.monitor.ports[0]

    assert (await http_get(stack.http("/nope"))).status == 404
    assert (await http_get(stack.http("/metrics"), method="POST")).status == 405
    index = await http_get(stack.http("/"))
    assert index.status == 200 and "/metrics" in index.body
    metrics = await http_get(stack.http("/metrics"))
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    head = await http_get(stack.http("/metrics"), method="HEAD")
    assert head.status == 200 and head.body == "" and int(head.headers["content-length"]) > 1000

    # Keep-alive: two requests on one connection; then an OpenMetrics scrape.
    stream = await _raw_request(port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
                                      b"GET /metrics HTTP/1.1\r\nhost: x\r\n"
                                      b"accept: application/openmetrics-text; version=1.0.0\r\n"
                                      b"connection: close\r\n\r\n")
    answer = await read_to_end(stream)
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert b"content-type: application/openmetrics-text" in answer and answer.rstrip().endswith(b"# EOF")

    garbage = await read_to_end(await _raw_request(port, b"NOT HTTP AT ALL\r\n\r\n"))
    assert garbage.startswith(b"HTTP/1.1 400 ")


async def test_monitor_gone_after_its_scope_ends() -> None:
    """After shutdown nothing answers on the metrics port (the nursery took it down)."""
    stack = build_stack(config_text(1))
    async with trio.open_nursery() as inner:
        await inner.start(stack.monitor.serve)
        url = stack.http("/healthz")
        assert (await http_get(url)).status == 200
        inner.cancel_scope.cancel()
    with pytest.raises(urllib.error.URLError):
        await http_get(url)
