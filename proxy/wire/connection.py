"""Lean WebSocket connections for the relay (trio): the ``relay.Connection`` protocol.

Why not a general-purpose stack (trio-websocket) on the hot path: per frame it
runs a reader task, a memory channel hop, a lock, wsproto's event objects and
generators, and a 4 KiB receive buffer; profiles of the proxy at saturation
showed that machinery taking most of the CPU. Here there is no task per
connection: the caller of :meth:`WsConnection.get_message` reads the socket
itself (answering pings and closes on the way), and
:meth:`WsConnection.send_message` writes straight to the socket when it can
take the bytes, waiting for writability only when not. Plain TCP connections
use the socket directly; other streams (TLS) go through
``receive_some``/``send_all``. All connections share one receive buffer: trio
runs one task at a time and the bytes are copied out before any await.

Errors are the proxy's own (:mod:`proxy.wire.errors`): a closed connection
raises :class:`ConnectionClosed` with a :class:`CloseReason`; when this side
closed it because the peer broke RFC 6455 the exception is a
:class:`ProtocolViolation`, and :class:`MessageTooBig` for a message over
``max_message_size``. ``wrap_server_stream`` returns a request with
``path``/``headers``/``proposed_subprotocols``/``accept``/``reject`` (once
accepted or rejected, only ``path`` is kept);
``open_websocket_url`` is a client for the duration of a block. The HTTP
upgrade itself is wsproto's.

Behaviour: a peer's close is answered and reported as its code and reason
(1005 when it gave none); a dropped TCP connection is 1006; a message over
``max_message_size`` is refused with 1009 as soon as its header arrives; a
protocol error (1002) or invalid UTF-8 (1007) is sent to the peer and reported
to the caller with its code; after a local close, pending and later messages
are dropped, and a reader blocked in get_message keeps reading until the peer
answers the close (then raises ConnectionClosed). Pings are answered only while
someone reads.
"""

from __future__ import annotations

import os
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import NoReturn

import h11
import trio
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import ProtocolError

from proxy.wire import codec
from proxy.wire.codec import Close, Event, Opcode, Ping, Pong, TextMessage, Violation
from proxy.wire.errors import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    DisconnectionTimeout,
    HandshakeError,
    MessageTooBig,
    ProtocolViolation,
    SendTimeout,
)

__all__ = ["CloseReason", "ConnectionClosed", "ConnectionRejected", "ConnectionTimeout",
           "DisconnectionTimeout", "HandshakeError", "HandshakeFailed", "MessageTooBig", "ProtocolViolation",
           "SendTimeout", "WsConnection", "WsRequest", "open_websocket_url", "read_request", "wrap_client_stream",
           "wrap_server_stream"]

RECEIVE_SIZE = 262_144
_buffer = bytearray(RECEIVE_SIZE)
_view = memoryview(_buffer)
_ABNORMAL = 1006
_HANDSHAKE_LIMIT = 65_536
_TEXT, _BINARY, _CLOSE, _PING, _PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CLOSE, Opcode.PING, Opcode.PONG
_encode = codec.encode
_wait_readable = trio.lowlevel.wait_readable


