"""The monitoring HTTP server: /metrics, /healthz, /readyz, the status page (trio + h11).

It runs in the proxy's own nursery on ``[metrics] listen`` (never on the OCPP
port), so its heartbeat shares the event loop it reports on. HTTP parsing is
h11's; each connection is bounded in header size, idle time and count, so a
stuck or hostile client cannot hold the proxy's resources.

The status page (``/``, its ``/status.css`` and ``/status.js``, shipped as
package data) and its JSON (``/api/status``, docs/status.md) are read-only:
every path answers GET and HEAD only, 405 otherwise, and nothing on them
changes state. They are served only where the monitor listens (loopback by
default) and to ``[metrics] allow``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any

import h11
import trio
from prometheus_client.exposition import choose_encoder

from proxy.config import Config, parse_listen
from proxy.core.admission import Allowlist
from proxy.ops.health import Heartbeat, Readiness, Response, text
from proxy.ops.logs import get_logger
from proxy.ops.metrics import Metrics
from proxy.core.sessionlog import SessionSummary
from proxy.ops.status import StatusSource, session_query, sessions_body
from proxy.storage.interface import StorageError

if TYPE_CHECKING:
    from proxy.runtime.server import ProxyServer

MAX_REQUEST_HEAD = 16 * 1024
MAX_CONNECTIONS = 32
IDLE_TIMEOUT = 30.0
_SERVER_HEADER = (b"server", b"ocpp-proxy")

#: The status page's files: path → (file in proxy/ops/static, content type).
STATIC = {"/": ("status.html", "text/html; charset=utf-8"),
          "/status.css": ("status.css", "text/css; charset=utf-8"),
          "/status.js": ("status.js", "text/javascript; charset=utf-8")}
STATUS_PATH = "/api/status"
#: The session log's newest records (docs/status.md), read from the store in its worker thread.
SESSIONS_PATH = "/api/sessions"
PATHS = ("/metrics", "/healthz", "/readyz", STATUS_PATH, SESSIONS_PATH, *STATIC)
#: Own files only, no inline script, no framing (the page is read-only, but still).
_SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"),
                     (b"content-security-policy",
                      b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                      b"img-src 'self'; frame-ancestors 'none'"),
                     (b"referrer-policy", b"no-referrer")]


def _static(name: str) -> bytes:
    return resources.files("proxy.ops").joinpath("static", name).read_bytes()


class Monitor:
    def __init__(self, config: Config, metrics: Metrics, server: ProxyServer | None = None, *,
                 source: str = "", heartbeat: Heartbeat | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.server = server
        self.source = source
        self.heartbeat = heartbeat or Heartbeat()
        #: Set by the shutdown sequence: /readyz turns 503 while sessions drain.
        self.stopping = False
        self.ports: list[int] = []
        self.log = get_logger()
        self._open = 0
        self._beat = trio.Event()
        self.status = StatusSource(server, metrics)
        #: Read once: a page that cannot be read is a broken install, found at start.
        self._files = {path: Response(200, kind, _static(name)) for path, (name, kind) in STATIC.items()}

    # -- lifetime ---------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED) -> None:
        host, port = parse_listen(self.config.metrics.listen)
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        self.ports = sorted({lst.socket.getsockname()[1] for lst in listeners})
        self.log.info("metrics_listening", address=self.config.metrics.listen, ports=self.ports)
        async with trio.open_nursery() as nursery:
            self._record_beat(trio.current_time(), trio.current_time())
            nursery.start_soon(self._run_heartbeat)
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.ports)

    async def wait_beat(self) -> None:
        """Wait for the next heartbeat (tests)."""
        await self._beat.wait()

    async def _run_heartbeat(self) -> None:
        while True:
            due = trio.current_time() + self.heartbeat.interval
            await trio.sleep_until(due)
            self._record_beat(trio.current_time(), due)

    def _record_beat(self, now: float, due: float) -> None:
        self.metrics.set_loop_lag(self.heartbeat.beat(now, due))
        self._beat.set()
        self._beat = trio.Event()

    # -- answers ----------------------------------------------------------------------------

    def respond(self, method: str, target: str, accept: str = "") -> Response:
        path = target.split("?", 1)[0]
        if path not in PATHS:
            return text(404, "not found; try /, /api/status, /api/sessions, /metrics, /healthz or /readyz")
        if method not in ("GET", "HEAD"):
            return text(405, "only GET and HEAD")
        if path == "/metrics":
            encoder, content_type = choose_encoder(accept)
            return Response(200, content_type, encoder(self.metrics.registry))
        if path == "/healthz":
            ok, message = self.heartbeat.check(trio.current_time())
            return text(200 if ok else 503, message)
        if path == "/readyz":
            ok, body = self.readiness().check()
            return Response(200 if ok else 503, "application/json", body.encode())
        if path == STATUS_PATH:
            snapshot = self.status.snapshot(trio.current_time(), datetime.now(UTC))
            return Response(200, "application/json", json.dumps(snapshot, ensure_ascii=False, allow_nan=False).encode())
        return self._files[path]

    async def sessions(self, query: str) -> Response:
        """``GET /api/sessions``: the session log's newest records, read without holding the event loop.

        The read runs in the store's worker thread (after any commit under
        way), so relaying never waits for it; each answer is bounded
        (:data:`~proxy.core.sessionlog.MAX_LISTED`).
        """
        asked = session_query(query)
        if isinstance(asked, str):
            return text(400, asked)
        store = self.server.session_log if self.server is not None else None
        found: list[SessionSummary] | None = None
        error: str | None = None
        if store is not None:
            try:
                found = await store.recent_sessions(asked.charger, asked.before, asked.per_charger, asked.limit)
            except StorageError as exc:
                error = exc.detail
        body = sessions_body(asked, found, datetime.now(UTC), error)
        return Response(200, "application/json", json.dumps(body, ensure_ascii=False, allow_nan=False).encode())

    def readiness(self) -> Readiness:
        server = self.server
        listening = server is not None and server.ready.is_set()
        return Readiness(config_source=self.source, chargers=len(self.config.all_chargers),
                         ports=list(server.ports) if server is not None else [],
                         listening=listening, stopping=self.stopping, status=self.metrics.status())

    # -- HTTP/1.1 -------------------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._open >= MAX_CONNECTIONS or not self._allowed(stream):
            await trio.aclose_forcefully(stream)
            return
        self._open += 1
        try:
            await self._serve_connection(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to report
        finally:
            self._open -= 1
            await trio.aclose_forcefully(stream)

    def _allowed(self, stream: trio.SocketStream) -> bool:
        """``[metrics] allow`` (empty: everyone who reaches the listen address)."""
        try:
            address = str(stream.socket.getpeername()[0])
        except OSError:
            return False
        if Allowlist(self.config.metrics.allow).allows(address):
            return True
        self.log.warning("metrics_refused", peer=address, reason="not in [metrics] allow")
        return False

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        while True:
            request: h11.Request | None = None
            with trio.move_on_after(IDLE_TIMEOUT):
                try:
                    request = await _read_request(conn, stream)
                except h11.RemoteProtocolError as exc:
                    await _send(conn, stream, "GET", text(exc.error_status_hint, "bad request"))
                    return
            if request is None:
                return
            method = request.method.decode("ascii", "replace")
            accept = _header(request.headers, b"accept")
            target = request.target.decode("ascii", "replace")
            if target.split("?", 1)[0] == SESSIONS_PATH and method in ("GET", "HEAD"):
                response = await self.sessions(target.partition("?")[2])
            else:
                response = self.respond(method, target, accept)
            await _send(conn, stream, method, response)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The next request, its body (if any) read and ignored; None when the client closed."""
    request: h11.Request | None = None
    while True:
        event: Any = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


async def _send(conn: h11.Connection, stream: trio.SocketStream, method: str, response: Response) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):  # IDLE: a 400 before any request
        return
    headers = [(b"content-type", response.content_type.encode()),
               (b"content-length", str(len(response.body)).encode()),
               (b"cache-control", b"no-store"), _SERVER_HEADER, *_SECURITY_HEADERS]
    if response.status == 405:
        headers.append((b"allow", b"GET, HEAD"))
    reason = HTTPStatus(response.status).phrase.encode()
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    if method != "HEAD":
        data = (data or b"") + (conn.send(h11.Data(data=response.body)) or b"")
    data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send_all(data)


def _header(headers: Any, name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return bytes(value).decode("latin-1")
    return ""
