"""``ocpp-proxy demo``: the proxy with simulated wallboxes and backend on loopback.

Everything runs in this process: the proxy on trio, and ``ocpp``-library peers
(a central system and a few charge points, from :mod:`proxy.demo.peers`) on an
asyncio loop in a thread, talking to the proxy over real sockets. Each wallbox
boots, authorizes, runs a transaction with Eichrecht-signed meter values and a
Giro-E payment DataTransfer; the live log shows every frame as the backend sees
it, and the summary checks that each frame arrived byte-identical. Beside the
1.6 wallboxes an OCPP 2.0.1 station (:mod:`proxy.demo.peers_v2`) does the same
with TransactionEvent, against its own 2.0.1 CSMS.

The wallboxes share a site limit (``[site] max_current``, 32 A by default): the
live log also shows each limit the proxy sets on a wallbox (its own
ChargePointMaxProfile, which the backend never sees), and the summary lists the
limits every wallbox received.

Modbus is in it too: a simulated SDM630 grid meter reports the house load
(6 A per phase plus what the Modbus wallbox draws), and a simulated Heidelberg
Energy Control wallbox without OCPP appears to the backend as charge point
``HD001`` (a virtual charge point with a fixed RFID): a car plugs in, charges
under the shared limit and leaves; the summary lists the currents the proxy
wrote to its register.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import trio

from proxy.ops import logs
from proxy.config import Config, SiteSettings, loads
from proxy.demo.excerpt import Excerpts
from proxy.runtime.server import ProxyServer
from proxy.ops.logs import get_logger
from proxy.ops.metrics import Metrics, MetricsListener
from proxy.ops.monitor import Monitor
from proxy.modbus.service import run_modbus
from proxy.demo.peers import (
    LoopThread,
    Recorder,
    SimBackend,
    SimHeidelberg,
    SimSdm630,
    WallboxHandle,
    connect_wallbox,
    now_iso,
)
from proxy.demo.peers_v2 import SimCsms, StationHandle, connect_station

_ARROWS = {"received": "─▶", "sent": "◀─"}
#: The proxy's own CALL ids (see proxy.core.session.ID_PREFIX).
_PROXY_ID = "ocpp-proxy:"
#: Stagger between wallboxes and how long each car charges: long enough to see the sharing.
_STAGGER = 0.4
_CHARGING = 1.2
_VIRTUAL = "HD001"
#: The OCPP 2.0.1 station beside the 1.6 wallboxes.
_STATION = "CS201"
_HOUSE_AMPS = 6.0


class LiveLog:
    """One line per frame as the backend sees it: the action and the telling fields first.

    ``raw``: the frames as they are, whole. Otherwise :mod:`proxy.demo.excerpt` condenses each one
    and fits it to ``width`` (the terminal's), keeping the part worth reading.
    """

    def __init__(self, out: TextIO, width: int = 0, raw: bool = False) -> None:
        self.out = out
        self.width = width or (shutil.get_terminal_size((140, 24)).columns if out.isatty() else 140)
        self.raw = raw
        self.excerpts = Excerpts()
        self.start = time.monotonic()
        #: Set before the summary: frames still in flight then (the last answers) are not printed into it.
        self.closed = False

    def frame(self, cp_id: str, direction: str, text: str) -> None:
        if self.closed:
            return
        elapsed = time.monotonic() - self.start
        prefix = f"{elapsed:7.3f}s  {cp_id:<6} {_ARROWS[direction]} backend  "
        shown = text if self.raw else self.excerpts.excerpt(cp_id, text).fit(self.width - len(prefix))
        print(prefix + shown, file=self.out, flush=True)

    def wallbox_frame(self, cp_id: str, direction: str, text: str) -> None:
        """Frames on the wallbox leg: only the proxy's own limits are shown (the rest is above)."""
        if direction != "received" or not text.startswith(f'[2,"{_PROXY_ID}') or self.closed:
            return
        limit = profile_limit(text)
        if limit is not None:
            elapsed = time.monotonic() - self.start
            print(f"{elapsed:7.3f}s  {cp_id:<6} ◀─ proxy    limit {limit}", file=self.out, flush=True)


def profile_limit(text: str) -> str | None:
    """'10.7 A (ChargePointMaxProfile)' for a proxy SetChargingProfile (1.6 or 2.x), 'cleared' for its Clear."""
    try:
        _, _, action, payload = json.loads(text)
    except ValueError:
        return None
    if action == "ClearChargingProfile":
        return "cleared"
    if action != "SetChargingProfile":
        return None
    profile = payload.get("csChargingProfiles") or payload["chargingProfile"]
    schedule = profile["chargingSchedule"]
    schedule = schedule[0] if isinstance(schedule, list) else schedule  # 2.x: a list of schedules
    value = schedule["chargingSchedulePeriod"][0]["limit"]
    return f"{value:g} {schedule['chargingRateUnit']} ({profile['chargingProfilePurpose']})"


#: What the demo changes from a site's defaults, so a few seconds show the sharing at work: limits go
#: up at once (a site: at most every ramp_up_interval), any increase is sent (a site: hysteresis), a
#: paused wallbox may resume at once (a site: min_hold_time). Said in the banner, with the defaults.
DEMO_TIMING = {"ramp_up_interval": 0.0, "hysteresis": 0.0, "min_hold_time": 0.0}
_UNITS = {"ramp_up_interval": "s", "hysteresis": "A", "min_hold_time": "s"}


def timing_note(real_timing: bool) -> str:
    """The banner's line about load-management timing: the site defaults, or what the demo changed."""
    defaults = {f.name: f.default for f in dataclasses.fields(SiteSettings)}
    if real_timing:
        return ("load management with a site's default timing: "
                + ", ".join(f"{name} {defaults[name]:g} {_UNITS[name]}" for name in DEMO_TIMING))
    changed = ", ".join(f"{name} {value:g} {_UNITS[name]} (a site's default: {defaults[name]:g} {_UNITS[name]})"
                        for name, value in DEMO_TIMING.items())
    return (f"demo timing, not a site's: {changed}; so limits change far more often here than on a site "
            "(--real-timing runs with the defaults)")


def demo_config(backend_port: int, wallboxes: int, data_dir: str, site_limit: float = 32.0,
                meter_port: int = 0, wallbox_port: int = 0, csms_port: int = 0, real_timing: bool = False,
                status_port: int = 0) -> str:
    chargers = "".join(f'[[chargers]]\nid = "CP{n:03d}"\nmax_current = 16\n' for n in range(1, wallboxes + 1))
    if csms_port:  # the 2.0.1 station has its own CSMS (a backend speaks one version per connection)
        chargers += (f'[[chargers]]\nid = "{_STATION}"\nmax_current = 16\n'
                     f'upstream_url = "ws://127.0.0.1:{csms_port}/ocpp"\n')
    timing = "" if real_timing else "".join(f"{name} = {value}\n" for name, value in DEMO_TIMING.items())
    modbus = ""
    if meter_port:
        modbus += f'[meter]\nmodbus = "127.0.0.1:{meter_port}"\nmap = "sdm630"\npoll_interval = 0.2\n'
    if wallbox_port:
        modbus += (f'[[modbus_chargers]]\nid = "{_VIRTUAL}"\nmodbus = "127.0.0.1:{wallbox_port}"\n'
                   f'fixed_id_tag = "DEMO-RFID-0001"\npoll_interval = 0.1\nmeter_interval = 1\n')
    return (f'[server]\nlisten = "127.0.0.1:0"\nping_interval = 0\n[log]\nlevel = "warning"\n'
            f'[backend]\nurl = "ws://127.0.0.1:{backend_port}/ocpp"\n[offline]\ndata_dir = "{data_dir}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{status_port}"\n'
            f'[site]\nmax_current = {site_limit}\n{timing}{modbus}{chargers}')


class Stop:
    """A stop asked for in trio (Ctrl-C), awaited by the peers in their asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()
        #: Set at once on the asking side (the event follows when the peers' loop gets to it).
        self.requested = False

    def set(self) -> None:
        self.requested = True
        self.loop.call_soon_threadsafe(self.event.set)

    def rounds(self, rounds: int | None) -> Iterator[int]:
        """Round numbers from 1: ``rounds`` of them, or (None) until a stop is asked for."""
        done = 0
        while (done < rounds) if rounds is not None else not self.event.is_set():
            done += 1
            yield done

    async def pause(self, seconds: float) -> None:
        """``seconds``, or less when a stop is asked for meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.event.wait(), seconds)