class WsConnection:
    """One open WebSocket connection (after the handshake)."""

    def __init__(self, stream: trio.abc.Stream, *, client: bool, subprotocol: str | None,
                 path: str, max_message_size: int, close_timeout: float = 5.0,
                 leftover: bytes = b"") -> None:
        self.stream = stream
        self.subprotocol = subprotocol
        self.path = path
        self.is_client = client
        self.close_timeout = close_timeout
        sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        # trio's socket wraps a stdlib socket; using that directly skips trio's
        # per-call checkpoints and retry helper (we do our own waiting).
        self._raw: socket.socket | None = getattr(sock, "_sock", None)
        #: The descriptor, so waiting does not ask the socket for it on every read.
        self._fd = self._raw.fileno() if self._raw is not None else -1
        self._parser = codec.FrameParser(from_client=not client, max_message_size=max_message_size)
        # A list, not a deque: it rarely holds more than one message, and an
        # empty deque costs 760 bytes per connection against a list's 56.
        self._messages: list[str | bytes] = []
        self._reason: CloseReason | None = None
        #: What get_message raises once closed: a ProtocolViolation when this side refused the peer.
        self._closed_by: type[ConnectionClosed] = ConnectionClosed
        self._close_sent = False
        #: No more frames will be read (a close seen, the connection lost or given up).
        self._close_seen = False
        # Idle connections are most of them: what only a waiting task needs (an Event, a
        # ParkingLot, the pings in flight) is made when one waits, about 600 bytes per
        # connection less.
        self._close_waiter: trio.Event | None = None
        self._reading = False
        # One writer at a time (a frame is never interleaved with another); a flag, not a
        # trio.Lock, because the uncontended check runs for every frame sent.
        self._writing = False
        self._write_waiters: trio.lowlevel.ParkingLot | None = None
        #: Longest a send may wait for the peer to read, then SendTimeout (None: no bound).
        self.send_timeout: float | None = None
        #: Pings in flight, oldest first.
        self._pings: dict[bytes, trio.Event] | None = None
        self._stream_closed = False
        self._leftover = leftover

    @property
    def closed(self) -> CloseReason | None:
        return self._reason

    # -- receiving ----------------------------------------------------------------------

    async def get_message(self) -> str | bytes:
        """The next message; raises ConnectionClosed once the connection is closed.

        The one place the socket is read (:meth:`aclose` reads through it too), inline rather
        than in a helper coroutine: every coroutine between the pump and trio's wait is one
        more call and one more frame to pass on each resumption, for every frame read.
        """
        messages = self._messages
        raw = self._raw
        while not messages:
            if self._close_seen:
                raise self._closed_by(self._reason or CloseReason(_ABNORMAL, None))
            if self._reading:  # aclose() is reading until the peer answers its close
                await self._wait_close_seen()
                continue
            self._reading = True
            try:
                if self._leftover:
                    data, self._leftover = self._leftover, b""
                elif raw is None:
                    data = bytes(await self.stream.receive_some(RECEIVE_SIZE))
                else:
                    if self._stream_closed:  # the descriptor number may belong to another socket by now
                        raise trio.ClosedResourceError
                    while True:
                        await _wait_readable(self._fd)
                        try:
                            n = raw.recv_into(_buffer)
                        except (BlockingIOError, InterruptedError):
                            continue
                        break
                    data = _view[:n].tobytes()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            finally:
                self._reading = False
            if not data:
                self._lost()
                continue
            for event in self._parser.feed(data):
                if type(event) is TextMessage:  # the common case, without a call
                    if self._reason is None or not self._close_sent:
                        messages.append(event.text)
                else:
                    await self._handle(event)
            data = b""  # a reader waiting for the rest of a frame holds none of the last read
        return messages.pop(0)

    async def _handle(self, event: Event) -> None:
        match event:
            case TextMessage(text):
                if self._reason is None or not self._close_sent:
                    self._messages.append(text)
            case codec.BinaryMessage(data):
                if self._reason is None or not self._close_sent:
                    self._messages.append(data)
            case Ping(payload):
                if not self._close_sent:
                    await self._write(_encode(_PONG, payload, self.is_client))
            case Pong(payload):
                self._pong(payload)
            case Close(code, reason):
                await self._peer_closed(code, reason)
            case Violation():
                await self._violation(event)

    def _pong(self, payload: bytes) -> None:
        """A pong answers its ping and every ping sent before it."""
        pings = self._pings
        if pings is None or payload not in pings:
            return
        for key in list(pings):  # oldest first
            pings.pop(key).set()
            if key == payload:
                break
        if not pings:
            self._pings = None

    async def _send_close_once(self, code: int, reason: str) -> None:
        if not self._close_sent:
            self._close_sent = True
            try:
                await self._write(_encode(_CLOSE, codec.close_payload(code, reason), self.is_client))
            except ConnectionClosed:
                pass

    async def _peer_closed(self, code: int, reason: str) -> None:
        if self._reason is None:
            self._reason = CloseReason(code, reason or None)
        await self._send_close_once(code, reason)
        self._finish()
        await self._close_stream()

    async def _violation(self, violation: Violation) -> None:
        if self._reason is None:
            self._reason = CloseReason(violation.code, violation.reason)
            self._closed_by = MessageTooBig if violation.too_big else ProtocolViolation
        await self._send_close_once(violation.code, violation.reason)
        self._finish()
        if not violation.too_big:  # (the relay closes a too-big leg itself, and logs why)
            await self._close_stream()

    def _lost(self) -> None:
        if self._reason is None:
            self._reason = CloseReason(_ABNORMAL, None)
        self._finish()

    def _finish(self) -> None:
        """No more frames will be read: wake whoever waits for a close or a pong."""
        self._close_seen = True
        if self._close_waiter is not None:
            self._close_waiter.set()
        pings, self._pings = self._pings, None
        for event in (pings or {}).values():
            event.set()

    async def _wait_close_seen(self) -> None:
        """Until no more frames will be read (:meth:`_finish`); a checkpoint even if that is so already."""
        if self._close_seen:
            await trio.lowlevel.checkpoint()
            return
        if self._close_waiter is None:
            self._close_waiter = trio.Event()
        await self._close_waiter.wait()

    # -- sending ------------------------------------------------------------------------

    async def send_message(self, message: str | bytes) -> None:
        if self._reason is not None or self._close_sent:
            raise ConnectionClosed(self._reason or CloseReason(1000, None))
        if isinstance(message, str):
            data = _encode(_TEXT, message.encode("utf-8"), self.is_client)
        elif isinstance(message, bytes):
            data = _encode(_BINARY, message, self.is_client)
        else:
            raise ValueError("message must be str or bytes")
        raw = self._raw
        if raw is not None and not self._writing and not self._stream_closed:
            # Per frame: the socket takes the frame at once (no _write coroutine); else _write goes on.
            sent = self._send_now(raw, data)
            if sent != len(data):
                await self._write(data, sent)
            return
        await self._write(data)

    async def ping(self, payload: bytes | None = None) -> None:
        """Send a ping and wait for its pong (raises ConnectionClosed if the connection ends)."""
        if self._reason is not None:
            raise ConnectionClosed(self._reason)
        if payload is None:
            payload = os.urandom(4)
        if self._pings is None:
            self._pings = {}
        if payload in self._pings:
            raise ValueError(f"Payload value {payload!r} is already in flight.")
        event = trio.Event()
        self._pings[payload] = event
        await self._write(_encode(_PING, payload, self.is_client))
        await event.wait()
        if self._reason is not None and self._close_seen:
            raise ConnectionClosed(self._reason)

    async def _write(self, data: bytes, sent: int = -1) -> None:
        """Write all of ``data``; without waiting when the socket takes it at once.

        ``sent``: how much of ``data`` the caller already wrote to the socket (-1: none tried).
        Only a write that has to wait (the peer is not reading, or another frame is
        being written) is bounded by ``send_timeout``: the common case sets up no
        cancel scope.
        """
        if self._stream_closed:
            raise ConnectionClosed(self._reason or CloseReason(_ABNORMAL, None))
        raw = self._raw
        rest: memoryview | None = None
        if raw is not None and (sent >= 0 or not self._writing):
            if sent < 0:
                sent = self._send_now(raw, data)
                if sent == len(data):
                    return
            rest = memoryview(data)[sent:]
            self._writing = True  # taken before any await: the rest of this frame goes next
        if self.send_timeout is None:
            await self._write_waiting(raw, data, rest)
            return
        with trio.move_on_after(self.send_timeout) as waited:
            await self._write_waiting(raw, data, rest)
        if waited.cancelled_caught:
            self._close_sent = True  # a frame may be cut off: nothing may follow it on this stream
            if self._reason is None:
                self._reason = CloseReason(_ABNORMAL, f"a send waited {self.send_timeout:g} s for the peer to read")
            self._finish()  # closing will not wait for the peer to answer a close it never got
            raise SendTimeout(self._reason)

    def _send_now(self, raw: socket.socket, data: bytes) -> int:
        """What the socket takes of ``data`` without waiting (0: its buffer is full)."""
        try:
            return raw.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self._broken()

    async def _write_waiting(self, raw: socket.socket | None, data: bytes, rest: memoryview | None) -> None:
        """The rest of a frame this task started writing (``rest``), or all of ``data`` once no other
        task is writing."""
        if rest is None:
            rest = memoryview(data)
            while self._writing:
                if self._write_waiters is None:
                    self._write_waiters = trio.lowlevel.ParkingLot()
                await self._write_waiters.park()
            if self._stream_closed:
                raise ConnectionClosed(self._reason or CloseReason(_ABNORMAL, None))
            self._writing = True
        try:
            if raw is not None:
                await self._write_rest(raw, rest)
                return
            try:
                await self.stream.send_all(rest)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._broken()
        finally:
            self._writing = False
            if self._write_waiters is not None:
                self._write_waiters.unpark()

    async def _write_rest(self, raw: socket.socket, rest: memoryview) -> None:
        while rest:
            try:
                await trio.lowlevel.wait_writable(raw)
            except trio.ClosedResourceError:
                self._broken()
            try:
                sent = raw.send(rest)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                self._broken()
            rest = rest[sent:]

    def _broken(self) -> NoReturn:
        if self._reason is None:
            self._reason = CloseReason(_ABNORMAL, None)
        self._finish()
        raise ConnectionClosed(self._reason)

    # -- closing ------------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close handshake (bounded by ``close_timeout``), then close the socket.

        Idempotent; a cancelled aclose still closes the socket.
        """
        try:
            if self._stream_closed or self._close_seen:
                return
            if self._reason is None:
                self._reason = CloseReason(1000, None)
            self._messages.clear()
            if not self._close_sent:
                self._close_sent = True
                try:
                    await self._write(_encode(_CLOSE, codec.close_payload(code, reason or ""), self.is_client))
                except ConnectionClosed:
                    return
            with trio.move_on_after(self.close_timeout):
                # Until the peer's close: the task already reading (a pump in get_message, which
                # keeps reading until then) sees it, else we read. After our close nothing more is
                # queued (messages dropped), so get_message returns only by raising at the close.
                while not self._close_seen:
                    try:
                        await self.get_message()
                    except ConnectionClosed:
                        break
        finally:
            await self._close_stream()

    async def _close_stream(self) -> None:
        if self._stream_closed:
            return
        self._stream_closed = True
        self._finish()
        if self._raw is not None and isinstance(self.stream, trio.SocketStream):
            self.stream.socket.close()  # synchronous: nothing to flush, cannot be cancelled
            return
        await trio.aclose_forcefully(self.stream)


# --- server side ------------------------------------------------------------------------------

class WsRequest:
    """A wallbox's upgrade request, to accept or reject."""

    def __init__(self, stream: trio.abc.Stream, handshake: H11Handshake, event: Request,
                 max_message_size: int, close_timeout: float) -> None:
        self._stream = stream
        self._handshake: H11Handshake | None = handshake
        self._event: Request | None = event
        self._path = event.target
        self._max_message_size = max_message_size
        self._close_timeout = close_timeout

    @property
    def path(self) -> str:
        return self._path

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self._request().extra_headers)

    @property
    def proposed_subprotocols(self) -> tuple[str, ...]:
        return tuple(self._request().subprotocols)

    def _request(self) -> Request:
        if self._event is None:
            raise RuntimeError("the request was already accepted or rejected")
        return self._event

    async def accept(self, *, subprotocol: str | None = None,
                     extra_headers: list[tuple[bytes, bytes]] | None = None) -> WsConnection:
        handshake = self._take_handshake()
        data = handshake.send(AcceptConnection(subprotocol=subprotocol, extra_headers=extra_headers or []))
        await self._stream.send_all(data)
        leftover = _trailing(handshake)
        return WsConnection(self._stream, client=False, subprotocol=subprotocol, path=self.path,
                            max_message_size=self._max_message_size, close_timeout=self._close_timeout,
                            leftover=leftover)

    async def reject(self, status_code: int, *, extra_headers: list[tuple[bytes, bytes]] | None = None,
                     body: bytes | None = None) -> None:
        await self._stream.send_all(_rejection(self._take_handshake(), status_code, extra_headers or [], body))

    def _take_handshake(self) -> H11Handshake:
        """The handshake engine, once: the caller keeps the request for the whole
        session, and the engine (h11 state, wsproto's unused frame machinery) is
        4 KiB per connection, the parsed request (headers) another 1 KiB."""
        handshake = self._handshake
        if handshake is None:
            raise RuntimeError("the request was already accepted or rejected")
        self._handshake = self._event = None
        return handshake


