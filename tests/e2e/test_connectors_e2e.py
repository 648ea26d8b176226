"""Connectors as load points end to end (issue 24): one two-connector ``ocpp``-library wallbox
(tests/smart_wallbox.py), two cars, through the proxy on 127.0.0.1 to an ``ocpp``-library backend.

Site 20 A; the wallbox 32 A, connector 1 one priority above connector 2. Both cars charging:
14 A and 6 A (both minimums, the rest to the higher priority). The limits are read on the
wallbox's side: its frames as received are replayed into a fresh profile store written from
the specification (not the proxy's profile code) and the OCPP composite is computed per
connector (min of the ChargePointMaxProfile on connector 0 and the connector's TxProfile, else
TxDefaultProfile). Then pausing one connector leaves the other charging: car 2 stops (connector
1 gets the whole 20 A, connector 2 0 A), and a reload disabling connector 1 (it drops to 0 A
while connector 2's new car charges at 20 A). MeterValues are attributed per connectorId.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import trio
from ocpp.v16 import call
from structlog.testing import capture_logs

from proxy.config import loads
from proxy.demo.peers import LoopThread, SimBackend
from proxy.demo.peers_v2 import SimCsms, StationHandle, connect_station, current_values
from proxy.ops.metrics import Metrics
from proxy.runtime.server import ProxyServer
from tests.conftest import StartProxy, proxy_url
from tests.e2e.test_fuse_e2e import fuse_metric
from tests.opskit import launch_proxy
from tests.peers import in_loop
from tests.smart_wallbox import ProfileStore, SmartHandle, connect_smart
from tests.station_v2 import composite, installed

SITE = 20.0


def connectors_config(backend: SimBackend, data_dir: Path, *, disable_first: bool = False) -> str:
    return (f'[server]\nlisten = "127.0.0.1:0"\ncall_timeout = 10\nping_interval = 0\n'
            f'[backend]\nurl = "ws://127.0.0.1:{backend.port}/ocpp"\n'
            f'[offline]\ndata_dir = "{data_dir}"\n'
            f'[site]\nmax_current = {SITE:g}\nramp_up_interval = 0\nhysteresis = 0\nmin_hold_time = 0\ninterval = 2\n'
            '[[chargers]]\nid = "DUO"\nmax_current = 32\nmin_current = 6\n'
            f'[[chargers.connectors]]\nid = 1\npriority = 1\nenabled = {"false" if disable_first else "true"}\n'
            '[[chargers.connectors]]\nid = 2\n')


def replayed(handle: SmartHandle) -> ProfileStore:
    """The profiles the wallbox received, applied in order to a fresh store (transactions as it has them)."""
    store = ProfileStore(transactions=dict(handle.wallbox.store.transactions))
    for _, action, payload in handle.wire.calls_received():
        if action == "SetChargingProfile":
            store.set(payload["connectorId"], payload["csChargingProfiles"])
        elif action == "ClearChargingProfile":
            store.clear(payload)
    return store


def limits(handle: SmartHandle) -> dict[int, float | None]:
    """Per connector, the composite limit of the profiles the wallbox received."""
    store = replayed(handle)
    return {n: store.composite(n) for n in (1, 2)}


async def until_limits(handle: SmartHandle, server: ProxyServer, wanted: dict[int, float],
                       timeout: float = 20.0) -> None:
    """Wait until the received profiles compute to ``wanted`` and the proxy has nothing left to send."""
    with trio.move_on_after(timeout):
        while True:
            if limits(handle) == wanted and server.limiter.settled():
                return
            with trio.move_on_after(0.2):
                await server.limiter.next_progress()
    raise AssertionError(f"limits {limits(handle)}, wanted {wanted}")


async def meter(peers: LoopThread, handle: SmartHandle, connector: int, amps: float) -> None:
    sampled = [{"value": f"{amps:.1f}", "measurand": "Current.Import", "phase": p, "unit": "A"}
               for p in ("L1", "L2", "L3")]
    await in_loop(peers, handle.wallbox.call(call.MeterValues(
        connector_id=connector, meter_value=[{"timestamp": "2026-11-27T10:00:00Z", "sampledValue": sampled}])))


async def test_two_cars_on_one_wallbox_get_per_connector_limits(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy, tmp_path: Path) -> None:
    server = await start_proxy(connectors_config(backend, tmp_path / "data"))
    handle = await in_loop(peers, connect_smart(proxy_url(server, "DUO"), "DUO"))
    for n in (1, 2):
        await in_loop(peers, handle.wallbox.call(call.StatusNotification(connector_id=n, error_code="NoError",
                                                                         status="Available")))
    await in_loop(peers, handle.wallbox.start_transaction(1))
    await in_loop(peers, handle.wallbox.start_transaction(2))

    # different priorities, different limits per connector
    await until_limits(handle, server, {1: 14.0, 2: 6.0})
    received = [payload for _, action, payload in handle.wire.calls_received() if action == "SetChargingProfile"]
    by_connector = {p["connectorId"]: p["csChargingProfiles"] for p in received}
    assert by_connector[0]["chargingProfilePurpose"] == "ChargePointMaxProfile"
    assert {by_connector[n]["chargingProfilePurpose"] for n in (1, 2)} == {"TxDefaultProfile"}
    assert handle.wire.overlaps == []  # one CALL at a time on the wallbox's connection
    assert handle.wallbox.store.composite(1) == 14.0 and handle.wallbox.store.composite(2) == 6.0
    views = server.limiter.engine.connector_views("DUO")
    assert (views[1].local_limit, views[2].local_limit) == (14.0, 6.0)
    assert views[1].mode == views[2].mode == "charging"

    # measured currents per connector, from MeterValues' connectorId
    await meter(peers, handle, 1, 13.8)
    await meter(peers, handle, 2, 5.9)
    views = server.limiter.engine.connector_views("DUO")
    assert views[1].currents == (13.8, 13.8, 13.8) and views[2].currents == (5.9, 5.9, 5.9)

    # car 2 leaves: connector 1 gets the site's 20 A, connector 2 nothing, and connector 1 keeps charging
    await in_loop(peers, handle.wallbox.stop_transaction(2))
    await until_limits(handle, server, {1: 20.0, 2: 0.0})
    views = server.limiter.engine.connector_views("DUO")
    assert views[1].mode == "charging" and views[1].transaction and views[2].mode == "idle"
    assert 1 in handle.wallbox.store.transactions

    # a new car on connector 2, and a reload disables connector 1: it is held at 0 A, connector 2 charges
    await in_loop(peers, handle.wallbox.start_transaction(2))
    await until_limits(handle, server, {1: 14.0, 2: 6.0})
    server.reload(loads(connectors_config(backend, tmp_path / "data", disable_first=True)))
    await until_limits(handle, server, {1: 0.0, 2: 20.0})
    views = server.limiter.engine.connector_views("DUO")
    assert views[1].mode == "blocked" and views[2].mode == "charging"
    assert handle.wire.overlaps == []
    await in_loop(peers, handle.close())


# --- OCPP 2.0.1: EVSEs as load points ---------------------------------------------------------------

async def until_evse_limits(handle: StationHandle, server: ProxyServer, wanted: dict[int, float],
                            timeout: float = 20.0) -> None:
    """Wait until the profiles the station received compute to ``wanted`` per EVSE (tests/station_v2.py)."""
    def seen() -> dict[int, float | None]:
        profiles = installed(handle.recorder.received)
        return {n: composite(profiles, evse=n) for n in wanted}

    with trio.move_on_after(timeout):
        while True:
            if seen() == wanted and server.limiter.settled():
                return
            with trio.move_on_after(0.2):
                await server.limiter.next_progress()
    raise AssertionError(f"limits {seen()}, wanted {wanted}")


async def car(peers: LoopThread, handle: StationHandle, evse: int, event: str, amps: float | None = None) -> None:
    """A TransactionEvent of the car on ``evse`` (its transaction ``tx-<evse>``), with currents when given."""
    c = handle.calls
    values = None if amps is None else [current_values((amps, amps, amps))]
    state = {"Started": "Charging", "Updated": "Charging", "Ended": "EVConnected"}[event]
    await in_loop(peers, handle.send(c.TransactionEvent(
        event_type=event, timestamp="2026-11-27T10:00:00Z", seq_no=evse * 10 + len(event),
        trigger_reason={"Started": "Authorized", "Updated": "MeterValuePeriodic", "Ended": "EVDeparted"}[event],
        transaction_info={"transaction_id": f"tx-{evse}", "charging_state": state},
        evse={"id": evse, "connector_id": 1}, meter_value=values,
        id_token={"id_token": f"T{evse}", "type": "ISO14443"} if event == "Started" else None)))


async def test_two_cars_on_one_ocpp201_station_get_per_evse_limits(
        peers: LoopThread, start_proxy: StartProxy, tmp_path: Path) -> None:
    csms = SimCsms(subprotocol="ocpp2.0.1")
    await in_loop(peers, csms.start())
    try:
        text = connectors_config(backend=csms, data_dir=tmp_path / "data").replace('"DUO"', '"CS2"')
        server = await start_proxy(text)
        handle = await in_loop(peers, connect_station(proxy_url(server, "CS2"), "CS2"))
        await in_loop(peers, handle.boot())
        for n in (1, 2):
            await in_loop(peers, handle.send(handle.calls.StatusNotification(
                timestamp="2026-11-27T10:00:00Z", connector_status="Occupied", evse_id=n, connector_id=1)))
        await car(peers, handle, 1, "Started")
        await car(peers, handle, 2, "Started")
        await until_evse_limits(handle, server, {1: 14.0, 2: 6.0})
        sets = [json.loads(t)[3] for t in handle.recorder.received if '"SetChargingProfile"' in t]
        assert {(s["evseId"], s["chargingProfile"]["chargingProfilePurpose"]) for s in sets} >= {
            (0, "ChargingStationMaxProfile"), (1, "TxDefaultProfile"), (2, "TxDefaultProfile")}
        # measured currents per EVSE, from TransactionEvent's evse
        await car(peers, handle, 1, "Updated", 13.7)
        await car(peers, handle, 2, "Updated", 5.8)
        views = server.limiter.engine.connector_views("CS2")
        assert views[1].currents == (13.7, 13.7, 13.7) and views[2].currents == (5.8, 5.8, 5.8)
        # the car on EVSE 2 leaves: EVSE 1 keeps charging with the site's 20 A
        await car(peers, handle, 2, "Ended")
        await in_loop(peers, handle.send(handle.calls.StatusNotification(
            timestamp="2026-11-27T10:00:00Z", connector_status="Available", evse_id=2, connector_id=1)))
        await until_evse_limits(handle, server, {1: 20.0, 2: 0.0})
        assert server.limiter.engine.connector_views("CS2")[1].mode == "charging"
        await in_loop(peers, handle.close())
    finally:
        await in_loop(peers, csms.stop())


async def test_a_reload_that_lists_the_connectors_makes_them_load_points(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy, tmp_path: Path) -> None:
    """One load point first (both cars share the wallbox's limit), then a reload lists the connectors."""
    whole = connectors_config(backend, tmp_path / "data").split("[[chargers.connectors]]")[0]
    server = await start_proxy(whole)
    handle = await in_loop(peers, connect_smart(proxy_url(server, "DUO"), "DUO"))
    await in_loop(peers, handle.wallbox.start_transaction(1))
    await in_loop(peers, handle.wallbox.start_transaction(2))
    await until_limits(handle, server, {1: 20.0, 2: 20.0})  # the wallbox's 20 A, one ChargePointMaxProfile
    assert server.limiter.fuse.charger_ids() == ["DUO"]
    server.reload(loads(connectors_config(backend, tmp_path / "data")))
    await until_limits(handle, server, {1: 14.0, 2: 6.0})
    assert server.limiter.fuse.charger_ids() == ["DUO#1", "DUO#2"]
    assert handle.wire.overlaps == []
    await in_loop(peers, handle.close())


# --- a backend profile whose answer was lost with the connection ----------------------------------------------

def lost_answer_config(backend: SimBackend, data_dir: Path, *, disable_first: bool = False) -> str:
    """DUO under tx-default (its connectors carry the limits) next to CP2, a 16 A wallbox, on the 20 A site."""
    duo = connectors_config(backend, data_dir, disable_first=disable_first).replace(
        'min_current = 6\n[[chargers.connectors]]', 'min_current = 6\nstrategy = "tx-default"\n[[chargers.connectors]]', 1)
    return duo + '[[chargers]]\nid = "CP2"\nmax_current = 16\nmin_current = 6\n'


async def drop_unanswered(handle: SmartHandle) -> None:
    """The connection goes with the wallbox's answer still unsent (its handler is cancelled mid-wait)."""
    handle.task.cancel()
    await handle.websocket.close()
    await asyncio.gather(handle.task, return_exceptions=True)


def may_draw(handle: SmartHandle, connector: int, top: float) -> float:
    """What a connector may draw by the profiles the wallbox really holds (its own store: no profile = top)."""
    with handle.wallbox.lock:
        limit = handle.wallbox.store.composite(connector)
    return top if limit is None else min(top, limit)


async def until_held(handle: SmartHandle, server: ProxyServer, wanted: dict[int, float],
                     timeout: float = 20.0) -> None:
    """Wait until the profiles the wallbox holds compute to ``wanted`` and the proxy has nothing left to send."""
    with trio.move_on_after(timeout):
        while True:
            if {n: may_draw(handle, n, 32.0) for n in wanted} == wanted and server.limiter.settled():
                return
            with trio.move_on_after(0.2):
                await server.limiter.next_progress()
    raise AssertionError(f"held {[may_draw(handle, n, 32.0) for n in wanted]}, wanted {wanted}")


async def test_a_backend_default_whose_answer_was_lost_still_counts_after_the_reconnect(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy, tmp_path: Path) -> None:
    """The backend's TxDefaultProfile for DUO's connector 1 (16 A, stack level 20, above the proxy's 8) reaches the
    wallbox, which applies it; the connection drops before its answer. After the reconnect a reload disables
    connector 1 and a car arrives at CP2. The proxy must keep counting connector 1 at the backend's 16 A until it
    has brought it down (the profile re-sent clamped to 0 A): CP2 gets its 16 A only then, and what the wallboxes
    may draw by the profiles they hold never exceeds the 20 A site (without that, 16 A + 16 A)."""
    server = await start_proxy(lost_answer_config(backend, tmp_path / "data"))
    duo_url = proxy_url(server, "DUO")
    handle = await in_loop(peers, connect_smart(duo_url, "DUO"))
    other = await in_loop(peers, connect_smart(proxy_url(server, "CP2"), "CP2"))
    for n in (1, 2):
        await in_loop(peers, handle.wallbox.call(call.StatusNotification(connector_id=n, error_code="NoError",
                                                                         status="Available")))
    await in_loop(peers, other.wallbox.call(call.StatusNotification(connector_id=1, error_code="NoError",
                                                                    status="Available")))
    await in_loop(peers, handle.wallbox.start_transaction(1))
    await until_limits(handle, server, {1: 20.0, 2: 0.0})

    # the backend's profile goes out; the wallbox applies it and the connection drops before it answers
    handle.wallbox.answer_delay = 60.0
    profile = {"chargingProfileId": 77, "stackLevel": 20, "chargingProfilePurpose": "TxDefaultProfile",
               "chargingProfileKind": "Absolute", "chargingSchedule": {
                   "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16}]}}
    pending = peers.submit(backend.call("DUO", call.SetChargingProfile(connector_id=1, cs_charging_profiles=profile)))
    with trio.fail_after(10):
        while not any(p["csChargingProfiles"]["chargingProfileId"] == 77
                      for _, action, p in handle.wire.calls_received() if action == "SetChargingProfile"):
            await trio.sleep(0.05)
    forwarded = [p for _, action, p in handle.wire.calls_received() if action == "SetChargingProfile"][-1]
    assert forwarded["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"] == 16
    with handle.wallbox.lock:
        assert handle.wallbox.store.set(1, forwarded["csChargingProfiles"]) == "Accepted"
    store = handle.wallbox.store
    await in_loop(peers, drop_unanswered(handle))
    with trio.fail_after(10):
        while "DUO" in server.limiter.coordinator.connected:
            await trio.sleep(0.05)
    pending.cancel()

    # back (no reboot: its profiles are still there), connector 1 disabled, a car at CP2
    handle = await in_loop(peers, connect_smart(duo_url, "DUO", store=store, boot=False))
    for n, status in ((1, "Charging"), (2, "Available")):
        await in_loop(peers, handle.wallbox.call(call.StatusNotification(connector_id=n, error_code="NoError",
                                                                         status=status)))
    await until_held(handle, server, {1: 16.0, 2: 0.0})  # the proxy's 20 A under the backend's 16 A
    assert server.limiter.fuse.may_draw("DUO#1", trio.current_time()) >= 160
    server.reload(loads(lost_answer_config(backend, tmp_path / "data", disable_first=True)))
    await in_loop(peers, other.wallbox.start_transaction(1))
    worst, counted_short = 0.0, []
    with trio.fail_after(30):
        while True:
            now = trio.current_time()
            duo = [may_draw(handle, n, 32.0) for n in (1, 2)]
            cp2 = may_draw(other, 1, 16.0)
            worst = max(worst, sum(duo) + cp2)
            if server.limiter.fuse.may_draw("DUO#1", now) < duo[0] * 10:
                counted_short.append(duo[0])
            if cp2 == 16.0 and server.limiter.settled():
                break
            with trio.move_on_after(0.05):
                await server.limiter.next_progress()
    assert counted_short == [], f"the fuse counted DUO#1 below what it may draw: {counted_short}"
    assert worst <= SITE, f"{worst} A may be drawn on the {SITE} A site"
    assert duo[0] == 0.0  # connector 1 disabled: the backend's profile there re-sent clamped
    resent = [p["csChargingProfiles"] for _, action, p in handle.wire.calls_received()
              if action == "SetChargingProfile" and p["csChargingProfiles"]["chargingProfileId"] == 77]
    assert resent and resent[-1]["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"] == 0.0  # clamped
    assert handle.wire.overlaps == []
    await in_loop(peers, handle.close())
    await in_loop(peers, other.close())


# --- a backend profile from before a proxy restart ----------------------------------------------------------

def kept_on_disk(data_dir: Path) -> dict[str, str]:
    """The backend profiles the proxy's record keeps per wallbox, read as it is on disk (read-only)."""
    path = data_dir / "reservations.sqlite3"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {str(c): str(t) for c, t in db.execute("SELECT charger, profiles FROM backend_profiles")}
    except sqlite3.OperationalError:  # the table is not there yet
        return {}
    finally:
        db.close()


async def until_drawn(wanted: Callable[[], bool], what: Callable[[], object], timeout: float = 20.0) -> None:
    """Wait until the wallboxes' own profiles satisfy ``wanted`` (the proxy is another process: only they tell)."""
    with trio.move_on_after(timeout):
        while not wanted():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"not reached in {timeout} s: {what()}")


async def test_a_backend_default_from_before_a_proxy_restart_still_counts(
        peers: LoopThread, backend: SimBackend, tmp_path: Path) -> None:
    """A real ``ocpp-proxy run`` process: the backend's TxDefaultProfile for DUO's connector 1 (16 A, stack level 20,
    above the proxy's 8) is accepted; the proxy is killed (-9) once its record has it and started again with
    connector 1 disabled; both wallboxes come back without a reboot (their profiles stay) and a car arrives at CP2.
    The new process knows the backend's profile only from the record: it must count connector 1 at 16 A until it
    re-sent it clamped to 0 A, so CP2 gets its 16 A only then and what the wallboxes may draw by the profiles they
    hold never exceeds the 20 A site (without the record: 16 A + 16 A, connector 1 never brought down)."""
    data, config = tmp_path / "data", tmp_path / "proxy.toml"

    def configure(disable_first: bool) -> None:
        config.write_text(lost_answer_config(backend, data, disable_first=disable_first)
                          + '[log]\nformat = "json"\n[metrics]\nlisten = ""\n')

    configure(disable_first=False)
    proxy, port = await launch_proxy(config)
    try:
        duo = await in_loop(peers, connect_smart(f"ws://127.0.0.1:{port}/ocpp/DUO", "DUO"))
        other = await in_loop(peers, connect_smart(f"ws://127.0.0.1:{port}/ocpp/CP2", "CP2"))
        for handle, n in ((duo, 1), (duo, 2), (other, 1)):
            await in_loop(peers, handle.wallbox.call(call.StatusNotification(connector_id=n, error_code="NoError",
                                                                             status="Available")))
        await in_loop(peers, duo.wallbox.start_transaction(1))

        def held() -> list[float]:
            return [may_draw(duo, 1, 32.0), may_draw(duo, 2, 32.0), may_draw(other, 1, 16.0)]

        await until_drawn(lambda: held() == [20.0, 0.0, 0.0], held)
        profile = {"chargingProfileId": 77, "stackLevel": 20, "chargingProfilePurpose": "TxDefaultProfile",
                   "chargingProfileKind": "Absolute", "chargingSchedule": {
                       "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16}]}}
        result = await in_loop(peers, backend.call("DUO", call.SetChargingProfile(connector_id=1,
                                                                                  cs_charging_profiles=profile)))
        assert result.status == "Accepted" and held() == [16.0, 0.0, 0.0]
        await until_drawn(lambda: '"chargingProfileId":77' in kept_on_disk(data).get("DUO", ""),
                          lambda: kept_on_disk(data))
        proxy.process.send_signal(signal.SIGKILL)
        assert await proxy.process.wait() == -signal.SIGKILL
    finally:
        await proxy.close()
    stores = {"DUO": duo.wallbox.store, "CP2": other.wallbox.store}
    for handle in (duo, other):
        await in_loop(peers, drop_unanswered(handle))

    configure(disable_first=True)
    proxy, port = await launch_proxy(config)
    try:
        duo = await in_loop(peers, connect_smart(f"ws://127.0.0.1:{port}/ocpp/DUO", "DUO", store=stores["DUO"],
                                                 boot=False))
        other = await in_loop(peers, connect_smart(f"ws://127.0.0.1:{port}/ocpp/CP2", "CP2", store=stores["CP2"],
                                                   boot=False))
        for handle, n, status in ((duo, 1, "Charging"), (duo, 2, "Available"), (other, 1, "Available")):
            await in_loop(peers, handle.wallbox.call(call.StatusNotification(connector_id=n, error_code="NoError",
                                                                             status=status)))
        await in_loop(peers, other.wallbox.start_transaction(1))
        samples: list[list[float]] = []

        def sampled() -> bool:  # every 50 ms until connector 1 is brought down and CP2 raised
            samples.append(held())
            return samples[-1][0] == 0.0 and samples[-1][2] == 16.0

        await until_drawn(sampled, held, timeout=30.0)
        worst = max(sum(seen) for seen in samples)
        assert worst <= SITE, f"{worst} A may be drawn on the {SITE} A site: {max(samples, key=sum)}"
        resent = [p["csChargingProfiles"] for _, action, p in duo.wire.calls_received()
                  if action == "SetChargingProfile" and p["csChargingProfiles"]["chargingProfileId"] == 77]
        assert resent and resent[-1]["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"] == 0.0  # clamped
        assert duo.wire.overlaps == []
        for handle in (duo, other):
            await in_loop(peers, handle.close())
        assert await proxy.stop() == 0
    finally:
        await proxy.close()


async def test_a_backend_profile_that_cannot_be_recorded_is_logged_counted_and_retried(
        peers: LoopThread, backend: SimBackend, start_proxy: StartProxy, tmp_path: Path) -> None:
    """The record refuses the backend's profiles (a real SQLite failure: a trigger aborts every write to their
    table). The backend's TxDefaultProfile still reaches the wallbox and is answered, the session goes on, the
    failure is logged and counted; once the table takes writes again the profile is on disk (the next batch)."""
    data = tmp_path / "data"
    server = await start_proxy(connectors_config(backend, data))
    metrics = Metrics(["DUO"])
    server.limiter.sinks.append(metrics)  # as cli.run_proxy does
    db = sqlite3.connect(data / "reservations.sqlite3", isolation_level=None)  # the proxy opened it at start
    try:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON backend_profiles "
                   "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
        handle = await in_loop(peers, connect_smart(proxy_url(server, "DUO"), "DUO"))
        for n in (1, 2):
            await in_loop(peers, handle.wallbox.call(call.StatusNotification(connector_id=n, error_code="NoError",
                                                                             status="Available")))
        await in_loop(peers, handle.wallbox.start_transaction(1))
        await until_limits(handle, server, {1: 20.0, 2: 0.0})
        profile = {"chargingProfileId": 77, "stackLevel": 20, "chargingProfilePurpose": "TxDefaultProfile",
                   "chargingProfileKind": "Absolute", "chargingSchedule": {
                       "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16}]}}
        with capture_logs() as logs:
            result = await in_loop(peers, backend.call("DUO", call.SetChargingProfile(connector_id=1,
                                                                                      cs_charging_profiles=profile)))
            assert result.status == "Accepted"
            await until_drawn(lambda: any(e["event"] == "reservations_not_recorded" and e["operation"] == "profiles"
                                          for e in logs), lambda: [e["event"] for e in logs], timeout=10.0)
        assert (fuse_metric(metrics, "ocpp_proxy_storage_errors_total", operation="profiles") or 0.0) >= 1.0
        assert fuse_metric(metrics, "ocpp_proxy_storage_failing") == 1.0
        assert "DUO" not in kept_on_disk(data)
        await in_loop(peers, handle.wallbox.call(call.Heartbeat()))  # the session goes on
        await until_limits(handle, server, {1: 16.0, 2: 0.0})  # the backend's 16 A under the proxy's 20 A
        db.execute("DROP TRIGGER refuse")
        await until_drawn(lambda: '"chargingProfileId":77' in kept_on_disk(data).get("DUO", ""),
                          lambda: kept_on_disk(data), timeout=10.0)
        await until_drawn(lambda: fuse_metric(metrics, "ocpp_proxy_storage_failing") == 0.0,
                          lambda: fuse_metric(metrics, "ocpp_proxy_storage_failing"), timeout=10.0)
        await in_loop(peers, handle.close())
    finally:
        db.close()
