"""Every built-in wallbox map against a simulator written from its vendor's table (issue 20).

The same session as the Heidelberg test (tests/e2e/test_virtual.py) for each make,
through the proxy to an ``ocpp``-library central system: boot, plug, fixed-tag
start, the backend's profile written to the wallbox, meter values, stop. The
simulators (tests/wallbox_sims.py) keep their own register constants, so a wrong
address, type, word order, scale, write function or enable path in a map file
fails here. Then what only some makes need: a two-socket wallbox with two
transactions at once, a set-point that expires unless refreshed, RTU frames over
TCP through a gateway, and two wallboxes sharing one RS485 bus.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from ocpp.v16 import call
from structlog.testing import capture_logs

from proxy.demo.peers import LoopThread, Recorder, SimBackend
from proxy.modbus.maps import WALLBOXES
from tests.conftest import StartProxy, backend_config
from tests.opskit import wait_until
from tests.e2e.test_virtual import calls, is_subsequence, tx_profile
from tests.peers import in_loop, wait_recorded
from tests.wallbox_sims import (
    SimAlfen,
    SimBender,
    SimKeba,
    SimMennekes,
    SimPhoenix,
    SimTwinHeidelberg,
    SimVestel,
    SimWallbox,
    SimWebasto,
)


@dataclass(frozen=True)
class Make:
    map: str
    vendor: str
    model: str
    sim: Callable[[], SimWallbox]


MAKES = [
    Make("alfen-eve-single", "Alfen", "Eve Single", SimAlfen),
    Make("phoenix-ev-cc", "Phoenix Contact", "EV-CC-AC1-M3", SimPhoenix),
    Make("vestel-evc04", "Vestel", "EVC04", SimVestel),
    Make("keba-p30x", "KEBA", "KeContact P30 x", SimKeba),
    Make("mennekes-amtron-compact", "MENNEKES", "AMTRON Compact 2.0s", SimMennekes),
    Make("webasto-next", "Webasto", "Next", SimWebasto),
    Make("bender-cc613", "Bender", "CC613", SimBender),
]


def make_config(backend: SimBackend, entries: list[str]) -> str:
    base = backend_config(backend, chargers=())
    common = 'fixed_id_tag = "FIXED-0001"\npoll_interval = 0.05\nmeter_interval = 1\nfault_after = 2\ntimeout = 0.5\n'
    return base + "".join(f"[[modbus_chargers]]\n{entry}{common}" for entry in entries)


def statuses(recorder: Recorder, connector: int = 1) -> list[str]:
    return [p["status"] for p in calls(recorder, "StatusNotification") if p["connectorId"] == connector]


async def wait_status(recorder: Recorder, status: str, connector: int = 1) -> None:
    await wait_recorded(recorder, lambda r: bool(statuses(r, connector)) and statuses(r, connector)[-1] == status)


def _transaction(recorder: Recorder, connector: int) -> int | None:
    starts = {json.loads(t)[1]: json.loads(t)[3]["connectorId"] for t in recorder.received
              if json.loads(t)[0] == 2 and json.loads(t)[2] == "StartTransaction"}
    for text in recorder.sent:
        frame = json.loads(text)
        if frame[0] == 3 and frame[1] in starts and starts[frame[1]] == connector:
            return int(frame[2]["transactionId"])
    return None


async def transaction_of(recorder: Recorder, connector: int) -> int:
    """The transactionId the backend gave the StartTransaction of ``connector`` (waits for its answer)."""
    await wait_recorded(recorder, lambda r: _transaction(r, connector) is not None)
    found = _transaction(recorder, connector)
    assert found is not None
    return found


def test_every_builtin_map_has_a_session_test() -> None:
    assert {m.map for m in MAKES} | {"heidelberg", "alfen-eve-double"} == set(WALLBOXES)
    for wallbox in WALLBOXES.values():  # each cites its table and what it was checked against
        assert wallbox.source and wallbox.cross_checked, wallbox.name


@pytest.mark.parametrize("make", MAKES, ids=[m.map for m in MAKES])
async def test_whole_session_for_each_make(make: Make, peers: LoopThread, backend: SimBackend,
                                           start_proxy: StartProxy) -> None:
    sim = make.sim()
    port = await in_loop(peers, sim.start())
    await start_proxy(make_config(backend, [f'id = "MB1"\nmodbus = "127.0.0.1:{port}"\nmap = "{make.map}"\n']))
    rec = backend.recorder("MB1")
    await wait_recorded(rec, lambda r: bool(calls(r, "BootNotification")))
    assert calls(rec, "BootNotification")[0] == {"chargePointVendor": make.vendor, "chargePointModel": make.model}
    await wait_status(rec, "Available")
    await wait_until(lambda: sim.limit_amps() == 0.0)  # no transaction, no current

    sim.car().plugged = True  # Authorize and StartTransaction with the fixed tag; charging at the maximum
    await wait_recorded(rec, lambda r: bool(calls(r, "StartTransaction")))
    start = calls(rec, "StartTransaction")[0]
    assert calls(rec, "Authorize") == [{"idTag": "FIXED-0001"}]
    assert start["idTag"] == "FIXED-0001" and start["connectorId"] == 1 and start["meterStart"] == 1_000_000
    transaction_id = await transaction_of(rec, 1)
    await wait_status(rec, "Charging")
    await wait_until(lambda: sim.limit_amps() == 16.0)

    # meter values from the wallbox's own registers, in the transaction
    await wait_recorded(rec, lambda r: any(p.get("transactionId") == transaction_id and any(
        v["measurand"] == "Current.Import" and v["value"] == "16.0" for v in p["meterValue"][0]["sampledValue"])
        for p in calls(r, "MeterValues")))
    sample = [p for p in calls(rec, "MeterValues") if p.get("transactionId") == transaction_id][-1]
    values = {(v["measurand"], v.get("phase")): v["value"] for v in sample["meterValue"][0]["sampledValue"]}
    assert values[("Current.Import", "L3")] == "16.0"
    assert int(values[("Energy.Active.Import.Register", None)]) >= 1_000_000
    assert values[("Power.Active.Import", None)] == str(3 * 16 * 230)

    # the backend limits the transaction to 10 A: the wallbox's register follows
    result = await in_loop(peers, backend.call("MB1", call.SetChargingProfile(
        connector_id=1, cs_charging_profiles=tx_profile(10, transaction_id))))
    assert result.status == "Accepted"
    await wait_until(lambda: sim.limit_amps() == 10.0)
    await wait_recorded(rec, lambda r: any(p.get("transactionId") == transaction_id and any(
        v["measurand"] == "Current.Import" and v["value"] == "10.0" for v in p["meterValue"][0]["sampledValue"])
        for p in calls(r, "MeterValues")))

    # RemoteStop: StopTransaction, the wallbox stops charging, Finishing until the car leaves
    stop = await in_loop(peers, backend.call("MB1", call.RemoteStopTransaction(transaction_id=transaction_id)))
    assert stop.status == "Accepted"
    await wait_recorded(rec, lambda r: bool(calls(r, "StopTransaction")))
    stopped = calls(rec, "StopTransaction")[0]
    assert stopped["transactionId"] == transaction_id and stopped["reason"] == "Remote"
    assert stopped["meterStop"] >= start["meterStart"]  # Vestel counts in 0.1 kWh
    await wait_until(lambda: sim.limit_amps() == 0.0)
    await wait_status(rec, "Finishing")
    sim.car().plugged = False
    await wait_status(rec, "Available")
    assert is_subsequence(["Available", "Preparing", "Charging", "Finishing", "Available"], statuses(rec))
    assert len(calls(rec, "StartTransaction")) == 1
    assert not [t for t in rec.sent if t.startswith("[4")]  # the backend found nothing invalid
    await in_loop(peers, sim.stop())


async def test_two_socket_alfen_runs_two_transactions(peers: LoopThread, backend: SimBackend,
                                                      start_proxy: StartProxy) -> None:
    """Alfen Eve Double: one charge point, connectors 1 and 2 (units 1 and 2), two transactions at once."""
    sim = SimAlfen(double=True)
    port = await in_loop(peers, sim.start())
    await start_proxy(make_config(backend, [f'id = "AL2"\nmodbus = "127.0.0.1:{port}"\nmap = "alfen-eve-double"\n'
                                            "max_current = 16\n"]))
    rec = backend.recorder("AL2")
    await wait_status(rec, "Available", 1)
    await wait_status(rec, "Available", 2)
    config = await in_loop(peers, backend.call("AL2", call.GetConfiguration(key=["NumberOfConnectors"])))
    assert config.configuration_key[0]["value"] == "2"

    sim.car(1).plugged = True
    await wait_status(rec, "Charging", 1)
    sim.car(2).plugged = True
    await wait_status(rec, "Charging", 2)
    first, second = await transaction_of(rec, 1), await transaction_of(rec, 2)
    assert first != second
    await wait_until(lambda: sim.limit_amps(1) == 16.0 and sim.limit_amps(2) == 16.0)

    # the backend caps the charge point at 20 A: the two sockets share it
    cap = {"chargingProfileId": 3, "stackLevel": 0, "chargingProfilePurpose": "ChargePointMaxProfile",
           "chargingProfileKind": "Absolute", "chargingSchedule": {
               "chargingRateUnit": "A", "startSchedule": "2020-01-01T00:00:00Z",
               "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 20}]}}
    result = await in_loop(peers, backend.call("AL2", call.SetChargingProfile(connector_id=0,
                                                                              cs_charging_profiles=cap)))
    assert result.status == "Accepted"
    await wait_until(lambda: sim.limit_amps(1) == 10.0 and sim.limit_amps(2) == 10.0)
    # socket 2's own profile takes less: socket 1 gets the rest of the 20 A
    result = await in_loop(peers, backend.call("AL2", call.SetChargingProfile(
        connector_id=2, cs_charging_profiles=tx_profile(7, second))))
    assert result.status == "Accepted"
    await wait_until(lambda: sim.limit_amps(1) == 13.0 and sim.limit_amps(2) == 7.0)

    # meter values per connector, each in its own transaction, from its own unit's registers
    await wait_recorded(rec, lambda r: {p["connectorId"] for p in calls(r, "MeterValues")
                                        if p.get("transactionId") in (first, second)} == {1, 2})
    by_tx = {p["transactionId"]: p["connectorId"] for p in calls(rec, "MeterValues") if "transactionId" in p}
    assert by_tx[first] == 1 and by_tx[second] == 2

    sim.car(1).plugged = False  # unplugging socket 1 ends only its transaction
    await wait_recorded(rec, lambda r: bool(calls(r, "StopTransaction")))
    await wait_status(rec, "Available", 1)
    assert [s["transactionId"] for s in calls(rec, "StopTransaction")] == [first]
    assert statuses(rec, 2)[-1] == "Charging"
    await wait_until(lambda: sim.limit_amps(1) == 0.0 and sim.limit_amps(2) == 7.0)
    assert not [t for t in rec.sent if t.startswith("[4")]
    await in_loop(peers, sim.stop())


async def test_alfen_setpoint_is_refreshed_before_it_expires(peers: LoopThread, backend: SimBackend,
                                                             start_proxy: StartProxy, tmp_path: Path) -> None:
    """The station falls back to its safe current unless the set-point is rewritten within the validity time;
    a user's map file (the built-in one with a shorter refresh) keeps it alive."""
    builtin = Path(__file__).parents[2] / "proxy" / "modbus" / "wallboxes" / "alfen-eve-single.toml"
    own = tmp_path / "alfen-fast.toml"
    own.write_text(builtin.read_text().replace("refresh = 20 ", "refresh = 0.3 "))
    sim = SimAlfen(validity=1.0, safe_current=6.0)
    port = await in_loop(peers, sim.start())
    await start_proxy(make_config(backend, [f'id = "AL1"\nmodbus = "127.0.0.1:{port}"\nmap_file = "{own}"\n']))
    rec = backend.recorder("AL1")
    sim.car().plugged = True
    await wait_status(rec, "Charging")
    await wait_until(lambda: sim.limit_amps() == 16.0)
    writes_before = len(sim.writes_to(1210))
    await trio.sleep(2.5)  # 2.5 validity times: without rewrites the station would be at its safe current
    assert sim.limit_amps() == 16.0 and sim.remaining(1) > 0
    assert len(sim.writes_to(1210)) >= writes_before + 4  # about every 0.3 s, unchanged value
    await in_loop(peers, sim.stop())