#: Bounds of the lingering close after an error answer: seconds, bytes read and dropped.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1_048_576


async def _linger(stream: trio.abc.Stream) -> None:
    """Drop what the peer is still sending before the socket closes, for a bounded time.

    Closing a socket with unread bytes resets the connection, and the reset can destroy the error
    answer before the peer has read it (an oversized request is answered after its first 64 KiB).
    """
    if isinstance(stream, trio.SocketStream):
        await stream.send_eof()
    dropped = 0
    with trio.move_on_after(_LINGER_SECONDS):
        while dropped < _LINGER_BYTES and (chunk := await stream.receive_some(65_536)):
            dropped += len(chunk)


def _rejection(handshake: H11Handshake, status_code: int, headers: list[tuple[bytes, bytes]],
               body: bytes | None) -> bytes:
    """An HTTP error response with its standard reason phrase (``HTTP/1.1 404 Not Found``).

    wsproto sends rejections with an empty phrase (``HTTP/1.1 404 ``), so a wallbox's log shows
    only a number; this writes the same response through the handshake's h11 connection, with the
    phrase. The handshake is not used afterwards.
    """
    try:
        phrase = HTTPStatus(status_code).phrase.encode("ascii")
    except ValueError:
        phrase = b""
    h11_connection = getattr(handshake, "_h11_connection")
    headers = [*headers, (b"Content-Length", str(len(body or b"")).encode("ascii")), (b"Connection", b"close")]
    data = h11_connection.send(h11.Response(status_code=status_code, headers=headers, reason=phrase)) or b""
    if body:
        data += h11_connection.send(h11.Data(data=body)) or b""
    return bytes(data + (h11_connection.send(h11.EndOfMessage()) or b""))


