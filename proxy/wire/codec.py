"""RFC 6455 data-phase framing: bytes in, typed events out (sans-IO).

The relay forwards small text frames at high rates, and a general-purpose
WebSocket stack (a generator per parse, a masker object per frame) costs more
per frame than everything else the proxy does. This parser reads a whole
receive buffer in one loop and returns small typed events (:data:`Event`);
:mod:`proxy.wire.connection` does the I/O. The HTTP upgrade stays with wsproto.

Rules kept here (each violation becomes a close code, as wsproto would send):

* frames from a client must be masked, frames from a server must not (1002);
  no extensions are negotiated, so RSV bits must be 0 (1002);
* control frames: at most 125 bytes, never fragmented (1002); a close frame's
  code must be one a peer may send, its reason valid UTF-8 (1002 / 1007);
* fragmented messages are reassembled; a continuation without a start, or a new
  message inside a fragmented one, is 1002;
* text must be valid UTF-8 (1007); a message over ``max_message_size`` bytes is
  refused as soon as its header says so (1009, :class:`Violation` with
  ``too_big``), before its payload is buffered.

Cost is linear in the bytes fed, however they are split: a frame that is not
complete yet is appended to one buffer and not parsed again until the bytes it
needs have arrived (1 MiB fed one byte at a time: ``python -m bench.codec``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final


class Opcode(IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


PROTOCOL_ERROR: Final = 1002
INVALID_DATA: Final = 1007
MESSAGE_TOO_BIG: Final = 1009
NO_STATUS: Final = 1005

# Plain ints for the parse loop: an IntEnum member lookup per frame costs more than the comparison.
_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = (int(op) for op in Opcode)


@dataclass(slots=True)
class TextMessage:
    text: str


@dataclass(slots=True)
class BinaryMessage:
    data: bytes


@dataclass(slots=True)
class Ping:
    payload: bytes


@dataclass(slots=True)
class Pong:
    payload: bytes


@dataclass(slots=True)
class Close:
    """The peer's close frame: its code (1005 when it gave none) and reason."""

    code: int
    reason: str


@dataclass(slots=True)
class Violation:
    """The peer broke RFC 6455 or the size limit; the parser accepts nothing more.

    ``code`` is the close code to answer with; ``too_big`` says the message was
    over ``max_message_size`` (code 1009), as a flag rather than reason text.
    """

    code: int
    reason: str
    too_big: bool = False


Event = TextMessage | BinaryMessage | Ping | Pong | Close | Violation

_SENDABLE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))
_PACK_SHORT = struct.Struct("!BBH").pack
_PACK_LONG = struct.Struct("!BBQ").pack


def _xor_python(payload: bytes, key: bytes) -> bytes:
    """(Un)mask: one big-integer XOR instead of a Python loop over the bytes."""
    n = len(payload)
    repeated = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


def _c_masker() -> Callable[[bytes, bytes], bytes]:
    """websockets (a dependency already, for the demo's peers) ships a C masker: 18x faster per KiB."""
    try:
        from websockets.speedups import apply_mask
    except ImportError:  # pragma: no cover - the pure-Python path is tested directly
        return _xor_python
    masker: Callable[[bytes, bytes], bytes] = apply_mask  # an untyped C function: its signature, stated
    return masker


_xor = _c_masker()

# Mask keys (RFC 6455 5.3: unpredictable, from a strong source) are cut from one
# os.urandom draw: one getrandom system call per 1024 masked frames instead of
# one per frame. The pool is dropped in a forked child, which must not reuse
# its parent's keys.
_POOL_BYTES: Final = 4096
_pool = b""
_pool_at = _POOL_BYTES


def _drop_pool() -> None:
    global _pool, _pool_at
    _pool, _pool_at = b"", _POOL_BYTES


os.register_at_fork(after_in_child=_drop_pool)


def mask_key() -> bytes:
    """The next 4-byte masking key."""
    global _pool, _pool_at
    at = _pool_at
    if at >= _POOL_BYTES:
        _pool, at = os.urandom(_POOL_BYTES), 0
    _pool_at = at + 4
    return _pool[at:at + 4]


def encode(opcode: int, payload: bytes, mask: bool) -> bytes:
    """One unfragmented frame; a client (``mask``) masks with a fresh key."""
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((0x80 | opcode, bit | n))
    elif n < 65536:
        head = _PACK_SHORT(0x80 | opcode, bit | 126, n)
    else:
        head = _PACK_LONG(0x80 | opcode, bit | 127, n)
    if not mask:
        return head + payload
    global _pool, _pool_at  # mask_key(), inline: this runs for every frame sent upstream
    at = _pool_at
    if at >= _POOL_BYTES:
        _pool, at = os.urandom(_POOL_BYTES), 0
    _pool_at = at + 4
    key = _pool[at:at + 4]
    return head + key + (_xor(payload, key) if n else b"")


def close_payload(code: int | None, reason: str = "") -> bytes:
    if code is None or code == NO_STATUS:
        return b""
    return code.to_bytes(2, "big") + reason.encode("utf-8")[:123]


def too_big(limit: int) -> Violation:
    return Violation(MESSAGE_TOO_BIG, f"message over the limit of {limit} bytes", too_big=True)


