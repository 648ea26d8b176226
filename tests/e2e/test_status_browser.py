"""The status page in a real browser (Debian's headless Chromium) during the demo (issue 21).

The demo runs as a process, as a user starts it (``ocpp-proxy demo --forever``), and prints the
page's address; the browser loads it on a phone-sized screen, the test waits for live updates (the
page counts them in ``data-updates``) and for values that change while the demo's cars charge, and
compares what is rendered with ``/api/status``. The screenshot is written to ``tests/artifacts/``
(gitignored) and to the test's tmp dir.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.browser import Browser, ensure_chromium, open_browser
from tests.opskit import ROOT, http_get

ARTIFACTS = ROOT / "tests" / "artifacts"
LIMIT_TEXT = r"\d+\.\d A, set by [a-z ()]+|none in force|not connected; the fuse still counts .+ for it"
ADDRESS = re.compile(rb"status page: (http://127\.0\.0\.1:\d+/)")
#: The demo's wallboxes: three OCPP 1.6, one 2.0.1 station, one Modbus wallbox.
DEMO_CHARGERS = {"CP001", "CP002", "CP003", "CS201", "HD001"}

RENDERED = """(() => [...document.querySelectorAll('article[data-charger]')].map(card => {
  const fields = {};
  for (const dd of card.querySelectorAll('[data-field]')) fields[dd.dataset.field] = dd.textContent;
  return {id: card.dataset.charger, fields};
}))()"""


@pytest.fixture(scope="session")
def chromium() -> str:
    return ensure_chromium()


class Demo:
    """``python -m proxy demo --forever``; its output is read all the time (a full pipe would stall it)."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output = b""
        self.address: str | None = None
        self.found = trio.Event()

    async def read(self) -> None:
        assert self.process.stdout is not None
        async for chunk in self.process.stdout:
            self.output += chunk
            match = ADDRESS.search(self.output)
            if match and not self.found.is_set():
                self.address = match.group(1).decode()
                self.found.set()

    async def stop(self) -> int:
        for _ in range(2):  # first Ctrl-C: finish transactions; second: at once
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                with trio.move_on_after(10):
                    await self.process.wait()
        if self.process.poll() is None:
            self.process.kill()
        return await self.process.wait()


async def rendered(browser: Browser) -> dict[str, dict[str, str]]:
    cards: list[dict[str, Any]] = await browser.evaluate(RENDERED)
    return {card["id"]: card["fields"] for card in cards}


async def test_status_page_in_chromium_during_the_demo(chromium: str, nursery: trio.Nursery,
                                                     tmp_path: Path) -> None:
    process = await trio.lowlevel.open_process([sys.executable, "-m", "proxy", "demo", "--forever"], cwd=ROOT,
                                               stdout=-1, stderr=-2)  # PIPE, STDOUT
    demo = Demo(process)
    nursery.start_soon(demo.read)
    try:
        with trio.fail_after(60):
            await demo.found.wait()
        assert demo.address is not None
        async with open_browser(chromium, tmp_path / "profile", tmp_path / "chromium.log") as browser:
            await check_page(browser, demo.address, tmp_path)
    finally:
        code = await demo.stop()
    assert code in (0, 130), demo.output[-3000:].decode(errors="replace")


async def check_page(browser: Browser, address: str, tmp_path: Path) -> None:
    await browser.send("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2,
                       mobile=True)
    await browser.send("Page.navigate", url=address)
    first = int(await browser.wait_for("Number(document.getElementById('updated')?.dataset.updates || 0)"))
    # A live update: the page polled again and re-rendered, without a reload.
    await browser.wait_for(f"Number(document.getElementById('updated').dataset.updates) > {first}")
    # Values that change while the demo runs: a car starts charging somewhere, and currents flow.
    await browser.wait_for("[...document.querySelectorAll('[data-field=transaction]')]"
                           ".some(dd => dd.textContent === 'running')", timeout=60)

    # The session log's list (issue 24): a demo car's transaction shows up in its charger's card.
    await browser.wait_for("document.querySelectorAll('[data-field=sessions] tr[data-session]').length > 0",
                           timeout=60)
    numbers = await browser.evaluate("[...document.querySelectorAll('tr[data-session]')]"
                                     ".map(tr => Number(tr.dataset.session))")
    listed = json.loads((await http_get(address + "api/sessions?limit=100")).body)["sessions"]
    assert set(numbers) <= {s["number"] for s in listed}, (numbers, listed)

    cards = await rendered(browser)
    status = json.loads((await http_get(address + "api/status")).body)
    assert set(cards) == DEMO_CHARGERS == {c["id"] for c in status["chargers"]}
    for charger in status["chargers"]:
        fields = cards[charger["id"]]
        assert fields["state"] == ("connected" if charger["connected"] else "disconnected")
        assert fields["ocpp"].startswith(charger["ocpp_version"]), fields
        assert fields["security"] == charger["security_profile"]
        assert fields["backend"] == "online"
        assert re.fullmatch(LIMIT_TEXT, fields["limit"]), fields
    assert cards["CS201"]["ocpp"] == "2.0.1 (ocpp2.0.1)" and cards["CP001"]["ocpp"] == "1.6 (ocpp1.6)"
    assert cards["HD001"]["modbus"].startswith("UP (127.0.0.1:") and cards["HD001"]["security"] == "local"
    site = await browser.evaluate("document.querySelector('[data-field=site-limit]').textContent")
    assert site == "32.0 A"
    meter = await browser.evaluate("document.querySelector('[data-field=meter]').textContent")
    # The demo's simulated grid meter: house load plus the Modbus wallbox's car, read a moment ago.
    assert re.fullmatch(r"ok: L1 \d+\.\d A, L2 \d+\.\d A, L3 \d+\.\d A, read \d+ s ago", meter), meter

    # A phone screen: nothing wider than it; every state is a word, not only a colour.
    width = await browser.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"page is {width} px wide on a 390 px screen"
    assert await browser.evaluate("[...document.querySelectorAll('.badge')].every(b => b.textContent.trim())")

    size = await browser.screenshot(tmp_path / "status-page.png")
    assert size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "status-page.png").write_bytes((tmp_path / "status-page.png").read_bytes())
