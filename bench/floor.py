"""The floor of a trio relay of the proxy's shape: what no change to the proxy's own code can go below.

    python -m bench.floor PORT BACKEND_URL        # prints "listening PORT", relays until stdin closes

One task per wallbox connection: the WebSocket handshake and the upstream
connection with the proxy's own wire layer (:mod:`proxy.wire.connection`, the
same parser, encoder and socket handling), then two loops,
``send_message(await get_message())``, one per direction. No session, no OCPP
classification, no offline queue, no metrics, no logs, no timers, no pings:
only trio's scheduling, the epoll waits and the RFC 6455 framing of every
frame. ``python -m bench --paths ...,floor`` runs it as the ``floor`` path
beside the proxy and websocat, so the proxy's added latency and CPU per frame
at 1 wallbox can be read against it in the same run (bench/README.md).
"""

from __future__ import annotations

import sys

import trio

from proxy.wire.connection import ConnectionClosed, WsConnection, WsRequest, open_websocket_url, read_request


async def _pump(source: WsConnection, target: WsConnection, scope: trio.CancelScope) -> None:
    try:
        while True:
            await target.send_message(await source.get_message())
    except ConnectionClosed:
        scope.cancel()


async def _serve(stream: trio.SocketStream, backend: str) -> None:
    request = await read_request(stream)
    if not isinstance(request, WsRequest):
        return
    identity = request.path.rstrip("/").rsplit("/", 1)[-1]
    try:
        async with open_websocket_url(f"{backend}/{identity}", subprotocols=["ocpp1.6"]) as upstream:
            wallbox = await request.accept(subprotocol=upstream.subprotocol)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, upstream, wallbox, nursery.cancel_scope)
                await _pump(wallbox, upstream, nursery.cancel_scope)
            await wallbox.aclose()
    except (ConnectionClosed, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _until_stdin_closes(scope: trio.CancelScope) -> None:
    await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
    scope.cancel()


async def main(port: int, backend: str) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print(f"listening {listeners[0].socket.getsockname()[1]}", flush=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_until_stdin_closes, nursery.cancel_scope)
        nursery.start_soon(trio.serve_listeners, lambda stream: _serve(stream, backend), listeners)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), sys.argv[2].rstrip("/"))
