"""The session log of chargers with a backend, and its list on the status page (issue 24).

End to end on real sockets: an ``ocpp``-library 1.6 wallbox charges through
the proxy (``ocpp-proxy run``'s parts, started by :func:`proxy.cli.start`) to
an ``ocpp``-library backend, with the session log on by default. The backend
answers every frame (it is the authority); the proxy's log, written behind
the relay, then holds the session: ``GET /api/sessions`` lists it (finished
and running, paged), and ``ocpp-proxy sessions export`` gives its signed
meter data byte for byte as the wallbox sent it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
from ocpp.v16 import call
from structlog.testing import capture_logs

from proxy.cli import Started, start
from proxy.config import loads
from proxy.demo.peers import LoopThread, SimBackend, connect_wallbox, now_iso
from proxy.ops.status import VERSION
from proxy.storage.offline_queue import DB_NAME
from tests.e2e.test_standalone import assert_byte_identical, export_when, sent_samples
from tests.e2e.test_status_page import base_config
from tests.browser import ensure_chromium, open_browser
from tests.opskit import http_get, wait_until
from tests.peers import in_loop

#: An id tag with markup and quotes: the API carries it as JSON text, the page as a text node.
ODD_TAG = '<b>"T&1\'</b>'


async def sessions(started: Started, query: str = "") -> dict[str, Any]:
    reply = await http_get(f"http://127.0.0.1:{started.monitor.ports[0]}/api/sessions{query}")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json", reply
    body: dict[str, Any] = json.loads(reply.body)
    assert body["version"] == VERSION
    return body


async def test_relayed_sessions_are_logged_listed_and_exported(peers: LoopThread, backend: SimBackend,
                                                               nursery: trio.Nursery, tmp_path: Path) -> None:
    text = base_config(backend.port, '[[chargers]]\nid = "CP1"\n', data_dir=str(tmp_path / "data"))
    assert "session_log" not in text  # the default: every charger is logged
    config = tmp_path / "proxy.toml"
    config.write_text(text)
    started = await start(loads(text), nursery)
    url = f"ws://127.0.0.1:{started.server.ports[0]}/ocpp/CP1"
    handle = await in_loop(peers, connect_wallbox(url, "CP1"))

    done = await in_loop(peers, handle.wallbox.run_session(id_tag=ODD_TAG))
    assert done["transaction_id"] == 1001  # the backend's answer reached the wallbox
    # A second transaction, still running: started, one energy reading.
    start_answer = await in_loop(peers, handle.wallbox.call(call.StartTransaction(
        connector_id=2, id_tag="TAG-2", meter_start=5000, timestamp=now_iso())))
    tx = start_answer.transaction_id
    await in_loop(peers, handle.wallbox.call(call.MeterValues(connector_id=2, transaction_id=tx, meter_value=[{
        "timestamp": now_iso(), "sampledValue": [
            {"value": "7.5", "measurand": "Energy.Active.Import.Register", "unit": "kWh"}]}])))

    async def both_listed() -> bool:
        listed = (await sessions(started))["sessions"]
        return len(listed) == 2 and listed[0]["meter_last_wh"] == 7500.0

    await wait_until(both_listed, timeout=15, interval=0.2)
    body = await sessions(started)
    assert body["log"] == "on" and body["next_before"] is None
    running, finished = body["sessions"]
    assert running["running"] is True and running["stopped"] is None and running["charger"] == "CP1"
    assert (running["transaction"], running["connector"], running["id_tag"]) == (str(tx), 2, "TAG-2")
    assert running["energy_wh"] == 2500.0 and running["signed"] is False and running["reason"] is None
    assert finished["running"] is False and finished["stopped"] is not None and finished["started"] is not None
    assert (finished["transaction"], finished["connector"], finished["id_tag"]) == ("1001", 1, ODD_TAG)
    assert (finished["energy_wh"], finished["reason"], finished["signed"]) == (12200.0, "Local", True)
    assert finished["number"] < running["number"]

    # Paged: one at a time, newest first, then the older one, then nothing.
    first = await sessions(started, "?charger=CP1&limit=1")
    assert [s["number"] for s in first["sessions"]] == [running["number"]]
    second = await sessions(started, f"?charger=CP1&limit=1&before={first['next_before']}")
    assert [s["number"] for s in second["sessions"]] == [finished["number"]]
    assert (await sessions(started, f"?charger=CP1&before={finished['number']}"))["sessions"] == []
    assert (await sessions(started, "?charger=OTHER"))["sessions"] == []
    for bad in ("?limit=0", "?limit=1000", "?before=x", "?order=asc"):
        reply = await http_get(f"http://127.0.0.1:{started.monitor.ports[0]}/api/sessions{bad}")
        assert reply.status == 400, bad

    # The export: the signed values exactly as the wallbox sent them (the backend got the same frames).
    rows = await export_when(config, lambda rows: len(rows) == 2)
    assert [(r["transaction"], r["energy_wh"], r["reason"]) for r in rows] == [("1001", 12200, "Local"),
                                                                              (str(tx), 2500, None)]
    sent = sent_samples(handle.recorder.sent, "MeterValues") + sent_samples(handle.recorder.sent, "StopTransaction")
    sent.sort(key=lambda pair: handle.recorder.sent.index(pair[0]))
    assert_byte_identical(rows[0]["signed"], sent)
    received = backend.recorders["CP1"].received
    assert all(frame in received for frame, _ in sent)  # relayed byte for byte as well
    await in_loop(peers, handle.close())


#: Per card, the rows of its session table as rendered: number, the cells' texts, and any element in a cell.
RENDERED_SESSIONS = """(() => [...document.querySelectorAll('article[data-charger]')].map(card => ({
  id: card.dataset.charger,
  rows: [...card.querySelectorAll('[data-field=sessions] tr[data-session]')].map(tr => ({
    number: Number(tr.dataset.session), cells: [...tr.cells].map(td => td.textContent),
    markup: [...tr.querySelectorAll('td *')].map(e => e.tagName.toLowerCase())}))})))()"""


@pytest.fixture(scope="module")
def chromium() -> str:
    return ensure_chromium()


async def test_status_page_lists_sessions_in_chromium(chromium: str, peers: LoopThread, backend: SimBackend,
                                                      nursery: trio.Nursery, tmp_path: Path) -> None:
    """The page shows each charger's sessions from /api/sessions; an id tag with markup stays text."""
    text = base_config(backend.port, '[[chargers]]\nid = "CP1"\n[[chargers]]\nid = "CP2"\n',
                       data_dir=str(tmp_path / "data"))
    started = await start(loads(text), nursery)
    address = f"http://127.0.0.1:{started.monitor.ports[0]}/"
    handle = await in_loop(peers, connect_wallbox(f"ws://127.0.0.1:{started.server.ports[0]}/ocpp/CP1", "CP1"))
    await in_loop(peers, handle.wallbox.run_session(id_tag=ODD_TAG))
    running = await in_loop(peers, handle.wallbox.call(call.StartTransaction(
        connector_id=1, id_tag="TAG-2", meter_start=100, timestamp=now_iso())))
    await wait_until(lambda: _listed(started, 2), timeout=15, interval=0.2)
    async with open_browser(chromium, tmp_path / "profile", tmp_path / "chromium.log") as browser:
        await browser.send("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2,
                           mobile=True)
        await browser.send("Page.navigate", url=address)
        await browser.wait_for("document.querySelectorAll('[data-field=sessions] tr[data-session]').length === 2")
        cards = {card["id"]: card["rows"] for card in await browser.evaluate(RENDERED_SESSIONS)}
        width = await browser.evaluate("document.documentElement.scrollWidth")
    listed = (await sessions(started))["sessions"]
    assert [row["number"] for row in cards["CP1"]] == [s["number"] for s in listed] and cards["CP2"] == []
    newest, older = cards["CP1"]
    assert newest["cells"][:2] == ["1", "TAG-2"] and newest["cells"][3] == "running" and newest["cells"][6] == "no"
    assert listed[0]["transaction"] == str(running.transaction_id)
    assert older["cells"][1] == ODD_TAG and older["markup"] == []  # the tag is text, not a <b> element
    assert (older["cells"][4], older["cells"][5], older["cells"][6]) == ("12.20 kWh", "Local", "yes")
    assert width <= 390, f"page is {width} px wide on a 390 px screen"
    await in_loop(peers, handle.close())


