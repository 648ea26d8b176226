"""The collector's young-generation threshold follows the open wallbox connections (proxy/runtime/gcpace.py).

Real sockets: a real proxy in this process, trio-websocket wallboxes, a backend that answers.
"""

from __future__ import annotations

import gc
import json
from contextlib import AsyncExitStack

import trio
import trio_websocket

from proxy.runtime import gcpace
from tests.conftest import StartProxy
from tests.opskit import start_backend, wait_until

WALLBOXES = 120


async def _round_trip(ws: trio_websocket.WebSocketConnection, msg_id: str) -> None:
    await ws.send_message(json.dumps([2, msg_id, "Heartbeat", {}]))
    with trio.fail_after(10):
        answer = await ws.get_message()
    assert json.loads(answer)[:2] == [3, msg_id]


async def test_threshold_grows_with_connections_and_returns(nursery: trio.Nursery, start_proxy: StartProxy) -> None:
    backend = await start_backend(nursery)
    base = gc.get_threshold()
    assert gcpace.young.open == 0
    server = await start_proxy(f'[server]\naccept_unknown = true\nping_interval = 0\n'
                               f'[backend]\nurl = "ws://127.0.0.1:{backend.port}/ocpp"\n')
    port = server.ports[0]
    async with AsyncExitStack() as first:
        async with AsyncExitStack() as second:
            wallboxes = []
            for n in range(WALLBOXES):
                stack = first if n < WALLBOXES // 2 else second
                wallboxes.append(await stack.enter_async_context(trio_websocket.open_websocket_url(
                    f"ws://127.0.0.1:{port}/ocpp/GC{n:03d}", subprotocols=["ocpp1.6"])))
            for n, ws in enumerate(wallboxes):  # every pair relays while the threshold is raised
                await _round_trip(ws, f"gc-{n}")
            assert gc.get_threshold() == (gcpace.PER_CONNECTION * WALLBOXES, base[1], base[2])
        # Half closed: the threshold follows, never below the interpreter's own.
        await wait_until(lambda: gcpace.young.open == WALLBOXES // 2)
        assert gc.get_threshold() == (max(base[0], gcpace.PER_CONNECTION * WALLBOXES // 2), base[1], base[2])
        for n, ws in enumerate(wallboxes[:WALLBOXES // 2]):
            await _round_trip(ws, f"again-{n}")
    await wait_until(lambda: gcpace.young.open == 0)
    assert gc.get_threshold() == base  # nothing open: the interpreter's thresholds exactly
