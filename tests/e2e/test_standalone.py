"""Standalone chargers (no backend: the proxy is their central system) and the session log (issue 24).

End to end with ``ocpp``-library charge points on real sockets: a site of a
1.6 wallbox and a 2.0.1 station without any backend, charging under a site
limit with local authorization; ``ocpp-proxy sessions export`` (the real CLI,
in a subprocess) lists both transactions with their energy and the signed
meter data byte for byte as the wallboxes sent it. Adversarial: a wallbox that
drops mid-transaction and reconnects, a StopTransaction retransmitted with
the same message id, a proxy restart.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from ocpp.v16 import call
from structlog.testing import capture_logs

from proxy.config import loads
from proxy.demo.peers import OCMF_SAMPLE, LoopThread, SimBackend, WallboxHandle, connect_wallbox, now_iso
from proxy.demo.peers_v2 import connect_station, current_values, signed_value
from proxy.runtime.server import ProxyServer
from tests.conftest import StartProxy, proxy_url
from tests.opskit import ROOT, free_port, wait_until
from tests.peers import in_loop

SITE_LIMIT = 20.0


def site_text(data_dir: Path, extra: str = "") -> str:
    """Two wallboxes, no [backend] anywhere: both run standalone."""
    return (f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\n{extra}\n'
            f'[offline]\ndata_dir = "{data_dir}"\nauth = "local_list"\nlocal_list = ["TAG-A", "TOKEN-B"]\n'
            f'heartbeat_interval = 120\ndata_transfer = "Accepted"\n'
            f'[site]\nmax_current = {SITE_LIMIT}\nramp_up_interval = 0\nhysteresis = 0\nmin_hold_time = 0\n'
            f'interval = 1\n'
            f'[[chargers]]\nid = "WB16"\nmax_current = 16\nallow_unauthenticated = true\n'
            f'[[chargers]]\nid = "WB201"\nmax_current = 16\nallow_unauthenticated = true\n')


class Proxy:
    """An in-process proxy that a test can stop and start again on the same data directory."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.server = ProxyServer(loads(text))

    async def stop(self) -> None:
        await self.server.stop()


