"""Test support: Debian's headless Chromium, installed when missing, driven over the DevTools protocol.

:func:`ensure_chromium` finds ``chromium``; on a fresh machine (as root, with apt-get) it installs
Debian's package once (:mod:`tests.debian`). Where no browser can be had it fails the test with
what to install: a browser test never skips.

:class:`Browser` speaks the DevTools protocol over a WebSocket (trio-websocket, already a test
dependency): navigate, evaluate JavaScript, emulate a phone screen, take a screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from tests.debian import ensure_program

INSTALL_HINT = ("the status page's browser test needs Chromium: install Debian's package "
                "(as root: apt-get update && apt-get install -y chromium)")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def ensure_chromium() -> str:
    """The browser's path; installs Debian's ``chromium`` when it is missing and we may."""
    return ensure_program("chromium", find_chromium, INSTALL_HINT)


class Browser:
    """One page of a headless Chromium, driven over the DevTools protocol."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self._next_id = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        sent = self._next_id
        await self.ws.send_message(json.dumps({"id": sent, "method": method, "params": params}))
        while True:  # events arrive in between; answers carry our id
            message = json.loads(await self.ws.get_message())
            if message.get("id") == sent:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll ``expression`` until it is truthy (fails with its last value after ``timeout``)."""
        value: Any = None
        with trio.move_on_after(timeout):
            while True:
                value = await self.evaluate(expression)
                if value:
                    return value
                await trio.sleep(0.1)
        raise AssertionError(f"{expression!r} still {value!r} after {timeout} s")

    async def screenshot(self, path: Path) -> int:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        data = base64.b64decode(shot["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return len(data)


def _json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@asynccontextmanager
async def open_browser(chromium: str, profile: Path, log: Path) -> AsyncIterator[Browser]:
    """Start Chromium on a free DevTools port (it writes the port into the profile) and attach to its page."""
    profile.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as output:
        process = await trio.lowlevel.open_process(
            [chromium, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", "--window-size=390,844", "about:blank"],
            stdout=output, stderr=output)
        try:
            port_file = profile / "DevToolsActivePort"
            with trio.fail_after(30):
                while not port_file.exists() or not port_file.read_text().strip():
                    if process.poll() is not None:
                        raise AssertionError(f"chromium exited {process.returncode}: {log.read_text()[-2000:]}")
                    await trio.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            targets = await trio.to_thread.run_sync(_json, f"http://127.0.0.1:{port}/json/list")
            page = next(t for t in targets if t.get("type") == "page")
            async with trio_websocket.open_websocket_url(page["webSocketDebuggerUrl"],
                                                         max_message_size=64 * 1024 * 1024) as ws:
                browser = Browser(ws)
                await browser.send("Page.enable")
                await browser.send("Runtime.enable")
                yield browser
        finally:
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            if process.poll() is None:
                process.kill()
