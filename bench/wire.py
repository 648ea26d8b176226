"""Minimal RFC 6455 framing for the load generator and the backend (asyncio, no library).

Both ends of the benchmark must cost as little CPU as possible, or they, not
the relay under test, set the ceiling. So this is the least WebSocket that is
still correct for what the relays send: unfragmented text frames, ping, pong,
close. Clients mask with an all-zero key (a valid key: the receiver still runs
its unmasking code, the sender saves the XOR).
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA
_ZERO_MASK = b"\0\0\0\0"


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def client_request(host: str, port: int, path: str, subprotocol: str = "ocpp1.6") -> tuple[bytes, bytes]:
    """Upgrade request and the Sec-WebSocket-Accept value the server must answer."""
    key = base64.b64encode(os.urandom(16))
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
               f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {subprotocol}\r\n\r\n").encode()
    return request, accept_key(key)


def parse_request(head: bytes) -> tuple[str, dict[bytes, bytes]]:
    """Path and lower-cased headers of an HTTP upgrade request (without the blank line)."""
    lines = head.split(b"\r\n")
    path = lines[0].split(b" ")[1].decode()
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return path, headers


def server_response(headers: dict[bytes, bytes]) -> bytes:
    offered = [p.strip() for p in headers.get(b"sec-websocket-protocol", b"").split(b",") if p.strip()]
    response = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_key(headers[b"sec-websocket-key"]) + b"\r\n")
    if b"ocpp1.6" in offered:
        response += b"Sec-WebSocket-Protocol: ocpp1.6\r\n"
    return response + b"\r\n"


def frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One unfragmented frame; a client masks with the zero key."""
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, bit | 127, n)
    return head + _ZERO_MASK + payload if mask else head + payload


def unmask(payload: bytes, key: bytes) -> bytes:
    if key == _ZERO_MASK:
        return payload
    n = len(payload)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


class FrameReader:
    """Incremental frame parser: feed bytes, take (opcode, payload) pairs."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer + data if self._buffer else data
        frames: list[tuple[int, bytes]] = []
        pos, end = 0, len(buffer)
        while end - pos >= 2:
            b0, b1 = buffer[pos], buffer[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = int.from_bytes(buffer[pos + 2:pos + 4], "big")
                head = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buffer[pos + 2:pos + 10], "big")
                head = 10
            masked = b1 & 0x80
            if masked:
                head += 4
            if end - pos < head + n:
                break
            payload = buffer[pos + head:pos + head + n]
            if masked:
                payload = unmask(payload, buffer[pos + head - 4:pos + head])
            frames.append((b0 & 0x0F, payload))
            pos += head + n
        self._buffer = buffer[pos:]
        return frames
