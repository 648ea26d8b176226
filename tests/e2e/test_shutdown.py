"""SIGTERM/SIGINT during traffic: `python -m proxy run` exits 0, wallboxes see 1001 (issue 8)."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio_websocket
from trio_websocket import open_websocket_url

from tests.opskit import ProxyProcess, RawBackend, read_to_end, running_proxy, start_backend

ROOT = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def proxy_process(tmp_path: Path, backend_port: int, chargers: int,
                        close_timeout: float = 5.0) -> AsyncIterator[tuple[ProxyProcess, int]]:
    entries = "".join(f'[[chargers]]\nid = "CP{n}"\n' for n in range(chargers))
    config = tmp_path / "proxy.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\nclose_timeout = {close_timeout}\n'
                      f'[backend]\nurl = "ws://127.0.0.1:{backend_port}/ocpp"\n'
                      f'[metrics]\nlisten = "127.0.0.1:0"\n[log]\nformat = "json"\n'
                      f'[offline]\ndata_dir = "{tmp_path}/data"\n{entries}')
    async with running_proxy(config) as proxy:
        yield proxy, await proxy.port()


@dataclass
class Wallbox:
    name: str
    sent: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    close_code: int | None = None


async def run_wallbox(url: str, wallbox: Wallbox, warmed_up: trio.MemorySendChannel[str]) -> None:
    """Heartbeats back to back until the proxy closes the connection."""
    try:
        async with open_websocket_url(url, subprotocols=["ocpp1.6"]) as ws:
            n = 0
            while True:
                text = f'[2,"{wallbox.name}-{n}","Heartbeat",{{}}]'
                wallbox.sent.append(text)
                await ws.send_message(text)
                answer = await ws.get_message()
                assert isinstance(answer, str)
                wallbox.received.append(answer)
                n += 1
                if n == 3:
                    await warmed_up.send(wallbox.name)
    except trio_websocket.ConnectionClosed as exc:
        wallbox.close_code = exc.reason.code if exc.reason else None


def assert_in_order_nothing_skipped(sent: list[str], received: list[str]) -> None:
    """What arrived is what was sent, in order; only the frame in flight at the close may be missing."""
    assert received == sent[:len(received)]
    assert len(received) >= len(sent) - 1


async def test_sigterm_during_traffic(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend: RawBackend = await start_backend(nursery)
    count = 5
    async with proxy_process(tmp_path, backend.port, count) as (proxy, port):
        wallboxes = [Wallbox(f"CP{n}") for n in range(count)]
        send, receive = trio.open_memory_channel[str](count)
        async with trio.open_nursery() as clients:
            for wallbox in wallboxes:
                clients.start_soon(run_wallbox, f"ws://127.0.0.1:{port}/ocpp/{wallbox.name}", wallbox, send)
            with trio.fail_after(20):
                for _ in range(count):
                    await receive.receive()
            proxy.process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await proxy.process.wait() == 0
        await proxy.drain_log()

    assert [w.close_code for w in wallboxes] == [1001] * count
    assert {backend.closes[w.name] for w in wallboxes} == {1001}
    for wallbox in wallboxes:
        assert len(wallbox.received) >= 3
        assert_in_order_nothing_skipped(wallbox.sent, backend.received[wallbox.name])
        answers = [json.dumps([3, json.loads(text)[1], {}]) for text in backend.received[wallbox.name]]
        assert_in_order_nothing_skipped(answers, wallbox.received)
    names = [e["event"] for e in proxy.events]
    assert names.index("stopping") < names.index("stopped")
    assert next(e for e in proxy.events if e["event"] == "stopping")["signal"] == "SIGTERM"
    assert "stop_timeout" not in names


HANDSHAKE = (b"GET /ocpp/CP0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
             b"Sec-WebSocket-Protocol: ocpp1.6\r\n\r\n")


async def stuck_wallbox(proxy: ProxyProcess, port: int) -> trio.SocketStream:
    """A wallbox that completes the handshake and then never reads again (no close reply)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(HANDSHAKE)
    with trio.fail_after(10):
        handshake = await stream.receive_some(4096)
    assert handshake.startswith(b"HTTP/1.1 101 ")
    await proxy.wait_event("session_opened")
    return stream


