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

import trio
import trio_websocket

from proxy import wsconn
from proxy.config import UpstreamTarget


class UpstreamUnavailable(Exception):
    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        #: Status for the wallbox: the backend's own 4xx is passed on
        #: (an unknown id stays unknown), network trouble becomes 502/504.
        self.status = status


def client_ssl_context(target: UpstreamTarget) -> ssl.SSLContext:
    """TLS towards the backend: configured CAs (else system trust), optional client cert."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for ca in target.ca:
        context.load_verify_locations(cafile=ca)
    if target.client_cert:
        context.load_cert_chain(target.client_cert, target.client_key or None)
    return context


def auth_headers(target: UpstreamTarget) -> list[tuple[bytes, bytes]]:
    if not target.password:
        return []
    token = base64.b64encode(f"{target.identity}:{target.password}".encode())
    return [(b"Authorization", b"Basic " + token)]


@asynccontextmanager
async def open_upstream(target: UpstreamTarget, subprotocols: Sequence[str], *, max_message_size: int,
                        close_timeout: float = 5.0,
                        ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[wsconn.WsConnection]:
    """The upstream WebSocket for the duration of the block.

    The connection's reader task lives in trio-websocket's own nursery inside
    this block, so a backend that refuses or breaks the handshake surfaces
    here as :class:`UpstreamUnavailable` instead of escaping into the caller's
    nursery. Errors after the handshake (the block's own) pass through.
    """
    if target.url.startswith("wss:") and ssl_context is None:
        try:
            ssl_context = client_ssl_context(target)
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnavailable(f"TLS settings unusable: {exc}", 502) from exc
    opened = False
    try:
        async with wsconn.open_websocket_url(
                target.url, ssl_context, subprotocols=list(subprotocols),
                extra_headers=auth_headers(target), max_message_size=max_message_size,
                connect_timeout=target.connect_timeout, disconnect_timeout=close_timeout) as connection:
            opened = True
            yield connection
    except trio_websocket.DisconnectionTimeout:
        pass  # the close handshake timed out; the socket is closed anyway
    except (trio_websocket.HandshakeError, OSError, trio.BrokenResourceError) as exc:
        if opened:
            raise
        raise _unavailable(exc, target) from exc


def _unavailable(exc: BaseException, target: UpstreamTarget) -> UpstreamUnavailable:
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return UpstreamUnavailable(f"no answer within {target.connect_timeout:g} s", 504)
    if isinstance(exc, trio_websocket.ConnectionRejected):
        status = exc.status_code if 400 <= exc.status_code < 500 else 502
        return UpstreamUnavailable(f"backend refused the handshake with HTTP {exc.status_code}", status)
    cause = exc.__cause__ or exc
    if isinstance(cause, ssl.SSLError):
        return UpstreamUnavailable(f"TLS handshake failed: {cause.reason or cause}", 502)
    return UpstreamUnavailable(f"cannot connect: {cause or type(cause).__name__}", 502)
