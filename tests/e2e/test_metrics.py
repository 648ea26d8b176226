"""/metrics during a proxied session: every counter and histogram moves by what was sent (issue 8)."""

from __future__ import annotations

import functools
import json

import pytest
import trio
import trio_websocket
from trio_websocket import open_websocket_url

from tests.opskit import (Stack, config_text, free_port, http_get, parse, scrape, start_backend, start_stack, value,
                          wait_until)

HEARTBEAT = '[2,"hb-{n}","Heartbeat",{{}}]'
STATUS = ('[2,"st-1","StatusNotification",{"connectorId":1,"errorCode":"NoError","status":"Charging",'
          '"info":"Stadtwerke K\u00f6ln \u20ac"}]')
VENDOR = '[2,"vx-1","VendorSpecificThing",{"a":1}]'
MALFORMED = "this is not OCPP-J"


def utf8(text: str) -> int:
    return len(text.encode("utf-8"))


async def call(ws: trio_websocket.WebSocketConnection, text: str) -> str:
    await ws.send_message(text)
    with trio.fail_after(5):
        answer = await ws.get_message()
    assert isinstance(answer, str)
    assert json.loads(answer)[1] == json.loads(text)[1]
    return answer


async def test_counters_and_histograms_follow_a_session(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    stack = await start_stack(nursery, config_text(backend.port))
    _, before = await scrape(stack)
    assert value(before, "ocpp_proxy_charger_connected", charger="CP1") == 0
    assert value(before, "ocpp_proxy_connections", side="wallbox") == 0

    heartbeats = [HEARTBEAT.format(n=n) for n in range(3)]
    answers: list[str] = []
    async with open_websocket_url(stack.url("CP1"), subprotocols=["ocpp1.6"]) as ws:
        with trio.fail_after(5):
            await stack.server.wait_sessions(1)
        await ws.send_message(MALFORMED)  # forwarded, counted; the backend ignores it
        for text in [*heartbeats, STATUS, VENDOR]:
            answers.append(await call(ws, text))
        # The backend's CALL, answered by the wallbox.
        await backend.connections["CP1"].send_message('[2,"gc-1","GetConfiguration",{"key":[]}]')
        with trio.fail_after(5):
            assert json.loads(await ws.get_message())[2] == "GetConfiguration"
        reply = '[3,"gc-1",{"configurationKey":[]}]'
        await ws.send_message(reply)
        # One more round trip proves the proxy handled the reply before we scrape.
        answers.append(await call(ws, HEARTBEAT.format(n=9)))
        heartbeats.append(HEARTBEAT.format(n=9))

        _, during = await scrape(stack)
        assert value(during, "ocpp_proxy_connections", side="wallbox") == 1
        assert value(during, "ocpp_proxy_connections", side="backend") == 1
        assert value(during, "ocpp_proxy_charger_connected", charger="CP1") == 1
        assert value(during, "ocpp_proxy_upstream_up", charger="CP1") == 1
        assert value(during, "ocpp_proxy_connector_status", charger="CP1", connector="1", status="Charging") == 1

    with trio.fail_after(5):
        await stack.server.wait_sessions(0)
    _, after = await scrape(stack)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    wb_call = {"source": "wallbox", "type": "call"}
    assert delta("ocpp_proxy_frames_total", **wb_call, action="Heartbeat") == 4
    assert delta("ocpp_proxy_frame_bytes_total", **wb_call, action="Heartbeat") == sum(map(utf8, heartbeats))
    assert delta("ocpp_proxy_frames_total", **wb_call, action="StatusNotification") == 1
    # Bytes, not characters: the status frame carries "ö" and "€".
    assert delta("ocpp_proxy_frame_bytes_total", **wb_call, action="StatusNotification") == utf8(STATUS)
    assert utf8(STATUS) > len(STATUS)
    assert delta("ocpp_proxy_frames_total", **wb_call, action="other") == 1
    assert delta("ocpp_proxy_frames_total", source="wallbox", type="invalid", action="") == 1
    assert delta("ocpp_proxy_malformed_frames_total", source="wallbox", dropped="false") == 1
    assert delta("ocpp_proxy_frames_total", source="wallbox", type="callresult", action="") == 1
    assert delta("ocpp_proxy_frame_bytes_total", source="wallbox", type="callresult", action="") == utf8(reply)
    assert delta("ocpp_proxy_frames_total", source="backend", type="callresult", action="") == len(answers)
    assert (delta("ocpp_proxy_frame_bytes_total", source="backend", type="callresult", action="")
            == sum(map(utf8, answers)))
    assert delta("ocpp_proxy_frames_total", source="backend", type="call", action="GetConfiguration") == 1

    backend_hb = {"leg": "backend", "action": "Heartbeat"}
    assert delta("ocpp_proxy_call_duration_seconds_count", **backend_hb) == 4
    assert delta("ocpp_proxy_call_duration_seconds_bucket", **backend_hb, le="+Inf") == 4
    assert delta("ocpp_proxy_call_duration_seconds_sum", **backend_hb) > 0
    assert delta("ocpp_proxy_call_duration_seconds_count", leg="backend", action="StatusNotification") == 1
    assert delta("ocpp_proxy_call_duration_seconds_count", leg="backend", action="other") == 1
    assert delta("ocpp_proxy_call_duration_seconds_count", leg="wallbox", action="GetConfiguration") == 1
    # Buckets are cumulative and end at the count.
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in after.items()
                     if name == "ocpp_proxy_call_duration_seconds_bucket" and dict(labels)["action"] == "Heartbeat")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1][1] == 4

    assert delta("ocpp_proxy_sessions_opened_total") == 1
    assert delta("ocpp_proxy_sessions_closed_total", closed_by="wallbox", code="1000") == 1
    assert value(after, "ocpp_proxy_connections", side="wallbox") == 0
    assert value(after, "ocpp_proxy_connections", side="backend") == 0
    assert value(after, "ocpp_proxy_charger_connected", charger="CP1") == 0
    assert value(after, "ocpp_proxy_upstream_up", charger="CP1") == 0
    assert ("ocpp_proxy_connector_status",
            frozenset({"charger": "CP1", "connector": "1", "status": "Charging"}.items())) not in after


