"""The charge point id rules against a configured set, as a property over real sockets (issue 16, item 3).

A proxy with ``accept_unknown = true`` and three chargers with passwords
serves on 127.0.0.1 (in a thread of its own); hypothesis sends raw HTTP
upgrade requests for generated ids, and each answer is checked against an
oracle written here from the rules in docs/security.md, not from the proxy's
code:

* not 1-48 of ``a-z A-Z 0-9 * - _ = + | @ .``, or ``.``/``..``: 400 (empty: 404);
* a configured id: 101 only with its password and its own id as username, else 401;
* any other id equal to a configured one ignoring case: 403 (a look-alike);
* any other valid id: 101 (admitted as an unknown charger).
"""

from __future__ import annotations

import base64
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import trio
from hypothesis import given, settings, strategies as st

from proxy.config import loads
from proxy.runtime.server import ProxyServer

PASSWORD = "0123456789abcdef0123"
CONFIGURED = ("CP001", "Wallbox-7", "de*abc*E1")
ALLOWED = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789*-_=+|@."


def expected(cb_id: str, user: str | None, password: str | None) -> int:
    if cb_id == "":
        return 404
    if not re.fullmatch(r"[A-Za-z0-9*\-_=+|@.]{1,48}", cb_id) or cb_id in (".", ".."):
        return 400
    if cb_id in CONFIGURED:
        return 101 if (user, password) == (cb_id, PASSWORD) else 401
    if any(cb_id.lower() == known.lower() for known in CONFIGURED):
        return 403
    return 101


@pytest.fixture(scope="module")
def proxy_port() -> Iterator[int]:
    """The proxy in its own thread and trio loop, for the life of the module."""
    data = tempfile.mkdtemp(prefix="ocpp-proxy-ids-")
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    backend_port = dead.getsockname()[1]  # bound, never listening: the backend is down, offline mode answers
    chargers = "".join(f'[[chargers]]\nid = "{cp}"\npassword = "{PASSWORD}"\n' for cp in CONFIGURED)
    config = loads(f'[server]\nlisten = "127.0.0.1:0"\naccept_unknown = true\nping_interval = 0\n'
                   f'per_address_rate = 0\n[backend]\nurl = "ws://127.0.0.1:{backend_port}/ocpp"\n'
                   f'[offline]\ndata_dir = "{data}"\n[log]\nlevel = "error"\n{chargers}')
    server = ProxyServer(config)
    started = threading.Event()
    stop: list[trio.CancelScope] = []
    token: list[trio.lowlevel.TrioToken] = []

    async def main() -> None:
        with trio.CancelScope() as scope:
            stop.append(scope)
            token.append(trio.lowlevel.current_trio_token())
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                started.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert started.wait(30)
    yield server.ports[0]
    trio.from_thread.run_sync(stop[0].cancel, trio_token=token[0])
    thread.join(30)
    dead.close()


def status(port: int, path: str, user: str | None, password: str | None) -> int:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}", "Sec-WebSocket-Version: 13",
             "Sec-WebSocket-Protocol: ocpp1.6"]
    if user is not None and password is not None:
        lines.append("Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0


def _recased(pair: tuple[str, list[bool]]) -> str:
    text, flips = pair
    return "".join(c.swapcase() if flip else c for c, flip in zip(text, flips + [False] * len(text)))


IDS = st.one_of(
    st.sampled_from(CONFIGURED),
    st.tuples(st.sampled_from(CONFIGURED), st.lists(st.booleans(), max_size=10)).map(_recased),
    st.tuples(st.sampled_from(CONFIGURED), st.sampled_from([" ", "\x00", "/", "%", "¹", "\u200b", "."]),
              st.booleans()).map(lambda t: t[1] + t[0] if t[2] else t[0] + t[1]),
    st.sampled_from(["", ".", "..", "...", "a" * 48, "a" * 49, "ＣＰ001", "CP00¹", "ｃｐ001", "../CP001"]),
    st.text(alphabet=ALLOWED, min_size=1, max_size=52),
    st.text(max_size=20),
)


@settings(max_examples=150)
@given(cb_id=IDS, auth=st.sampled_from(["none", "own", "other-user", "wrong-password"]))
def test_id_rules_against_a_configured_set(proxy_port: int, cb_id: str, auth: str) -> None:
    user, password = {"none": (None, None), "own": (cb_id, PASSWORD), "other-user": ("CP001x", PASSWORD),
                      "wrong-password": (cb_id, "not-the-password-000")}[auth]
    path = "/ocpp/" + quote(cb_id, safe="")
    assert status(proxy_port, path, user, password) == expected(cb_id, user, password), (cb_id, auth)