async def _wallbox_sessions(url: str, ids: list[str], rounds: int | None, live: LiveLog,
                            stop: Stop) -> list[WallboxHandle]:
    async def one(index: int, cp_id: str) -> WallboxHandle:
        await asyncio.sleep(index * _STAGGER)
        handle = await connect_wallbox(f"{url}/{cp_id}", cp_id,
                                       on_frame=functools.partial(live.wallbox_frame, cp_id))
        for _ in stop.rounds(rounds):
            await handle.wallbox.run_session(id_tag=f"04A2B3C4D5{int(cp_id[2:]):04d}", charging_time=_CHARGING)
            if rounds is None:
                await stop.pause(5)
        return handle

    return list(await asyncio.gather(*(one(i, cp_id) for i, cp_id in enumerate(ids))))


async def _station_session(url: str, rounds: int | None, live: LiveLog, stop: Stop) -> StationHandle:
    """The 2.0.1 station: boot, a connector status, a whole signed transaction (TransactionEvent)."""
    await asyncio.sleep(_STAGGER / 2)
    handle = await connect_station(f"{url}/{_STATION}", _STATION,
                                   on_frame=functools.partial(live.wallbox_frame, _STATION))
    await handle.boot()

    async def connector(status: str) -> None:
        await handle.send(handle.calls.StatusNotification(timestamp=now_iso(), connector_status=status,
                                                          evse_id=1, connector_id=1))

    for done in stop.rounds(rounds):
        await connector("Occupied")  # a car plugged in
        await handle.signed_transaction(f"demo-tx-{done}", token="04A2B3C4D5E6F7", charging_time=_CHARGING)
        await connector("Available")  # and gone
        if rounds is None:
            await stop.pause(5)
    return handle


