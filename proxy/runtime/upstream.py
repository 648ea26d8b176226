"""Opening the connection to a backend (trio).

:func:`open_upstream` turns an :class:`UpstreamTarget` into an open WebSocket
or an :class:`UpstreamUnavailable` that says why, with the HTTP status the
wallbox should see if its own handshake is refused because of it.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from urllib.parse import urlsplit

import trio

from proxy.wire import connection as wsconn
from proxy.wire.errors import ConnectionRejected, HandshakeError
from proxy.config import UpstreamTarget

Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]
from proxy.wire.tls import client_context


#: How wsproto words a handshake answer naming a subprotocol the client did not offer.
_UNOFFERED = "unrecognized subprotocol"


class UpstreamUnavailable(Exception):
    def __init__(self, reason: str, status: int, *, outage: bool | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        #: Status for the wallbox: the backend's own 4xx is passed on
        #: (an unknown id stays unknown), network trouble becomes 502/504.
        self.status = status
        #: An outage (offline mode takes over) or a misconfiguration (the wallbox is refused):
        #: by default every 5xx is an outage and every 4xx a misconfiguration.
        self.outage = status >= 500 if outage is None else outage


def client_ssl_context(target: UpstreamTarget) -> ssl.SSLContext:
    """TLS towards the backend: configured CAs (else system trust), optional client cert."""
    return client_context(target.ca, target.client_cert, target.client_key,
                          client_key_password=target.client_key_password, verify=target.verify)


def auth_headers(target: UpstreamTarget) -> list[tuple[bytes, bytes]]:
    if not target.password:
        return []
    token = base64.b64encode(f"{target.identity}:{target.password}".encode())
    return [(b"Authorization", b"Basic " + token)]


def open_upstream(target: UpstreamTarget, subprotocols: Sequence[str], *, max_message_size: int,
                  close_timeout: float = 5.0,
                  ssl_context: ssl.SSLContext | None = None) -> AbstractAsyncContextManager[wsconn.WsConnection]:
    """The upstream WebSocket for the duration of the block.

    TCP and TLS are opened here, before the WebSocket handshake, so a
    certificate the proxy does not trust is reported as such. The connection
    (:mod:`proxy.wire.connection`) runs no task of its own: a backend that refuses the
    handshake surfaces here as :class:`UpstreamUnavailable`.
    """
    return _Upstream(target, subprotocols, max_message_size, close_timeout, ssl_context)


class _Upstream:
    """:func:`open_upstream`'s block: entered once per connection, alive as long as it is.

    A class, not ``@asynccontextmanager`` generators: these hold their frames for the life of
    every pair (two nested ones cost about 1.5 KiB per idle pair, this about 0.1).
    """

    __slots__ = ("target", "subprotocols", "max_message_size", "close_timeout", "ssl_context", "_stream",
                 "_connection")

    def __init__(self, target: UpstreamTarget, subprotocols: Sequence[str], max_message_size: int,
                 close_timeout: float, ssl_context: ssl.SSLContext | None) -> None:
        self.target, self.subprotocols, self.ssl_context = target, subprotocols, ssl_context
        self.max_message_size, self.close_timeout = max_message_size, close_timeout
        self._stream: Stream | None = None
        self._connection: wsconn.WsConnection | None = None

    async def __aenter__(self) -> wsconn.WsConnection:
        target = self.target
        parts = urlsplit(target.url)
        secure = parts.scheme == "wss"
        host, port = parts.hostname or "", parts.port or (443 if secure else 80)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        with trio.move_on_after(target.connect_timeout) as deadline:
            stream = await _open_stream(target, host, port, self.ssl_context if secure else None, secure)
        if deadline.cancelled_caught:
            raise UpstreamUnavailable(f"no answer within {target.connect_timeout:g} s", 504)
        try:
            self._connection = await _websocket(stream, target, host if parts.port is None else f"{host}:{port}",
                                                resource, self.subprotocols, self.max_message_size,
                                                self.close_timeout)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        self._stream = stream
        return self._connection

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the WebSocket (bounded by close_timeout), then the stream, whatever ended the block."""
        connection, stream = self._connection, self._stream
        self._connection = self._stream = None
        try:
            if connection is not None:
                with trio.move_on_after(self.close_timeout):
                    await connection.aclose()
        finally:
            if stream is not None:
                await trio.aclose_forcefully(stream)


async def _open_stream(target: UpstreamTarget, host: str, port: int, context: ssl.SSLContext | None,
                       secure: bool) -> Stream:
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise UpstreamUnavailable(f"cannot connect: {exc.strerror or exc}", 502) from exc
    if not secure:
        return tcp
    try:
        context = context or client_ssl_context(target)
    except (OSError, ssl.SSLError) as exc:
        await tcp.aclose()
        raise UpstreamUnavailable(f"TLS settings unusable: {exc}", 502) from exc
    tls = trio.SSLStream(tcp, context, server_hostname=host)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tls)
        cause = exc.__cause__
        reason = f"{getattr(cause, 'reason', '')}: {cause}" if cause else str(exc)
        raise UpstreamUnavailable(f"TLS handshake failed: {reason}", 502) from exc
    return tls


async def _websocket(stream: Stream, target: UpstreamTarget, host: str, resource: str,
                     subprotocols: Sequence[str], max_message_size: int,
                     close_timeout: float) -> wsconn.WsConnection:
    """The WebSocket handshake on ``stream`` (bounded by connect_timeout), or why not."""
    connection: wsconn.WsConnection | None = None
    with trio.move_on_after(target.connect_timeout):
        try:
            connection = await wsconn.wrap_client_stream(
                stream, host, resource, subprotocols=list(subprotocols), extra_headers=auth_headers(target),
                max_message_size=max_message_size, close_timeout=close_timeout)
        except ConnectionRejected as exc:
            status = exc.status_code if 400 <= exc.status_code < 500 else 502
            raise UpstreamUnavailable(f"backend refused the handshake with HTTP {exc.status_code}", status) from exc
        except HandshakeError as exc:
            if str(exc).startswith(_UNOFFERED):  # wsproto checks the answer against what was offered
                raise UpstreamUnavailable(f"backend chose a subprotocol that was not offered "
                                          f"({str(exc)[len(_UNOFFERED):].strip()[:40]!r}; offered: "
                                          f"{', '.join(subprotocols)})", 502, outage=False) from exc
            raise UpstreamUnavailable(f"WebSocket handshake failed: {type(exc).__name__} {exc}", 502) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise UpstreamUnavailable(f"WebSocket handshake failed: {type(exc).__name__} {exc}", 502) from exc
    if connection is None:
        raise UpstreamUnavailable(f"no WebSocket handshake within {target.connect_timeout:g} s", 504)
    return connection
