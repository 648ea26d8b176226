"""Opening the connection to a backend (trio).

:func:`open_upstream` turns an :class:`UpstreamTarget` into an open WebSocket
or an :class:`UpstreamUnavailable` that says why, with the HTTP status the
wallbox should see if its own handshake is refused because of it.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
import trio_websocket
from trio_websocket import WebSocketConnection

from proxy.config import UpstreamTarget

Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]
from proxy.tls import client_context


class UpstreamUnavailable(Exception):
    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        #: Status for the wallbox: the backend's own 4xx is passed on
        #: (an unknown id stays unknown), network trouble becomes 502/504.
        self.status = status


def client_ssl_context(target: UpstreamTarget) -> ssl.SSLContext:
    """TLS towards the backend: configured CAs (else system trust), optional client cert."""
    return client_context(target.ca, target.client_cert, target.client_key)


def auth_headers(target: UpstreamTarget) -> list[tuple[bytes, bytes]]:
    if not target.password:
        return []
    token = base64.b64encode(f"{target.identity}:{target.password}".encode())
    return [(b"Authorization", b"Basic " + token)]


@asynccontextmanager
async def open_upstream(target: UpstreamTarget, subprotocols: Sequence[str], *, max_message_size: int,
                        close_timeout: float = 5.0,
                        ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[WebSocketConnection]:
    """The upstream WebSocket for the duration of the block.

    TCP and TLS are opened here, before trio-websocket sees the stream, so a
    certificate the proxy does not trust is reported as such (trio-websocket
    would only time out). The connection's reader task lives in a nursery of
    this block: a backend that refuses the handshake surfaces here as
    :class:`UpstreamUnavailable` and never escapes into the caller's nursery.
    """
    parts = urlsplit(target.url)
    secure = parts.scheme == "wss"
    host, port = parts.hostname or "", parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with trio.move_on_after(target.connect_timeout) as deadline:
        stream = await _open_stream(target, host, port, ssl_context if secure else None, secure)
    if deadline.cancelled_caught:
        raise UpstreamUnavailable(f"no answer within {target.connect_timeout:g} s", 504)
    try:
        async with _websocket(stream, target, host if parts.port is None else f"{host}:{port}", resource,
                              subprotocols, max_message_size, close_timeout) as connection:
            yield connection
    finally:
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


@asynccontextmanager
async def _websocket(stream: Stream, target: UpstreamTarget, host: str, resource: str,
                     subprotocols: Sequence[str], max_message_size: int,
                     close_timeout: float) -> AsyncIterator[WebSocketConnection]:
    opened = False
    try:
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(target.connect_timeout) as deadline:
                connection = await trio_websocket.wrap_client_stream(
                    nursery, stream, host, resource, subprotocols=list(subprotocols),
                    extra_headers=auth_headers(target), max_message_size=max_message_size)
            if deadline.cancelled_caught:
                raise UpstreamUnavailable(f"no WebSocket handshake within {target.connect_timeout:g} s", 504)
            opened = True
            try:
                yield connection
            finally:
                with trio.move_on_after(close_timeout):
                    await connection.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _single(group, opened) from None


def _single(group: BaseExceptionGroup[BaseException], opened: bool) -> BaseException:
    """The one exception that matters in a nursery's group (the reader's or the block's)."""
    errors = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
    first = errors[0] if errors else group
    if opened or isinstance(first, UpstreamUnavailable):
        return first
    if isinstance(first, trio_websocket.ConnectionRejected):
        status = first.status_code if 400 <= first.status_code < 500 else 502
        return UpstreamUnavailable(f"backend refused the handshake with HTTP {first.status_code}", status)
    return UpstreamUnavailable(f"WebSocket handshake failed: {type(first).__name__} {first}", 502)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