def _backend_frames(texts: list[str]) -> list[str]:
    """A wallbox's frames without the proxy's CALLs and their answers (not the backend's business)."""
    return [t for t in texts if not t.startswith((f'[2,"{_PROXY_ID}', f'[3,"{_PROXY_ID}', f'[4,"{_PROXY_ID}'))]


async def _modbus_car(backend: SimBackend, wallbox: SimHeidelberg, meter: SimSdm630) -> None:
    """A car at the Modbus wallbox: plug in, charge, leave; the grid meter sees house load plus the car."""

    def frames(action: str) -> int:
        recorder = backend.recorders.get(_VIRTUAL)
        return sum(1 for text in recorder.received if f'"{action}"' in text) if recorder else 0

    async def follow_meter() -> None:
        while True:
            amps = _HOUSE_AMPS + wallbox.limit_amps * (wallbox.plugged and wallbox.limit_amps >= 6)
            meter.set_currents(amps, amps, amps)
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow_meter)
        with trio.fail_after(20):
            while frames("StatusNotification") < 2:  # booted, connectors reported
                await trio.sleep(0.05)
            wallbox.plugged = True
            while frames("StartTransaction") < 1:
                await trio.sleep(0.05)
            await trio.sleep(_CHARGING * 2)
            wallbox.plugged = False
            while frames("StopTransaction") < 1:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


def modbus_summary(backend: SimBackend, wallbox: SimHeidelberg, out: TextIO) -> bool:
    recorder = backend.recorders.get(_VIRTUAL)
    received = recorder.received if recorder else []
    actions = [json.loads(t)[2] for t in received if t.startswith("[2,")]
    currents = [f"{values[0] / 10:g} A" for address, values in wallbox.writes if address == 261]
    shown = " → ".join(c for i, c in enumerate(currents) if i == 0 or c != currents[i - 1])
    print(f"{_VIRTUAL:<8} {len(received):>14} {len(recorder.sent if recorder else []):>15}  "
          f"{'(Modbus)':<14}  current register: {shown}", file=out)
    return {"BootNotification", "Authorize", "StartTransaction", "MeterValues", "StopTransaction"} <= set(actions)


