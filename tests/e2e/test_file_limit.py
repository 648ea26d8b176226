"""`ocpp-proxy run` raises its soft open-file limit: two sockets per wallbox."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import trio

from tests.opskit import ProxyProcess

ROOT = Path(__file__).resolve().parents[2]


def low_soft_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))


async def test_soft_open_file_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    config = tmp_path / "proxy.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:0"\n[backend]\nurl = "ws://127.0.0.1:9/ocpp"\n'
                      '[metrics]\nlisten = ""\n[log]\nformat = "json"\n'
                      f'[offline]\ndata_dir = "{tmp_path}/data"\n')
    process = await trio.lowlevel.open_process([sys.executable, "-m", "proxy", "run", "--config", str(config)],
                                               cwd=ROOT, stderr=subprocess.PIPE, preexec_fn=low_soft_limit)
    proxy = ProxyProcess(process)
    try:
        limit = await proxy.wait_event("open_file_limit")
        await proxy.wait_event("listening")
        with open(f"/proc/{process.pid}/limits") as f:
            line = next(row for row in f if row.startswith("Max open files"))
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await process.wait()
    assert limit["soft"] == limit["hard"] == hard and limit["max_wallboxes"] == (hard - 64) // 2
    assert line.split()[3] == str(hard)  # the running process, not just its log line
