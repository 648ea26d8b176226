"""Wire-level behaviour of the proxy's own WebSocket layer (proxy/wire/connection.py).

A hand-made client (raw bytes over a trio socket, frames built by wsproto)
does what library peers rarely do: pipelines a frame behind its upgrade
request, fragments a message around a ping, and pings the proxy.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import ssl
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message, Ping, Pong, TextMessage

from proxy.wire import connection as wsconn
from proxy.demo.peers import SimBackend
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


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 (generated per test, never committed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls_streams_take_the_generic_path(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Over TLS the connection uses receive_some/send_all; messages, pings and close codes still work."""
    cert, key = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    closed: list[int] = []
    done = trio.Event()

    async def echo(stream: trio.SocketStream) -> None:
        request = await wsconn.wrap_server_stream(None, trio.SSLStream(stream, server_context, server_side=True))
        assert request is not None and request.path == "/ocpp/TLS1"
        connection = await request.accept(subprotocol="ocpp1.6")
        assert connection._raw is None  # not a plain socket: the generic stream path
        try:
            while True:
                await connection.send_message(await connection.get_message())
        except wsconn.ConnectionClosed as exc:
            closed.append(exc.reason.code if exc.reason else 0)
            done.set()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, echo, listeners)
    big = '[2,"3","DataTransfer",{"data":"' + "ö" * 50_000 + '"}]'
    with trio.fail_after(10):
        async with wsconn.open_websocket_url(f"wss://127.0.0.1:{port}/ocpp/TLS1", client_context,
                                             subprotocols=["ocpp1.6"]) as client:
            assert client.subprotocol == "ocpp1.6"
            for text in ('[2,"1","Heartbeat",{}]', big):
                await client.send_message(text)
                assert await client.get_message() == text
            got: list[str | bytes] = []

            async def reader() -> None:  # pongs are read by whoever reads: here, this task
                got.append(await client.get_message())

            async with trio.open_nursery() as reading:
                reading.start_soon(reader)
                await client.ping()
                await client.send_message("after ping")
            assert got == ["after ping"]
            await client.aclose(4000, "bye")
        await done.wait()
    assert closed == [4000]


async def test_a_send_the_peer_does_not_read_ends_after_send_timeout(nursery: trio.Nursery) -> None:
    """Only a send that has to wait is bounded; after SendTimeout nothing more goes out."""
    accepted: list[wsconn.WsConnection] = []
    ready = trio.Event()

    async def never_reads(stream: trio.SocketStream) -> None:
        request = await wsconn.wrap_server_stream(None, stream)
        assert request is not None
        accepted.append(await request.accept(subprotocol="ocpp1.6"))
        ready.set()
        await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, never_reads, listeners)
    chunk = "x" * 10_000
    with trio.fail_after(30):
        async with wsconn.open_websocket_url(f"ws://127.0.0.1:{port}/ocpp/STALL", subprotocols=["ocpp1.6"],
                                             disconnect_timeout=2) as client:
            await ready.wait()
            client.send_timeout = 0.5
            sent = 0
            with pytest.raises(wsconn.SendTimeout) as stalled:
                while sent < 20_000:  # 200 MB: far beyond any socket buffer
                    await client.send_message(chunk)
                    sent += 1
            assert sent >= 1 and stalled.value.reason.code == 1006
            with pytest.raises(wsconn.ConnectionClosed):
                await client.send_message("after the stall")
