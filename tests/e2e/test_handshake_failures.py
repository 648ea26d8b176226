"""Refusals carry standard reason phrases; a failed handshake is logged and counted as what it was
(issue 19, item 7): over real sockets, with raw HTTP so the exact status line is seen."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from tests.opskit import Stack, config_text, read_to_end, scrape, start_backend, start_stack, value, wait_until


async def _raw(stack: Stack, request: bytes, *, hang_up: bool = False) -> bytes:
    """Send ``request`` and read the answer until the proxy closes (or hang up right after sending)."""
    stream = await trio.open_tcp_stream("127.0.0.1", stack.server.ports[0])
    await stream.send_all(request)
    if hang_up:
        await stream.aclose()
        return b""
    return await read_to_end(stream)


def _upgrade(path: str, extra: bytes = b"") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: ocpp1.6\r\n").encode() + extra + b"\r\n"


async def test_refusals_have_standard_reason_phrases(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    stack = await start_stack(nursery, config_text(backend.port, extra="password = \"0123456789abcdef0123\""))
    unknown = await _raw(stack, _upgrade("/ocpp/NOPE"))
    assert unknown.startswith(b"HTTP/1.1 404 Not Found\r\n"), unknown[:60]
    assert unknown.endswith(b"\r\n\r\nunknown_charge_point\n")
    no_password = await _raw(stack, _upgrade("/ocpp/CP1"))
    assert no_password.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), no_password[:60]
    assert b"www-authenticate: Basic" in no_password.lower().replace(b"basic", b"Basic")


async def _counted(stack: Stack, reason: str) -> float:
    _, samples = await scrape(stack)
    return value(samples, "ocpp_proxy_handshake_rejections_total", reason=reason)


async def _wait_counted(stack: Stack, reason: str) -> None:
    """The count arrives when the proxy's task for the connection has finished: wait for it."""
    async def counted() -> bool:
        return await _counted(stack, reason) >= 1

    await wait_until(counted, interval=0.05)


async def test_bad_request_hang_up_and_oversize_are_not_timeouts(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    stack = await start_stack(nursery, config_text(backend.port))
    with capture_logs() as logs:
        garbage = await _raw(stack, b"HELLO WORLD\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 Bad Request\r\n"), garbage[:60]
        await _wait_counted(stack, "bad_request")

        huge = await _raw(stack, _upgrade("/ocpp/CP1", b"X-Padding: " + b"a" * 100_000 + b"\r\n"))
        assert huge.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), huge[:60]
        await _wait_counted(stack, "request_too_large")

        await _raw(stack, _upgrade("/ocpp/CP1")[:40], hang_up=True)
        await _wait_counted(stack, "hung_up")
    assert await _counted(stack, "handshake_timeout") == 0
    failed = {entry["reason"]: entry for entry in logs if entry["event"] == "handshake_failed"}
    assert set(failed) == {"bad_request", "request_too_large", "hung_up"}
    assert failed["bad_request"]["status"] == 400 and failed["request_too_large"]["status"] == 431
    assert failed["hung_up"]["status"] is None and "40 bytes" in failed["hung_up"]["detail"]
    assert not [entry for entry in logs if entry["event"] == "handshake_timeout"]


async def test_tls_refusals_are_counted_as_what_they_were(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery)
    tls_on = await start_stack(nursery, config_text(backend.port, extra=f'tls = "on"\ncerts_dir = "{tmp_path}"'))
    tls_off = await start_stack(nursery, config_text(backend.port))
    try:  # plain HTTP on a TLS port: closed without an answer (reset, as the request was not read)
        assert await _raw(tls_on, _upgrade("/ocpp/CP1")) == b""
    except trio.BrokenResourceError:
        pass
    await _wait_counted(tls_on, "plaintext_refused")

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", tls_off.server.ports[0]), context)
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
        await stream.do_handshake()  # TLS on a plain port: closed before the handshake completes
    await _wait_counted(tls_off, "tls_refused")

    # TLS 1.2 with only a cipher outside the whitepaper's list: the proxy's handshake fails (no shared cipher)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("AES128-GCM-SHA256")
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", tls_on.server.ports[0]), context)
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
        await stream.do_handshake()
    await trio.aclose_forcefully(stream.transport_stream)
    await _wait_counted(tls_on, "tls_handshake_failed")
    for stack in (tls_on, tls_off):
        assert await _counted(stack, "handshake_timeout") == 0