async def test_refusals_and_rejected_frames_are_counted(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    stack = await start_stack(nursery, config_text(backend.port, 'password = "sixteen-chars-pass"'))
    _, before = await scrape(stack)

    auth = [(b"Authorization", b"Basic Q1AxOnNpeHRlZW4tY2hhcnMtcGFzcw==")]  # CP1:sixteen-chars-pass
    for url, protocols, headers in ((stack.url("NOPE"), ["ocpp1.6"], []), (stack.url("CP1"), ["ocpp1.6"], []),
                                    (stack.url("CP1"), ["ocpp9"], auth)):
        with pytest.raises(trio_websocket.ConnectionRejected):
            async with open_websocket_url(url, subprotocols=protocols, extra_headers=headers):
                pass  # pragma: no cover - the handshake is refused

    async with open_websocket_url(stack.url("CP1"), subprotocols=["ocpp1.6"], extra_headers=auth) as ws:
        await ws.send_message(b"\x00binary")
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason is not None and closed.value.reason.code == 1003
    with trio.fail_after(5):
        await stack.server.wait_sessions(0)

    _, after = await scrape(stack)
    for reason in ("unknown_charge_point", "password_missing", "no_subprotocol"):
        assert (value(after, "ocpp_proxy_handshake_rejections_total", reason=reason)
                - value(before, "ocpp_proxy_handshake_rejections_total", reason=reason)) == 1, reason
    assert value(after, "ocpp_proxy_rejected_frames_total", source="wallbox", reason="binary") == 1
    assert value(after, "ocpp_proxy_sessions_closed_total", closed_by="wallbox", code="1003") == 1
    assert value(after, "ocpp_proxy_frames_total", source="wallbox", type="call", action="Heartbeat") == 0


async def test_setters_for_features_that_feed_later_appear_in_the_output(nursery: trio.Nursery) -> None:
    """Limit engine, meter and offline queue call these; the scrape shows what they set."""
    now = [1_000.0]
    backend = await start_backend(nursery)
    stack = await start_stack(nursery, config_text(backend.port), clock=lambda: now[0])
    metrics = stack.metrics
    metrics.set_charger_limits("CP1", effective=10.0, local=10.0, backend=16.0)
    metrics.set_charger_current("CP1", [9.5, 9.7, 9.6])
    metrics.set_site(limit=35.0, effective_limit=35.0, headroom=[12.0, 11.0, 13.5])
    metrics.set_meter(True, currents=[23.0, 24.0, 21.5], read_at=998.0)
    metrics.set_queue("CP1", 5, oldest=970.0)
    _, samples = await scrape(stack)
    assert value(samples, "ocpp_proxy_charger_limit_amperes", charger="CP1", source="backend") == 16.0
    assert value(samples, "ocpp_proxy_charger_limit_amperes", charger="CP1", source="effective") == 10.0
    assert ("ocpp_proxy_charger_limit_amperes", frozenset({"charger": "CP1", "source": "ems"}.items())) \
        not in samples
    assert value(samples, "ocpp_proxy_charger_current_amperes", charger="CP1", phase="L2") == 9.7
    assert value(samples, "ocpp_proxy_site_headroom_amperes", phase="L3") == 13.5
    assert value(samples, "ocpp_proxy_grid_current_amperes", phase="L1") == 23.0
    assert value(samples, "ocpp_proxy_meter_up") == 1
    assert value(samples, "ocpp_proxy_meter_age_seconds") == 2.0
    assert value(samples, "ocpp_proxy_queue_frames", charger="CP1") == 5
    assert value(samples, "ocpp_proxy_queue_oldest_age_seconds", charger="CP1") == 30.0

    metrics.set_queue("CP1", 0)
    metrics.set_meter(False)
    now[0] = 1_010.0
    ready = json.loads((await http_get(stack.http("/readyz"))).body)
    assert ready["meter"] == {"state": "stale", "age_seconds": 12.0}
    _, samples = await scrape(stack)
    assert value(samples, "ocpp_proxy_meter_up") == 0
    assert value(samples, "ocpp_proxy_meter_age_seconds") == 12.0
    assert ("ocpp_proxy_queue_oldest_age_seconds", frozenset({"charger": "CP1"}.items())) not in samples


async def test_unknown_actions_share_one_series(nursery: trio.Nursery) -> None:
    """A peer inventing action names cannot create series (or cache entries) at will."""
    backend = await start_backend(nursery)
    stack = await start_stack(nursery, config_text(backend.port))
    async with open_websocket_url(stack.url("CP1"), subprotocols=["ocpp1.6"]) as ws:
        for n in range(20):
            await call(ws, f'[2,"u{n}","Invented{n}",{{}}]')
    with trio.fail_after(5):
        await stack.server.wait_sessions(0)
    reply = await http_get(stack.http("/metrics"))
    _, samples = parse(reply.body)
    assert "Invented" not in reply.body
    assert value(samples, "ocpp_proxy_frames_total", source="wallbox", type="call", action="other") == 20
    assert value(samples, "ocpp_proxy_call_duration_seconds_count", leg="backend", action="other") == 20
    assert len(stack.metrics.frames.children) <= 3


async def _open_and_close(stack: Stack, charger: str) -> None:
    async with open_websocket_url(stack.url(charger), subprotocols=["ocpp1.6"]):
        with trio.fail_after(5):
            await stack.server.wait_sessions(1)
    with trio.fail_after(5):
        await stack.server.wait_sessions(0)


async def test_unknown_chargers_leave_no_series_behind(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    stack = await start_stack(nursery, config_text(backend.port, "accept_unknown = true"))
    await _open_and_close(stack, "GUEST-1")
    await _open_and_close(stack, "CP1")
    _, samples = await scrape(stack)
    chargers = {dict(labels).get("charger") for _, labels in samples} - {None}
    assert chargers == {"CP1"}
    assert value(samples, "ocpp_proxy_sessions_opened_total") == 2


async def test_handshake_timeouts_are_counted(nursery: trio.Nursery) -> None:
    """A TCP client that never sends its HTTP request (a port scan, TLS to a plain port)."""
    backend = await start_backend(nursery)
    stack = await start_stack(nursery, config_text(backend.port, "handshake_timeout = 0.2"))
    stream = await trio.open_tcp_stream("127.0.0.1", stack.server.ports[0])
    with trio.fail_after(5):
        assert await stream.receive_some(1024) == b""  # the proxy hung up after handshake_timeout
    await stream.aclose()
    _, samples = await scrape(stack)
    assert value(samples, "ocpp_proxy_handshake_rejections_total", reason="handshake_timeout") == 1


async def test_modbus_meter_and_wallbox_health_reach_the_metrics(nursery: trio.Nursery) -> None:
    """The meter poller and a virtual charge point report their state as cli.run_proxy wires them."""
    from proxy.ops.logs import get_logger
    from proxy.modbus.service import run_modbus
    from proxy.demo.peers import LoopThread, SimHeidelberg, SimSdm630
    from tests.peers import in_loop

    peers = LoopThread("metrics-modbus")
    try:
        meter, wallbox = SimSdm630(), SimHeidelberg()
        meter.set_currents(12.5, 11.0, 10.0)
        meter_port, wallbox_port = await in_loop(peers, meter.start()), await in_loop(peers, wallbox.start())
        backend = await start_backend(nursery)
        text = config_text(backend.port, chargers=()) + (
            f'[meter]\nmodbus = "127.0.0.1:{meter_port}"\npoll_interval = 0.05\ntimeout = 0.2\n'
            f'[[modbus_chargers]]\nid = "HD1"\nmodbus = "127.0.0.1:{wallbox_port}"\npoll_interval = 0.05\n'
            f'timeout = 0.2\n')
        stack = await start_stack(nursery, text)
        await nursery.start(functools.partial(run_modbus, stack.config, stack.server.limiter.engine,
                                              stack.server.limiter.poke, get_logger(), health=stack.metrics))

        async def sample(name: str, **labels: str) -> float | None:
            _, samples = await scrape(stack)
            return samples.get((name, frozenset(labels.items())))

        async def becomes(expected: float, name: str, **labels: str) -> None:
            async def reached() -> bool:
                return await sample(name, **labels) == expected

            await wait_until(reached, interval=0.05)

        await becomes(1.0, "ocpp_proxy_meter_up")
        await becomes(12.5, "ocpp_proxy_grid_current_amperes", phase="L1")
        await becomes(1.0, "ocpp_proxy_modbus_wallbox_up", charger="HD1")
        meter.failing = wallbox.failing = True
        await becomes(0.0, "ocpp_proxy_meter_up")
        await becomes(0.0, "ocpp_proxy_modbus_wallbox_up", charger="HD1")
        meter.failing = wallbox.failing = False
        await becomes(1.0, "ocpp_proxy_modbus_wallbox_up", charger="HD1")
        await wait_until(lambda: "HD1" in stack.server.sessions)
        await in_loop(peers, meter.stop())
        await in_loop(peers, wallbox.stop())
    finally:
        peers.close()


async def test_offline_queue_depth_and_oldest_age_come_from_the_sessions(nursery: trio.Nursery) -> None:
    """Backend down: frames answered locally are queued; depth and the oldest frame's age are exported."""
    now = [5_000.0]
    port = free_port()  # nothing listens there: the backend is down
    stack = await start_stack(nursery, config_text(port, offline="reconnect_min = 30\nreconnect_max = 60\n"),
                              clock=lambda: now[0])
    async with open_websocket_url(stack.url("CP1"), subprotocols=["ocpp1.6"]) as ws:
        status = '[2,"s1","StatusNotification",{"connectorId":1,"status":"Available","errorCode":"NoError"}]'
        assert json.loads(await call(ws, status))[0] == 3  # answered locally
        now[0] += 20
        assert json.loads(await call(ws, status.replace("s1", "s2")))[0] == 3
        now[0] += 10
        _, samples = await scrape(stack)
        assert value(samples, "ocpp_proxy_queue_frames", charger="CP1") == 2
        assert value(samples, "ocpp_proxy_queue_oldest_age_seconds", charger="CP1") == 30.0