async def test_rtu_over_tcp_gateway_and_two_wallboxes_on_one_bus(peers: LoopThread, backend: SimBackend,
                                                                 start_proxy: StartProxy) -> None:
    """Two AMTRONs (units 50 and 51) behind one RS485 gateway in transparent mode: RTU frames over TCP, one
    shared client, one request on the bus at a time with a silent interval between them."""
    sim = SimMennekes(units=(50, 51))
    port = await in_loop(peers, sim.start(rtu=True))
    bus = f'modbus = "127.0.0.1:{port}"\ntransport = "rtu-over-tcp"\nframe_gap = 0.01\nmap = "mennekes-amtron-compact"\n'
    with capture_logs():
        server = await start_proxy(make_config(backend, [f'id = "AM1"\nmodbus_unit = 50\n{bus}',
                                                         f'id = "AM2"\nmodbus_unit = 51\n{bus}']))
    first, second = backend.recorder("AM1"), backend.recorder("AM2")
    sim.car(50).plugged = True
    sim.car(51).plugged = True
    await wait_status(first, "Charging")
    await wait_status(second, "Charging")
    await wait_until(lambda: sim.limit_amps(50) == 16.0 and sim.limit_amps(51) == 16.0)
    assert len(server.modbus_buses) == 1 and len(server.virtual) == 2  # one client for the bus
    client = next(iter(server.modbus_buses.values()))
    assert sim.heartbeat_fresh(50) and sim.heartbeat_fresh(51)  # the keep-alive reached both
    assert {u for u, a, _ in sim.writes if a == 0x0D00} == {50, 51}
    # one request at a time, at least the frame gap apart (the server sees each when it is complete)
    times = sim.times[-200:]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) > 20 and min(gaps) >= 0.009, min(gaps)
    assert client.requests >= len(sim.times)  # every frame on the bus came from the one client
    await in_loop(peers, sim.stop())


