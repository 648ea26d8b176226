"""What the proxy's WebSocket connections raise (:mod:`proxy.wire.connection`, :mod:`proxy.wire.local`).

The relay tells a close the peer sent from one this side made because the
peer broke the rules by the exception's class, not by its reason text:
:class:`MessageTooBig` is this side refusing an oversized message (the relay
reports it as a refused frame), while a peer that closes with 1009 itself is
a plain :class:`ConnectionClosed` (mirrored to the other leg like any close).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CloseReason:
    """How a connection ended: a close code (1005 when the peer gave none, 1006 when the TCP
    connection dropped) and the reason text, if any."""

    code: int
    reason: str | None = None


class WebSocketError(Exception):
    """Base of the errors below."""


class ConnectionClosed(WebSocketError):
    """The connection is closed (by the peer, by this side, or the TCP connection dropped)."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(reason)
        self.reason = reason


class ProtocolViolation(ConnectionClosed):
    """This side closed the connection because the peer broke RFC 6455 (``reason.code`` says how)."""


class MessageTooBig(ProtocolViolation):
    """This side closed the connection with 1009: the peer's message was over the size limit."""


class SendTimeout(ConnectionClosed):
    """A send waited longer than the connection's ``send_timeout`` for the peer to read.

    Part of a frame may have been written, so nothing more is sent on the connection
    (not even a close frame): it counts as closed (1006), and is only good for dropping.
    """


class HandshakeError(WebSocketError):
    """The opening handshake failed (connection dropped, invalid response)."""


class ConnectionRejected(HandshakeError):
    """The server answered the upgrade request with an HTTP status instead of 101."""

    def __init__(self, status_code: int, headers: tuple[tuple[bytes, bytes], ...], body: bytes | None) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code
        self.headers = headers
        self.body = body


class ConnectionTimeout(HandshakeError):
    """The opening handshake did not finish in time."""


class DisconnectionTimeout(WebSocketError):
    """The closing handshake did not finish in time."""
