"""Opening the connection to a backend (trio).

One function, :func:`connect`, turns an :class:`UpstreamTarget` into an open
WebSocket or an :class:`UpstreamUnavailable` that says why, with the HTTP status
the wallbox should see if its own handshake is refused because of it.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Sequence

import trio
import trio_websocket
from trio_websocket import WebSocketConnection

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


async def connect(nursery: trio.Nursery, target: UpstreamTarget, subprotocols: Sequence[str], *,
                  max_message_size: int,
                  ssl_context: ssl.SSLContext | None = None) -> WebSocketConnection:
    """Open the upstream WebSocket; its reader task lives in ``nursery``."""
    if target.url.startswith("wss:") and ssl_context is None:
        try:
            ssl_context = client_ssl_context(target)
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnavailable(f"TLS settings unusable: {exc}", 502) from exc
    try:
        with trio.fail_after(target.connect_timeout):
            return await trio_websocket.connect_websocket_url(
                nursery, target.url, ssl_context, subprotocols=list(subprotocols),
                extra_headers=auth_headers(target), max_message_size=max_message_size)
    except trio.TooSlowError as exc:
        raise UpstreamUnavailable(f"no answer within {target.connect_timeout:g} s", 504) from exc
    except trio_websocket.ConnectionRejected as exc:
        status = exc.status_code if 400 <= exc.status_code < 500 else 502
        raise UpstreamUnavailable(f"backend refused the handshake with HTTP {exc.status_code}",
                                  status) from exc
    except ssl.SSLError as exc:
        raise UpstreamUnavailable(f"TLS handshake failed: {exc.reason or exc}", 502) from exc
    except (OSError, trio.BrokenResourceError, trio_websocket.HandshakeError) as exc:
        raise UpstreamUnavailable(f"cannot connect: {exc}", 502) from exc
