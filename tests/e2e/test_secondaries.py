"""Several backends per wallbox over real sockets: a primary and two secondaries (issue 10).

All three backends are ``ocpp``-library central systems (SimBackend), each handing
out transaction ids from its own range, so every id a peer sees says whose it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from ocpp.v16 import call

from prometheus_client import generate_latest

from proxy.config import loads
from proxy.messages.ocppj import classify
from proxy.ops.metrics import Metrics, MetricsListener
from proxy.runtime.server import ProxyServer
from proxy.demo.peers import OCMF_SAMPLE, LoopThread, SimBackend, WallboxHandle, connect_wallbox
from tests.conftest import StartProxy, proxy_url
from tests.opskit import parse, value, wait_until
from tests.peers import in_loop, wait_recorded

HA_ACTIONS = ["BootNotification", "StatusNotification", "StartTransaction", "MeterValues", "StopTransaction"]


@pytest.fixture
async def three(peers: LoopThread) -> AsyncIterator[dict[str, SimBackend]]:
    sims = {"primary": SimBackend(), "ems": SimBackend(first_transaction_id=5001),
            "ha": SimBackend(first_transaction_id=7001)}
    for sim in sims.values():
        await in_loop(peers, sim.start())
    yield sims
    for sim in sims.values():
        await in_loop(peers, sim.stop())


def site(sims: dict[str, SimBackend], tmp_path: Path, *, ems_policy: str = "", ha_policy: str = "",
         primary_policy: str = "") -> str:
    return f"""
