"""Several proxies behind HAProxy with the state in PostgreSQL, end to end on loopback (issue 22).

Real parts only: Debian's HAProxy (installed on first use) with deploy/haproxy.cfg rendered for
loopback ports (:mod:`tests.haproxykit`), a PostgreSQL server from the pgserver wheel, two
``python -m proxy run`` processes sharing it, the ``ocpp``-library central system in a process
of its own (tests/backend_process.py), and raw OCPP 1.6J wallboxes that reconnect and resend
what was unanswered (:mod:`tests.cluster_wallbox`).
"""

from __future__ import annotations

import json
import signal
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import trio
import psycopg
import trio_websocket

from tests.cluster_wallbox import ClusterWallbox, worst_sum
from tests.haproxykit import Haproxy, Upstream, client_cert, running_haproxy, write_certs
from tests.opskit import BackendProcess, ProxyProcess, http_get, wait_until

SITE = 400.0     # A per phase: 50 wallboxes x 8 A
MAX = 16.0       # A per phase and wallbox: 50 x 16 A = 800 A would blow the fuse twice over
WALLBOXES = 50
LEASE = 3.0      # [store] lease_seconds: a killed proxy's wallboxes are served elsewhere this much later
GRACE = 8.0      # [server] drain_grace of the SIGTERM test


def proxy_config(directory: Path, backend_port: int, store_url: str, chargers: list[str], *,
                 site: bool = True, server: str = "", charger_extra: str = "", drain_grace: float = 3) -> Path:
    """One proxy process's configuration: loopback ports chosen by the OS, the shared store and
    the charger lease under the directory's name."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = "".join(f'[[chargers]]\nid = "{cp}"\nmax_current = {MAX:g}\nmin_current = 6\n{charger_extra}'
                      for cp in chargers)
    site_section = (f"[site]\nmax_current = {SITE:g}\ninterval = 1\nramp_up_interval = 0\nhysteresis = 0\n"
                    "min_hold_time = 0\n") if site else ""
    path = directory / "proxy.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\ndrain_grace = {drain_grace:g}\nper_address_pending = 0\n'
        f'per_address_rate = 0\nper_address_handshakes = 0\n{server}\n'
        f'[backend]\nurl = "ws://127.0.0.1:{backend_port}/ocpp"\n'
        f'[metrics]\nlisten = "127.0.0.1:0"\n[log]\nformat = "json"\n'
        f'[offline]\ndata_dir = "{directory / "data"}"\n'
        f'[store]\nurl = "{store_url}"\nprocess = "{directory.name}"\nlease_seconds = {LEASE:g}\n'
        f'{site_section}{entries}')
    return path


@dataclass
class Cluster:
    backend: BackendProcess
    proxies: dict[str, ProxyProcess]
    haproxy: Haproxy
    etc: Path

    def served_by(self, since: dict[str, int] | None = None) -> dict[str, list[str]]:
        """Charger → the proxies that opened a session for it (each proxy once, in the proxies' order),
        counting the events from ``since`` (a :meth:`mark`) on."""
        served: dict[str, list[str]] = {}
        for name, proxy in self.proxies.items():
            for event in proxy.events[(since or {}).get(name, 0):]:
                if event.get("event") == "session_opened" and name not in served.get(event["charger"], []):
                    served.setdefault(event["charger"], []).append(name)
        return served

    def mark(self) -> dict[str, int]:
        """Where each proxy's log is now (for :meth:`served_by`)."""
        return {name: len(proxy.events) for name, proxy in self.proxies.items()}

    async def wait_sessions(self, chargers: list[str], timeout: float = 60) -> None:
        """Until every charger in ``chargers`` has had a session on some proxy (two logs: polled)."""
        await wait_until(lambda: set(chargers) <= set(self.served_by()), timeout=timeout, interval=0.05)


async def start_proxy(name: str, config: Path, nursery: trio.Nursery,
                      started: dict[str, ProxyProcess]) -> Upstream:
    """Start it, put it in ``started`` at once (whoever owns that closes it, even if it never
    listens), wait until it listens; its wallbox and check ports."""
    proxy = started[name] = await ProxyProcess.start(config)
    port = await proxy.port()
    check = int((await proxy.wait_event("metrics_listening"))["ports"][0])
    nursery.start_soon(proxy.follow)  # from now on everything it logs is read as it comes
    return Upstream(name, port, check)


@asynccontextmanager
async def running_cluster(tmp_path: Path, store_url: str, chargers: list[str], *, chargers_map: str = "",
                          site: bool = True, server: str = "", charger_extra: str = "",
                          drain_grace: float = 3) -> AsyncIterator[Cluster]:
    etc = tmp_path / "haproxy"
    write_certs(etc)
    backend = await BackendProcess.start()
    proxies: dict[str, ProxyProcess] = {}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.follow)
            upstreams = []
            for name in ("proxy1", "proxy2"):
                config = proxy_config(tmp_path / name, backend.port, store_url, chargers, site=site, server=server,
                                      charger_extra=charger_extra, drain_grace=drain_grace)
                upstreams.append(await start_proxy(name, config, nursery, proxies))
            async with running_haproxy(upstreams, etc, chargers_map) as haproxy:
                await haproxy.wait_states({"proxy1": "UP", "proxy2": "UP"})
                yield Cluster(backend, proxies, haproxy, etc)
            nursery.cancel_scope.cancel()
    finally:
        for proxy in proxies.values():
            await proxy.close()
        await backend.stop()


