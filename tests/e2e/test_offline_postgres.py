"""The offline queue in PostgreSQL (``[store] url``): an outage, a kill -9, and the replay (issue 22)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psycopg

from proxy.demo.peers import LoopThread, SimBackend, connect_wallbox
from tests.e2e.test_offline import offline_config, replayed_expectation
from tests.opskit import free_port, launch_proxy, running_proxy
from tests.peers import in_loop


async def test_kill_9_with_frames_queued_in_postgres_delivers_them_exactly_once(
        peers: LoopThread, tmp_path: Path, pg_url: str) -> None:
    backend_port = free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\n[log]\nformat = "json"\n'
                      f'[metrics]\nlisten = ""\n{offline_config(backend_port).split("[server]")[1]}'
                      f'data_dir = "{tmp_path}/data"\n[store]\nurl = "{pg_url}"\n')

    proxy, port = await launch_proxy(config)
    handle = await in_loop(peers, connect_wallbox(f"ws://127.0.0.1:{port}/ocpp/CP1", "CP1"))
    await in_loop(peers, handle.wallbox.run_session())  # the backend is down: all answered locally
    sent = list(handle.recorder.sent)
    proxy.process.send_signal(signal.SIGKILL)  # every answer the wallbox saw was committed first
    assert await proxy.process.wait() == -signal.SIGKILL
    await in_loop(peers, handle.websocket.wait_closed())
    with psycopg.connect(pg_url) as db:  # the frames are in the database, not in a file
        queued = db.execute("SELECT count(*) FROM frames WHERE charger = 'CP1'").fetchone()
    assert queued == (len(sent),)  # every CALL the wallbox sent (the replay leaves out Heartbeats)
    assert not (tmp_path / "data" / "queue.sqlite3").exists()

    backend = SimBackend(port=backend_port)
    await in_loop(peers, backend.start())
    proxy, port = await launch_proxy(config)
    try:
        again = await in_loop(peers, connect_wallbox(f"ws://127.0.0.1:{port}/ocpp/CP1", "CP1"))
        await proxy.wait_event("replay_finished")
        assert backend.recorders["CP1"].received == replayed_expectation(sent, -1, 1001)
        await in_loop(peers, again.close())
        assert await proxy.stop() == 0
    finally:
        await proxy.close()
        await in_loop(peers, backend.stop())
    assert len(backend.recorders["CP1"].received) == 9  # exactly once, nothing after the replay
    with psycopg.connect(pg_url) as db:
        left = db.execute("SELECT count(*) FROM frames").fetchone()
        mapped = db.execute("SELECT local_tx, backend_tx FROM transactions WHERE charger = 'CP1'").fetchall()
    assert left == (0,) and mapped == [(-1, 1001)]


async def test_an_unreachable_database_stops_the_proxy_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\n[log]\nformat = "json"\n[metrics]\nlisten = ""\n'
                      f'[backend]\nurl = "ws://127.0.0.1:{free_port()}/ocpp"\n[[chargers]]\nid = "CP1"\n'
                      f'[store]\nurl = "postgresql://proxy:s3cret@/gone?host={tmp_path}&connect_timeout=2"\n')
    async with running_proxy(config) as proxy:
        unusable = await proxy.wait_event("queue_database_unusable")
        failed = await proxy.wait_event("startup_failed")
        assert await proxy.process.wait() == 1
        await proxy.drain_log()
    assert unusable["key"] == "[store] url" and unusable["file"].startswith("postgresql://***@/gone")
    assert "(from [store] url) cannot be used" in str(failed["error"])
    assert "s3cret" not in json.dumps(proxy.events)