async def export(config: Path, *args: str) -> str:
    """``ocpp-proxy sessions export`` in a subprocess (the real CLI, as an operator runs it)."""
    done = await trio.run_process([sys.executable, "-m", "proxy", "sessions", "export", "-c", str(config), *args],
                                  capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


async def export_when(config: Path, ready: Callable[[list[dict[str, Any]]], bool],
                      timeout: float = 15.0) -> list[dict[str, Any]]:
    """The JSON export once ``ready`` holds: a relayed charger's frames reach the log within a second
    (docs/standalone.md), so a test waits for them instead of hoping."""
    rows: list[dict[str, Any]] = []

    async def check() -> bool:
        nonlocal rows
        rows = json.loads(await export(config, "--format", "json"))
        return ready(rows)

    await wait_until(check, timeout=timeout, interval=0.2)
    return rows


def sent_samples(texts: list[str], action: str) -> list[tuple[str, dict[str, Any]]]:
    """(frame text, signed sampledValue as parsed) for each signed value the peer sent in ``action`` CALLs."""
    found: list[tuple[str, dict[str, Any]]] = []
    for text in texts:
        frame = json.loads(text)
        if frame[0] != 2 or frame[2] != action:
            continue
        payload = frame[3]
        for meter_value in payload.get("meterValue", []) + payload.get("transactionData", []):
            for sample in meter_value["sampledValue"]:
                if sample.get("format") == "SignedData" or "signedMeterValue" in sample:
                    found.append((text, sample))
    return found


def assert_byte_identical(exported: list[str], sent: list[tuple[str, dict[str, Any]]]) -> None:
    """Each exported signed value is a piece of the frame as sent (not a re-serialization) and is that value."""
    assert len(exported) == len(sent) > 0
    for text, (frame, sample) in zip(exported, sent):
        assert text in frame, f"not byte-identical to the frame as sent: {text[:120]}"
        assert text.startswith("{") and text.endswith("}")
        assert json.loads(text) == sample


async def settled(server: ProxyServer) -> None:
    with trio.fail_after(15):
        await server.limiter.next_progress()
        await server.limiter.wait_settled()


@pytest.fixture
async def nursery_proxy(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[tuple[Proxy, Path]]:
    text = site_text(tmp_path / "data")
    config = tmp_path / "site.toml"
    config.write_text(text)
    proxy = Proxy(text)
    await nursery.start(proxy.server.serve)
    yield proxy, config


async def test_standalone_site_two_wallboxes_under_site_limit(
        peers: LoopThread, nursery_proxy: tuple[Proxy, Path]) -> None:
    proxy, config = nursery_proxy
    server = proxy.server
    wb = await in_loop(peers, connect_wallbox(proxy_url(server, "WB16"), "WB16"))
    st = await in_loop(peers, connect_station(proxy_url(server, "WB201"), "WB201"))
    c2 = st.calls
    w = wb.wallbox

    # --- the proxy answers as the central system --------------------------------------
    boot = await in_loop(peers, w.call(call.BootNotification(charge_point_model="M", charge_point_vendor="V")))
    assert (boot.status, boot.interval) == ("Accepted", 120)
    assert (await in_loop(peers, w.call(call.Heartbeat()))).current_time
    assert (await in_loop(peers, w.call(call.Authorize(id_tag="TAG-A")))).id_tag_info["status"] == "Accepted"
    assert (await in_loop(peers, w.call(call.Authorize(id_tag="STRANGER")))).id_tag_info["status"] == "Invalid"
    transfer = await in_loop(peers, w.call(call.DataTransfer(vendor_id="com.example", message_id="x", data="y")))
    assert transfer.status == "Accepted"
    boot2 = await in_loop(peers, st.boot())
    assert (boot2.status, boot2.interval) == ("Accepted", 120)
    auth2 = await in_loop(peers, st.send(c2.Authorize(id_token={"id_token": "TOKEN-B", "type": "ISO14443"})))
    assert auth2.id_token_info["status"] == "Accepted"

    # --- both charge ------------------------------------------------------------------
    await in_loop(peers, w.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Charging")))
    start = await in_loop(peers, w.call(call.StartTransaction(connector_id=1, id_tag="TAG-A", meter_start=100000,
                                                              timestamp=now_iso())))
    tx = start.transaction_id
    assert tx < 0 and start.id_tag_info["status"] == "Accepted"  # from the proxy's own (negative) range
    await in_loop(peers, w.call(call.MeterValues(connector_id=1, transaction_id=tx, meter_value=[{
        "timestamp": now_iso(), "sampledValue": [
            {"value": str(a), "measurand": "Current.Import", "phase": p, "unit": "A"}
            for a, p in ((16.0, "L1"), (16.0, "L2"), (16.0, "L3"))]}])))
    await in_loop(peers, st.send(c2.StatusNotification(timestamp=now_iso(), connector_status="Occupied",
                                                      evse_id=1, connector_id=1)))
    token = {"id_token": "TOKEN-B", "type": "ISO14443"}
    started = await in_loop(peers, st.transaction_event("Started", "st-tx-1", [signed_value(1000.0)],
                                                         "Authorized", token))
    assert started.id_token_info["status"] == "Accepted"
    await in_loop(peers, st.transaction_event("Updated", "st-tx-1", [current_values((16.0, 16.0, 16.0))],
                                              "MeterValuePeriodic"))
    await settled(server)
    views = server.limiter.views()
    limits = [views[cid].local_limit for cid in ("WB16", "WB201")]
    assert all(limit is not None and limit > 0 for limit in limits), limits
    assert sum(limits) <= SITE_LIMIT + 1e-6, limits  # the site fuse holds without any backend
    assert any('"SetChargingProfile"' in t for t in wb.recorder.received)  # applied on the wallboxes
    assert st.station.profiles

    # --- both stop, with signed meter data ----------------------------------------------
    await in_loop(peers, w.call(call.MeterValues(connector_id=1, transaction_id=tx, meter_value=[{
        "timestamp": now_iso(), "sampledValue": [
            {"value": "104000", "measurand": "Energy.Active.Import.Register", "unit": "Wh"},
            {"value": OCMF_SAMPLE, "format": "SignedData", "context": "Sample.Periodic"}]}])))
    await in_loop(peers, w.call(call.StopTransaction(meter_stop=112200, timestamp=now_iso(), transaction_id=tx,
                                                     id_tag="TAG-A", reason="EVDisconnected", transaction_data=[{
                                                         "timestamp": now_iso(), "sampledValue": [{
                                                             "value": OCMF_SAMPLE, "format": "SignedData",
                                                             "context": "Transaction.End"}]}])))
    await in_loop(peers, st.transaction_event("Ended", "st-tx-1", [signed_value(2200.0, "Transaction.End")],
                                              "EVDeparted"))

    # --- the export, as an operator runs it ----------------------------------------------
    rows = json.loads(await export(config, "--format", "json", "--from", "2000-01-01"))
    by_charger = {row["charger"]: row for row in rows}
    assert set(by_charger) == {"WB16", "WB201"}
    a, b = by_charger["WB16"], by_charger["WB201"]
    assert (a["transaction"], a["connector"], a["id_tag"], a["reason"]) == (str(tx), 1, "TAG-A", "EVDisconnected")
    assert (a["meter_start_wh"], a["meter_stop_wh"], a["energy_wh"]) == (100000, 112200, 12200)
    assert (b["transaction"], b["connector"], b["id_tag"]) == ("st-tx-1", 1, "TOKEN-B")
    assert (b["meter_start_wh"], b["meter_stop_wh"], b["energy_wh"]) == (1000, 2200, 1200)
    assert a["started"] and a["stopped"] and b["started"] and b["stopped"]
    sent_16 = sent_samples(wb.recorder.sent, "MeterValues") + sent_samples(wb.recorder.sent, "StopTransaction")
    assert_byte_identical(a["signed"], sent_16)
    assert_byte_identical(b["signed"], sent_samples(st.recorder.sent, "TransactionEvent"))
    table = list(csv.DictReader(io.StringIO(await export(config, "--format", "csv"))))
    assert {(r["charger"], r["energy_wh"]) for r in table} == {("WB16", "12200.0"), ("WB201", "1200.0")}
    assert json.loads(next(r for r in table if r["charger"] == "WB16")["signed"]) == a["signed"]
    assert json.loads(await export(config, "--format", "json", "--to", "2000-01-01")) == []  # the time filter
    await in_loop(peers, wb.close())
    await in_loop(peers, st.close())


async def drop(wb: WallboxHandle) -> None:
    """The TCP connection is reset under the wallbox (no close handshake), in the peers' own loop."""
    wb.websocket.transport.abort()
    await asyncio.gather(wb.task, return_exceptions=True)


async def stop_with_id(peers: LoopThread, wb: WallboxHandle, msg_id: str, tx: int) -> Any:
    payload = call.StopTransaction(meter_stop=5500, timestamp=now_iso(), transaction_id=tx, reason="Local",
                                   transaction_data=[{"timestamp": now_iso(), "sampledValue": [{
                                       "value": OCMF_SAMPLE, "format": "SignedData", "context": "Transaction.End"}]}])
    return await in_loop(peers, wb.wallbox.call(payload, unique_id=msg_id))


async def test_drop_retransmission_and_restart_keep_one_record(
        peers: LoopThread, nursery_proxy: tuple[Proxy, Path], tmp_path: Path) -> None:
    proxy, config = nursery_proxy
    url = proxy_url(proxy.server, "WB16")
    wb = await in_loop(peers, connect_wallbox(url, "WB16"))
    start = await in_loop(peers, wb.wallbox.call(call.StartTransaction(connector_id=1, id_tag="TAG-A",
                                                                       meter_start=1000, timestamp=now_iso())))
    tx = start.transaction_id
    # The wallbox drops mid-transaction (no close handshake) and comes back.
    await in_loop(peers, drop(wb))
    await wait_until(lambda: "WB16" not in proxy.server.sessions)
    wb = await in_loop(peers, connect_wallbox(url, "WB16"))
    await wait_until(lambda: "WB16" in proxy.server.sessions)
    # The StopTransaction is sent, its answer "lost", and sent again with the same message id.
    first = await stop_with_id(peers, wb, "stop-1", tx)
    again = await stop_with_id(peers, wb, "stop-1", tx)
    assert first == again
    rows = json.loads(await export(config, "--format", "json"))
    assert len(rows) == 1
    assert (rows[0]["transaction"], rows[0]["energy_wh"], rows[0]["reason"]) == (str(tx), 4500, "Local")
    assert len(rows[0]["signed"]) == 1  # the retransmission did not add its signed value twice
    await in_loop(peers, wb.close())

    # A restart keeps the log, and the proxy's transaction ids do not repeat.
    await proxy.stop()
    async with trio.open_nursery() as nursery:
        again_proxy = Proxy(proxy.text)
        await nursery.start(again_proxy.server.serve)
        assert json.loads(await export(config, "--format", "json")) == rows
        wb = await in_loop(peers, connect_wallbox(proxy_url(again_proxy.server, "WB16"), "WB16"))
        second = await in_loop(peers, wb.wallbox.call(call.StartTransaction(
            connector_id=1, id_tag="TAG-A", meter_start=5500, timestamp=now_iso())))
        assert second.transaction_id < tx  # the next of the proxy's own ids
        rows = json.loads(await export(config, "--format", "json"))
        assert [r["transaction"] for r in rows] == [str(tx), str(second.transaction_id)]
        await in_loop(peers, wb.close())
        await again_proxy.stop()
        nursery.cancel_scope.cancel()


async def test_reject_all_and_no_unknown_ids(peers: LoopThread, nursery: trio.Nursery, tmp_path: Path) -> None:
    """``auth = reject_all``: a standalone charger's transactions are refused, and an unknown id is never admitted."""
    text = site_text(tmp_path / "data", extra="accept_unknown = false").replace('auth = "local_list"',
                                                                                 'auth = "reject_all"')
    proxy = Proxy(text)
    await nursery.start(proxy.server.serve)
    wb = await in_loop(peers, connect_wallbox(proxy_url(proxy.server, "WB16"), "WB16"))
    answer = await in_loop(peers, wb.wallbox.call(call.Authorize(id_tag="TAG-A")))
    assert answer.id_tag_info["status"] == "Invalid"
    with pytest.raises(Exception, match="404"):
        await in_loop(peers, connect_wallbox(proxy_url(proxy.server, "NOBODY"), "NOBODY"))
    await in_loop(peers, wb.close())
    await proxy.stop()


async def check_config(path: Path) -> tuple[int, str]:
    done = await trio.run_process([sys.executable, "-m", "proxy", "check-config", str(path)], capture_stdout=True,
                                  capture_stderr=True, check=False, cwd=ROOT)
    return done.returncode, done.stdout.decode() + done.stderr.decode()


async def test_check_config_accepts_standalone_and_refuses_unknown_ids_without_backend(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(site_text(tmp_path / "data"))
    code, out = await check_config(path)
    assert code == 0, out
    assert "chargers[0] (WB16): no backend URL: runs standalone" in out
    assert "chargers[1] (WB201): no backend URL: runs standalone" in out
    assert "no backend URL: set this" not in out
    # A charger with its own backend next to a standalone one: only the standalone one is named.
    path.write_text(site_text(tmp_path / "data").replace(
        'id = "WB201"\n', 'id = "WB201"\nupstream_url = "ws://127.0.0.1:9/ocpp"\n'))
    code, out = await check_config(path)
    assert code == 0 and "WB16" in out and "(WB201)" not in out, out
    # accept_unknown without a default backend would run anyone standalone: refused, with the reason.
    path.write_text(site_text(tmp_path / "data", extra="accept_unknown = true"))
    code, out = await check_config(path)
    assert code == 2 and "accept_unknown needs a default backend URL" in out, out


async def test_charger_with_backend_is_logged_too(peers: LoopThread, start_proxy: StartProxy, tmp_path: Path) -> None:
    """Offline (local id, then the backend's after the replay) and online (the backend's id): both in the log."""
    port = free_port()
    text = (f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\n'
            f'[backend]\nurl = "ws://127.0.0.1:{port}/ocpp"\nconnect_timeout = 2\n'
            f'[[chargers]]\nid = "CP1"\n[offline]\ndata_dir = "{tmp_path / "data"}"\nauth = "accept_all"\n'
            'reconnect_min = 0.05\nreconnect_max = 0.2\n')  # the log is on by default, backend or not
    config = tmp_path / "backend.toml"
    config.write_text(text)
    server = await start_proxy(text)
    handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
    offline = await in_loop(peers, handle.wallbox.run_session())
    assert offline["transaction_id"] == -1  # answered by the proxy: the backend is down
    backend = SimBackend(port=port)
    with capture_logs() as logs:
        await in_loop(peers, backend.start())
        await wait_until(lambda: any(e["event"] == "replay_finished" for e in logs), timeout=20)
    online = await in_loop(peers, handle.wallbox.run_session())
    assert online["transaction_id"] == 1002  # the backend's (1001 went to the replayed one)
    rows = await export_when(config, lambda rows: len(rows) == 2 and rows[1]["stopped"] is not None)
    assert [(r["transaction"], r["backend_transaction"], r["energy_wh"]) for r in rows] == [
        ("-1", 1001, 12200), ("1002", None, 12200)]
    sent = sent_samples(handle.recorder.sent, "MeterValues") + sent_samples(handle.recorder.sent, "StopTransaction")
    sent.sort(key=lambda pair: handle.recorder.sent.index(pair[0]))
    assert_byte_identical(rows[0]["signed"] + rows[1]["signed"], sent)
    await in_loop(peers, handle.close())
    await in_loop(peers, backend.stop())


async def test_status_page_says_standalone(peers: LoopThread, nursery: trio.Nursery, tmp_path: Path) -> None:
    from proxy.cli import start
    from tests.e2e.test_status_page import charger, wait_status

    text = site_text(tmp_path / "data").replace("[offline]", '[metrics]\nlisten = "127.0.0.1:0"\n[offline]', 1)
    started = await start(loads(text), nursery)
    wb = await in_loop(peers, connect_wallbox(proxy_url(started.server, "WB16"), "WB16"))
    body = await wait_status(started, lambda b: charger(b, "WB16")["connected"] is True)
    assert charger(body, "WB16")["backend"] == {"state": "standalone", "queued_frames": 0,
                                                "oldest_queued_age_seconds": None}
    await in_loop(peers, wb.close())


async def test_standalone_charger_gets_a_backend_and_keeps_its_history(
        peers: LoopThread, nursery: trio.Nursery, tmp_path: Path) -> None:
    """docs/standalone.md: the log keeps the proxy's ids; new transactions get the backend's."""
    text = site_text(tmp_path / "data")
    config = tmp_path / "site.toml"
    config.write_text(text)
    alone = Proxy(text)
    await nursery.start(alone.server.serve)
    wb = await in_loop(peers, connect_wallbox(proxy_url(alone.server, "WB16"), "WB16"))
    local = await in_loop(peers, wb.wallbox.run_session(id_tag="TAG-A"))
    assert local["transaction_id"] < 0
    await in_loop(peers, wb.close())
    await alone.stop()

    backend = SimBackend()
    await in_loop(peers, backend.start())
    with_backend = text.replace('[[chargers]]\nid = "WB16"\n',
                                f'[[chargers]]\nid = "WB16"\nupstream_url = "ws://127.0.0.1:{backend.port}/ocpp"\n')
    config.write_text(with_backend)
    online = Proxy(with_backend)
    await nursery.start(online.server.serve)
    wb = await in_loop(peers, connect_wallbox(proxy_url(online.server, "WB16"), "WB16"))
    answer = await in_loop(peers, wb.wallbox.run_session(id_tag="TAG-A"))
    assert answer["transaction_id"] == 1001  # the backend's id
    received = backend.recorders["WB16"].received
    assert all(f'"transactionId":{local["transaction_id"]}' not in t for t in received)  # nothing replayed
    rows = await export_when(config, lambda rows: len(rows) == 2 and rows[1]["stopped"] is not None)
    assert [(r["transaction"], r["energy_wh"]) for r in rows] == [(str(local["transaction_id"]), 12200),
                                                                  ("1001", 12200)]
    await in_loop(peers, wb.close())
    await online.stop()
    await in_loop(peers, backend.stop())
