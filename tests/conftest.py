"""Shared fixtures: an asyncio thread for ocpp-library peers, a simulated backend,
and a way to start the proxy in-process on 127.0.0.1 with a config text."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, settings

from proxy.config import loads
from proxy.runtime.server import ProxyServer
from proxy.demo.peers import LoopThread, SimBackend
from tests.peers import in_loop
from tests.pgkit import PgCluster

# Speed is what bench/ measures. On a loaded CI machine a slow example is no finding about the
# code, so property tests have no per-example deadline and no too_slow health check.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One real PostgreSQL server for the whole run (started on first use, stopped and removed at the end)."""
    cluster = PgCluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A URL to a new, empty PostgreSQL database."""
    return pg_cluster.database()


@pytest.fixture
def peers() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
async def backend(peers: LoopThread) -> AsyncIterator[SimBackend]:
    sim = SimBackend()
    await in_loop(peers, sim.start())
    yield sim
    await in_loop(peers, sim.stop())


StartProxy = Callable[[str], Awaitable[ProxyServer]]


@pytest.fixture
def start_proxy(nursery: trio.Nursery, tmp_path: Path) -> StartProxy:
    """``await start_proxy(toml_text)`` → a serving ProxyServer.

    Defaults for tests: listen on 127.0.0.1:0, the offline queue in the test's tmp_path.
    """

    async def start(text: str) -> ProxyServer:
        if "listen" not in text.split("[backend]")[0]:
            text = text.replace("[server]", '[server]\nlisten = "127.0.0.1:0"', 1) if "[server]" in text \
                else '[server]\nlisten = "127.0.0.1:0"\n' + text
        if "data_dir" not in text:
            data = f'data_dir = "{tmp_path}/data"'
            text = text.replace("[offline]", f"[offline]\n{data}", 1) if "[offline]" in text \
                else f"{text}\n[offline]\n{data}\n"
        server = ProxyServer(loads(text))
        await nursery.start(server.serve)
        return server

    return start


def proxy_url(server: ProxyServer, cp_id: str, scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{server.ports[0]}/ocpp/{cp_id}"


def backend_config(backend: SimBackend, extra: str = "", chargers: tuple[str, ...] = ("CP1",)) -> str:
    entries = "".join(f'[[chargers]]\nid = "{cp}"\n' for cp in chargers)
    return f'[server]\n{extra}\n[backend]\nurl = "ws://127.0.0.1:{backend.port}/ocpp"\n{entries}'
