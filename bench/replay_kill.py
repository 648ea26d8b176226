"""Duplicates at the backend when the proxy is killed (kill -9) during replay.

    PYTHONPATH=. python bench/replay_kill.py [--chargers 50] [--rounds 5] [--at 0.4] [--checkout DIR]

Each round: 50 chargers each have one whole transaction queued (Boot, status reports,
Authorize, StartTransaction, 6 MeterValues, StopTransaction: 13 frames, 650 in all), written
into a fresh queue file the way a proxy leaves it. A backend (``tests/backend_process.py``,
the ``ocpp``-library central system, in its own process) is up; ``python -m proxy run`` starts
and the 50 wallboxes connect (plain WebSocket clients that only keep the connection), so every
queue is replayed at once. When the backend has received ``--at`` of the frames, the proxy is
killed with SIGKILL, started again, the wallboxes reconnect, and the bench waits until every
queue is empty. It then counts the message ids the backend received more than once, and the
StartTransactions among them (each one a second transaction at a backend that does not
recognise a repeated message id).

``--checkout DIR`` runs the proxy from another checkout (e.g. a ``git worktree`` of the commit
before the change) with the same load, so "before" and "after" are measured side by side.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio
from trio_websocket import open_websocket_url

from tests.opskit import BackendProcess, ProxyProcess

ROOT = Path(__file__).resolve().parents[1]


def transaction(charger: str, n: int) -> list[tuple[str, str, int | None]]:
    """(action, exact text, local transaction id) of one queued transaction."""
    def frame(k: int, action: str, payload: dict[str, Any]) -> str:
        return json.dumps([2, f"{charger}-{k}", action, payload], separators=(",", ":"))

    ts = "2026-11-27T05:%02d:00Z"
    frames = [("BootNotification", frame(0, "BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"}), None),
              ("StatusNotification", frame(1, "StatusNotification", {"connectorId": 1, "errorCode": "NoError",
                                                                     "status": "Preparing"}), None),
              ("Authorize", frame(2, "Authorize", {"idTag": f"TAG{n}"}), None),
              ("StartTransaction", frame(3, "StartTransaction", {"connectorId": 1, "idTag": f"TAG{n}", "meterStart": 0,
                                                                 "timestamp": ts % 1}), -1)]
    for k in range(6):
        frames.append(("MeterValues", frame(4 + k, "MeterValues", {
            "connectorId": 1, "transactionId": -1,
            "meterValue": [{"timestamp": ts % (10 + k), "sampledValue": [{"value": str(100 * k)}]}]}), None))
    frames += [("StatusNotification", frame(10, "StatusNotification", {"connectorId": 1, "errorCode": "NoError",
                                                                       "status": "Finishing"}), None),
               ("StopTransaction", frame(11, "StopTransaction", {"transactionId": -1, "meterStop": 600,
                                                                 "timestamp": ts % 30}), None),
               ("StatusNotification", frame(12, "StatusNotification", {"connectorId": 1, "errorCode": "NoError",
                                                                       "status": "Available"}), None)]
    return frames


def write_queue(data: Path, chargers: list[str]) -> int:
    """The queue a proxy leaves behind (the columns every version has; newer ones add theirs)."""
    data.mkdir(parents=True)
    with sqlite3.connect(data / "queue.sqlite3") as db:
        db.executescript("""
            CREATE TABLE frames (row INTEGER PRIMARY KEY AUTOINCREMENT, charger TEXT NOT NULL, action TEXT NOT NULL,
                                 text TEXT NOT NULL, local_tx INTEGER, created REAL NOT NULL);
            CREATE INDEX frames_by_charger ON frames (charger, row);
            CREATE TABLE transactions (charger TEXT NOT NULL, local_tx INTEGER NOT NULL, backend_tx INTEGER NOT NULL,
                                       PRIMARY KEY (charger, local_tx));
            CREATE TABLE counters (charger TEXT PRIMARY KEY, last_local_tx INTEGER NOT NULL);""")
        count = 0
        for n, charger in enumerate(chargers):
            for action, text, local in transaction(charger, n):
                db.execute("INSERT INTO frames (charger, action, text, local_tx, created) VALUES (?, ?, ?, ?, ?)",
                           (charger, action, text, local, time.time()))
                count += 1
            db.execute("INSERT INTO counters VALUES (?, -1)", (charger,))
    return count


def remaining(data: Path) -> int:
    with sqlite3.connect(data / "queue.sqlite3", timeout=10) as db:
        return int(db.execute("SELECT count(*) FROM frames").fetchone()[0])


def config(work: Path, backend_port: int, chargers: list[str]) -> Path:
    path = work / "proxy.toml"
    path.write_text(f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\n[log]\nformat = "json"\n'
                    f'[metrics]\nlisten = ""\n[backend]\nurl = "ws://127.0.0.1:{backend_port}/ocpp"\n'
                    f'[offline]\ndata_dir = "{work / "data"}"\nreconnect_min = 0.2\nreconnect_max = 1.0\n'
                    + "".join(f'[[chargers]]\nid = "{c}"\n' for c in chargers))
    return path


async def start_proxy(checkout: Path, config_path: Path) -> tuple[ProxyProcess, int]:
    process = await trio.lowlevel.open_process([sys.executable, "-m", "proxy", "run", "--config", str(config_path)],
                                               cwd=checkout, stderr=subprocess.PIPE)
    proxy = ProxyProcess(process)
    return proxy, int((await proxy.wait_event("listening", timeout=60))["ports"][0])


async def wallboxes(port: int, chargers: list[str], stop: trio.Event) -> None:
    """Each charger's wallbox connects and stays until ``stop`` or until the proxy goes away."""
    async def one(charger: str) -> None:
        try:
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ocpp/{charger}", subprotocols=["ocpp1.6"]):
                await stop.wait()
        except Exception:  # noqa: BLE001 - the proxy was killed under it: expected
            pass

    async with trio.open_nursery() as nursery:
        for charger in chargers:
            nursery.start_soon(one, charger)


