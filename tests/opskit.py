"""Test support: a raw OCPP-J backend on trio-websocket, the proxy stack (server + metrics +
monitor) in-process, the proxy and a backend as processes, an HTTP client that is not ours
(urllib) for /metrics, /healthz and /readyz, one wait helper and one free port."""

from __future__ import annotations

import inspect
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
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
class JsonLinesProcess:
    """A child process that writes one JSON object per line on ``stream`` (stderr or stdout)."""

    process: trio.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    _buffer: bytes = b""
    stream_name: str = "stderr"

    @property
    def _stream(self) -> trio.abc.ReceiveStream:
        stream = self.process.stderr if self.stream_name == "stderr" else self.process.stdout
        assert stream is not None
        return stream

    _following: bool = False
    _changed: trio.Event = field(default_factory=trio.Event)

    async def _read(self) -> bool:
        chunk = await self._stream.receive_some(65536)
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        self.events += [json.loads(line) for line in lines if line.strip()]
        self._changed.set()
        self._changed = trio.Event()
        return bool(chunk)

    async def follow(self) -> None:
        """Read everything as it comes (a chatty child must never block on a full pipe); until EOF."""
        self._following = True
        while await self._read():
            pass

    def follow_in(self, nursery: trio.Nursery) -> None:
        """:meth:`follow` in a task of ``nursery``; from now on :meth:`wait_for` waits on that task."""
        self._following = True
        nursery.start_soon(self.follow)

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], after: int = 0,
                       timeout: float = 20) -> dict[str, Any]:
        """Read until an event from index ``after`` on satisfies ``predicate``."""
        with trio.fail_after(timeout):
            while True:
                for event in self.events[after:]:
                    if predicate(event):
                        return event
                if self._following:
                    await self._changed.wait()
                else:
                    assert await self._read(), f"process exited while waiting: {self.events[-20:]}"

    async def wait_event(self, name: str, after: int = 0, timeout: float = 20) -> dict[str, Any]:
        """Read the JSON lines until ``name`` appears among the events from index ``after`` on."""
        return await self.wait_for(lambda event: event.get("event") == name, after, timeout)

    async def drain_log(self) -> None:
        while chunk := await self._stream.receive_some(65536):
            self._buffer += chunk
        self.events += [json.loads(line) for line in self._buffer.split(b"\n") if line.strip()]


ROOT = Path(__file__).resolve().parents[1]


class ProxyProcess(JsonLinesProcess):
    """``python -m proxy run --config CONFIG [ARGS]`` as an operator runs it; its JSON log is on stderr.

    Start it with :meth:`start`, or for a block with :func:`running_proxy`, which
    never leaves it running.
    """

    def __init__(self, process: trio.Process) -> None:
        super().__init__(process, stream_name="stderr")

    @classmethod
    async def start(cls, config: Path, *args: str, cwd: Path = ROOT, python: Sequence[str] = (sys.executable,),
                    **options: Any) -> ProxyProcess:
        """``options`` go to ``trio.lowlevel.open_process`` (``env``, ``preexec_fn``)."""
        process = await trio.lowlevel.open_process([*python, "-m", "proxy", "run", "--config", str(config), *args],
                                                   cwd=cwd, stderr=subprocess.PIPE, **options)
        return cls(process)

    async def port(self, timeout: float = 20) -> int:
        """The wallbox port, once the proxy logged ``listening``."""
        return int((await self.wait_event("listening", timeout=timeout))["ports"][0])

    async def stop(self, timeout: float = 20) -> int:
        """SIGTERM (a graceful shutdown), then its exit code, within ``timeout``."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(timeout):
            return await self.process.wait()

    async def close(self) -> None:
        """Make sure it is gone: SIGKILL if it still runs (a test that failed half-way)."""
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


@asynccontextmanager
async def running_proxy(config: Path, *args: str, **start: Any) -> AsyncIterator[ProxyProcess]:
    """:meth:`ProxyProcess.start` for the block; killed afterwards if the block did not stop it."""
    proxy = await ProxyProcess.start(config, *args, **start)
    try:
        yield proxy
    finally:
        await proxy.close()


async def launch_proxy(config: Path) -> tuple[ProxyProcess, int]:
    """``python -m proxy run --config CONFIG`` (JSON log); returns it and its wallbox port once listening."""
    proxy = await ProxyProcess.start(config)
    return proxy, await proxy.port()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0,
                     interval: float = 0.01) -> None:
    """Wait for a state change the test cannot subscribe to (another thread's or process's, a
    scraped value); ``condition`` may be a coroutine function. Fails after ``timeout``."""
    with trio.fail_after(timeout):
        while True:
            result = condition()
            if await result if inspect.isawaitable(result) else result:
                return
            await trio.sleep(interval)


class BackendProcess(JsonLinesProcess):
    """``python -m tests.backend_process``: a backend that can be frozen (SIGSTOP) and killed."""

    def __init__(self, process: trio.Process) -> None:
        super().__init__(process, stream_name="stdout")
        self.port = 0

    @classmethod
    async def start(cls, mode: str = "answer", port: int = 0) -> BackendProcess:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tests.backend_process", "--mode", mode, "--port", str(port)],
            cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        backend = cls(process)
        backend.port = int((await backend.wait_event("listening"))["port"])
        return backend

    def received(self, charger: str) -> list[str]:
        return [e["text"] for e in self.events
                if e.get("event") == "frame" and e["charger"] == charger and e["direction"] == "received"]

    async def wait_received(self, charger: str, count: int, timeout: float = 20) -> list[str]:
        """Wait until the backend received ``count`` frames from ``charger``."""
        await self.wait_for(lambda _: len(self.received(charger)) >= count, timeout=timeout)
        return self.received(charger)

    async def send(self, charger: str, text: str) -> None:
        """Send a raw frame to a connected charge point (the backend's own CALL)."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(f"send {charger} {text}\n".encode())
        await self.wait_for(lambda e: e.get("event") == "sent" and e["text"] == text)

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    async def stop(self) -> None:
        self.process.send_signal(signal.SIGCONT)
        self.process.kill()
        await self.process.wait()