def _trailing(handshake: H11Handshake) -> bytes:
    """Bytes the peer sent right after its handshake (frames pipelined behind it)."""
    h11_connection = getattr(handshake, "_h11_connection", None)
    trailing = getattr(h11_connection, "trailing_data", (b"", False))
    return bytes(trailing[0])


@dataclass(frozen=True)
class HandshakeFailed:
    """Why no upgrade request arrived, so it is logged and counted as what it was."""

    #: ``hung_up`` (closed before a whole request), ``bad_request`` (not an HTTP upgrade request)
    #: or ``request_too_large`` (headers over h11's limit).
    reason: str
    #: The HTTP status sent to the peer; 0 when nothing was sent (it had hung up).
    status: int
    detail: str


async def wrap_server_stream(nursery: trio.Nursery | None, stream: trio.abc.Stream, *,
                             max_message_size: int = 1_048_576, close_timeout: float = 5.0) -> WsRequest | None:
    """Read the upgrade request; None when the peer hung up or sent no valid request.

    (``nursery`` is accepted for the signature callers know from trio-websocket; no task is started.)
    :func:`read_request` says why there was none.
    """
    request = await read_request(stream, max_message_size=max_message_size, close_timeout=close_timeout)
    return request if isinstance(request, WsRequest) else None


