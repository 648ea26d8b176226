"""A WebSocket upgrade request written by hand, over a real socket, from a chosen loopback address.

Admission tests need what no WebSocket library sends: odd paths, wrong
usernames, no subprotocol check on our side, a source address other than
127.0.0.1 (the per-address caps), TLS with or without a client certificate.
"""

from __future__ import annotations

import base64
import os
import ssl
from dataclasses import dataclass

import trio


@dataclass(frozen=True)
class Reply:
    status: int
    head: bytes
    #: None when the connection was reset before the request was sent.
    stream: trio.abc.Stream | None

    async def close(self) -> None:
        if self.stream is not None:
            await trio.aclose_forcefully(self.stream)


def basic(user: str, password: str) -> tuple[str, str]:
    return "Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def connect(port: int, *, source: str = "127.0.0.1", context: ssl.SSLContext | None = None) -> trio.abc.Stream:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream: trio.abc.Stream = trio.SocketStream(sock)
    if context is not None:
        tls = trio.SSLStream(stream, context, server_hostname="127.0.0.1")
        await tls.do_handshake()
        stream = tls
    return stream


async def upgrade(port: int, path: str, headers: tuple[tuple[str, str], ...] = (), *, source: str = "127.0.0.1",
                  context: ssl.SSLContext | None = None, subprotocol: str = "ocpp1.6",
                  keep: bool = False, timeout: float = 10.0) -> Reply:
    """Send the upgrade request; the status of the answer (0: closed or reset without one).

    ``keep``: leave the stream open (an admitted wallbox stays connected); else closed here.
    """
    with trio.fail_after(timeout):
        try:
            stream = await connect(port, source=source, context=context)
        except (ConnectionResetError, trio.BrokenResourceError):
            return Reply(0, b"", None)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", f"Sec-WebSocket-Protocol: {subprotocol}",
                 *(f"{name}: {value}" for name, value in headers)]
        try:
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            head = b""
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    reply = Reply(status, head, stream)
    if not keep:
        await reply.close()
    return reply