def summary(backend: SimBackend, handles: list[WallboxHandle], out: TextIO,
            station: tuple[SimCsms, StationHandle] | None = None) -> bool:
    print("\nwallbox  frames→backend  frames←backend  byte-identical  limits set by the proxy", file=out)
    rows: list[tuple[str, Recorder, Recorder]] = [(h.wallbox.id, h.recorder, backend.recorders[h.wallbox.id])
                                                  for h in handles]
    if station is not None:
        rows.append((_STATION, station[1].recorder, station[0].recorders[_STATION]))
    all_ok = True
    for cp_id, own, seen in rows:
        ok = _backend_frames(own.sent) == seen.received and seen.sent == _backend_frames(own.received)
        all_ok &= ok
        limits = [profile_limit(t) for t in own.received if t.startswith(f'[2,"{_PROXY_ID}')]
        shown = " → ".join(str(limit).split(" (")[0] for limit in limits if limit) or "none"
        print(f"{cp_id:<8} {len(seen.received):>14} {len(seen.sent):>15}  {'yes' if ok else 'NO':<14}  "
              f"{shown}", file=out)
    return all_ok


@dataclass(frozen=True)
class DemoOptions:
    wallboxes: int = 3
    forever: bool = False
    site_limit: float = 32.0
    #: Print frames whole instead of their excerpts.
    raw: bool = False
    #: Load management with a site's default timing instead of the demo's quick one.
    real_timing: bool = False
    #: The status page's port on 127.0.0.1 (0: any free one; the address is printed).
    status_port: int = 0


@dataclass
class _Sims:
    """The simulated peers and where they listen."""

    backend: SimBackend
    csms: SimCsms
    meter: SimSdm630
    wallbox: SimHeidelberg
    ports: dict[str, int] = field(default_factory=dict)


async def _demo(options: DemoOptions, out: TextIO) -> bool | None:
    """True: every frame byte-identical; None: stopped at once by a second Ctrl-C (no summary)."""
    peers = LoopThread("demo-peers")
    stop = Stop(peers.loop)
    live = LiveLog(out, raw=options.raw)
    sims = _Sims(SimBackend(on_frame=live.frame), SimCsms(subprotocol="ocpp2.0.1", on_frame=live.frame), SimSdm630(),
                 SimHeidelberg())
    data_dir = tempfile.mkdtemp(prefix="ocpp-proxy-demo-")  # the demo leaves no queue behind
    sims.meter.set_currents(_HOUSE_AMPS, _HOUSE_AMPS, _HOUSE_AMPS)
    try:
        sims.ports = {"backend": peers.run(sims.backend.start()), "meter": peers.run(sims.meter.start()),
                      "wallbox": peers.run(sims.wallbox.start()), "csms": peers.run(sims.csms.start())}
        p = sims.ports
        config = loads(demo_config(p["backend"], options.wallboxes, data_dir, options.site_limit, p["meter"],
                                   p["wallbox"], p["csms"], options.real_timing, options.status_port), "<demo>")
        with trio.CancelScope() as at_once:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_signals, stop, at_once, out)
                ok = await _run(config, options, sims, (peers, stop, live), out)
                nursery.cancel_scope.cancel()
        return None if at_once.cancelled_caught else ok
    finally:
        for sim in (sims.wallbox, sims.meter, sims.backend, sims.csms):
            peers.run(sim.stop())
        peers.close()
        shutil.rmtree(data_dir, ignore_errors=True)