async def read_request(stream: trio.abc.Stream, *, max_message_size: int = 1_048_576,
                       close_timeout: float = 5.0) -> WsRequest | HandshakeFailed:
    """Read the upgrade request, or say why there is none.

    A malformed request is answered with 400 first, one with oversized headers with 431.
    """
    handshake = H11Handshake(ConnectionType.SERVER)
    received = 0
    while True:
        try:
            data = await stream.receive_some(_HANDSHAKE_LIMIT)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        received += len(data)
        if not data:
            return HandshakeFailed("hung_up", 0, f"closed after {received} bytes of the HTTP request")
        if received > _HANDSHAKE_LIMIT:
            return await _fail(stream, handshake, 431, f"HTTP request over {_HANDSHAKE_LIMIT} bytes")
        try:
            handshake.receive_data(bytes(data))
        except ProtocolError as exc:
            # wsproto's hint is always 400; h11's own error (the context) knows 431 for oversized headers
            status = getattr(exc.__context__, "error_status_hint", None)
            if not isinstance(status, int):
                hint = getattr(exc, "event_hint", None)
                status = hint.status_code if isinstance(hint, RejectConnection) else 400
            return await _fail(stream, handshake, status, str(exc)[:200])
        for event in handshake.events():
            if isinstance(event, Request):
                return WsRequest(stream, handshake, event, max_message_size, close_timeout)