async def received_count(backend: BackendProcess, wanted: int, timeout: float) -> int:
    def count() -> int:
        return sum(1 for e in backend.events if e.get("event") == "frame" and e["direction"] == "received")

    await backend.wait_for(lambda _: count() >= wanted, timeout=timeout)
    return count()


async def one_round(checkout: Path, chargers: list[str], at: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="replay-kill-"))
    total = write_queue(work / "data", chargers)
    backend = await BackendProcess.start("answer")
    config_path = config(work, backend.port, chargers)
    async with trio.open_nursery() as reader:
        reader.start_soon(backend.follow)
        try:
            return await _replay_and_kill(checkout, chargers, at, work, total, backend, config_path)
        finally:
            await backend.stop()
            reader.cancel_scope.cancel()


async def _replay_and_kill(checkout: Path, chargers: list[str], at: float, work: Path, total: int,
                           backend: BackendProcess, config_path: Path) -> dict[str, Any]:
    before_kill = 0
    for killed in (True, False):
        proxy, port = await start_proxy(checkout, config_path)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy.follow)  # its log must never fill the pipe and block it
            nursery.start_soon(wallboxes, port, chargers, stop)
            if killed:
                before_kill = await received_count(backend, int(total * at), timeout=120)
                proxy.process.send_signal(signal.SIGKILL)
            else:
                with trio.fail_after(180):
                    while remaining(work / "data"):
                        await trio.sleep(0.2)  # the queue file is the only place that says "done"
                await trio.sleep(1.0)  # answers in flight reach the backend's log
                proxy.process.terminate()
            await proxy.process.wait()
            stop.set()
    ids = Counter(json.loads(e["text"])[1] for e in backend.events
                  if e.get("event") == "frame" and e["direction"] == "received" and e["text"].startswith("[2,"))
    repeated = {msg_id: n for msg_id, n in ids.items() if n > 1}
    starts = [msg_id for msg_id in repeated if msg_id.endswith("-3")]
    missing = sum(1 for c in chargers for k in range(13) if f"{c}-{k}" not in ids and k != 0)
    return {"queued": total, "received_before_kill": before_kill, "distinct": len(ids),
            "duplicated_frames": sum(n - 1 for n in repeated.values()), "duplicated_ids": len(repeated),
            "duplicated_starts": len(starts), "missing": missing,
            "chargers_with_duplicates": len({msg_id.rsplit("-", 1)[0] for msg_id in repeated})}


async def main_async(args: argparse.Namespace) -> None:
    checkout = Path(args.checkout).resolve() if args.checkout else ROOT
    chargers = [f"K{n:03d}" for n in range(args.chargers)]
    rows = []
    for round_ in range(args.rounds):
        row = await one_round(checkout, chargers, args.at)
        rows.append(row)
        print(f"round {round_ + 1}: {row}", flush=True)
    print(f"\n{checkout}: {args.chargers} chargers, kill -9 at {args.at:.0%} of the replay, {args.rounds} rounds")
    for key in ("duplicated_frames", "duplicated_starts", "chargers_with_duplicates", "missing"):
        values = [r[key] for r in rows]
        print(f"  {key}: {values} (total {sum(values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chargers", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--at", type=float, default=0.4, help="share of the frames received when the proxy is killed")
    parser.add_argument("--checkout", default="", help="run the proxy from this checkout (default: this one)")
    trio.run(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
