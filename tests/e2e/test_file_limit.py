"""`ocpp-proxy run` raises its soft open-file limit: two sockets per wallbox."""

from __future__ import annotations

import resource
from pathlib import Path

from tests.opskit import running_proxy


def low_soft_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))


async def test_soft_open_file_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    config = tmp_path / "proxy.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:0"\n[backend]\nurl = "ws://127.0.0.1:9/ocpp"\n'
                      '[metrics]\nlisten = ""\n[log]\nformat = "json"\n'
                      f'[offline]\ndata_dir = "{tmp_path}/data"\n')
    async with running_proxy(config, preexec_fn=low_soft_limit) as proxy:
        limit = await proxy.wait_event("open_file_limit")
        await proxy.port()
        with open(f"/proc/{proxy.process.pid}/limits") as f:
            line = next(row for row in f if row.startswith("Max open files"))
        await proxy.stop()
    assert limit["soft"] == limit["hard"] == hard and limit["max_wallboxes"] == (hard - 64) // 2
    assert line.split()[3] == str(hard)  # the running process, not just its log line