async def _fail(stream: trio.abc.Stream, handshake: H11Handshake, status: int, detail: str) -> HandshakeFailed:
    """Answer an unusable request with ``status`` (best effort: the peer may be gone)."""
    try:
        await stream.send_all(_rejection(handshake, status, [], None))
        await _linger(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
    return HandshakeFailed("request_too_large" if status == 431 else "bad_request", status, detail)


# --- client side ------------------------------------------------------------------------------

def _url_to_host(url: str, ssl_context: ssl.SSLContext | None) -> tuple[str, int, str, ssl.SSLContext | None]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError('WebSocket URL scheme must be "ws:" or "wss:"')
    if parts.scheme == "ws" and ssl_context is not None:
        raise ValueError("SSL context must be None for ws: URL scheme")
    if parts.scheme == "wss" and ssl_context is None:
        ssl_context = ssl.create_default_context()
    if parts.hostname is None:
        raise ValueError("URL host must not be None")
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    resource = parts.path or "/"
    if "?" in url:
        resource += "?" + parts.query
    return parts.hostname, port, resource, ssl_context


async def connect_websocket(host: str, port: int, resource: str, ssl_context: ssl.SSLContext | None, *,
                            subprotocols: Sequence[str] = (), extra_headers: list[tuple[bytes, bytes]] | None = None,
                            max_message_size: int = 1_048_576, close_timeout: float = 5.0) -> WsConnection:
    stream: trio.abc.Stream
    if ssl_context is None:
        stream = await trio.open_tcp_stream(host, port)
    else:
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context, https_compatible=True)
    try:
        return await _client_handshake(stream, host if port in (80, 443) else f"{host}:{port}", resource,
                                       subprotocols, extra_headers or [], max_message_size, close_timeout)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def wrap_client_stream(stream: trio.abc.Stream, host: str, resource: str, *,
                             subprotocols: Sequence[str] = (), extra_headers: list[tuple[bytes, bytes]] | None = None,
                             max_message_size: int = 1_048_576, close_timeout: float = 5.0) -> WsConnection:
    """The client handshake on an open stream (TCP or TLS); ``host`` is the Host header value.

    Raises ConnectionRejected (the backend answered with an HTTP status) or
    HandshakeError; the caller owns the stream and closes it on failure.
    """
    return await _client_handshake(stream, host, resource, subprotocols, extra_headers or [],
                                   max_message_size, close_timeout)


async def _client_handshake(stream: trio.abc.Stream, host: str, resource: str, subprotocols: Sequence[str],
                            extra_headers: list[tuple[bytes, bytes]], max_message_size: int,
                            close_timeout: float) -> WsConnection:
    handshake = H11Handshake(ConnectionType.CLIENT)
    await stream.send_all(handshake.send(Request(host=host, target=resource, subprotocols=list(subprotocols),
                                                 extra_headers=extra_headers)))
    rejected: RejectConnection | None = None
    body = b""
    while True:
        data = await stream.receive_some(_HANDSHAKE_LIMIT)
        if not data:
            if rejected is not None:
                raise ConnectionRejected(rejected.status_code, tuple(rejected.headers), body)
            raise HandshakeError("connection closed during the WebSocket handshake")
        try:
            handshake.receive_data(bytes(data))
        except ProtocolError as exc:
            raise HandshakeError(str(exc)) from exc
        for event in handshake.events():
            if isinstance(event, AcceptConnection):
                return WsConnection(stream, client=True, subprotocol=event.subprotocol, path=resource,
                                    max_message_size=max_message_size, close_timeout=close_timeout,
                                    leftover=_trailing(handshake))
            if isinstance(event, RejectConnection):
                rejected = event
                if not event.has_body:
                    raise ConnectionRejected(event.status_code, tuple(event.headers), None)
            elif isinstance(event, RejectData) and rejected is not None:
                body += event.data
                if event.body_finished:
                    raise ConnectionRejected(rejected.status_code, tuple(rejected.headers), body)


@asynccontextmanager
async def open_websocket_url(url: str, ssl_context: ssl.SSLContext | None = None, *,
                             subprotocols: Sequence[str] = (), extra_headers: list[tuple[bytes, bytes]] | None = None,
                             max_message_size: int = 1_048_576, connect_timeout: float = 60.0,
                             disconnect_timeout: float = 60.0) -> AsyncIterator[WsConnection]:
    """A client connection for the duration of the block.

    Raises ConnectionTimeout when the handshake takes longer than ``connect_timeout``,
    HandshakeError when it fails, DisconnectionTimeout when closing takes longer than
    ``disconnect_timeout``.
    """
    host, port, resource, context = _url_to_host(url, ssl_context)
    try:
        with trio.fail_after(connect_timeout):
            connection = await connect_websocket(host, port, resource, context, subprotocols=subprotocols,
                                                 extra_headers=extra_headers, max_message_size=max_message_size,
                                                 close_timeout=disconnect_timeout)
    except trio.TooSlowError:
        raise ConnectionTimeout from None
    except OSError as exc:
        raise HandshakeError from exc
    failed = False
    try:
        yield connection
    except BaseException:
        failed = True
        raise
    finally:
        with trio.move_on_after(disconnect_timeout) as scope:
            await connection.aclose()
        if scope.cancelled_caught and not failed:
            raise DisconnectionTimeout
