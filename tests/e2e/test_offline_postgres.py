"""``[store] url`` at start-up (issue 22). The outage, kill -9 and replay with the queue in PostgreSQL is
tests/e2e/test_offline.py::test_kill_9_with_frames_queued_delivers_them_exactly_once[postgres]."""

from __future__ import annotations

import json
from pathlib import Path

from tests.opskit import free_port, running_proxy


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
