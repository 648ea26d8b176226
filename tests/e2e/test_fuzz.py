"""Hostile wallboxes: fuzzed frames and handshakes never hurt other sessions (issue 7).

Every fuzzed frame gets a CALLERROR, is dropped with a log line (strict mode),
or closes its own session; a control wallbox keeps round-tripping through the
same proxy the whole time, and the proxy keeps running.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from typing import Any

import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from proxy.messages.ocppj import classify, strict_problem
from proxy.demo.peers import LoopThread, SimBackend
from tests.conftest import StartProxy, backend_config, proxy_url
from tests.opskit import wait_until

VALID = '[2,"ok-1","Heartbeat",{}]'

hostile_frames = st.one_of(
    st.text(max_size=300),
    st.builds(lambda n: f'[2,"{"x" * n}","Heartbeat",{{}}]', st.integers(37, 5000)),  # huge ids
    st.builds(lambda cut: VALID[:cut], st.integers(1, len(VALID) - 1)),  # truncated JSON
    st.builds(lambda v: json.dumps([2, "t-1", "Heartbeat", v]), st.one_of(st.integers(), st.text(), st.lists(
        st.integers(), max_size=3))),  # wrong payload types
    st.builds(lambda v: json.dumps([v, "t-2", "Heartbeat", {}]), st.one_of(st.integers(5, 99), st.text())),
    st.builds(lambda v: json.dumps(v), st.lists(st.integers() | st.text(max_size=5), max_size=6)),
    st.just('[2,"t-3","Heartbeat",{"a":}]'),
    st.just('[2,"t-4","Heartbeat",{}]]'),
)


def is_valid_ocpp(text: str) -> bool:
    frame = classify(text)
    return frame.kind is not None and strict_problem(frame) is None


async def control_round_trip(control: trio_websocket.WebSocketConnection, n: int) -> None:
    with trio.fail_after(10):
        await control.send_message(f'[2,"control-{n}","Heartbeat",{{}}]')
        answer = json.loads(await control.get_message())
    assert answer[0] == 3 and answer[1] == f"control-{n}"


# A list here replaces the suite profile's (tests/conftest.py), so too_slow is named again.
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(frames=st.lists(hostile_frames.filter(lambda t: not is_valid_ocpp(t)), min_size=1, max_size=4))
async def test_fuzzed_frames_get_callerror_or_drop_and_spare_other_sessions(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy, frames: list[str]) -> None:
    server = await fuzz_proxy(start_proxy, backend)
    async with trio_websocket.open_websocket_url(proxy_url(server, "CTRL"), subprotocols=["ocpp1.6"]) as control, \
            trio_websocket.open_websocket_url(proxy_url(server, "FUZZ"), subprotocols=["ocpp1.6"]) as fuzz:
        for n, text in enumerate(frames):
            with capture_logs() as logs:
                await fuzz.send_message(text)
                await control_round_trip(control, n)  # other sessions are untouched
                frame = classify(text)
                if frame.is_call and frame.msg_id and len(frame.msg_id) <= 36:
                    with trio.fail_after(10):
                        error = json.loads(await fuzz.get_message())
                    assert error[:3] == [4, frame.msg_id, "FormationViolation"]
                else:  # the two sessions are separate tasks: wait for the drop rather than assume an order
                    await wait_until(lambda: any(e["event"] == "malformed_frame" and e["dropped"] for e in logs))
        assert "FUZZ" in server.sessions  # a misbehaving wallbox is answered, not disconnected


_SERVERS: dict[int, Any] = {}


async def fuzz_proxy(start_proxy: StartProxy, backend: SimBackend) -> Any:
    """One strict proxy per test function (hypothesis runs many examples on it)."""
    key = id(start_proxy)
    if key not in _SERVERS:
        _SERVERS.clear()
        _SERVERS[key] = await start_proxy(backend_config(backend, 'strict = true\naccept_unknown = true\n'
                                                                  'handshake_timeout = 0.5'))
    return _SERVERS[key]


async def raw_websocket(port: int, cp_id: str) -> trio.SocketStream:
    """A client speaking WebSocket by hand, to send what no library would."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all((f"GET /ocpp/{cp_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           "Sec-WebSocket-Protocol: ocpp1.6\r\n\r\n").encode())
    response = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in response:
            response += await stream.receive_some(4096)
    assert response.startswith(b"HTTP/1.1 101")
    return stream


def masked_text_frame(payload: bytes, declared: int | None = None) -> bytes:
    length = len(payload) if declared is None else declared
    mask = os.urandom(4)
    header = bytes([0x81]) + (bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + struct.pack("!H", length))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def close_code(stream: trio.SocketStream) -> int | None:
    """The code of the close frame the proxy sends (None if it just drops TCP)."""
    data = b""
    with trio.fail_after(5):
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return None
            data += chunk
            if len(data) >= 4 and data[0] & 0x0F == 0x8:
                return int(struct.unpack("!H", data[2:4])[0])


async def test_invalid_utf8_truncated_frames_and_slow_handshakes(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy) -> None:
    server = await start_proxy(backend_config(backend, 'accept_unknown = true\nhandshake_timeout = 0.5'))
    port = server.ports[0]
    async with trio_websocket.open_websocket_url(proxy_url(server, "CTRL"), subprotocols=["ocpp1.6"]) as control:
        # Invalid UTF-8 in a text frame: the WebSocket layer ends that session with 1007
        # (trio-websocket drops the TCP connection without sending its close frame).
        with capture_logs() as logs:
            bad = await raw_websocket(port, "UTF8")
            await bad.send_all(masked_text_frame(b'[2,"u","Heartbeat",{"x":"\xff\xfe"}]'))
            assert await close_code(bad) in (1007, None)
            await control_round_trip(control, 1)
        closing = [e for e in logs if e["event"] == "session_closing" and e.get("charger") == "UTF8"]
        assert closing and closing[0]["code"] == 1007

        # A frame cut off mid-way, then the TCP connection drops: only that session ends.
        cut = await raw_websocket(port, "CUT")
        await cut.send_all(masked_text_frame(b'[2,"c","Heart', declared=60))
        await cut.aclose()
        await control_round_trip(control, 2)

        # Slow handshakes: 30 connections that never finish theirs, and one that trickles.
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(30)]
        trickle = await trio.open_tcp_stream("127.0.0.1", port)
        await trickle.send_all(b"GET /ocpp/SLOW HTTP/1.1\r\n")
        await control_round_trip(control, 3)  # the accept loop is not blocked by them
        async with trio_websocket.open_websocket_url(proxy_url(server, "NEW"), subprotocols=["ocpp1.6"]) as new:
            await control_round_trip(new, 4)
        for stream in [*silent, trickle]:
            with trio.fail_after(5):  # each is closed after handshake_timeout
                assert await stream.receive_some(1) == b""
            await stream.aclose()
        await control_round_trip(control, 5)
    with trio.fail_after(10):
        await server.wait_sessions(0)