async def _listed(started: Started, count: int) -> bool:
    return len((await sessions(started))["sessions"]) == count


async def test_a_stalled_store_never_holds_a_relayed_answer(peers: LoopThread, backend: SimBackend,
                                                            nursery: trio.Nursery, tmp_path: Path) -> None:
    """The disk stalls (another writer holds the store's lock past the proxy's busy timeout): relayed
    frames still get their answers at once, the failed batch is kept and committed when the disk is back."""
    text = base_config(backend.port, '[[chargers]]\nid = "CP1"\n', data_dir=str(tmp_path / "data"))
    started = await start(loads(text), nursery)
    handle = await in_loop(peers, connect_wallbox(f"ws://127.0.0.1:{started.server.ports[0]}/ocpp/CP1", "CP1"))
    blocker = sqlite3.connect(tmp_path / "data" / DB_NAME, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # every commit of the proxy now waits, then fails (busy timeout 10 s)
    try:
        with capture_logs() as logs:
            with trio.fail_after(6):  # a whole session, each answer relayed while the store is stuck
                done = await in_loop(peers, handle.wallbox.run_session())
            assert done["transaction_id"] == 1001
            await wait_until(lambda: any(e["event"] == "storage_error" for e in logs), timeout=30)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    async def logged() -> bool:
        listed = (await sessions(started))["sessions"]
        return len(listed) == 1 and listed[0]["energy_wh"] == 12200.0 and listed[0]["signed"] is True

    await wait_until(logged, timeout=30, interval=0.2)
    await in_loop(peers, handle.close())


async def test_log_off_lists_nothing(peers: LoopThread, backend: SimBackend, nursery: trio.Nursery,
                                     tmp_path: Path) -> None:
    text = base_config(backend.port, '[[chargers]]\nid = "CP1"\n', data_dir=str(tmp_path / "data")).replace(
        "[offline]\n", "[offline]\nsession_log = false\n", 1)
    started = await start(loads(text), nursery)
    handle = await in_loop(peers, connect_wallbox(f"ws://127.0.0.1:{started.server.ports[0]}/ocpp/CP1", "CP1"))
    await in_loop(peers, handle.wallbox.run_session())
    body = await sessions(started)
    assert (body["log"], body["sessions"], body["next_before"]) == ("off", [], None)
    await in_loop(peers, handle.close())