[offline]
data_dir = "{tmp_path / 'data'}"
reconnect_min = 0.05
reconnect_max = 0.2
[backend]
url = "ws://127.0.0.1:{sims['primary'].port}/ocpp"
{primary_policy}
[backends.ems]
url = "ws://127.0.0.1:{sims['ems'].port}/ocpp"
{ems_policy}
[[chargers]]
id = "CP1"
secondaries = ["ems"]
[[chargers.secondary]]
name = "ha"
url = "ws://127.0.0.1:{sims['ha'].port}/ems"
forward_actions = {json.dumps(HA_ACTIONS)}
{ha_policy}
"""


async def connected(peers: LoopThread, server: ProxyServer, sims: dict[str, SimBackend]) -> WallboxHandle:
    handle = await in_loop(peers, connect_wallbox(proxy_url(server, "CP1"), "CP1"))
    await wait_until(lambda: all("CP1" in sim.handlers for sim in sims.values()))  # the peers' thread
    return handle


def calls(frames: list[str]) -> list[str]:
    return [f for f in frames if classify(f).is_call]


def with_tx(text: str, old: int, new: int) -> str:
    return text.replace(f'"transactionId":{old}', f'"transactionId":{new}')


async def test_transaction_reaches_all_three_with_own_ids(peers: LoopThread, three: dict[str, SimBackend],
                                                         start_proxy: StartProxy, tmp_path: Path) -> None:
    server = await start_proxy(site(three, tmp_path))
    handle = await connected(peers, server, three)
    outcome = await in_loop(peers, handle.wallbox.run_session())
    assert outcome["transaction_id"] == 1001  # the primary's id, and only the primary's answers count

    wallbox_calls = calls(handle.recorder.sent)
    primary = three["primary"].recorders["CP1"]
    # The primary's frames are byte-identical, in both directions, and only its answers reach the wallbox.
    assert primary.received == handle.recorder.sent
    assert handle.recorder.received == primary.sent

    last = wallbox_calls[-1]  # the final StatusNotification: once it is there, everything is
    for name in ("ems", "ha"):
        await wait_recorded(three[name].recorder("CP1"), lambda r: last in r.received and len(r.sent) >= len(r.received))
    ems, ha = three["ems"].recorders["CP1"], three["ha"].recorders["CP1"]
    start_answers = {name: [json.loads(a)[2]["transactionId"] for a in three[name].recorders["CP1"].sent
                            if "transactionId" in a] for name in ("ems", "ha")}
    assert start_answers == {"ems": [5001], "ha": [7001]}

    # Each secondary got the wallbox's text with its own transaction id (signed data untouched).
    expected_ems = [with_tx(f, 1001, 5001) for f in wallbox_calls]
    heartbeat = [f for f in wallbox_calls if classify(f).action == "Heartbeat"]
    # A Heartbeat is copied only if the secondary is idle at that moment (it says nothing later).
    assert [f for f in ems.received if f not in heartbeat] == [f for f in expected_ems if f not in heartbeat]
    expected_ha = [with_tx(f, 1001, 7001) for f in wallbox_calls if classify(f).action in HA_ACTIONS]
    assert ha.received == expected_ha
    for recorder, own in ((ems, 5001), (ha, 7001)):
        tx_frames = [f for f in recorder.received if classify(f).action in ("MeterValues", "StopTransaction")]
        assert len(tx_frames) == 2 and all(f'"transactionId":{own}' in f for f in tx_frames)
        assert all(json.dumps(OCMF_SAMPLE, ensure_ascii=False)[1:-1] in f or json.dumps(OCMF_SAMPLE)[1:-1] in f
                   for f in tx_frames)
    # The ids each secondary gave are persisted for a restart.
    assert server.secondaries.store is not None
    assert server.secondaries.store.restore_mirrors()[("CP1", "ems")].transactions == {1001: 5001}
    assert server.secondaries.store.restore_mirrors()[("CP1", "ha")].transactions == {1001: 7001}
    await in_loop(peers, handle.close())


async def test_secondary_commands_follow_policy(peers: LoopThread, three: dict[str, SimBackend],
                                               start_proxy: StartProxy, tmp_path: Path) -> None:
    server = await start_proxy(site(
        three, tmp_path, ha_policy='policy = { RemoteStartTransaction = "forward", Reset = "forward" }',
        primary_policy='policy = { Reset = "reject" }'))
    handle = await connected(peers, server, three)
    remote_start = call.RemoteStartTransaction(id_tag="04A2B3C4D5E6F7", connector_id=1)
    reset = call.Reset(type="Soft")

    # Default policy (ems): rejected with SecurityError, the wallbox never sees them.
    for command in (remote_start, reset):
        assert await in_loop(peers, three["ems"].call("CP1", command)) is None
    errors = [json.loads(f) for f in three["ems"].recorders["CP1"].received if f.startswith("[4")]
    assert [(e[2], "not permitted" in e[3]) for e in errors] == [("SecurityError", True)] * 2
    # Read-only commands from a secondary are forwarded by default.
    config = await in_loop(peers, three["ems"].call("CP1", call.GetConfiguration(key=["HeartbeatInterval"])))
    assert config.configuration_key[0]["value"] == "300"

    # Allowed by policy (ha): forwarded, the wallbox answers, the answer comes back to ha.
    assert (await in_loop(peers, three["ha"].call("CP1", remote_start))).status == "Accepted"
    assert (await in_loop(peers, three["ha"].call("CP1", reset))).status == "Accepted"
    # ... and the primary, whose Reset was handed over to ha, is refused.
    assert await in_loop(peers, three["primary"].call("CP1", reset)) is None
    assert handle.wallbox.commands == ["GetConfiguration", "RemoteStartTransaction", "Reset"]
    # The secondaries' CALL ids were kept off the wallbox leg (the proxy's namespace there).
    wallbox_ids = [classify(f).msg_id or "" for f in handle.recorder.received if classify(f).is_call]
    assert all(i.startswith("ocpp-proxy:") for i in wallbox_ids)
    await in_loop(peers, handle.close())


def test_run_refuses_a_conflicting_config(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('[backend]\nurl = "ws://127.0.0.1:9/ocpp"\n'
                    '[backends.ems]\nurl = "ws://127.0.0.1:9/ems"\n'
                    'policy = { SetChargingProfile = "forward" }\n'
                    '[[chargers]]\nid = "CP1"\nsecondaries = ["ems"]\n')
    result = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", str(path)], capture_output=True,
                            text=True, cwd=Path(__file__).parents[2], timeout=60)
    assert result.returncode == 2
    assert (f"{path}:5: backends.ems.policy.SetChargingProfile: upstreams 'primary' (backend) and 'ems' "
            "(backends.ems) may both send charging profiles") in result.stderr


async def test_dead_secondary_loses_nothing_and_catches_up(peers: LoopThread, three: dict[str, SimBackend],
                                                          nursery: trio.Nursery, tmp_path: Path) -> None:
    metrics = Metrics(["CP1"])
    server = ProxyServer(loads('[server]\nlisten = "127.0.0.1:0"\n' + site(three, tmp_path)),
                         listeners=[MetricsListener(metrics)])
    await nursery.start(server.serve)

    def metric(name: str, **labels: str) -> float | None:
        return value(parse(generate_latest(metrics.registry).decode())[1], name, **labels)

    handle = await connected(peers, server, three)
    wallbox = handle.wallbox
    await in_loop(peers, wallbox.call(call.BootNotification(charge_point_model="M", charge_point_vendor="V")))
    await in_loop(peers, wallbox.call(call.StatusNotification(connector_id=1, error_code="NoError",
                                                              status="Available")))
    first_ems = three["ems"]
    await wait_recorded(first_ems.recorder("CP1"), lambda r: len(r.sent) >= 2)

    await in_loop(peers, first_ems.stop())  # the EMS goes away for a while
    paired = server.sessions["CP1"]
    mirror = paired.session.mirrors["ems"]
    await wait_until(lambda: not mirror.up)
    outcome = await in_loop(peers, wallbox.run_session())
    assert outcome["transaction_id"] == 1001
    assert mirror.depth >= 9  # everything of the session since the outage, waiting for the EMS
    assert metric("ocpp_proxy_secondary_up", charger="CP1", upstream="ems") == 0
    assert metric("ocpp_proxy_secondary_up", charger="CP1", upstream="ha") == 1
    assert metric("ocpp_proxy_secondary_queue_frames", charger="CP1", upstream="ems") == mirror.depth
    sent_during_outage = calls(handle.recorder.sent)[2:]

    back = SimBackend(port=first_ems.port, first_transaction_id=6001)
    await in_loop(peers, back.start())
    try:
        last = sent_during_outage[-1]
        await wait_recorded(back.recorder("CP1"), lambda r: last in r.received and len(r.sent) >= len(r.received))
        received = back.recorders["CP1"].received
        # First what it missed about the wallbox (Boot, last status; proxy ids), then the queue in order.
        assert [classify(f).action for f in received[:2]] == ["BootNotification", "StatusNotification"]
        assert all((classify(f).msg_id or "").startswith("ocpp-proxy:r") for f in received[:2])
        assert json.loads(received[1])[3]["status"] == "Available"
        queued = [f for f in sent_during_outage if classify(f).action != "Heartbeat"]
        assert received[2:] == [with_tx(f, 1001, 6001) for f in queued]
        await wait_until(lambda: not mirror.depth)  # its last answer is on its way to the proxy
        assert metric("ocpp_proxy_secondary_connects_total", charger="CP1", upstream="ems") == 2
        assert metric("ocpp_proxy_secondary_queue_frames", charger="CP1", upstream="ems") == 0
        assert (metric("ocpp_proxy_frames_total", source="secondary", type="callresult", action="") or 0) >= 20
        assert metric("ocpp_proxy_connections", side="backend") == 1  # the primary only
        # The primary and the wallbox saw every frame, byte for byte, while the EMS was away.
        assert three["primary"].recorders["CP1"].received == handle.recorder.sent
        assert handle.recorder.received == three["primary"].recorders["CP1"].sent
    finally:
        await in_loop(peers, handle.close())
        await in_loop(peers, back.stop())


async def test_queue_for_a_dead_secondary_survives_a_proxy_restart(peers: LoopThread,
                                                                   three: dict[str, SimBackend],
                                                                   tmp_path: Path) -> None:
    """The EMS is down while a transaction runs; the proxy restarts; the EMS then gets all of it."""
    ems = three["ems"]
    await in_loop(peers, ems.stop())
    text = '[server]\nlisten = "127.0.0.1:0"\n' + site(three, tmp_path)
    async with trio.open_nursery() as nursery:
        first = ProxyServer(loads(text))
        await nursery.start(first.serve)
        handle = await in_loop(peers, connect_wallbox(proxy_url(first, "CP1"), "CP1"))
        outcome = await in_loop(peers, handle.wallbox.run_session())
        assert outcome["transaction_id"] == 1001
        sent = [f for f in calls(handle.recorder.sent) if classify(f).action != "Heartbeat"]
        assert first.sessions["CP1"].session.mirrors["ems"].depth == len(sent)
        await in_loop(peers, handle.close())
        await first.stop()
        nursery.cancel_scope.cancel()

    back = SimBackend(port=ems.port, first_transaction_id=6001)
    await in_loop(peers, back.start())
    try:
        async with trio.open_nursery() as nursery:
            second = ProxyServer(loads(text))
            await nursery.start(second.serve)
            handle = await in_loop(peers, connect_wallbox(proxy_url(second, "CP1"), "CP1"))
            await wait_recorded(back.recorder("CP1"), lambda r: sent[-1] in r.received and len(r.sent) >= len(sent))
            assert back.recorders["CP1"].received == [with_tx(f, 1001, 6001) for f in sent]
            await in_loop(peers, handle.close())
            await second.stop()
            nursery.cancel_scope.cancel()
    finally:
        await in_loop(peers, back.stop())
