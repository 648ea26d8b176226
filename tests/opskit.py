"""Test support for the operations features: a raw OCPP-J backend on trio-websocket,
the proxy stack (server + metrics + monitor) in-process, and an HTTP client that is
not ours (urllib) for /metrics, /healthz and /readyz."""

from __future__ import annotations

import json
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Config, loads
from proxy.ops.metrics import Metrics, MetricsListener
from proxy.ops.monitor import Monitor
from proxy.runtime.server import ProxyServer


@dataclass
class RawBackend:
    """Answers every CALL with ``[3, id, {}]`` and records what it received, per charger."""

    port: int = 0
    received: dict[str, list[str]] = field(default_factory=dict)
    connections: dict[str, trio_websocket.WebSocketConnection] = field(default_factory=dict)
    closes: dict[str, int | None] = field(default_factory=dict)
    connected: trio.Event = field(default_factory=trio.Event)

    async def handler(self, request: trio_websocket.WebSocketRequest) -> None:
        charger = request.path.rstrip("/").rsplit("/", 1)[-1]
        ws = await request.accept(subprotocol=(request.proposed_subprotocols or [None])[0])
        self.connections[charger] = ws
        self.received.setdefault(charger, [])
        self.connected.set()
        try:
            while True:
                message = await ws.get_message()
                assert isinstance(message, str)
                self.received[charger].append(message)
                if message.startswith("[2,"):
                    msg_id = json.loads(message)[1]
                    await ws.send_message(json.dumps([3, msg_id, {}]))
        except trio_websocket.ConnectionClosed as exc:
            self.closes[charger] = exc.reason.code if exc.reason else None


async def read_to_end(stream: trio.SocketStream) -> bytes:
    """Everything the peer sends until it closes (bounded), then close our side."""
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            data += chunk
    await stream.aclose()
    return data


async def start_backend(nursery: trio.Nursery) -> RawBackend:
    backend = RawBackend()
    server = await nursery.start(trio_websocket.serve_websocket, backend.handler, "127.0.0.1", 0, None)
    backend.port = server.port
    return backend


def config_text(backend_port: int, extra: str = "", chargers: tuple[str, ...] = ("CP1",),
                offline: str = "") -> str:
    entries = "".join(f'[[chargers]]\nid = "{cp}"\n' for cp in chargers)
    data_dir = tempfile.mkdtemp(prefix="ocpp-proxy-test-")  # the offline queue, never in the repo
    return (f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\n{extra}\n'
            f'[backend]\nurl = "ws://127.0.0.1:{backend_port}/ocpp"\n'
            f'[metrics]\nlisten = "127.0.0.1:0"\n[offline]\ndata_dir = "{data_dir}"\n{offline}\n{entries}')


@dataclass
class Stack:
    """What cli.run_proxy builds, started in a test's nursery."""

    config: Config
    metrics: Metrics
    server: ProxyServer
    monitor: Monitor

    def url(self, charger: str) -> str:
        return f"ws://127.0.0.1:{self.server.ports[0]}/ocpp/{charger}"

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.monitor.ports[0]}{path}"


def build_stack(text: str, clock: Callable[[], float] = time.time) -> Stack:
    config = loads(text)
    metrics = Metrics((c.id for c in config.chargers), clock=clock)
    server = ProxyServer(config, listeners=[MetricsListener(metrics)])
    return Stack(config, metrics, server, Monitor(config, metrics, server, source="test.toml"))


async def start_stack(nursery: trio.Nursery, text: str, clock: Callable[[], float] = time.time) -> Stack:
    stack = build_stack(text, clock)
    await nursery.start(stack.monitor.serve)
    await nursery.start(stack.server.serve)
    return stack


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: str


def _get(url: str, method: str) -> Reply:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()},
                         response.read().decode())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode())


async def http_get(url: str, method: str = "GET") -> Reply:
    return await trio.to_thread.run_sync(_get, url, method)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[set[str], Samples]:
    """Family names and every sample, keyed by (sample name, labels)."""
    families: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families, samples


async def scrape(stack: Stack) -> tuple[set[str], Samples]:
    reply = await http_get(stack.http("/metrics"))
    assert reply.status == 200, reply
    return parse(reply.body)


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass
class ProxyProcess:
    process: trio.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    _buffer: bytes = b""

    async def wait_event(self, name: str, after: int = 0) -> dict[str, Any]:
        """Read the JSON log (stderr) until ``name`` appears among the events from index ``after`` on."""
        assert self.process.stderr is not None
        with trio.fail_after(20):
            while True:
                for event in self.events[after:]:
                    if event.get("event") == name:
                        return event
                chunk = await self.process.stderr.receive_some(65536)
                assert chunk, f"proxy exited before {name!r}: {self.events}"
                self._buffer += chunk
                *lines, self._buffer = self._buffer.split(b"\n")
                self.events += [json.loads(line) for line in lines if line.strip()]

    async def drain_log(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.receive_some(65536):
            self._buffer += chunk
        self.events += [json.loads(line) for line in self._buffer.split(b"\n") if line.strip()]
