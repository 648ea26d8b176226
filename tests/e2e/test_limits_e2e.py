"""Local load management end to end: an ``ocpp``-library backend and smart wallboxes
that keep their profiles and compute the OCPP 1.6 composite limit, through the
proxy on 127.0.0.1 (issue 5)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import trio
from ocpp.v16 import call

from proxy.config import loads
from proxy.loadmgmt.driver import Limiter
from proxy.runtime.relay import Listener, PairedSession
from proxy.runtime.server import ProxyServer
from proxy.demo.peers import LoopThread, SimBackend, connect_wallbox
from tests.conftest import StartProxy, proxy_url
from tests.peers import in_loop, wait_recorded
from tests.smart_wallbox import ProfileStore, SmartHandle, connect_smart

PID = 990001


def site_config(backend: SimBackend, *, site: str = "max_current = 32", chargers: dict[str, str] | None = None,
                timing: str = "ramp_up_interval = 0\nhysteresis = 0\nmin_hold_time = 0\ninterval = 2") -> str:
    entries = "".join(f'[[chargers]]\nid = "{cid}"\nmax_current = 32\n{more}\n'
                      for cid, more in (chargers or {"CP1": ""}).items())
    section = f"[site]\n{site}\n{timing}\n" if site is not None else ""
    return (f'[server]\ncall_timeout = 10\nping_interval = 0\n'
            f'[backend]\nurl = "ws://127.0.0.1:{backend.port}/ocpp"\n{section}{entries}')


async def settle(limiter: Limiter) -> None:
    with trio.fail_after(15):
        await limiter.wait_settled()


def profile(pid: int, level: int, purpose: str, limit: float, unit: str = "A", tx: int | None = None) -> dict[str, Any]:
    raw: dict[str, Any] = {"chargingProfileId": pid, "stackLevel": level, "chargingProfilePurpose": purpose,
                           "chargingProfileKind": "Absolute",
                           "chargingSchedule": {"startSchedule": "2026-01-01T00:00:00Z", "chargingRateUnit": unit,
                                                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}]}}
    if tx is not None:
        raw["transactionId"] = tx
    return raw


class Backend:
    """Drives the ocpp-library central system and mirrors what it installed (its intent)."""

    def __init__(self, peers: LoopThread, sim: SimBackend, cp_id: str, wallbox: SmartHandle) -> None:
        self.peers, self.sim, self.cp_id, self.wallbox = peers, sim, cp_id, wallbox
        self.intent = ProfileStore()

    async def set(self, connector: int, raw: dict[str, Any]) -> str:
        result = await in_loop(self.peers, self.sim.call(self.cp_id, call.SetChargingProfile(
            connector_id=connector, cs_charging_profiles=raw)))
        if result.status == "Accepted":
            self.intent.set(connector, raw)
        return str(result.status)

    async def clear(self, **criteria: Any) -> str:
        result = await in_loop(self.peers, self.sim.call(self.cp_id, call.ClearChargingProfile(**criteria)))
        wire = {"connectorId" if k == "connector_id" else "chargingProfilePurpose" if k == "charging_profile_purpose"
                else "stackLevel" if k == "stack_level" else k: v for k, v in criteria.items()}
        if result.status == "Accepted":
            self.intent.clear(wire)
        return str(result.status)

    def transactions(self, mapping: dict[int, int]) -> None:
        self.intent.transactions = dict(mapping)

    def limit(self) -> float | None:
        return self.intent.composite()


def expected(*limits: float | None) -> float | None:
    present = [v for v in limits if v is not None]
    return min(present) if present else None


def check_wire(handle: SmartHandle, sim: SimBackend, cp_id: str,
               since: tuple[int, int] = (0, 0)) -> list[tuple[str, str, dict[str, Any]]]:
    """The wire rules; returns the proxy's own CALLs as the wallbox received them.

    ``since``: how many frames the backend had sent and received for this id
    before this connection.
    """
    wire = handle.wire
    backend_sent = sim.recorders[cp_id].sent[since[0]:]
    backend_received = sim.recorders[cp_id].received[since[1]:]
    assert wire.overlaps == [], f"wallbox had two CALLs outstanding: {wire.overlaps}"
    calls = wire.calls_received()
    ids = [msg_id for msg_id, _, _ in calls]
    assert len(ids) == len(set(ids)), "message ids collided on the wallbox leg"
    assert all(len(msg_id) <= 36 for msg_id in ids)
    backend_calls = {m[1]: (m[2], json.dumps(m[3], sort_keys=True))
                     for m in (json.loads(t) for t in backend_sent) if m[0] == 2}
    # Backend CALLs whose id had to change on the wallbox leg (the backend used the
    # proxy's namespace): found by their content, which the proxy did not touch.
    remapped: dict[str, str] = {}
    for backend_id, content in backend_calls.items():
        if backend_id.startswith("ocpp-proxy:"):
            remapped.update({i: backend_id for i, a, p in calls
                             if (a, json.dumps(p, sort_keys=True)) == content and i != backend_id})
    from_backend = {i for i in backend_calls if not i.startswith("ocpp-proxy:")} | set(remapped)
    proxy_calls = [(i, a, p) for i, a, p in calls if i not in from_backend]
    proxy_ids = {i for i, _, _ in proxy_calls}
    assert all(i.startswith("ocpp-proxy:") for i in proxy_ids)
    answers_to_proxy = [t for t in wire.sent if json.loads(t)[1] in proxy_ids]
    assert len(answers_to_proxy) == len(proxy_ids)
    assert not set(answers_to_proxy) & set(backend_received), "the backend got a proxy CALL's answer"
    forwarded = []
    for text in wire.sent:
        msg_id = json.loads(text)[1]
        if msg_id in proxy_ids:
            continue
        forwarded.append(text.replace(json.dumps(msg_id), json.dumps(remapped[msg_id]), 1)
                         if msg_id in remapped else text)
    assert backend_received == forwarded  # everything else, in order, byte for byte
    return proxy_calls


class MinProbe:
    """Sets the EMS site limit and checks the wallbox ends up at min(backend, EMS, site 32 A)."""

    def __init__(self, limiter: Limiter, wallbox: Any, cs: Backend) -> None:
        self.limiter, self.wallbox, self.cs = limiter, wallbox, cs
        self.local: float | None = None  # EMS site limit; None: only the configured 32 A

    def ems(self, amps: float | None) -> None:
        self.local = amps
        self.limiter.engine.ems_site_limit(amps, trio.current_time())

    async def check(self) -> None:
        await settle(self.limiter)
        want = expected(self.cs.limit(), self.local, 32.0)
        assert self.wallbox.composite() == want, (self.wallbox.profiles(), self.cs.limit(), self.local)
        view = self.limiter.engine.charger_view("CP1")
        assert view is not None and view.effective_limit == want


async def test_effective_limit_is_min_of_backend_and_local(peers: LoopThread, backend: SimBackend,
                                                           start_proxy: StartProxy) -> None:
    server = await start_proxy(site_config(backend))
    limiter = server.limiter
    handle = await in_loop(peers, connect_smart(proxy_url(server, "CP1"), "CP1"))
    wallbox = handle.wallbox
    cs = Backend(peers, backend, "CP1", handle)
    await settle(limiter)
    assert wallbox.composite() == 32.0  # the site allows the charger's maximum

    probe = MinProbe(limiter, wallbox, cs)
    probe.ems(20)
    await probe.check()
    assert await cs.set(0, profile(11, 1, "TxDefaultProfile", 16)) == "Accepted"
    await probe.check()
    assert await cs.set(0, profile(12, 1, "ChargePointMaxProfile", 12)) == "Accepted"
    await probe.check()  # the proxy's own ChargePointMaxProfile now carries min(12, 20)
    probe.ems(10)
    await probe.check()
    tx = await in_loop(peers, wallbox.start_transaction())
    cs.transactions({1: tx})
    assert await cs.set(1, profile(13, 0, "TxProfile", 8, tx=tx)) == "Accepted"
    await probe.check()
    probe.ems(None)
    await probe.check()
    # A backend Clear that hits the proxy's profile too (by purpose): it is put back.
    assert await cs.clear(charging_profile_purpose="ChargePointMaxProfile") == "Accepted"
    await probe.check()
    assert PID in wallbox.profiles() and 12 not in wallbox.profiles()
    await in_loop(peers, wallbox.stop_transaction())
    cs.transactions({})
    await probe.check()
    # Watts from the backend, converted: 6900 W / (230 V x 3 phases) = 10 A.
    assert await cs.set(0, profile(14, 2, "TxDefaultProfile", 6900, unit="W")) == "Accepted"
    await probe.check()
    # An empty Clear wipes every profile on the wallbox; the proxy re-installs only its own.
    assert await cs.clear() == "Accepted"
    await probe.check()
    assert list(wallbox.profiles()) == [PID]

    # A burst: the backend installs profiles while the local limit moves under it.
    async def backend_burst() -> None:
        for n, amps in enumerate((18, 9, 25, 7, 14)):
            assert await cs.set(0, profile(20 + n, 3, "TxDefaultProfile", amps)) == "Accepted"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend_burst)
        for amps in (30, 12, 6, 22, 16, 24):
            probe.ems(amps)
            with trio.fail_after(10):
                await limiter.next_progress()
    await probe.check()

    # The backend uses an id from the proxy's namespace: both still arrive, no collision.
    answer = await in_loop(peers, backend.handlers["CP1"].call(call.GetConfiguration(key=["X"]),
                                                               unique_id="ocpp-proxy:1"))
    assert answer is not None
    own = check_wire(handle, backend, "CP1")
    assert own and all(a in ("SetChargingProfile", "ClearChargingProfile") for _, a, _ in own)
    assert not [p for _, a, p in own if a == "ClearChargingProfile" and p != {"id": PID}]
    await in_loop(peers, handle.close())


async def test_reapplied_after_reboot_and_reconnect(peers: LoopThread, backend: SimBackend,
                                                    start_proxy: StartProxy) -> None:
    server = await start_proxy(site_config(backend, site="max_current = 14"))
    store = ProfileStore()
    handle = await in_loop(peers, connect_smart(proxy_url(server, "CP1"), "CP1", store=store))
    await settle(server.limiter)
    assert handle.wallbox.composite() == 14.0
    assert await in_loop(peers, handle.wallbox.reboot()) == "Accepted"  # profiles lost
    await settle(server.limiter)
    assert handle.wallbox.composite() == 14.0
    before = len(handle.wire.calls_received())
    server.limiter.engine.ems_site_limit(20, trio.current_time())  # an input change, same limit
    await settle(server.limiter)
    assert len(handle.wire.calls_received()) == before  # unchanged limit: nothing re-sent
    check_wire(handle, backend, "CP1")
    await in_loop(peers, handle.close())
    with trio.fail_after(5):
        await server.wait_sessions(0)
    since = (len(backend.recorders["CP1"].sent), len(backend.recorders["CP1"].received))
    store.profiles.clear()  # a wallbox that forgets its profiles while away
    again = await in_loop(peers, connect_smart(proxy_url(server, "CP1"), "CP1", store=store))
    await settle(server.limiter)
    assert again.wallbox.composite() == 14.0
    check_wire(again, backend, "CP1", since)
    await in_loop(peers, again.close())


async def test_a_new_connection_replacing_an_old_one_is_managed(peers: LoopThread, backend: SimBackend,
                                                                start_proxy: StartProxy) -> None:
    """The same wallbox connects again before its old TCP connection is gone."""
    server = await start_proxy(site_config(backend, site="max_current = 14"))
    old = await in_loop(peers, connect_smart(proxy_url(server, "CP1"), "CP1"))
    await settle(server.limiter)
    assert old.wallbox.composite() == 14.0
    new = await in_loop(peers, connect_smart(proxy_url(server, "CP1"), "CP1"))
    await settle(server.limiter)
    assert new.wallbox.composite() == 14.0
    server.limiter.engine.ems_site_limit(9, trio.current_time())
    await settle(server.limiter)
    assert new.wallbox.composite() == 9.0 and old.wallbox.composite() == 14.0
    assert server.limiter.attached["CP1"] is server.sessions["CP1"]
    await in_loop(peers, new.close())
    await in_loop(peers, old.close())


async def test_wallbox_rejecting_max_profile_is_limited_through_tx_default(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy) -> None:
    server = await start_proxy(site_config(backend))
    limiter = server.limiter
    store = ProfileStore(reject_max_profile=True)
    handle = await in_loop(peers, connect_smart(proxy_url(server, "CP1"), "CP1", store=store))
    wallbox = handle.wallbox
    cs = Backend(peers, backend, "CP1", handle)
    probe = MinProbe(limiter, wallbox, cs)
    probe.ems(10)
    await probe.check()
    assert limiter.controls["CP1"].strategy == "tx-default"
    assert [p.profile["chargingProfilePurpose"] for p in wallbox.profiles().values()] == ["TxDefaultProfile"]
    assert await cs.set(0, profile(31, 2, "TxDefaultProfile", 20)) == "Accepted"
    await probe.check()  # clamped on its way: 10
    tx = await in_loop(peers, wallbox.start_transaction())
    cs.transactions({1: tx})
    assert await cs.set(1, profile(32, 0, "TxProfile", 8, tx=tx)) == "Accepted"
    await probe.check()  # 8
    probe.ems(6)
    await probe.check()  # both backend profiles re-sent clamped at 6
    probe.ems(None)
    await probe.check()  # the backend's own 8 again
    assert await cs.set(1, profile(33, 1, "TxProfile", 11040, unit="W", tx=tx)) == "Accepted"
    probe.ems(12)
    await probe.check()
    await in_loop(peers, wallbox.stop_transaction())
    cs.transactions({})
    await probe.check()
    assert await cs.clear(id=31) == "Accepted"
    await probe.check()  # the backend has no TxDefault left: the proxy's own carries the limit
    assert PID in wallbox.profiles()
    own = check_wire(handle, backend, "CP1")
    assert ("ChargePointMaxProfile" in json.dumps(own[0][2])) and len(own) > 3
    await in_loop(peers, handle.close())


async def test_disable_with_clear_removes_only_the_proxy_profile(peers: LoopThread, backend: SimBackend,
                                                                 start_proxy: StartProxy) -> None:
    text = site_config(backend, site="max_current = 10")
    server = await start_proxy(text)
    handle = await in_loop(peers, connect_smart(proxy_url(server, "CP1"), "CP1"))
    cs = Backend(peers, backend, "CP1", handle)
    await settle(server.limiter)
    assert await cs.set(0, profile(41, 1, "TxDefaultProfile", 16)) == "Accepted"
    assert await cs.set(0, profile(42, 1, "ChargePointMaxProfile", 20)) == "Accepted"
    await settle(server.limiter)
    assert sorted(handle.wallbox.profiles()) == [41, 42, PID] and handle.wallbox.composite() == 10.0

    server.reload(loads(text.replace('max_current = 32\n', 'max_current = 32\nenabled = false\n'
                                     'on_disable = "clear"\n').replace("[server]", '[server]\nlisten = "127.0.0.1:0"')))
    await settle(server.limiter)
    assert sorted(handle.wallbox.profiles()) == [41, 42]  # the backend's stay
    assert handle.wallbox.composite() == 16.0  # the wallbox runs on the backend's limits alone
    clears = [p for _, a, p in handle.wire.calls_received() if a == "ClearChargingProfile"]
    assert clears == [{"id": PID}]

    # "block" instead pauses it (limit 0) through the proxy's profile.
    server.reload(loads(text.replace('max_current = 32\n', 'max_current = 32\nenabled = false\n'
                                     'on_disable = "block"\n').replace("[server]", '[server]\nlisten = "127.0.0.1:0"')))
    await settle(server.limiter)
    assert handle.wallbox.composite() == 0.0
    assert server.sessions["CP1"].session.wallbox_outstanding == 0
    check_wire(handle, backend, "CP1")
    await in_loop(peers, handle.close())


async def test_three_wallboxes_share_the_site_limit(peers: LoopThread, backend: SimBackend,
                                                    start_proxy: StartProxy) -> None:
    text = site_config(backend, site="max_current = 32", chargers={"CP1": "", "CP2": "", "CP3": ""})
    server = await start_proxy(text)
    handles = {cp: await in_loop(peers, connect_smart(proxy_url(server, cp), cp)) for cp in ("CP1", "CP2", "CP3")}

    async def limits() -> dict[str, float | None]:
        await settle(server.limiter)
        return {cp: h.wallbox.composite() for cp, h in handles.items()}

    assert await limits() == {"CP1": 10.7, "CP2": 10.7, "CP3": 10.6}  # fair: 32 A in tenths
    server.reload(loads(text.replace('id = "CP1"\nmax_current = 32\n', 'id = "CP1"\nmax_current = 32\npriority = 1\n')
                        .replace("[server]", '[server]\nlisten = "127.0.0.1:0"')))
    # Every charger keeps its minimum; what is left goes to the higher priority first.
    assert await limits() == {"CP1": 20.0, "CP2": 6.0, "CP3": 6.0}
    await in_loop(peers, handles["CP3"].wallbox.call(call.StatusNotification(
        connector_id=1, error_code="NoError", status="Available")))
    assert await limits() == {"CP1": 26.0, "CP2": 6.0, "CP3": 0.0}  # no car: no share
    server.limiter.engine.ems_site_limit(15, trio.current_time())
    assert await limits() == {"CP1": 9.0, "CP2": 6.0, "CP3": 0.0}
    server.limiter.engine.ems_site_limit(10, trio.current_time())
    assert await limits() == {"CP1": 10.0, "CP2": 0.0, "CP3": 0.0}  # paused rather than starved
    view = server.limiter.engine.charger_view("CP2")
    assert view is not None and view.mode == "paused"  # no status yet: may have a car, gets none
    for cp, handle in handles.items():
        check_wire(handle, backend, cp)
    for handle in handles.values():  # (one leaving frees current for the others: new CALLs)
        await in_loop(peers, handle.close())


async def test_without_site_the_proxy_injects_and_rewrites_nothing(peers: LoopThread, backend: SimBackend,
                                                                   start_proxy: StartProxy) -> None:
    server = await start_proxy(site_config(backend, site=None))  # type: ignore[arg-type]
    handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
    await in_loop(peers, handle.wallbox.run_session())
    raw = ('[2,"b-1","SetChargingProfile",{"connectorId":0,"csChargingProfiles":{"chargingProfileId":1,'
           '"stackLevel":0,"chargingProfilePurpose":"TxDefaultProfile","chargingProfileKind":"Absolute",'
           '"chargingSchedule":{"chargingRateUnit":"A","chargingSchedulePeriod":[{"startPeriod":0,"limit":40.0}]}}}]')
    await in_loop(peers, backend.send_raw("CP1", raw))
    await wait_recorded(handle.recorder, lambda r: raw in r.received)
    session = server.sessions["CP1"].session
    assert not server.limiter.active and session.observe == frozenset() and session.taps == {}
    assert server.limiter.attached == {}
    assert handle.recorder.received == backend.recorders["CP1"].sent  # nothing added, nothing changed
    assert not any("ocpp-proxy:" in t for t in handle.recorder.received)
    await in_loop(peers, handle.close())


async def test_fail_closed_before_any_reading(peers: LoopThread, backend: SimBackend, nursery: trio.Nursery,
                                             tmp_path: Path) -> None:
    """A configured meter that has not been read: fallback; fail_closed makes it 0."""
    text = site_config(backend, site="max_current = 32\nfail_closed = true").replace(
        "[server]", '[server]\nlisten = "127.0.0.1:0"') + f'[offline]\ndata_dir = "{tmp_path}/data"\n'

    # A [meter] the test never lets the proxy poll (nothing listens there): readings are fed
    # to the engine directly, the way the meter poller does.
    config = loads(text + '[meter]\nmodbus = "127.0.0.1:9"\n')
    server = ProxyServer(config)
    await nursery.start(server.serve)
    handle = await in_loop(peers, connect_smart(proxy_url(server, "CP1"), "CP1"))
    await settle(server.limiter)
    assert handle.wallbox.composite() == 0.0
    server.limiter.engine.meter_reading((10.0, 10.0, 10.0), trio.current_time())
    await settle(server.limiter)
    assert handle.wallbox.composite() == 22.0
    await in_loop(peers, handle.close())


async def test_limits_are_published_as_metrics(peers: LoopThread, backend: SimBackend, nursery: trio.Nursery,
                                              tmp_path: Path) -> None:
    from tests.opskit import build_stack, scrape, value

    text = site_config(backend, site="max_current = 16").replace(
        "[server]", '[server]\nlisten = "127.0.0.1:0"') + '[metrics]\nlisten = "127.0.0.1:0"\n' \
        + f'[offline]\ndata_dir = "{tmp_path}/data"\n'
    stack = build_stack(text)
    stack.server.limiter.sinks.append(stack.metrics)  # as cli.run_proxy does
    await nursery.start(stack.monitor.serve)
    await nursery.start(stack.server.serve)
    handle = await in_loop(peers, connect_smart(stack.url("CP1"), "CP1"))
    cs = Backend(peers, backend, "CP1", handle)
    assert await cs.set(0, profile(51, 1, "TxDefaultProfile", 10)) == "Accepted"
    await in_loop(peers, handle.wallbox.call(call.MeterValues(connector_id=1, meter_value=[{
        "timestamp": "2026-11-25T10:00:00Z", "sampledValue": [
            {"value": "9.5", "measurand": "Current.Import", "phase": "L1", "unit": "A"},
            {"value": "9.7", "measurand": "Current.Import", "phase": "L2", "unit": "A"}]}])))
    await settle(stack.server.limiter)
    _, samples = await scrape(stack)
    limit = "ocpp_proxy_charger_limit_amperes"
    assert value(samples, limit, charger="CP1", source="backend") == 10.0
    assert value(samples, limit, charger="CP1", source="local") == 10.0
    assert value(samples, limit, charger="CP1", source="effective") == 10.0
    assert value(samples, "ocpp_proxy_charger_current_amperes", charger="CP1", phase="L2") == 9.7
    assert value(samples, "ocpp_proxy_site_limit_amperes", source="config") == 16.0
    assert value(samples, "ocpp_proxy_site_headroom_amperes", phase="L1") == 16.0
    await in_loop(peers, handle.close())


async def test_frames_the_limiter_cannot_read_are_forwarded_unchanged(peers: LoopThread, backend: SimBackend,
                                                                       start_proxy: StartProxy) -> None:
    server = await start_proxy(site_config(backend, chargers={"CP1": 'strategy = "tx-default"'}))
    handle = await in_loop(peers, connect_smart(proxy_url(server, "CP1"), "CP1"))
    await settle(server.limiter)
    bad_profile = '[2,"bad-1","SetChargingProfile",{"connectorId":"x","csChargingProfiles":42}]'
    await in_loop(peers, backend.send_raw("CP1", bad_profile))
    bad_meter = '[2,"bad-2","MeterValues",{"connectorId":1,"meterValue":[{"sampledValue":[{"value":[1]}]}]}]'
    await in_loop(peers, handle.wire.send(bad_meter))
    await wait_recorded(backend.recorders["CP1"], lambda r: bad_meter in r.received)
    # The wallbox answered the broken profile (a CALLERROR): it had it, exactly as sent.
    await wait_recorded(backend.recorders["CP1"], lambda r: any('"bad-1"' in t for t in r.received))
    assert bad_profile in handle.wire.received
    server.limiter.engine.ems_site_limit(7, trio.current_time())  # still managed afterwards
    await settle(server.limiter)
    assert handle.wallbox.composite() == 7.0
    await in_loop(peers, handle.close())


class UpstreamWatch(Listener):
    def __init__(self) -> None:
        self.down = trio.Event()

    def upstream_state(self, paired: PairedSession, name: str, up: bool, reason: str) -> None:
        if not up:
            self.down.set()


async def test_load_managed_while_the_backend_is_down(peers: LoopThread, backend: SimBackend,
                                                      nursery: trio.Nursery, tmp_path: Path) -> None:
    text = site_config(backend, site="max_current = 20").replace(
        "[server]", '[server]\nlisten = "127.0.0.1:0"') + f'[offline]\ndata_dir = "{tmp_path}/data"\n'
    watch = UpstreamWatch()
    server = ProxyServer(loads(text), listeners=[watch])
    await nursery.start(server.serve)
    store = ProfileStore()
    handle = await in_loop(peers, connect_smart(proxy_url(server, "CP1"), "CP1", store=store))
    await settle(server.limiter)
    assert handle.wallbox.composite() == 20.0
    # The backend goes away; the wallbox stays connected. (Its stop() completes once the
    # proxy lets go of the old upstream socket, when this wallbox leaves: awaited at the end.)
    stopping = peers.submit(backend.stop())
    with trio.fail_after(10):
        await watch.down.wait()
    server.limiter.engine.ems_site_limit(11, trio.current_time())
    await settle(server.limiter)
    assert handle.wallbox.composite() == 11.0
    # A reboot while offline: the proxy answered the BootNotification itself, so it
    # re-applies at once instead of waiting for a backend answer that cannot come.
    assert await in_loop(peers, handle.wallbox.reboot()) == "Accepted"
    assert server.limiter.controls["CP1"].ready
    await settle(server.limiter)
    assert handle.wallbox.composite() == 11.0
    assert server.sessions["CP1"].session.offline_mode
    await in_loop(peers, handle.close())
    await trio.to_thread.run_sync(functools.partial(stopping.result, 15))


async def test_grid_meter_over_modbus_sets_the_headroom(peers: LoopThread, backend: SimBackend,
                                                        nursery: trio.Nursery, tmp_path: Path) -> None:
    """A simulated SDM630 on Modbus TCP: house load = grid - charger; stale meter → fallback."""
    from proxy.ops.logs import get_logger
    from proxy.modbus.maps import METERS
    from proxy.modbus.service import run_modbus
    from proxy.demo.peers import SimModbusDevice

    sdm630 = METERS["sdm630"]

    def grid(l1: float, l2: float, l3: float) -> dict[int, int]:
        registers: dict[int, int] = {}
        for field_, amps in zip(sdm630.currents, (l1, l2, l3), strict=True):
            for offset, word in enumerate(field_.encode(amps)):
                registers[field_.address + offset] = word
        return registers

    meter = SimModbusDevice(input=grid(30, 30, 30))
    meter_port = await in_loop(peers, meter.start())
    text = site_config(backend, site="max_current = 40").replace(
        "[server]", '[server]\nlisten = "127.0.0.1:0"') + (
        f'[offline]\ndata_dir = "{tmp_path}/data"\n'
        f'[meter]\nmodbus = "127.0.0.1:{meter_port}"\npoll_interval = 0.05\nstale_after = 0.5\n')
    config = loads(text)
    server = ProxyServer(config)
    await nursery.start(server.serve)
    await nursery.start(run_modbus, config, server.limiter.engine, server.limiter.poke, get_logger())
    handle = await in_loop(peers, connect_smart(proxy_url(server, "CP1"), "CP1"))

    async def limit_becomes(value: float) -> None:
        wait = functools.partial(handle.wallbox.wait_composite, value, 15.0)
        assert await trio.to_thread.run_sync(wait, abandon_on_cancel=True), handle.wallbox.profiles()

    await limit_becomes(10.0)  # 40 A fuse - 30 A house (the charger draws nothing yet)
    # The car starts and takes 9.8 of its 10 A; the meter sees it at once, MeterValues
    # later: the proxy must not mistake the car for house load and pause it.
    await in_loop(peers, handle.wallbox.call(call.StatusNotification(
        connector_id=1, error_code="NoError", status="Charging")))
    meter.input.update(grid(39.8, 39.8, 39.8))
    limiter = server.limiter
    with trio.fail_after(10):  # the engine has read the new grid value (polled every 50 ms)
        while limiter.engine.site_view(trio.current_time()).house_load != (29.8, 29.8, 29.8):
            await limiter.next_progress()
    await settle(limiter)
    assert handle.wallbox.composite() == 10.0
    await in_loop(peers, handle.wallbox.call(call.MeterValues(connector_id=1, meter_value=[{
        "timestamp": "2026-11-25T10:00:00Z", "sampledValue": [
            {"value": "9.8", "measurand": "Current.Import", "phase": p, "unit": "A"} for p in ("L1", "L2", "L3")]}])))
    await settle(limiter)
    assert handle.wallbox.composite() == 10.0
    meter.input.update(grid(45.8, 39.8, 39.8))  # the house takes 6 A more on L1: 4 A left, below 6 A
    await limit_becomes(0.0)
    meter.failing = True  # no readings: after stale_after the fallback (min_current) applies
    await limit_becomes(6.0)
    view = server.limiter.engine.charger_view("CP1")
    assert view is not None and view.fallback
    await in_loop(peers, handle.close())
    await in_loop(peers, meter.stop())
