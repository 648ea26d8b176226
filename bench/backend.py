"""A trivial OCPP backend for the benchmarks: answers every CALL at once (asyncio).

    python -m bench.backend PORT        # prints "ready PORT", then obeys stdin lines

It accepts any path with subprotocol ``ocpp1.6`` and answers a CALL with a
CALLRESULT carrying the same id (``{"currentTime": ...}`` for Heartbeat,
``{}`` otherwise). It records when each upstream handshake completed, so the
runner can tell when a relay had paired a wallbox. Stdin commands: ``accepted``
prints ``{"accepted": {path: monotonic seconds}}`` and forgets them;
``quit`` exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from bench import wire
from bench.sysinfo import raise_nofile

HEARTBEAT = b"Heartbeat"
TIME_PAYLOAD = b'{"currentTime":"2026-01-01T00:00:00.000Z"}'


def answer(payload: bytes) -> bytes:
    """CALLRESULT text for a CALL (a fixed-shape scan, as cheap as the load generator)."""
    i = payload.index(b'"')
    j = payload.index(b'"', i + 1)
    k = payload.index(b'"', j + 1)
    action = payload[k + 1:payload.index(b'"', k + 1)]
    body = TIME_PAYLOAD if action == HEARTBEAT else b"{}"
    return b'[3,"' + payload[i + 1:j] + b'",' + body + b"]"


class BackendConnection(asyncio.Protocol):
    def __init__(self, accepted: dict[str, float]) -> None:
        self.accepted = accepted
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.reader: wire.FrameReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            path, headers = wire.parse_request(self.head[:end])
            data = self.head[end + 4:]
            self.head = b""
            assert self.transport is not None
            self.transport.write(wire.server_response(headers))
            self.accepted[path] = time.monotonic()
            self.reader = wire.FrameReader()
            if not data:
                return
        out = []
        for opcode, payload in self.reader.feed(data):
            if opcode == wire.TEXT:
                out.append(wire.frame(wire.TEXT, answer(payload), mask=False))
            elif opcode == wire.PING:
                out.append(wire.frame(wire.PONG, payload, mask=False))
            elif opcode == wire.CLOSE:
                out.append(wire.frame(wire.CLOSE, payload[:2], mask=False))
                assert self.transport is not None
                self.transport.write(b"".join(out))
                self.transport.close()
                return
        if out:
            assert self.transport is not None
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    accepted: dict[str, float] = {}
    server = await loop.create_server(lambda: BackendConnection(accepted), "127.0.0.1", port,
                                      backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"ready {bound}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        if line == "accepted":
            print(json.dumps({"accepted": accepted}), flush=True)
            accepted.clear()
        elif line == "quit":
            break
    server.close()


def main() -> None:
    raise_nofile()
    asyncio.run(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))


if __name__ == "__main__":
    main()