# --- routing -----------------------------------------------------------------------------------------


async def test_a_charger_always_reaches_the_same_proxy_and_a_site_map_keeps_a_site_together(
        tmp_path: Path, pg_url: str) -> None:
    chargers = [f"CP{n:02d}" for n in range(12)]
    site_a = chargers[:6]
    mapping = "".join(f"{cp} site-a\n" for cp in site_a)
    async with running_cluster(tmp_path, pg_url, chargers, chargers_map=mapping, site=False) as cluster:
        rounds = []
        for _ in range(2):  # connect everyone, close, connect again: the same proxy each time
            mark = cluster.mark()
            async with trio.open_nursery() as nursery:
                for cp in chargers:
                    nursery.start_soon(_connect_once, cluster.haproxy.url(cp))
            rounds.append(cluster.served_by(mark))
    first, second = rounds
    assert set(first) == set(chargers) and first == second, rounds
    assert all(len(proxies) == 1 for proxies in first.values()), first
    served = first
    assert len({served[cp][0] for cp in site_a}) == 1, "a site's chargers are split over proxies"
    # By charge point id the others spread over both proxies (12 ids on a consistent hash ring).
    assert {served[cp][0] for cp in chargers} == {"proxy1", "proxy2"}, served


async def _connect_once(url: str) -> None:
    async with trio_websocket.open_websocket_url(url, subprotocols=["ocpp1.6"]) as ws:
        await ws.send_message('[2,"h1","Heartbeat",{}]')
        answer = json.loads(await ws.get_message())
        assert answer[:2] == [3, "h1"], answer


# --- draining on SIGTERM ------------------------------------------------------------------------------


