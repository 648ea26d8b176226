"""Dead peers are detected by pings, and closed sessions leave no sockets behind."""

from __future__ import annotations

import os

import trio
from structlog.testing import capture_logs

from proxy.demo.peers import LoopThread, SimBackend, connect_wallbox
from tests.conftest import StartProxy, backend_config, proxy_url
from tests.opskit import wait_until
from tests.peers import in_loop


async def test_silent_backend_is_detected_within_two_ping_intervals(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy) -> None:
    with capture_logs() as logs:
        server = await start_proxy(backend_config(backend, "ping_interval = 0.3") + "[offline]\nenabled = false\n")
        handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))

        async def freeze_backend() -> None:  # it stops reading: no pongs, TCP still up
            backend.handlers["CP1"]._connection.websocket.transport.pause_reading()

        await in_loop(peers, freeze_backend())
        with trio.fail_after(3):  # detection takes at most 2 x ping_interval; generous for loaded CI
            await server.wait_sessions(0)
    await in_loop(peers, handle.websocket.wait_closed())
    assert handle.websocket.close_code == 1001
    assert handle.websocket.close_reason == "primary connection lost"
    assert [e["side"] for e in logs if e["event"] == "ping_timeout"] == ["primary"]

    async def unfreeze() -> None:  # lets the backend fixture shut down without its 10 s close wait
        backend.handlers["CP1"]._connection.websocket.transport.abort()

    await in_loop(peers, unfreeze())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_closed_sessions_release_their_sockets(peers: LoopThread, backend: SimBackend,
                                                     start_proxy: StartProxy) -> None:
    server = await start_proxy(backend_config(backend, "accept_unknown = true"))
    warm = await in_loop(peers, connect_wallbox(proxy_url(server, "WARM"), "WARM"))
    await in_loop(peers, warm.close())
    with trio.fail_after(5):
        await server.wait_sessions(0)
    baseline = open_fds()
    handles = [await in_loop(peers, connect_wallbox(proxy_url(server, f"L{n}"), f"L{n}")) for n in range(20)]
    assert len(server.sessions) == 20
    assert open_fds() >= baseline + 40  # wallbox + upstream per pair, both ends in this process
    for handle in handles:
        await in_loop(peers, handle.close())
    with trio.fail_after(10):
        await server.wait_sessions(0)
    await wait_until(lambda: open_fds() <= baseline)  # the peers' ends close asynchronously in their thread
    assert open_fds() <= baseline
