"""An energy manager over Modbus TCP (a real pymodbus client) limits an OCPP wallbox (issue 6)."""

from __future__ import annotations

import trio
from pymodbus.client import AsyncModbusTcpClient

from proxy.ops.logs import get_logger
from proxy.modbus.service import run_modbus
from proxy.demo.peers import LoopThread, SimBackend
from tests.conftest import StartProxy, proxy_url
from tests.e2e.test_limits_e2e import Backend, profile, settle, site_config
from tests.peers import in_loop
from tests.smart_wallbox import connect_smart


async def test_ems_limit_pause_and_read_back(peers: LoopThread, backend: SimBackend, start_proxy: StartProxy,
                                             nursery: trio.Nursery) -> None:
    text = site_config(backend).replace("[site]", '[ems]\nmodbus_listen = "127.0.0.1:0"\n[site]', 1)
    server = await start_proxy(text)
    limiter = server.limiter
    ems_server = await nursery.start(run_modbus, server.config, limiter.engine, limiter.poke, get_logger())
    assert ems_server is not None
    handle = await in_loop(peers, connect_smart(proxy_url(server, "CP1"), "CP1"))
    cs = Backend(peers, backend, "CP1", handle)
    assert await cs.set(0, profile(11, 1, "TxDefaultProfile", 16)) == "Accepted"
    await settle(limiter)

    async def ems_session() -> tuple[list[int], list[int], bool, bool]:
        client = AsyncModbusTcpClient("127.0.0.1", port=ems_server.ports[0])
        await client.connect()
        try:
            limit = await client.write_register(100, 80, device_id=1)  # charger 0: 8.0 A
            bad = await client.write_register(102, 5, device_id=1)      # read-only state register
            over = await client.write_register(100, 60000, device_id=1)  # out of range
            back = await client.read_holding_registers(100, count=13, device_id=1)
            site = await client.read_input_registers(0, count=2, device_id=1)
            return list(back.registers), list(site.registers), bad.isError(), over.isError() and not limit.isError()
        finally:
            client.close()

    registers, site, refused_ro, refused_range = await in_loop(peers, ems_session())
    assert refused_ro and refused_range  # invalid writes get a Modbus exception, nothing crashes
    assert registers[0] == 80 and registers[1] == 1 and site == [0xFFFF, 1]
    await settle(limiter)
    assert handle.wallbox.composite() == 8.0  # min(backend 16 A, EMS 8 A)
    assert limiter.engine.charger_view("CP1").effective_limit == 8.0  # type: ignore[union-attr]

    async def pause_and_read() -> list[int]:
        client = AsyncModbusTcpClient("127.0.0.1", port=ems_server.ports[0])
        await client.connect()
        try:
            await client.write_register(101, 0, device_id=1)  # pause
            return list((await client.read_holding_registers(100, count=13, device_id=1)).registers)
        finally:
            client.close()

    await in_loop(peers, pause_and_read())
    await settle(limiter)
    assert handle.wallbox.composite() == 0.0  # either side can pause charging
    after = await in_loop(peers, pause_and_read())
    assert after[1] == 0 and after[10] == 0  # enable register and effective limit read back
    assert after[2] != 0  # state of a connected charger (not "offline")
