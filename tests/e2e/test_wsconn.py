"""Wire-level behaviour of the proxy's own WebSocket layer (proxy/wsconn.py).

A hand-made client (raw bytes over a trio socket, frames built by wsproto)
does what library peers rarely do: pipelines a frame behind its upgrade
request, fragments a message around a ping, and pings the proxy.
"""

from __future__ import annotations

import base64
import os

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message, Ping, Pong, TextMessage

from proxy.simulators import SimBackend
from tests.conftest import StartProxy, backend_config
from tests.peers import wait_recorded


async def raw_client(port: int, cp_id: str, first_frames: bytes) -> tuple[trio.SocketStream, bytes]:
    """Upgrade request and ``first_frames`` in one write; returns the stream and what followed the 101."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET /ocpp/{cp_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Protocol: ocpp1.6\r\n\r\n").encode()
    await stream.send_all(request + first_frames)
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(65536)
    response, _, rest = head.partition(b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 101"), response
    return stream, rest


async def next_events(stream: trio.SocketStream, ws: Connection, pending: bytes, count: int) -> list[object]:
    events: list[object] = []
    if pending:
        ws.receive_data(pending)
    while True:
        events += list(ws.events())
        if len(events) >= count:
            return events
        ws.receive_data(await stream.receive_some(65536))


async def test_pipelined_fragmented_and_pinged(backend: SimBackend, start_proxy: StartProxy) -> None:
    server = await start_proxy(backend_config(backend))
    ws = Connection(ConnectionType.CLIENT)
    first = ws.send(TextMessage('[2,"1","Heartbeat",{}]'))  # sent with the upgrade request
    with trio.fail_after(10):
        stream, rest = await raw_client(server.ports[0], "CP1", first)
        answer = (await next_events(stream, ws, rest, 1))[0]
        assert isinstance(answer, TextMessage) and answer.data.startswith('[3,"1",{"currentTime":')

        text = '[2,"2","DataTransfer",{"vendorId":"com.example","data":"Köln: 0,39 €/kWh"}]'
        split = text.index("Köln") + 2  # two fragments around a ping: "...Kö" and "ln..."
        await stream.send_all(ws.send(Message(data=text[:split], message_finished=False))
                              + ws.send(Ping(b"hop"))
                              + ws.send(Message(data=text[split:], message_finished=True)))
        events = await next_events(stream, ws, b"", 2)
        assert any(isinstance(e, Pong) and e.payload == b"hop" for e in events)  # answered by the proxy
        await wait_recorded(backend.recorders["CP1"], lambda r: text in r.received)
        assert backend.recorders["CP1"].received == ['[2,"1","Heartbeat",{}]', text]

        await stream.send_all(ws.send(CloseConnection(code=4000, reason="done")))
        closing = await next_events(stream, ws, b"", 1)
        assert isinstance(closing[0], CloseConnection) and closing[0].code == 4000
        await server.wait_sessions(0)
    await stream.aclose()