async def test_sigint_with_a_wallbox_that_never_answers_the_close(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A wallbox that ignores the close handshake cannot hold the shutdown: close_timeout bounds it."""
    backend = await start_backend(nursery)
    async with proxy_process(tmp_path, backend.port, 1, close_timeout=0.5) as (proxy, port):
        stream = await stuck_wallbox(proxy, port)
        proxy.process.send_signal(signal.SIGINT)
        with trio.fail_after(20):  # a guard, not a speed assertion
            assert await proxy.process.wait() == 0
        await proxy.drain_log()
        rest = await read_to_end(stream)
    # The proxy did send its close frame (opcode 8, unmasked) with code 1001 before giving up.
    assert rest[:1] == b"\x88" and rest[2:4] == (1001).to_bytes(2, "big")
    names = [e["event"] for e in proxy.events]
    assert "stopped" in names and "stopping_now" not in names
    assert backend.closes["CP0"] == 1001


async def test_second_signal_stops_at_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    """With a long close_timeout and a stuck wallbox, a second SIGTERM ends the drain."""
    backend = await start_backend(nursery)
    async with proxy_process(tmp_path, backend.port, 1, close_timeout=60) as (proxy, port):
        stream = await stuck_wallbox(proxy, port)
        proxy.process.send_signal(signal.SIGTERM)
        await proxy.wait_event("session_closing")  # draining, waiting for a close reply that never comes
        proxy.process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):  # far below 2 x close_timeout: only the second signal explains it
            assert await proxy.process.wait() == 0
        await proxy.drain_log()
        await read_to_end(stream)
    names = [e["event"] for e in proxy.events]
    assert names.index("stopping") < names.index("stopping_now") < names.index("stopped")


async def test_port_in_use_fails_start_up_with_exit_1(tmp_path: Path) -> None:
    taken = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = taken[0].socket.getsockname()[1]
    config = tmp_path / "proxy.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\n[backend]\nurl = "ws://127.0.0.1:1/ocpp"\n'
                      '[metrics]\nlisten = "127.0.0.1:0"\n[log]\nformat = "json"\n'
                      f'[offline]\ndata_dir = "{tmp_path}/data"\n')
    with trio.fail_after(20):
        result = await trio.run_process([sys.executable, "-m", "proxy", "run", "--config", str(config)],
                                        cwd=ROOT, capture_stderr=True, check=False)
    for listener in taken:
        await listener.aclose()
    assert result.returncode == 1
    events = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    failed = [e for e in events if e["event"] == "startup_failed"]
    assert failed and "in use" in failed[0]["error"]


async def test_metrics_can_be_turned_off(nursery: trio.Nursery, tmp_path: Path) -> None:
    """`[metrics] listen = ""`: no monitoring port, the proxy itself runs and stops as usual."""
    backend = await start_backend(nursery)
    config = tmp_path / "proxy.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\n[backend]\nurl = "ws://127.0.0.1:{backend.port}/ocpp"\n'
                      '[metrics]\nlisten = ""\n[log]\nformat = "json"\n[[chargers]]\nid = "CP0"\n'
                      f'[offline]\ndata_dir = "{tmp_path}/data"\n')
    async with running_proxy(config) as proxy:
        port = await proxy.port()
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ocpp/CP0", subprotocols=["ocpp1.6"]) as ws:
            await ws.send_message('[2,"1","Heartbeat",{}]')
            with trio.fail_after(5):
                assert await ws.get_message() == '[3, "1", {}]'
            assert await proxy.stop() == 0
        await proxy.drain_log()
    assert "metrics_listening" not in [e["event"] for e in proxy.events]