async def test_sigterm_turns_readyz_503_haproxy_takes_the_proxy_out_then_its_wallboxes_move(
        tmp_path: Path, pg_url: str) -> None:
    chargers = [f"CP{n:02d}" for n in range(8)]
    # The grace must outlast HAProxy's two failed checks (2 s at a quiet moment): generous here,
    # as this machine may be loaded.
    async with running_cluster(tmp_path, pg_url, chargers, site=False, drain_grace=GRACE) as cluster:
        async with trio.open_nursery() as nursery:
            boxes = [ClusterWallbox(cp, cluster.haproxy.url(cp), meters=400, meter_interval=0.05)
                     for cp in chargers]
            for box in boxes:
                nursery.start_soon(box.serve)
            await cluster.wait_sessions(chargers)
            served = cluster.served_by()
            mark = cluster.mark()
            leaving = cluster.proxies["proxy1"]
            mine = [cp for cp in chargers if served[cp] == ["proxy1"]]
            assert mine, served
            leaving.process.send_signal(signal.SIGTERM)
            draining = await leaving.wait_event("draining")
            assert draining["seconds"] == GRACE
            ready = await http_get(f"http://127.0.0.1:{cluster.haproxy.upstreams[0].check_port}/readyz")
            assert ready.status == 503 and json.loads(ready.body)["reason"] == "shutting down"
            # HAProxy takes it out while its sessions still run (no session_closed yet) ...
            await cluster.haproxy.wait_states({"proxy1": "DOWN", "proxy2": "UP"}, timeout=10)
            assert not [e for e in leaving.events if e.get("event") == "session_closed"]
            # ... then the proxy closes them with 1001 and they come back through HAProxy on proxy2.
            with trio.fail_after(30):
                assert await leaving.process.wait() == 0
            await cluster.proxies["proxy2"].wait_for(
                lambda _: all(cluster.served_by(mark).get(cp) == ["proxy2"] for cp in mine), timeout=30)
            nursery.cancel_scope.cancel()
    closes = [e for e in leaving.events if e.get("event") == "session_closed"]
    assert len(closes) == len(mine) and all(e["code"] == 1001 for e in closes), closes
    # HAProxy never refused one (it knew before the wallboxes came back). proxy2 may refuse a
    # wallbox that is back before proxy1 has released its lease (503 with Retry-After): served
    # at its next try.
    refusals = [r for box in boxes for r in box.refusals]
    assert all(r.startswith("ConnectionRejected 503 retry-after=") for r in refusals), refusals
    reasons = {e["reason"] for e in cluster.proxies["proxy2"].events if e.get("event") == "handshake_refused"}
    assert reasons <= {"charger_leased_elsewhere"}, reasons


# --- TLS at HAProxy and passed through ----------------------------------------------------------------


def _wallbox_tls(certs: Path, cert: tuple[str, str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / "chargers-ca.pem"))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


async def _tls_outcome(url: str, context: ssl.SSLContext) -> str:
    try:
        async with trio_websocket.open_websocket_url(url, ssl_context=context, subprotocols=["ocpp1.6"],
                                                     connect_timeout=10) as ws:
            await ws.send_message('[2,"h1","Heartbeat",{}]')
            return "ok" if json.loads(await ws.get_message())[0] == 3 else "no answer"
    except trio_websocket.ConnectionRejected as exc:
        return f"rejected {exc.status_code}"
    except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError, ssl.SSLError) as exc:
        return type(exc).__name__


async def test_tls_terminated_at_haproxy_checks_the_client_certificate_and_its_cn(
        tmp_path: Path, pg_url: str) -> None:
    chargers = ["CP1", "CP2"]
    async with running_cluster(tmp_path, pg_url, chargers, site=False) as cluster:
        certs = cluster.etc / "certs"
        url = cluster.haproxy.url("CP1", "wss_terminated")
        assert await _tls_outcome(url, _wallbox_tls(certs, client_cert(certs, "CP1"))) == "ok"
        # CN of another charger: HAProxy refuses the upgrade (the proxy would not know).
        assert await _tls_outcome(url, _wallbox_tls(certs, client_cert(certs, "CP2"))) == "rejected 403"
        # No certificate: the TLS handshake fails at HAProxy ("verify required").
        assert await _tls_outcome(url, _wallbox_tls(certs, None)) != "ok"
        served = cluster.served_by()
    assert served == {"CP1": [served["CP1"][0]]}  # only the good one reached a proxy
    opened = [e for p in cluster.proxies.values() for e in p.events if e.get("event") == "session_opened"]
    assert len(opened) == 1


