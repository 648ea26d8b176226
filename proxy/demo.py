"""``ocpp-proxy demo``: the proxy with simulated wallboxes and backend on loopback.

Everything runs in this process: the proxy on trio, and ``ocpp``-library peers
(a central system and a few charge points, from :mod:`proxy.simulators`) on an
asyncio loop in a thread, talking to the proxy over real sockets. Each wallbox
boots, authorizes, runs a transaction with Eichrecht-signed meter values and a
Giro-E payment DataTransfer; the live log shows every frame as the backend sees
it, and the summary checks that each frame arrived byte-identical.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import sys
import tempfile
import time
from typing import Any, TextIO

import trio

from proxy import logs
from proxy.config import loads
from proxy.server import ProxyServer
from proxy.simulators import LoopThread, SimBackend, WallboxHandle, connect_wallbox

_ARROWS = {"received": "─▶", "sent": "◀─"}


class LiveLog:
    """One line per frame as the backend sees it, clipped to a readable width."""

    def __init__(self, out: TextIO, width: int = 110) -> None:
        self.out = out
        self.width = width
        self.start = time.monotonic()

    def frame(self, cp_id: str, direction: str, text: str) -> None:
        elapsed = time.monotonic() - self.start
        line = f"{elapsed:7.3f}s  {cp_id:<6} {_ARROWS[direction]} backend  {text}"
        if len(line) > self.width:
            line = line[: self.width - 1] + "…"
        print(line, file=self.out, flush=True)


def demo_config(backend_port: int, wallboxes: int, data_dir: str) -> str:
    chargers = "".join(f'[[chargers]]\nid = "CP{n:03d}"\n' for n in range(1, wallboxes + 1))
    return (f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\n[log]\nlevel = "warning"\n'
            f'[backend]\nurl = "ws://127.0.0.1:{backend_port}/ocpp"\n[offline]\ndata_dir = "{data_dir}"\n'
            f'{chargers}')


async def _wallbox_sessions(url: str, ids: list[str], rounds: int | None) -> list[WallboxHandle]:
    async def one(cp_id: str) -> WallboxHandle:
        handle = await connect_wallbox(f"{url}/{cp_id}", cp_id)
        done = 0
        while rounds is None or done < rounds:
            await handle.wallbox.run_session(id_tag=f"04A2B3C4D5{int(cp_id[2:]):04d}")
            done += 1
            if rounds is None:
                await asyncio.sleep(5)
        return handle

    return list(await asyncio.gather(*(one(cp_id) for cp_id in ids)))


def summary(backend: SimBackend, handles: list[WallboxHandle], out: TextIO) -> bool:
    print("\nwallbox  frames→backend  frames←backend  byte-identical", file=out)
    all_ok = True
    for handle in handles:
        seen = backend.recorders[handle.wallbox.id]
        ok = handle.recorder.sent == seen.received and seen.sent == handle.recorder.received
        all_ok &= ok
        print(f"{handle.wallbox.id:<8} {len(seen.received):>14} {len(seen.sent):>15}  {'yes' if ok else 'NO'}",
              file=out)
    return all_ok


async def _demo(wallboxes: int, forever: bool, out: TextIO) -> bool:
    peers = LoopThread("demo-peers")
    live = LiveLog(out)
    backend = SimBackend(on_frame=live.frame)
    data_dir = tempfile.mkdtemp(prefix="ocpp-proxy-demo-")  # the demo leaves no queue behind
    try:
        port = peers.run(backend.start())
        server = ProxyServer(loads(demo_config(port, wallboxes, data_dir), "<demo>"))
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(server.serve)
            url = f"ws://127.0.0.1:{ports[0]}/ocpp"
            print(f"ocpp-proxy demo: backend ws://127.0.0.1:{port}/ocpp, proxy {url}/<id>, "
                  f"{wallboxes} wallboxes\n", file=out)
            ids = [f"CP{n:03d}" for n in range(1, wallboxes + 1)]
            run = functools.partial(peers.run, _wallbox_sessions(url, ids, None if forever else 1), 120)
            handles: list[WallboxHandle] = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
            ok = summary(backend, handles, out)
            for handle in handles:
                peers.run(handle.close())
            with trio.fail_after(10):
                await server.wait_sessions(0)
            nursery.cancel_scope.cancel()
        return ok
    finally:
        peers.run(backend.stop())
        peers.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def run_demo(wallboxes: int = 3, forever: bool = False, out: Any = None) -> int:
    out = out or sys.stdout
    logs.configure("warning", "console")
    try:
        ok = trio.run(_demo, wallboxes, forever, out)
    except KeyboardInterrupt:
        return 0
    print("\nall frames arrived byte-identical" if ok else "\nMISMATCH: see above", file=out)
    return 0 if ok else 1
