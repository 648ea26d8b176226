"""A second, independent OCPP implementation for interoperability tests: ocpp-rpc (Node.js).

``peer.js`` runs an ocpp-rpc station or CSMS with strict schema validation;
:class:`NodePeer` starts it as a child process and talks to it in JSON lines.
The first test that needs it installs it from the committed lock file
(``npm ci --prefix tests/interop``, once per checkout, under a file lock), so the
README's test command needs no extra step; without Node.js the tests that need it
fail with a message naming what to install (they never skip).
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent


def node() -> str:
    """The Node.js binary, with ocpp-rpc installed beside ``peer.js`` (installed here on first use)."""
    found = shutil.which("node")
    npm = shutil.which("npm")
    assert found is not None and npm is not None, \
        "Node.js and npm are needed for the interop tests (Debian: apt-get install nodejs npm)"
    with open(HERE / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (HERE / "node_modules" / "ocpp-rpc").is_dir():
            done = subprocess.run([npm, "ci", "--prefix", str(HERE), "--no-audit", "--no-fund"],
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"npm ci --prefix tests/interop failed:\n{done.stderr[-2000:]}"
    return found


class NodePeer:
    """One ocpp-rpc peer process: its frames as sent/received, its answers by call id."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.sent: list[str] = []
        self.received: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()
        self._ids = 0

    @classmethod
    async def start(cls, nursery: trio.Nursery, *args: str) -> NodePeer:
        process = await trio.lowlevel.open_process([node(), str(HERE / "peer.js"), *args], cwd=HERE,
                                                   stdin=subprocess.PIPE,
                                                   stdout=subprocess.PIPE)
        peer = cls(process)
        nursery.start_soon(peer._read)
        return peer

    async def _read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                event = json.loads(line)
                if event["event"] == "frame":
                    (self.sent if event["dir"] == "sent" else self.received).append(event["text"])
                self.events.append(event)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, event: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """The first event named ``event`` with ``fields``; fails after ``timeout``."""
        with trio.fail_after(timeout):
            while True:
                for item in self.events:
                    if item["event"] == "fatal":
                        raise AssertionError(f"ocpp-rpc peer failed: {item['error']}")
                    if item["event"] == event and all(item.get(k) == v for k, v in fields.items()):
                        return item
                await self._changed.wait()

    async def wait_frames(self, count: int, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while len(self.received) < count:
                await self._changed.wait()

    async def call(self, action: str, params: dict[str, Any], timeout: float = 20.0) -> Any:
        """A CALL from this peer; returns the answer's payload (raises on a CALLERROR)."""
        self._ids += 1
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps({"id": self._ids, "call": action, "params": params}).encode()
                                          + b"\n")
        with trio.fail_after(timeout):
            while True:
                for item in self.events:
                    if item.get("id") == self._ids and item["event"] in ("answer", "error"):
                        if item["event"] == "error":
                            raise AssertionError(f"{action}: {item['error']}")
                        return item["result"]
                await self._changed.wait()

    async def stop(self) -> None:
        if self.process.stdin is not None:
            await self.process.stdin.aclose()
        with trio.move_on_after(5):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