async def _signals(stop: Stop, at_once: trio.CancelScope, out: TextIO) -> None:
    """First Ctrl-C (or SIGTERM): every wallbox finishes its transaction, then the summary. Second: stop."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if stop.requested:
                at_once.cancel()
                return
            print("\nstopping: each wallbox finishes its transaction, then the summary "
                  "(Ctrl-C again to stop at once)\n", file=out, flush=True)
            stop.set()


async def _run(config: Config, options: DemoOptions, sims: _Sims, loop: tuple[LoopThread, Stop, LiveLog],
               out: TextIO) -> bool:
    """The proxy serving the simulated peers until they are done (or stopped); the summary."""
    peers, stop, live = loop
    rounds = None if options.forever else 1
    timeout = None if options.forever else 120.0
    metrics = Metrics(charger.id for charger in config.all_chargers)
    server = ProxyServer(config, listeners=[MetricsListener(metrics)])
    server.limiter.sinks.append(metrics)
    monitor = Monitor(config, metrics, server, source="<demo>")
    async with trio.open_nursery() as nursery:
        status_ports = await nursery.start(monitor.serve)  # the status page lives as long as the demo
        ports = await nursery.start(server.serve)
        inputs = trio.CancelScope()  # the grid meter: stopped before the wallboxes leave

        async def modbus_inputs(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            with inputs:
                await run_modbus(config, server.limiter.engine, server.limiter.poke, get_logger(),
                                 task_status=task_status, health=metrics)

        await nursery.start(modbus_inputs)
        url = f"ws://127.0.0.1:{ports[0]}/ocpp"
        p = sims.ports
        print(f"ocpp-proxy demo: backend ws://127.0.0.1:{p['backend']}/ocpp, proxy {url}/<id>, "
              f"{options.wallboxes} OCPP 1.6 wallboxes, OCPP 2.0.1 station {_STATION} (its CSMS ws://127.0.0.1:"
              f"{p['csms']}/ocpp; max 16 A each) and Modbus wallbox {_VIRTUAL} sharing a site limit of "
              f"{options.site_limit:g} A; grid meter (SDM630) 127.0.0.1:{p['meter']}, house load "
              f"{_HOUSE_AMPS:g} A", file=out)
        print(timing_note(options.real_timing), file=out)
        print(f"status page: http://127.0.0.1:{status_ports[0]}/ (JSON: /api/status), up while the demo runs\n",
              file=out, flush=True)
        ids = [f"CP{n:03d}" for n in range(1, options.wallboxes + 1)]
        run = functools.partial(peers.run, _wallbox_sessions(url, ids, rounds, live, stop), timeout)
        run_station = functools.partial(peers.run, _station_session(url, rounds, live, stop), timeout)
        handles: list[WallboxHandle] = []
        stations: list[StationHandle] = []

        async def ocpp_wallboxes() -> None:
            handles.extend(await trio.to_thread.run_sync(run, abandon_on_cancel=True))

        async def ocpp_station() -> None:
            stations.append(await trio.to_thread.run_sync(run_station, abandon_on_cancel=True))

        async with trio.open_nursery() as cars:
            cars.start_soon(ocpp_wallboxes)
            cars.start_soon(ocpp_station)
            cars.start_soon(_modbus_car, sims.backend, sims.wallbox, sims.meter)
        live.closed = True
        ok = summary(sims.backend, handles, out, (sims.csms, stations[0]))
        ok &= modbus_summary(sims.backend, sims.wallbox, out)
        inputs.cancel()
        with trio.move_on_after(5):  # limits in flight are answered; then no new ones
            await server.limiter.wait_settled()
        server.limiter.stop()

        async def close_all() -> None:  # in the peers' loop; trio keeps serving the close handshakes
            await asyncio.gather(*(h.close() for h in handles), *(s.close() for s in stations))

        await trio.to_thread.run_sync(peers.run, close_all())
        await server.stop()
        nursery.cancel_scope.cancel()
    return ok


def run_demo(wallboxes: int = 3, forever: bool = False, out: Any = None, site_limit: float = 32.0, *,
             raw: bool = False, real_timing: bool = False, status_port: int = 0) -> int:
    """Exit status: 0 every frame arrived byte-identical (also after Ctrl-C), 1 a mismatch, 130 stopped at once."""
    out = out or sys.stdout
    logs.configure("warning", "console")
    # The simulated Modbus devices complain when the proxy hangs up mid-request at the end; not news.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    options = DemoOptions(wallboxes, forever, site_limit, raw, real_timing, status_port)
    ok: bool | None = None
    try:
        ok = trio.run(_demo, options, out)
    except* KeyboardInterrupt:  # Ctrl-C before the demo listens for it (start-up): nothing to summarise
        pass
    if ok is None:
        print("\nstopped at once: no summary", file=out)
        return 130
    print("\nall frames arrived byte-identical" if ok else "\nMISMATCH: see above", file=out)
    return 0 if ok else 1
