"""Configuration reload without dropping connections (SIGHUP, ``ocpp-proxy reload``).

A running proxy re-reads its file on SIGHUP: a valid file replaces the
charger settings and the load-management settings at once, for connected
wallboxes too; open connections stay. Settings that belong to sockets
already bound ([server] listen, TLS, [metrics]) are only logged as needing a
restart. An invalid file changes nothing: every problem is logged with key
and line and the old configuration stays.

``ocpp-proxy reload`` sends that SIGHUP to the process whose id is in the
pidfile ``ocpp-proxy run --pidfile`` wrote (or to ``--pid``); in Docker,
``docker kill --signal HUP <container>`` does the same.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.config import Config, ConfigError, ModbusChargerSettings, load

if TYPE_CHECKING:
    from proxy.runtime.server import ProxyServer

#: Sections bound to sockets or files opened at start.
_RESTART_SECTIONS = ("metrics", "log", "meter", "ems")
_RESTART_SERVER_KEYS = ("listen", "tls", "cert", "key", "client_ca", "certs_dir")


def needs_restart(old: Config, new: Config) -> list[str]:
    """Dotted keys whose new values only take effect after a restart."""
    changed = [f"server.{key}" for key in _RESTART_SERVER_KEYS
               if getattr(old.server, key) != getattr(new.server, key)]
    for section in _RESTART_SECTIONS:
        before, after = getattr(old, section), getattr(new, section)
        changed += [f"{section}.{f.name}" for f in dataclasses.fields(before)
                    if getattr(before, f.name) != getattr(after, f.name)]
    if [_virtual_identity(c) for c in old.modbus_chargers] != [_virtual_identity(c) for c in new.modbus_chargers]:
        changed.append("modbus_chargers")  # their runners start with the server; load settings do reload
    return changed


def _virtual_identity(charger: ModbusChargerSettings) -> tuple[Any, ...]:
    """What a running virtual charge point was started with (its load-management keys reload)."""
    return (charger.id, charger.modbus, charger.modbus_unit, charger.map, charger.map_file, charger.transport,
            charger.serial_port, charger.baudrate, charger.parity, charger.stopbits, charger.frame_gap,
            charger.fixed_id_tag, charger.vendor,
            charger.model, charger.serial_number, charger.poll_interval, charger.timeout, charger.fault_after,
            charger.meter_interval)


def reload_from(server: ProxyServer, path: str, log: Any) -> bool:
    """Re-read ``path`` and apply it to ``server``; False (old config kept) on errors."""
    try:
        config = load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload_failed", file=exc.source, key=problem.key, line=problem.line, problem=problem.message)
        return False
    pending = needs_restart(server.config, config)
    if pending:
        log.warning("restart_required", keys=pending)
    server.reload(config)
    return True


def write_pidfile(path: str) -> None:
    Path(path).write_text(f"{os.getpid()}\n", encoding="ascii")


def remove_pidfile(path: str) -> None:
    try:
        if Path(path).read_text(encoding="ascii").strip() == str(os.getpid()):
            Path(path).unlink()
    except OSError:
        pass


def read_pidfile(path: str) -> int:
    """The process id in a pidfile; raises ValueError with a readable reason."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except OSError as exc:
        raise ValueError(f"cannot read pidfile {path}: {exc.strerror}") from exc
    if not text.isdigit():
        raise ValueError(f"pidfile {path} holds no process id")
    return int(text)


def send_reload(pid: int) -> None:
    """SIGHUP to a running proxy; raises ValueError if there is no such process."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError as exc:
        raise ValueError(f"no process {pid} (is the proxy running?)") from exc
    except PermissionError as exc:
        raise ValueError(f"not allowed to signal process {pid}") from exc
