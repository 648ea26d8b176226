"""A backend in a process of its own, for fault tests that freeze, kill or restart it.

    python -m tests.backend_process [--port N] [--mode answer|silent|subprotocol]

``answer``: the ``ocpp``-library central system of :mod:`proxy.demo.peers` (answers
every CALL, hands out transactionIds from 1001). ``silent``: completes the
WebSocket handshake and answers pings (the library does) but never a CALL.
``subprotocol``: answers the handshake choosing ``ocpp2.0.1`` whatever was offered.

It prints one JSON object per line on stdout: ``listening`` (port), ``connected``
(charger, path, Basic-auth user) and ``frame`` (charger, direction, exact text).
SIGSTOP freezes it (a backend that stops reading and answering), SIGCONT thaws it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import sys
from typing import Any
from urllib.parse import unquote, urlsplit

import websockets

from proxy.demo.peers import SimBackend


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def basic_user(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization", "")
    if not value.startswith("Basic "):
        return None
    return base64.b64decode(value[6:]).decode().partition(":")[0]


async def answering(port: int) -> None:
    backend = SimBackend(port=port, subprotocols=("ocpp1.6", "ocpp2.0.1"),
                         on_frame=lambda cp, direction, text: emit(event="frame", charger=cp, direction=direction,
                                                                   text=text))
    original = backend._handle

    async def handle(websocket: Any) -> None:
        path = websocket.request.path
        charger = unquote(urlsplit(path).path.rstrip("/").rpartition("/")[2])
        headers = {k.lower(): v for k, v in websocket.request.headers.raw_items()}
        emit(event="connected", charger=charger, path=path, user=basic_user(headers))
        await original(websocket)

    backend._handle = handle  # type: ignore[method-assign]
    await backend.start()
    emit(event="listening", port=backend.port)
    await commands(backend)


async def commands(backend: SimBackend) -> None:
    """stdin: ``send CHARGER TEXT`` sends TEXT (a raw OCPP-J frame) to that charge point."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode():
        command, charger, text = line.rstrip("\n").split(" ", 2)
        if command == "send":
            await backend.send_raw(charger, text)
            emit(event="sent", charger=charger, text=text)
    await asyncio.Event().wait()


async def silent(port: int) -> None:
    async def handle(websocket: Any) -> None:
        path = websocket.request.path
        charger = unquote(urlsplit(path).path.rstrip("/").rpartition("/")[2])
        emit(event="connected", charger=charger, path=path, user=None)
        async for message in websocket:  # pings are answered by the library; CALLs never
            emit(event="frame", charger=charger, direction="received", text=message)

    server = await websockets.serve(handle, "127.0.0.1", port, subprotocols=["ocpp1.6", "ocpp2.0.1"],  # type: ignore[list-item]
                                    ping_interval=None)
    emit(event="listening", port=server.sockets[0].getsockname()[1])
    await asyncio.Event().wait()


async def wrong_subprotocol(port: int) -> None:
    """A raw HTTP/1.1 upgrade answer naming a subprotocol nobody offered."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = request.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        emit(event="connected", charger=lines[0].split()[1].rpartition("/")[2], path=lines[0].split()[1],
             user=basic_user(headers), offered=headers.get("sec-websocket-protocol"))
        accept = base64.b64encode(hashlib.sha1(
            (headers["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        writer.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: ocpp2.0.1\r\n\r\n").encode())
        await writer.drain()
        await reader.read()  # until the proxy gives up
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    emit(event="listening", port=server.sockets[0].getsockname()[1])
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=("answer", "silent", "subprotocol"), default="answer")
    args = parser.parse_args()
    run = {"answer": answering, "silent": silent, "subprotocol": wrong_subprotocol}[args.mode]
    try:
        asyncio.run(run(args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