class FrameParser:
    """Incremental parser for one direction of one connection.

    ``feed(data)`` returns the events completed by ``data``, in order; a
    :class:`Close` or :class:`Violation` is the last event the parser returns.
    """

    __slots__ = ("_buffer", "_failed", "_limit", "_masked", "_need", "_part_type", "_parts", "_size")

    def __init__(self, *, from_client: bool, max_message_size: int) -> None:
        self._masked = 0x80 if from_client else 0
        self._limit = max_message_size
        #: Bytes of a frame not complete yet, and how many it needs before parsing is worth it.
        self._buffer = bytearray()
        self._need = 0
        self._parts: list[bytes] = []
        self._part_type = 0
        self._size = 0
        self._failed = False

    def feed(self, data: bytes) -> list[Event]:
        if self._failed:
            return []
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < self._need:
                return []  # the frame in progress is still short: nothing to parse yet
            data = bytes(buffer)
            buffer.clear()
        events: list[Event] = []
        pos, end = 0, len(data)
        masked = self._masked
        while True:
            if end - pos < 2:
                need = 2
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n >= 126:
                if n == 126:
                    if end - pos < 4:
                        need = 4
                        break
                    n = (data[pos + 2] << 8) | data[pos + 3]
                    head = 4
                    if n < 126:
                        return self._fail(events, PROTOCOL_ERROR, "payload length not minimally encoded")
                else:
                    if end - pos < 10:
                        need = 10
                        break
                    n = int.from_bytes(data[pos + 2:pos + 10], "big")
                    head = 10
                    if n < 65536 or n >> 63:
                        return self._fail(events, PROTOCOL_ERROR, "invalid 64-bit payload length")
            opcode = b0 & 0x0F
            if b0 & 0x70:
                return self._fail(events, PROTOCOL_ERROR, "reserved bits set")
            if (b1 & 0x80) != masked:
                return self._fail(events, PROTOCOL_ERROR,
                                  "client frame not masked" if masked else "server frame masked")
            if opcode >= 8:
                if n > 125 or not b0 & 0x80:
                    return self._fail(events, PROTOCOL_ERROR, "invalid control frame")
            elif self._size + n > self._limit:
                return self._refuse(events, too_big(self._limit))
            if masked:
                head += 4
            stop = pos + head + n
            if stop > end:
                need = head + n
                break
            payload = data[pos + head:stop]
            if masked and n:
                payload = _xor(payload, data[pos + head - 4:pos + head])
            pos = stop
            if opcode == _TEXT or opcode == _BINARY:
                if self._part_type:
                    return self._fail(events, PROTOCOL_ERROR, "new message inside a fragmented one")
                if b0 & 0x80:
                    if opcode == _TEXT:
                        try:
                            events.append(TextMessage(payload.decode("utf-8")))
                        except UnicodeDecodeError:
                            return self._fail(events, INVALID_DATA, "invalid UTF-8 in text message")
                    else:
                        events.append(BinaryMessage(payload))
                else:
                    self._part_type = opcode
                    self._parts.append(payload)
                    self._size = n
            elif opcode == _CONTINUATION:
                if not self._part_type:
                    return self._fail(events, PROTOCOL_ERROR, "continuation without a message")
                self._parts.append(payload)
                self._size += n
                if b0 & 0x80 and not self._message_done(events):
                    return events
            elif opcode == _PING:
                events.append(Ping(payload))
            elif opcode == _PONG:
                events.append(Pong(payload))
            elif opcode == _CLOSE:
                return self._close(events, payload)
            else:
                return self._fail(events, PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if pos < end:
            buffer += memoryview(data)[pos:]
            self._need = need
        return events

    def _message_done(self, events: list[Event]) -> bool:
        """The last fragment arrived: the whole message; False after a violation."""
        whole = b"".join(self._parts)
        kind = self._part_type
        self._parts, self._part_type, self._size = [], 0, 0
        if kind == _BINARY:
            events.append(BinaryMessage(whole))
            return True
        try:
            events.append(TextMessage(whole.decode("utf-8")))
        except UnicodeDecodeError:
            self._fail(events, INVALID_DATA, "invalid UTF-8 in text message")
            return False
        return True

    def _close(self, events: list[Event], payload: bytes) -> list[Event]:
        self._failed = True  # nothing may follow a close frame
        if not payload:
            events.append(Close(NO_STATUS, ""))
            return events
        if len(payload) == 1:
            return self._fail(events, PROTOCOL_ERROR, "close frame with a 1-byte payload")
        code = int.from_bytes(payload[:2], "big")
        if code not in _SENDABLE and not 3000 <= code <= 4999:
            return self._fail(events, PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            return self._fail(events, INVALID_DATA, "invalid UTF-8 in close reason")
        events.append(Close(code, reason))
        return events

    def _fail(self, events: list[Event], code: int, reason: str) -> list[Event]:
        return self._refuse(events, Violation(code, reason))

    def _refuse(self, events: list[Event], violation: Violation) -> list[Event]:
        self._failed = True
        self._buffer = bytearray()
        self._parts = []
        events.append(violation)
        return events