async def test_a_broken_map_file_is_refused_with_key_and_line(tmp_path: Path, backend: SimBackend) -> None:
    from proxy.config import ConfigError, loads

    own = tmp_path / "mine.toml"
    own.write_text('[wallbox]\nvendor = "X"\nmodel = "Y"\n[[state]]\nregister = 5\n[state.values]\n'
                   '1 = {}\n[currents]\nregisters = [6, 7, 8]\n[energy]\nregister = 7\n'
                   '[current_limit]\nregister = 300\nkind = "holding"\nmin = 6\nmax = 16\n')
    text = make_config(backend, [f'id = "X1"\nmodbus = "127.0.0.1:1502"\nmap_file = "{own.name}"\n'])
    with pytest.raises(ConfigError) as error:
        loads(text, "site.toml", base_dir=tmp_path)
    messages = [p.render("site.toml") for p in error.value.problems]
    line = text.splitlines().index(f'map_file = "{own.name}"') + 1
    assert messages == [
        f"site.toml:{line}: modbus_chargers[0].map_file: {own}:12: current_limit.pause: is required without an "
        "[enable] coil/register: nothing could stop charging",
        f"site.toml:{line}: modbus_chargers[0].map_file: {own}:11: energy.register: register 7 overlaps currents "
        "(at 7)"]


