"""RFC 6455 data-phase framing: bytes in, messages and control frames out (sans-IO).

The relay forwards small text frames at high rates, and a general-purpose
WebSocket stack (an event object per frame, a generator per parse, a masker
object per frame) costs more per frame than everything else the proxy does.
This parser reads a whole receive buffer in one loop and returns plain tuples;
:mod:`proxy.wire.connection` does the I/O. The HTTP upgrade stays with wsproto.

Rules kept here (each violation becomes a close code, as wsproto would send):

* frames from a client must be masked, frames from a server must not (1002);
  no extensions are negotiated, so RSV bits must be 0 (1002);
* control frames: at most 125 bytes, never fragmented (1002); a close frame's
  code must be one a peer may send, its reason valid UTF-8 (1002 / 1007);
* fragmented messages are reassembled; a continuation without a start, or a new
  message inside a fragmented one, is 1002;
* text must be valid UTF-8 (1007); a message over ``max_message_size`` bytes is
  refused as soon as its header says so (1009), before its payload is buffered.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import cast

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
#: Not an opcode: the event that ends parsing, with (code, reason).
VIOLATION = -1

PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG, NO_STATUS = 1002, 1007, 1009, 1005

Event = tuple[int, object]

_SENDABLE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))
_PACK_SHORT = struct.Struct("!BBH").pack
_PACK_LONG = struct.Struct("!BBQ").pack


def too_big_reason(limit: int) -> str:
    # The relay recognises this wording (it is trio-websocket's) as "frame over the limit".
    return f"Exceeded maximum message size: {limit} bytes"


def _xor_python(payload: bytes, key: bytes) -> bytes:
    """(Un)mask: one big-integer XOR instead of a Python loop over the bytes."""
    n = len(payload)
    repeated = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


def _c_masker() -> Callable[[bytes, bytes], bytes]:
    """websockets (pinned already, for the demo's peers) ships a C masker: 18x faster per KiB."""
    try:
        from websockets.speedups import apply_mask
    except ImportError:  # pragma: no cover - the pure-Python path is tested directly
        return _xor_python
    return cast(Callable[[bytes, bytes], bytes], apply_mask)


_xor = _c_masker()


def encode(opcode: int, payload: bytes, mask: bool) -> bytes:
    """One unfragmented frame; a client (``mask``) masks with a fresh random key."""
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
    key = os.urandom(4)
    return head + key + (_xor(payload, key) if n else b"")


def close_payload(code: int | None, reason: str = "") -> bytes:
    if code is None or code == NO_STATUS:
        return b""
    return code.to_bytes(2, "big") + reason.encode("utf-8")[:123]


class FrameParser:
    """Incremental parser for one direction of one connection.

    ``feed(data)`` returns the events completed by ``data``: ``(TEXT, str)``,
    ``(BINARY, bytes)``, ``(PING, bytes)``, ``(PONG, bytes)``,
    ``(CLOSE, (code, reason))`` and, last, ``(VIOLATION, (code, reason))``
    after which the parser accepts nothing more.
    """

    __slots__ = ("_failed", "_limit", "_masked", "_part_type", "_parts", "_rest", "_size")

    def __init__(self, *, from_client: bool, max_message_size: int) -> None:
        self._masked = 0x80 if from_client else 0
        self._limit = max_message_size
        self._rest = b""
        self._parts: list[bytes] = []
        self._part_type = 0
        self._size = 0
        self._failed = False

    def feed(self, data: bytes) -> list[Event]:
        if self._failed:
            return []
        if self._rest:
            data = self._rest + data
            self._rest = b""
        events: list[Event] = []
        pos, end = 0, len(data)
        while end - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n >= 126:
                if n == 126:
                    if end - pos < 4:
                        break
                    n = (data[pos + 2] << 8) | data[pos + 3]
                    head = 4
                    if n < 126:
                        return self._fail(events, PROTOCOL_ERROR, "payload length not minimally encoded")
                else:
                    if end - pos < 10:
                        break
                    n = int.from_bytes(data[pos + 2:pos + 10], "big")
                    head = 10
                    if n < 65536 or n >> 63:
                        return self._fail(events, PROTOCOL_ERROR, "invalid 64-bit payload length")
            opcode = b0 & 0x0F
            if b0 & 0x70:
                return self._fail(events, PROTOCOL_ERROR, "reserved bits set")
            if (b1 & 0x80) != self._masked:
                return self._fail(events, PROTOCOL_ERROR,
                                  "client frame not masked" if self._masked else "server frame masked")
            if opcode >= 8:
                if n > 125 or not b0 & 0x80:
                    return self._fail(events, PROTOCOL_ERROR, "invalid control frame")
            elif self._size + n > self._limit:
                return self._fail(events, MESSAGE_TOO_BIG, too_big_reason(self._limit))
            if self._masked:
                head += 4
            stop = pos + head + n
            if stop > end:
                break
            payload = data[pos + head:stop]
            if self._masked and n:
                payload = _xor(payload, data[pos + head - 4:pos + head])
            pos = stop
            if opcode == TEXT or opcode == BINARY:
                if self._parts or self._part_type:
                    return self._fail(events, PROTOCOL_ERROR, "new message inside a fragmented one")
                if b0 & 0x80:
                    if opcode == TEXT:
                        try:
                            events.append((TEXT, payload.decode("utf-8")))
                        except UnicodeDecodeError:
                            return self._fail(events, INVALID_DATA, "invalid UTF-8 in text message")
                    else:
                        events.append((BINARY, payload))
                else:
                    self._part_type = opcode
                    self._parts.append(payload)
                    self._size = n
            elif opcode == CONTINUATION:
                if not self._part_type:
                    return self._fail(events, PROTOCOL_ERROR, "continuation without a message")
                self._parts.append(payload)
                self._size += n
                if b0 & 0x80:
                    whole = b"".join(self._parts)
                    kind = self._part_type
                    self._parts, self._part_type, self._size = [], 0, 0
                    if kind == TEXT:
                        try:
                            events.append((TEXT, whole.decode("utf-8")))
                        except UnicodeDecodeError:
                            return self._fail(events, INVALID_DATA, "invalid UTF-8 in text message")
                    else:
                        events.append((BINARY, whole))
            elif opcode == PING or opcode == PONG:
                events.append((opcode, payload))
            elif opcode == CLOSE:
                return self._close(events, payload)
            else:
                return self._fail(events, PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if pos < end:
            self._rest = data[pos:]
        return events

    def _close(self, events: list[Event], payload: bytes) -> list[Event]:
        self._failed = True  # nothing may follow a close frame
        if not payload:
            events.append((CLOSE, (NO_STATUS, "")))
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
        events.append((CLOSE, (code, reason)))
        return events

    def _fail(self, events: list[Event], code: int, reason: str) -> list[Event]:
        self._failed = True
        self._rest = b""
        self._parts = []
        events.append((VIOLATION, (code, reason)))
        return events
