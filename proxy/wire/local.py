"""An in-process WebSocket stand-in: two connected ends that carry text messages (trio).

A virtual charge point (a Modbus wallbox the proxy speaks OCPP for) is the
wallbox leg of an ordinary :class:`~proxy.runtime.relay.PairedSession`. Giving it one
end of a :func:`local_pair` instead of a socket means the session, the offline
queue, load management, secondaries and metrics treat it exactly like a real
wallbox, without a loopback hop or a TLS and password set-up of its own.

Each end behaves like :class:`proxy.wire.connection.WsConnection` as the relay uses it:
``get_message`` returns what the other end sent, in order, then raises
``ConnectionClosed`` with the code and reason the closing end gave; sending on
a closed pair raises the same; ``ping`` answers at once while open.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio
from proxy.wire.errors import CloseReason, ConnectionClosed


@dataclass
class _Shared:
    close: CloseReason | None = None


class LocalConnection:
    def __init__(self, send: trio.MemorySendChannel[str], receive: trio.MemoryReceiveChannel[str],
                 shared: _Shared, subprotocol: str) -> None:
        self._send, self._receive, self._shared = send, receive, shared
        self.subprotocol = subprotocol

    async def get_message(self) -> str:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionClosed(self._shared.close or CloseReason(1006, "closed")) from None

    async def send_message(self, message: str | bytes) -> None:
        if self._shared.close is not None:
            raise ConnectionClosed(self._shared.close)
        text = message if isinstance(message, str) else message.decode("utf-8")
        try:
            self._send.send_nowait(text)  # unbounded: both ends are read by tasks that never stall
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(self._shared.close or CloseReason(1006, "closed")) from None

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close both directions; the first close's code and reason are what both ends see."""
        if self._shared.close is None:
            self._shared.close = CloseReason(code, reason)
        self._send.close()     # the other end reads what is queued, then the close
        self._receive.close()  # this end stops reading; the other end's sends fail
        await trio.lowlevel.checkpoint()  # closing is done even when this checkpoint is cancelled

    async def ping(self, payload: bytes | None = None) -> None:
        if self._shared.close is not None:
            raise ConnectionClosed(self._shared.close)
        await trio.lowlevel.checkpoint()


def local_pair(subprotocol: str = "ocpp1.6") -> tuple[LocalConnection, LocalConnection]:
    """Two connected ends: what one sends, the other receives."""
    a_send, b_receive = trio.open_memory_channel[str](math.inf)
    b_send, a_receive = trio.open_memory_channel[str](math.inf)
    shared = _Shared()
    return (LocalConnection(a_send, a_receive, shared, subprotocol),
            LocalConnection(b_send, b_receive, shared, subprotocol))