class SerialLine:
    """Two pseudo-terminals joined back to back: the proxy opens one end as its RS485 port, a pymodbus RTU
    server the other (what a USB-RS485 adapter and the wire give a real gateway box)."""

    def __init__(self) -> None:
        import os
        import threading

        self._os = os
        (self.master_a, self.slave_a), (self.master_b, self.slave_b) = os.openpty(), os.openpty()
        self.device_a, self.device_b = os.ttyname(self.slave_a), os.ttyname(self.slave_b)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        import select

        peer = {self.master_a: self.master_b, self.master_b: self.master_a}
        while not self._stop.is_set():
            ready, _, _ = select.select(list(peer), [], [], 0.05)
            for fd in ready:
                try:
                    data = self._os.read(fd, 4096)
                except OSError:
                    continue
                self._os.write(peer[fd], data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for fd in (self.master_a, self.slave_a, self.master_b, self.slave_b):
            self._os.close(fd)


async def test_rs485_serial_port_on_the_box(peers: LoopThread, backend: SimBackend, start_proxy: StartProxy) -> None:
    """transport = rtu: the proxy's own serial port (termios, 57600 8N2 as the AMTRON wants) to a pymodbus
    RTU server on the other end of the line; the whole session runs over it."""
    line = SerialLine()
    sim = SimMennekes()
    try:
        await in_loop(peers, sim.start_serial(line.device_b))
        await start_proxy(make_config(backend, [
            f'id = "AMS"\ntransport = "rtu"\nserial_port = "{line.device_a}"\nbaudrate = 57600\nstopbits = 2\n'
            'map = "mennekes-amtron-compact"\n']))
        rec = backend.recorder("AMS")
        await wait_status(rec, "Available")
        sim.car().plugged = True
        await wait_status(rec, "Charging")
        await wait_until(lambda: sim.limit_amps() == 16.0)
        transaction_id = await transaction_of(rec, 1)
        await wait_recorded(rec, lambda r: any(p.get("transactionId") == transaction_id
                                               for p in calls(r, "MeterValues")))
        assert not [t for t in rec.sent if t.startswith("[4")]
    finally:
        await in_loop(peers, sim.stop())
        line.close()


async def test_a_dead_wallbox_on_the_bus_does_not_fault_its_neighbour(peers: LoopThread, backend: SimBackend,
                                                                      start_proxy: StartProxy) -> None:
    """Unit 51 stops answering mid-session: its connector goes Faulted after fault_after, while unit 50 on the
    same bus keeps charging and metering (each timeout costs the bus one request time, no more); 51 comes back."""
    sim = SimMennekes(units=(50, 51))
    port = await in_loop(peers, sim.start(rtu=True))
    bus = f'modbus = "127.0.0.1:{port}"\ntransport = "rtu-over-tcp"\nmap = "mennekes-amtron-compact"\n'
    await start_proxy(make_config(backend, [f'id = "AM1"\nmodbus_unit = 50\n{bus}',
                                            f'id = "AM2"\nmodbus_unit = 51\n{bus}']))
    live, dead = backend.recorder("AM1"), backend.recorder("AM2")
    sim.car(50).plugged = sim.car(51).plugged = True
    await wait_status(live, "Charging")
    await wait_status(dead, "Charging")
    seen = len(statuses(live))

    sim.silent.add(51)
    await wait_status(dead, "Faulted")
    meter_values = len(calls(live, "MeterValues"))
    await wait_recorded(live, lambda r: len(calls(r, "MeterValues")) >= meter_values + 2)  # still metered
    assert statuses(live)[seen:] == [] and statuses(live)[-1] == "Charging"  # never left Charging
    assert sim.limit_amps(50) == 16.0

    sim.silent.clear()
    await wait_status(dead, "Charging")  # back, the same transaction
    assert len(calls(dead, "StartTransaction")) == 1 and not calls(dead, "StopTransaction")
    await in_loop(peers, sim.stop())


async def test_two_sockets_by_register_offset(peers: LoopThread, backend: SimBackend, start_proxy: StartProxy,
                                              tmp_path: Path) -> None:
    """A map file with two connectors on one unit id, the second 100 registers further on: each socket's own
    state, meter and current register, two transactions at once."""
    builtin = Path(__file__).parents[2] / "proxy" / "modbus" / "wallboxes" / "heidelberg.toml"
    own = tmp_path / "twin.toml"
    own.write_text(builtin.read_text() + "\n[[connectors]]\noffset = 0\n\n[[connectors]]\noffset = 100\n")
    sim = SimTwinHeidelberg()
    port = await in_loop(peers, sim.start())
    await start_proxy(make_config(backend, [f'id = "TW"\nmodbus = "127.0.0.1:{port}"\nmap_file = "{own}"\n']))
    rec = backend.recorder("TW")
    await wait_status(rec, "Available", 2)
    sim.cars[1].plugged = True  # socket 2 first
    await wait_status(rec, "Charging", 2)
    await wait_until(lambda: sim.socket_limit(2) == 16.0 and sim.socket_limit(1) == 0.0)
    assert statuses(rec, 1)[-1] == "Available"
    sim.cars[0].plugged = True
    await wait_status(rec, "Charging", 1)
    await wait_until(lambda: sim.socket_limit(1) == 16.0 and sim.socket_limit(2) == 16.0)
    first, second = await transaction_of(rec, 1), await transaction_of(rec, 2)
    result = await in_loop(peers, backend.call("TW", call.SetChargingProfile(
        connector_id=1, cs_charging_profiles=tx_profile(8, first))))
    assert result.status == "Accepted"
    await wait_until(lambda: sim.socket_limit(1) == 8.0 and sim.socket_limit(2) == 16.0)
    assert [v for u, a, v in sim.writes if a == 261][-1] == [80] and [v for u, a, v in sim.writes if a == 361]
    await wait_recorded(rec, lambda r: any(p.get("transactionId") == second and any(
        v["measurand"] == "Current.Import" and v["value"] == "16.0" for v in p["meterValue"][0]["sampledValue"])
        for p in calls(r, "MeterValues")))
    assert not [t for t in rec.sent if t.startswith("[4")]
    await in_loop(peers, sim.stop())


async def test_closing_a_shared_bus_waits_for_the_exchange_on_the_wire(peers: LoopThread) -> None:
    """One wallbox leaving a shared bus (its runner restarts) must not cut another's request short."""
    from proxy.modbus.client import ModbusClient

    sim = SimMennekes(units=(50, 51))
    sim.delay = 0.3
    port = await in_loop(peers, sim.start(rtu=True))
    client = ModbusClient("127.0.0.1", port, 50, timeout=5.0, transport="rtu-over-tcp")
    answers: list[list[int]] = []

    async def read() -> None:
        answers.append(await client.read("holding", 0x0100, 1, unit=51))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await wait_until(lambda: len(sim.times) == 1)  # the request is on the wire
        await client.aclose()  # waits for the answer instead of dropping the connection under it
        assert answers == [[1]]  # unit 51's EVSE state: idle
    assert await client.read("holding", 0x0100, 1, unit=50) == [1]  # and the bus reopens
    await client.aclose()
    await in_loop(peers, sim.stop())
