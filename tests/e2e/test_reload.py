"""Reload without dropping connections: `ocpp-proxy run --pidfile` as a process,
`ocpp-proxy reload` (SIGHUP) with a changed, then a broken config (issue 5)."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import trio

from proxy.demo.peers import LoopThread, SimBackend
from tests.opskit import ProxyProcess
from tests.peers import in_loop
from tests.smart_wallbox import SmartHandle, connect_smart

ROOT = Path(__file__).resolve().parents[2]


def config_text(backend_port: int, site_limit: float, extra: str = "", data_dir: str = "/nonexistent") -> str:
    return (f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\n[metrics]\nlisten = ""\n[log]\nformat = "json"\n'
            f'[backend]\nurl = "ws://127.0.0.1:{backend_port}/ocpp"\n[offline]\ndata_dir = "{data_dir}"\n'
            f'[site]\nmax_current = {site_limit}\nramp_up_interval = 0\nhysteresis = 0\nmin_hold_time = 0\n'
            f'[[chargers]]\nid = "CP1"\nmax_current = 32\n{extra}')


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_stdout=True,
                                  capture_stderr=True, check=False)


async def wait_limit(handle: SmartHandle, value: float) -> None:
    wait = functools.partial(handle.wallbox.wait_composite, value, 15.0)
    assert await trio.to_thread.run_sync(wait, abandon_on_cancel=True), handle.wallbox.profiles()


async def test_reload_applies_new_limits_to_connected_wallboxes(tmp_path: Path, peers: LoopThread,
                                                                backend: SimBackend) -> None:
    config, pidfile = tmp_path / "proxy.toml", tmp_path / "proxy.pid"
    text = functools.partial(config_text, data_dir=str(tmp_path / "data"))
    config.write_text(text(backend.port, 20))
    log = await ProxyProcess.start(config, "--pidfile", str(pidfile))
    process = log.process
    try:
        port = await log.port()
        handle = await in_loop(peers, connect_smart(f"ws://127.0.0.1:{port}/ocpp/CP1", "CP1"))
        await wait_limit(handle, 20.0)
        assert pidfile.read_text().strip() == str(process.pid)

        config.write_text(text(backend.port, 12))
        done = await cli("reload", "--pidfile", str(pidfile), "--config", str(config))
        assert done.returncode == 0, done.stderr
        await wait_limit(handle, 12.0)
        reloaded = await log.wait_event("config_reloaded")
        assert reloaded["site"] is True

        # Per-charger settings too: block this charger (limit 0).
        config.write_text(text(backend.port, 12, 'enabled = false\non_disable = "block"\n'))
        assert (await cli("reload", "--pid", str(process.pid))).returncode == 0
        await wait_limit(handle, 0.0)

        # A broken file: `reload --config` refuses before signalling; a bare SIGHUP
        # logs the problem with its key and keeps the running configuration.
        config.write_text(text(backend.port, 12).replace("max_current = 12", "max_current = -3"))
        refused = await cli("reload", "--pidfile", str(pidfile), "--config", str(config))
        assert refused.returncode == 2 and b"site.max_current" in refused.stderr
        count = len(log.events)
        assert (await cli("reload", "--pidfile", str(pidfile))).returncode == 0
        failed = await log.wait_event("reload_failed", after=count)
        assert failed["key"] == "site.max_current" and failed["line"] == 13
        assert handle.wallbox.composite() == 0.0

        # One connection all along: the backend saw a single BootNotification.
        assert handle.websocket.state.name == "OPEN"
        boots = [t for t in backend.recorders["CP1"].received if '"BootNotification"' in t]
        assert len(boots) == 1
        await in_loop(peers, handle.close())
        assert await log.stop() == 0
    finally:
        await log.close()
    assert not pidfile.exists()


async def test_reload_without_a_running_proxy_says_so(tmp_path: Path) -> None:
    missing = await cli("reload", "--pidfile", str(tmp_path / "none.pid"))
    assert missing.returncode == 1 and b"cannot read pidfile" in missing.stderr
    (tmp_path / "stale.pid").write_text("999999999\n")
    stale = await cli("reload", "--pidfile", str(tmp_path / "stale.pid"))
    assert stale.returncode == 1 and b"no process" in stale.stderr


def test_keys_bound_at_start_are_reported_as_needing_a_restart() -> None:
    from proxy.config import loads
    from proxy.runtime.reload import needs_restart

    old = loads(config_text(1234, 20))
    new = loads(config_text(1234, 10).replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:19999"', 1)
                .replace('format = "json"', 'format = "console"'))
    assert needs_restart(old, new) == ["server.listen", "log.format"]
    assert needs_restart(old, loads(config_text(1234, 10))) == []  # [site] applies at once
    virtual = '[[modbus_chargers]]\nid = "HD1"\nmodbus = "127.0.0.1:502"\nmax_current = 16\n'
    with_virtual = loads(config_text(1234, 10) + virtual)
    assert needs_restart(old, with_virtual) == ["modbus_chargers"]  # a new virtual charge point starts at restart
    assert needs_restart(with_virtual, loads(config_text(1234, 10) + virtual.replace("16", "10"))) == []