async def test_tls_passed_through_lets_the_proxy_check_the_client_certificate(
        tmp_path: Path, pg_url: str) -> None:
    etc = tmp_path / "haproxy"
    certs = write_certs(etc)
    server = (f'tls = "detect"\ncert = "{certs / "server.crt"}"\nkey = "{certs / "server.key"}"\n'
              f'client_ca = ["{certs / "chargers-ca.pem"}"]')
    async with running_cluster(tmp_path, pg_url, ["CP1", "CP2"], site=False, server=server) as cluster:
        await cluster.haproxy.wait_states({"proxy1": "UP", "proxy2": "UP"}, backend="proxies_tls")
        url = cluster.haproxy.url("CP1", "wss_passthrough")
        assert await _tls_outcome(url, _wallbox_tls(certs, client_cert(certs, "CP1"))) == "ok"
        # The proxy, not HAProxy, refuses a certificate whose CN is another charger's.
        assert await _tls_outcome(url, _wallbox_tls(certs, client_cert(certs, "CP2"))) == "rejected 403"
    events = [e for p in cluster.proxies.values() for e in p.events]
    assert [e["reason"] for e in events if e.get("event") == "handshake_refused"] == ["certificate_cn_mismatch"]
    assert len([e for e in events if e.get("event") == "session_opened"]) == 1


# --- kill -9 mid-transaction --------------------------------------------------------------------------


@dataclass
class FuseWatch:
    """Every wallbox's limit after every change, as the wallboxes hold them."""

    limits: dict[str, float] = field(default_factory=dict)
    history: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    changed: trio.Event = field(default_factory=trio.Event)

    def __call__(self, charger: str, limit: float) -> None:
        self.limits[charger] = limit
        self.history.append((trio.current_time(), dict(self.limits)))
        self.changed.set()
        self.changed = trio.Event()

    async def until_total(self, amps: float) -> None:
        while sum(self.limits.values()) < amps:
            await self.changed.wait()


def leases_of(store_url: str, owner: str) -> dict[str, datetime]:
    """Charger → when its lease held by ``owner`` runs out, as the database says."""
    with psycopg.connect(store_url) as db:
        rows = db.execute("SELECT charger, expires FROM leases WHERE owner = %s", (owner,)).fetchall()
    return {charger: expires for charger, expires in rows}


def opened_at(proxy: ProxyProcess, after: int) -> dict[str, datetime]:
    """Charger → when ``proxy`` first opened a session for it, from its log's event ``after`` on."""
    opened: dict[str, datetime] = {}
    for event in proxy.events[after:]:
        if event.get("event") == "session_opened":
            opened.setdefault(event["charger"], datetime.fromisoformat(event["timestamp"]))
    return opened


@pytest.mark.parametrize("routing", ["site", "charger"])
async def test_kill_9_mid_transaction_every_frame_reaches_the_backend_and_the_fuse_holds(
        tmp_path: Path, pg_url: str, routing: str) -> None:
    """50 wallboxes in transactions with signed meter values; one proxy is killed with SIGKILL.

    ``site``: chargers.map puts the whole site on one proxy (deploy/chargers.map), which is killed:
    all 50 move. ``charger``: routed by charge point id, the site is split over both proxies and
    the one serving more of it is killed.
    """
    chargers = [f"KW{n:03d}" for n in range(WALLBOXES)]
    mapping = "".join(f"{cp} site-koeln\n" for cp in chargers) if routing == "site" else ""
    watch = FuseWatch()
    with trio.fail_after(240):
        async with running_cluster(tmp_path, pg_url, chargers, chargers_map=mapping) as cluster:
            boxes = {cp: ClusterWallbox(cp, cluster.haproxy.url(cp), meters=30, meter_interval=0.25,
                                        max_current=MAX, on_limit=watch) for cp in chargers}
            async with trio.open_nursery() as nursery:
                for box in boxes.values():
                    nursery.start_soon(box.serve)
                # Mid-transaction: every wallbox has its transaction, two meter values answered and
                # its first limit from the proxy.
                for box in boxes.values():
                    while box.meters_answered < 2 or not box.profiles_received:
                        await box.progressed.wait()
                if routing == "site":  # and charging: the site's current handed out
                    await watch.until_total(0.9 * SITE)
                served = cluster.served_by()
                count = Counter(served[cp][0] for cp in chargers)
                victim = count.most_common(1)[0][0]
                moved = [cp for cp in chargers if served[cp] == [victim]]
                mark = cluster.mark()
                cluster.proxies[victim].process.kill()
                killed_at = trio.current_time()
                await cluster.proxies[victim].process.wait()
                # Its leases as it left them: it can renew none any more.
                leases = await trio.to_thread.run_sync(leases_of, pg_url, victim)
                for box in boxes.values():
                    await box.done.wait()
                after_kill = cluster.served_by(mark)
                await cluster.backend.wait_for(
                    lambda _: all(_calls_at_backend(cluster.backend, cp)[-1:] == [box.sent[-1]]
                                  for cp, box in boxes.items()), timeout=30)
    # Where the wallboxes went.
    survivor = next(name for name in cluster.proxies if name != victim)
    if routing == "site":
        assert set(count) == {victim}, count  # the whole site on one proxy
    assert all(after_kill.get(cp) == [survivor] for cp in moved), {cp: after_kill.get(cp) for cp in moved}
    assert all(boxes[cp].connections >= 2 for cp in moved)
    # One process at a time: the killed proxy held a lease for each of its chargers, and the
    # survivor opened none of their sessions before that lease ran out (the database's time and
    # the survivor's log, one clock on this machine). A wallbox back earlier is refused with 503
    # naming the holder, and only the killed one's wallboxes are.
    assert {key for key in leases if key in boxes} == set(moved), (sorted(leases), moved)
    survivor_opened = opened_at(cluster.proxies[survivor], mark[survivor])
    early = {cp: (survivor_opened[cp], leases[cp]) for cp in moved if survivor_opened[cp] < leases[cp]}
    assert not early, early
    refused = [e for e in cluster.proxies[survivor].events if e.get("event") == "handshake_refused"]
    assert {e["reason"] for e in refused} <= {"charger_leased_elsewhere"}, refused
    assert {e["charger"] for e in refused} <= set(moved) and all(victim in e["detail"] for e in refused), refused
    # Besides those, HAProxy's 502 for a handshake the killed proxy took with it (its connection
    # closed with no answer), and only for its wallboxes.
    assert all(r.startswith("ConnectionRejected 503 retry-after=") for cp in chargers if cp not in moved
               for r in boxes[cp].refusals)
    assert all(r.startswith("ConnectionRejected 503 retry-after=") or r == "ConnectionRejected 502 from haproxy"
               for cp in moved for r in boxes[cp].refusals), [boxes[cp].refusals for cp in moved]
    # Every CALL reached the backend, byte for byte, in the order the wallbox sent it.
    duplicates: dict[str, list[str]] = {}
    for cp, box in boxes.items():
        received = _calls_at_backend(cluster.backend, cp)
        assert _first_occurrences(received) == _first_occurrences(box.sent), cp
        ids = Counter(json.loads(text)[1] for text in received)
        duplicates[cp] = [msg_id for msg_id, n in ids.items() if n > 1]
    # At-least-once (docs/offline.md): a frame reaches the backend twice only when it was in
    # flight at the kill, unanswered, and the wallbox sent it again after its reconnect.
    for cp, repeated in duplicates.items():
        assert set(repeated) <= set(boxes[cp].resent), (cp, repeated, boxes[cp].resent)
    # The fuse: what the wallboxes hold never adds up to more than the site's limit, from the
    # moment each had its first limit, across the kill and the move.
    settled = next(t for t, limits in watch.history if len(limits) == WALLBOXES)
    worst = worst_sum([(t, limits) for t, limits in watch.history if t >= settled])
    assert worst <= SITE + 1e-6, f"the wallboxes held {worst} A on a {SITE} A fuse (kill at {killed_at:.1f})"


def _calls_at_backend(backend: BackendProcess, charger: str) -> list[str]:
    return [text for text in backend.received(charger) if text.startswith("[2,")]


def _first_occurrences(texts: list[str]) -> list[str]:
    seen: set[str] = set()
    ordered = []
    for text in texts:
        if text not in seen:
            seen.add(text)
            ordered.append(text)
    return ordered
