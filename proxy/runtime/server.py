"""The wallbox-facing listener (trio): accept, authenticate, pair, relay.

Each TCP connection gets one task. In it: the WebSocket handshake (bounded
by ``handshake_timeout``), the decision from :mod:`proxy.core.admission`, the
upstream connection, and then the :class:`~proxy.runtime.relay.PairedSession`,
whose nursery holds the pair's other tasks. When the handler returns, every
task and socket of the pair is gone.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from proxy.wire.errors import ConnectionClosed

from proxy.wire import closecodes
from proxy.wire import connection as wsconn
from proxy.config import (ChargerBase, ChargerSettings, Config, ModbusChargerSettings, UpstreamTarget, parse_listen,
                          redact_url, security_warnings, startup_step)
from proxy.core.admission import AddressLimits, Admit, Refuse, decide, profile
from proxy.core import lease as leasing
from proxy.loadmgmt.driver import Limiter, SharedSite, site_key, site_settings
from proxy.wire.local import LocalConnection, local_pair
from proxy.ops.logs import get_logger
from proxy.core.offline import OfflineResponder, OfflineSettings
from proxy.messages.ocppj import MessageType, build_error, classify
from proxy.storage.interface import Storage, StorageError, StorageUnusable
from proxy.storage.offline_queue import DB_NAME, AsyncQueue, SqliteStorage
from proxy.wire.tls_listener import Secured, SecureLayer
from proxy.runtime.relay import Connection, Connector, Listener, Listeners, PairedSession, SessionSettings
from proxy.runtime.leases import UNREACHABLE, LeaseKeeper
from proxy.runtime.secondary import Secondaries
from proxy.runtime import gcpace
from proxy.core.session import PRIMARY, PROXY, Session, Side
from proxy.messages.versions import OcppVersion, version_of
from proxy.runtime.upstream import UpstreamUnavailable, client_ssl_context, open_upstream

if TYPE_CHECKING:
    from proxy.storage.postgres import PostgresStorage
    from proxy.modbus.client import ModbusClient
    from proxy.modbus.wallbox import VirtualWallbox


def _nothing() -> None:
    pass


#: Seconds the event loop may hold the GIL while the store's worker thread waits for it (default 0.005).
STORE_SWITCH_INTERVAL = 0.0005


class ProxyServer:
    def __init__(self, config: Config, *, listeners: Sequence[Listener] = ()) -> None:
        self.config = config
        self.log = get_logger()
        #: Load management; idle (injects nothing) without [site], meter or EMS.
        self.limiter = Limiter(config, log=self.log)
        self.listeners = [*listeners, self.limiter]
        self.sessions: dict[str, PairedSession] = {}
        #: Chargers whose queues are being delivered without their wallbox (docs/offline.md).
        self.drains: dict[str, PairedSession] = {}
        self._connections: trio.Nursery | None = None
        #: Modbus wallboxes presented as charge points (``[[modbus_chargers]]``), by id.
        self.virtual: dict[str, VirtualWallbox] = {}
        #: One Modbus client per bus (gateway address or serial port), shared by the wallboxes on it.
        self.modbus_buses: dict[tuple[str, str], ModbusClient] = {}
        self.ports: list[int] = []
        self._changed = trio.Event()
        self._accepting: trio.CancelScope | None = None
        self.ready = trio.Event()
        self._secure: SecureLayer
        self._storage: Storage | None = None
        #: Charger leases (several processes on one database); None with SQLite: this process serves all.
        self.leases: LeaseKeeper | None = None
        #: The PostgreSQL store with ``[store] url`` (queue and leases share it when both are used).
        self._postgres: PostgresStorage | None = None
        #: The offline queue (None: offline mode off); the same object as ``_store`` when on.
        self._queue: AsyncQueue | None = None
        #: The durable store's trio front (offline queue, session log); None when nothing needs a store.
        self._store: AsyncQueue | None = None
        self._limits = _address_limits(config)
        #: Handshakes in progress per address (``per_address_handshakes``); the others wait their turn.
        self._slots = _Slots(config.server.per_address_handshakes)
        #: Per address: when a refusal by the per-address caps was last logged (one line per second at most).
        self._limited_logged: dict[str, float] = {}
        #: Secondary upstreams: mirrors kept across sessions, their transaction ids (issue 10).
        self.secondaries = Secondaries(config)
        self._relay_only_seen: set[str] = set()
        self._shared_listeners: dict[bool, Listeners] = {}
        if self.secondaries.configured:
            self.listeners.append(self.secondaries.listener)

    def _listeners(self, drain: bool) -> Listeners:
        """The pairs' listeners, one shared :class:`Listeners` (what each wants is worked out once).

        An absent wallbox is not load-managed: the limiter does not hear of a drain.
        """
        wanted = tuple(lst for lst in self.listeners if not (drain and lst is self.limiter))
        shared = self._shared_listeners.get(drain)
        if shared is None or tuple(shared) != wanted:
            shared = self._shared_listeners[drain] = Listeners(wanted)
        return shared

    # -- lifetime -----------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled or :meth:`stop`; reports the bound ports."""
        self._secure = SecureLayer(self.config.server, self.log,  # certificate problems stop start-up
                                   on_refused=lambda reason, detail: self._tell_refused(Refuse(0, reason, detail)))
        self._check_upstream_tls()
        self._open_storage()
        host, port = parse_listen(self.config.server.listen)
        with startup_step("server.listen", self.config.server.listen):
            listeners = await trio.open_tcp_listeners(port, host=host or None)
        self.ports = sorted({lst.socket.getsockname()[1] for lst in listeners})
        self.log.info("listening", address=self.config.server.listen, ports=self.ports,
                      tls=self.config.server.tls)
        self._log_security()
        try:
            async with trio.open_nursery() as background:
                background.start_soon(self.secondaries.run)  # writes behind the sessions
                if self.leases is not None:
                    background.start_soon(self.leases.run)
                if self._store is not None:
                    background.start_soon(self._store.retry_deferred)
                    background.start_soon(self._store.commit_behind)  # the session log's write-behind batches
                async with trio.open_nursery() as connections:
                    self._connections = connections
                    await connections.start(self.limiter.run)
                    with trio.CancelScope() as self._accepting:
                        async with trio.open_nursery() as accepting:
                            for listener in listeners:
                                accepting.start_soon(self._accept, listener, connections)
                            for charger in self.config.modbus_chargers:  # they "connect" like wallboxes
                                accepting.start_soon(self._virtual, charger, connections)
                            self.ready.set()
                            task_status.started(self.ports)
                            connections.start_soon(self._drain_backlog)
                    # stop(): no new connections; free the port at once (a restart may bind it
                    # again) while the open sessions close gracefully in `connections`.
                    self.limiter.stop()  # closing sessions get no new limits
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)
                background.cancel_scope.cancel()
        finally:
            if self.leases is not None:  # every session has ended: the others may take over at once
                await self.leases.release_all()
                self.leases = None
            self.secondaries.close()
            if self._postgres is not None and self._postgres is not self._storage:
                self._postgres.close()
            self._postgres = None
            if self._store is not None:
                self._store.stats.unwatch_gc()
                checkpoints = self._storage.checkpoints.stats.summary() if isinstance(self._storage, SqliteStorage) \
                    else None
                self.log.info("queue_stats", commits=self._store.commits, changes=self._store.committed_changes,
                              commit_seconds=round(self._store.commit_seconds, 3), deferred=self._store.deferred,
                              session_log_dropped=self._store.later_dropped, checkpoints=checkpoints,
                              **self._store.stats.summary())
                self._store.close()  # a last try of deferred deliveries; closes the file
            elif self._storage is not None:
                self._storage.close()
            self._queue = self._store = self._storage = None
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    def _open_storage(self) -> None:
        """The durable store, if offline mode, the session log or a secondary needs it (raises StorageUnusable);
        with ``[store] url`` the charger leases too."""
        config = self.config
        if self._storage is None and (config.offline.enabled or self.secondaries.configured or self._session_log_on):
            self._open_queue()
        if config.store.url and self.leases is None:
            if self._postgres is None:
                self._postgres = _postgres(config.store.url)
            policy = leasing.LeasePolicy(process_name(config.store.process), config.store.lease_seconds)
            self.leases = LeaseKeeper(self._postgres, policy, log=self.log, on_lost=self._lease_lost)
            site = site_settings(config).name
            self.limiter.share(SharedSite(self.leases, site_key(config),
                                          functools.partial(self._postgres.reservations, site, policy.me)))
            self.log.info("leases_on", process=policy.me, lease_seconds=policy.ttl)

    def _open_queue(self) -> None:
        config = self.config
        if config.store.url:
            self._storage = self._postgres = _postgres(config.store.url)
        else:
            self._storage = SqliteStorage(Path(config.offline.data_dir) / DB_NAME)
        self._store = AsyncQueue(self._storage, on_error=self._storage_error)
        self._store.stats.watch_gc()  # collection pauses stall every answer in flight (queue_stats)
        # The store's worker thread takes the GIL back after every SQLite call and fsync; with the default
        # 5 ms switch interval a busy event loop made each such wait up to 5 ms (a commit's hop into the
        # thread alone took 7 ms at the median, docs/storage.md "Where the time goes").
        sys.setswitchinterval(STORE_SWITCH_INTERVAL)
        if config.offline.enabled:
            self._queue = self._store
        self.secondaries.on_error = self._storage_error
        self.secondaries.open(self._storage)

    def _storage_error(self, operation: str, detail: str) -> None:
        """A failed (or, with an empty detail, recovered) storage operation: logged and counted."""
        if detail:
            self.log.error("storage_error", operation=operation, error=detail, file=self._storage_location)
        else:
            self.log.info("storage_recovered", operation=operation)
        for listener in self.listeners:
            listener.storage_error(operation, detail)

    @property
    def store(self) -> AsyncQueue | None:
        """The durable store's trio front while serving (None when nothing needs one); its commit counts."""
        return self._store

    @property
    def session_log(self) -> AsyncQueue | None:
        """The store the session log is read from (the status page's list); None while no log is kept."""
        return self._store if self._store is not None and self._session_log_on else None

    @property
    def _session_log_on(self) -> bool:
        """The session log is kept (see :meth:`Config.session_log_on`)."""
        return self.config.session_log_on()

    @property
    def _storage_location(self) -> str:
        return self._storage.location if self._storage is not None else ""

    def _check_upstream_tls(self) -> None:
        """Every backend's TLS settings load now (CA files, client keys and their passphrases), so a
        missing or wrong passphrase stops start-up naming the key instead of failing each connection."""
        seen: set[tuple[object, ...]] = set()
        for target in self._upstream_targets():
            key = (target.ca, target.client_cert, target.client_key, target.client_key_password, target.verify)
            if key in seen or not (target.url.startswith("wss:") or target.client_cert):
                continue
            seen.add(key)
            client_ssl_context(target)
            if not target.verify:
                self.log.warning("tls_verify_disabled", upstream=redact_url(target.url),
                                 reason="verify = false: the backend's certificate is not checked")

    def _upstream_targets(self) -> list[UpstreamTarget]:
        config = self.config
        targets = [config.upstream_for(c) for c in config.all_chargers]
        if config.server.accept_unknown and config.backend.url:
            targets.append(config.upstream_for(ChargerSettings(id="unknown")))
        for charger in config.all_chargers:
            targets += [secondary.target for secondary in config.secondaries_for(charger)]
        return targets

    def _log_security(self) -> None:
        """Each charger's effective admission profile and every security warning, at every start."""
        server = self.config.server
        for charger in self.config.chargers:
            shown = profile(server, charger)
            self.log.info("admission_profile", charger=charger.id, profile=shown.name,
                          plain=shown.plain or "refused", tls=shown.tls or "refused")
        if server.accept_unknown:
            unknown = profile(server, _unknown_placeholder())
            self.log.info("admission_profile", charger="(unknown ids)", profile=unknown.name,
                          plain=unknown.plain or "refused", tls=unknown.tls or "refused")
        for warning in security_warnings(self.config):
            self.log.warning("config_warning", key=warning.key, message=warning.message)

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        """Accept until cancelled; running out of file descriptors pauses instead of failing.

        The per-address caps are applied here, before a connection gets a task:
        a refused connection costs one accept and one close.
        """
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                self.log.error("accept_paused", error=exc.strerror)
                await trio.sleep(0.1)
                continue
            address = _address(stream)
            refused = self._limits.arrive(address, trio.current_time())
            if refused is not None:
                self._limited(stream, address, refused)
                continue
            connections.start_soon(self._handle_stream, stream, address)

    def _limited(self, stream: trio.SocketStream, address: str, reason: str) -> None:
        """Close at once (RST, no lingering); log at most once per second per address."""
        try:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        stream.socket.close()
        now = trio.current_time()
        if now - self._limited_logged.get(address, -10.0) >= 1.0:
            if len(self._limited_logged) > 1024:
                self._limited_logged.clear()
            self._limited_logged[address] = now
            self.log.warning("connection_limited", peer=address, reason=reason)
        self._tell_refused(Refuse(429, reason, "per-address cap"))

    async def _virtual(self, charger: ModbusChargerSettings, connections: trio.Nursery) -> None:
        from proxy.modbus.wallbox import VirtualWallbox

        def open_session(wallbox: LocalConnection) -> None:
            connections.start_soon(self.serve_virtual, charger, wallbox)

        log = self.log.bind(charger=charger.id)
        while True:  # like one connection, one virtual charge point must never stop the server
            virtual = VirtualWallbox(charger, open_session, log=log, data_dir=self.config.offline.data_dir,
                                     call_timeout=self.config.server.call_timeout,
                                     retry_max=self.config.offline.reconnect_max,
                                     health=functools.partial(self._modbus_wallbox, charger.id),
                                     buses=self.modbus_buses)
            self.virtual[charger.id] = virtual
            try:
                await virtual.run()
            except Exception as exc:  # noqa: BLE001 - logged; it starts again from its stored transaction
                log.error("virtual_charge_point_failed", error=_describe(exc), restart_in=_VIRTUAL_RESTART)
            await trio.sleep(_VIRTUAL_RESTART)

    def _modbus_wallbox(self, charger_id: str, up: bool) -> None:
        for listener in self.listeners:
            listener.modbus_wallbox(charger_id, up)

    async def stop(self, code: int = closecodes.GOING_AWAY, reason: str = "proxy shutting down") -> None:
        """Stop accepting, close every session with ``code``, wait until they are gone."""
        if self._accepting is not None:
            self._accepting.cancel()
        async with trio.open_nursery() as nursery:
            for paired in [*self.sessions.values(), *self.drains.values()]:
                nursery.start_soon(paired.shutdown, code, reason)
        await self.wait_sessions(0)
        while self.drains:
            await self._changed.wait()

    def reload(self, config: Config) -> None:
        """New settings for new connections and for load management; open sessions stay.

        Virtual charge points keep running as started (see :func:`proxy.runtime.reload.needs_restart`)
        and take the new current limits.
        """
        self.config = config
        fresh = _address_limits(config)  # the caps change, the counts in flight stay
        self._limits.max_pending, self._limits.rate, self._limits.burst = fresh.max_pending, fresh.rate, fresh.burst
        self._slots.alone = config.server.per_address_handshakes  # for addresses that start a handshake from now
        for charger in config.modbus_chargers:
            if charger.id in self.virtual:
                self.virtual[charger.id].reconfigure(charger)
        self.limiter.reconfigure(config)
        self.log.info("config_reloaded", chargers=len(config.chargers), site=config.site is not None)

    async def wait_sessions(self, count: int) -> None:
        """Wait until exactly ``count`` paired sessions are open (tests, shutdown)."""
        while len(self.sessions) != count:
            await self._changed.wait()

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- one connection -------------------------------------------------------------------

    async def _handle_stream(self, stream: trio.SocketStream, address: str = "?") -> None:
        """One connection; whatever goes wrong in it is logged and stays in it."""
        peer = _peer(stream)
        slot = _HandshakeSlot(self._limits, self._slots if self._slots.alone else None, address)
        gcpace.young.opened()  # the collector's pace follows the open connections (gcpace.py)
        try:
            try:
                secured = await self._secure.wrap(stream, peer)
            except trio.TooSlowError:
                self._handshake_timed_out(peer)
                return
            if secured is None:
                return
            await self._handle_connection(secured, peer, slot)
        except Exception as exc:  # noqa: BLE001 - one connection must never stop the server
            self.log.error("connection_failed", peer=peer, error=_describe(exc))
        finally:
            gcpace.young.closed()
            slot.release()
            await trio.aclose_forcefully(stream)

    async def _handle_connection(self, secured: Secured, peer: str,
                                 slot: _HandshakeSlot | None = None) -> None:
        server = self.config.server
        request: wsconn.WsRequest | wsconn.HandshakeFailed | None = None
        with trio.move_on_after(server.handshake_timeout):
            request = await wsconn.read_request(secured.stream, max_message_size=server.max_message_bytes,
                                                close_timeout=server.close_timeout)
        if request is None:
            self._handshake_timed_out(peer)
            return
        if isinstance(request, wsconn.HandshakeFailed):
            self._handshake_failed(request, peer)
            return
        if slot is not None and not await slot.take(server.handshake_timeout):
            self._handshake_timed_out(peer)  # its address had other handshakes in the works all along
            return
        decision = decide(self.config, request.path, request.headers, request.proposed_subprotocols,
                          tls=secured.tls, client_cn=secured.client_cn)
        if isinstance(decision, Refuse):
            await self._refuse(request, decision, peer)
            return
        if decision.other_username is not None:
            self.log.warning("basic_auth_username_ignored", peer=peer, charger=decision.charger.id,
                             username=decision.other_username, reason="any_username = true")
        async with self._lease(decision.charger.id) as refused:
            if refused is not None:
                await self._refuse(request, _lease_refusal(decision.charger.id, refused), peer)
                return
            await self._admit(request, decision, peer, slot.release if slot is not None else _nothing)

    def _lease(self, charger_id: str, served: bool = True) -> AbstractAsyncContextManager[leasing.Refuse | None]:
        """Hold the charger's lease for the block (none needed with SQLite); yields a refusal instead if
        another process serves it (docs/cluster.md). ``served``: its wallbox is about to be load-managed
        here, so the fuse counts it at least at its shared record first.

        Without leases, one shared context that yields None: no generator kept per session.
        """
        if self.leases is None:
            return _NO_LEASE
        return self._leased(self.leases, charger_id, served)

    @asynccontextmanager
    async def _leased(self, leases: LeaseKeeper, charger_id: str,
                      served: bool) -> AsyncIterator[leasing.Refuse | None]:
        async with leases.hold(charger_id) as refused:
            if refused is None and served:
                await self.limiter.charger_leased(charger_id)
            yield refused

    def _lease_lost(self, charger_id: str, reason: str) -> None:
        """Another process may serve the charger from now (or soon): close its session and drain now."""
        for paired in (self.sessions.get(charger_id), self.drains.get(charger_id)):
            if paired is not None and self._connections is not None:
                self._connections.start_soon(paired.shutdown, closecodes.TRY_AGAIN_LATER,
                                             closecodes.truncate(f"lease lost: {reason}"))

    async def _refuse(self, request: wsconn.WsRequest, refusal: Refuse, peer: str) -> None:
        self.log.warning("handshake_refused", peer=peer, charger=refusal.charge_box_id,
                         status=refusal.status, reason=refusal.reason, detail=refusal.detail)
        with trio.move_on_after(self.config.server.close_timeout):
            await request.reject(refusal.status, extra_headers=refusal.headers,
                                 body=f"{refusal.reason}\n".encode())
        self._tell_refused(refusal)

    def _handshake_timed_out(self, peer: str) -> None:
        seconds = self.config.server.handshake_timeout
        self.log.warning("handshake_timeout", peer=peer, seconds=seconds)
        self._tell_refused(Refuse(408, "handshake_timeout", f"no handshake in {seconds:g} s"))

    def _handshake_failed(self, failed: wsconn.HandshakeFailed, peer: str) -> None:
        """A hang-up, a malformed or an oversized request: logged and counted as such, not as a timeout."""
        self.log.warning("handshake_failed", peer=peer, reason=failed.reason, status=failed.status or None,
                         detail=failed.detail)
        self._tell_refused(Refuse(failed.status, failed.reason, failed.detail))

    def _tell_refused(self, refusal: Refuse) -> None:
        for listener in self.listeners:
            listener.handshake_refused(refusal)

    async def _admit(self, request: wsconn.WsRequest, admit: Admit, peer: str,
                     decided: Callable[[], None] = lambda: None) -> None:
        async def refuse(exc: UpstreamUnavailable) -> None:
            await self._refuse(request, Refuse(exc.status, "upstream_unavailable", exc.reason, admit.charger.id),
                               peer)

        # `decided`: paired, answered 101 and registered: the handshake no longer counts against its address
        await self._pair(admit, peer, functools.partial(_accept_request, request), refuse, started=decided)

    async def _pair(self, admit: Admit, peer: str, accept: Callable[[str | None], Awaitable[Connection]],
                    refuse: Callable[[UpstreamUnavailable], Awaitable[None]], drain: bool = False,
                    started: Callable[[], None] = _nothing) -> None:
        """Open the upstream, then relay; an unreachable backend is an outage (5xx) or a refusal (4xx)."""
        log = self.log.bind(charger=admit.charger.id)
        if self.config.standalone(admit.charger):
            if offline_subprotocol(admit) is None:  # the proxy answers only in a version it speaks
                await refuse(UpstreamUnavailable("standalone charger: no OCPP version the proxy answers in "
                                                 f"offered ({', '.join(admit.subprotocols)[:80]})", 400))
                return
            await self._relay(accept, admit, None, peer, log, drain, started)
            return
        # The upstream's block, entered by hand: an AsyncExitStack would keep a deque (760 bytes)
        # for the life of every pair.
        opening = self._connector(admit)()
        try:
            upstream = await opening.__aenter__()
        except UpstreamUnavailable as exc:
            log.warning("upstream_unavailable", peer=peer, url=redact_url(admit.upstream.url), reason=exc.reason,
                        status=exc.status)
            # A 4xx or a subprotocol nobody offered is configuration, not an outage; and the proxy
            # answers only in a version it speaks.
            if not (self._queue is not None and exc.outage and offline_subprotocol(admit)):
                await refuse(exc)
                return
            await self._relay(accept, admit, None, peer, log, drain, started)
            return
        async with _Entered(opening, upstream):
            await self._relay(accept, admit, upstream, peer, log, drain, started)

    def _connector(self, admit: Admit, subprotocols: Sequence[str] | None = None,
                   ) -> Callable[[], AbstractAsyncContextManager[wsconn.WsConnection]]:
        """Opens the primary; ``subprotocols``: offer only these (a reconnect keeps the wallbox's version)."""
        server = self.config.server
        return functools.partial(open_upstream, admit.upstream, subprotocols or admit.subprotocols,
                                 max_message_size=server.max_message_bytes, close_timeout=server.close_timeout)

    async def serve_virtual(self, charger: ModbusChargerSettings, wallbox: LocalConnection) -> None:
        """A virtual charge point's session: paired like a wallbox's, without a handshake.

        The upstream refusing (4xx) or being down without offline mode closes
        ``wallbox`` with 1008 or 1013 and the reason; its runner retries later.
        """
        # the upstream settings as they are now: a reload applies them at the next session, as for a wallbox
        charger = next((c for c in self.config.modbus_chargers if c.id == charger.id), charger)
        admit = Admit(charger, self.config.upstream_for(charger), (wallbox.subprotocol,), known=True)
        peer = f"modbus:{charger.modbus}"

        async def refuse(exc: UpstreamUnavailable) -> None:
            code = closecodes.TRY_AGAIN_LATER if exc.status >= 500 else closecodes.POLICY_VIOLATION
            await wallbox.aclose(code, closecodes.truncate(f"upstream: {exc.reason}"))

        try:
            async with self._lease(charger.id) as refused:
                if refused is not None:  # another process polls this wallbox; its runner tries again later
                    await wallbox.aclose(closecodes.TRY_AGAIN_LATER, "served by another proxy process")
                    return
                await self._pair(admit, peer, _accept_local(wallbox), refuse)
        except Exception as exc:  # noqa: BLE001 - as for a socket connection: logged, contained
            self.log.error("connection_failed", charger=charger.id, peer=peer, error=_describe(exc))
            await wallbox.aclose(closecodes.INTERNAL_ERROR, "proxy error")

    async def _relay(self, accept: Callable[[str | None], Awaitable[Connection]], admit: Admit,
                     upstream: wsconn.WsConnection | None, peer: str, log: Any, drain: bool = False,
                     started: Callable[[], None] = _nothing) -> None:
        charger_id = admit.charger.id
        subprotocol = upstream.subprotocol if upstream is not None else offline_subprotocol(admit)
        # A backend that chose no subprotocol: the wallbox speaks what it offered first.
        version = version_of(subprotocol or admit.subprotocols[0])
        if version is None:
            self._relay_only(subprotocol or admit.subprotocols[0], log)
        session = await self._new_session(admit.charger, version)
        queued = await self._queued(charger_id, log)
        wallbox = await accept(subprotocol)
        if drain and (charger_id in self.sessions or charger_id in self.drains):
            return  # the wallbox came back (or another drain started) while this one was opening
        standalone = session.standalone
        log.info("drain_started" if drain else "session_opened", peer=peer,
                 upstream="" if standalone else redact_url(admit.upstream.url), subprotocol=subprotocol,
                 known=admit.known, offline=upstream is None and not standalone, standalone=standalone, queued=queued)
        reconnect: dict[Side, Connector] = {}
        if session.offline is not None and not standalone:
            reconnect[PRIMARY] = self._connector(admit, (subprotocol,) if subprotocol else None)
        secondaries = self.secondaries.connectors(admit.charger, subprotocol)  # opened by the pair's links
        reconnect.update(secondaries)
        # A standalone charger has no primary link: the session answers its CALLs itself.
        upstreams: dict[Side, Connection | None] = {} if standalone else {PRIMARY: upstream}
        upstreams.update(dict.fromkeys(secondaries))
        # An absent wallbox is not load-managed: the limiter does not hear of a drain.
        listeners = self._listeners(drain)
        paired = PairedSession(charger_id, session, wallbox, upstreams, log=log,
                               settings=self._session_settings(), listeners=listeners,
                               reconnect=reconnect, queue=self._store, queued=queued, subprotocol=subprotocol,
                               drain=drain)
        registry = self.drains if drain else self.sessions
        if drain:
            registry[charger_id] = paired
        else:
            await self._register(paired)
        started()
        try:
            await paired.run()
        finally:
            last = registry.get(charger_id) is paired
            if last:
                del registry[charger_id]
                self._changed_now()
            side, code, reason = paired.close_info or (PROXY, closecodes.GOING_AWAY, "")
            log.info("drain_closed" if drain else "session_closed", closed_by=side, code=code, reason=reason)
            if last and not drain and self._connections is not None and self._serving:
                self._connections.start_soon(self._drain_if_owed, admit.charger, True)

    async def _register(self, paired: PairedSession) -> None:
        """A wallbox that reconnects replaces its old session (the old TCP may be half-dead) and a drain."""
        old = self.sessions.get(paired.charger_id)
        self.sessions[paired.charger_id] = paired
        self._changed_now()
        drain = self.drains.get(paired.charger_id)
        if drain is not None:  # the wallbox is back: its own session replays the rest
            await drain.hand_over(closecodes.NORMAL, "charge point connected")
        if old is not None:
            old.log.info("session_replaced")
            await old.shutdown(closecodes.GOING_AWAY, "replaced by a new connection")

    async def _queued(self, charger_id: str, log: Any) -> int:
        """The charger's queued frames; on a read error 1, so the replay reads (and retries) itself."""
        if self._queue is None:
            return 0
        try:
            return (await self._queue.depth(charger_id))[0]
        except StorageError as exc:
            log.error("queue_read_failed", error=exc.detail)
            return 1

    # -- queues without their wallbox ------------------------------------------------------

    @property
    def _serving(self) -> bool:
        return self._accepting is not None and not self._accepting.cancel_called

    async def _drain_backlog(self) -> None:
        """At start-up: deliver every queue whose charger has no session (billing data must not wait).

        After ``drain_delay``: wallboxes reconnecting after a restart replay their own queues.
        """
        await trio.sleep(self.config.offline.drain_delay)
        owed = dict(self.secondaries.backlog)
        if self._queue is not None:
            try:
                for charger, count in (await self._queue.backlog()).items():
                    owed[charger] = owed.get(charger, 0) + count
            except StorageError as exc:
                self.log.error("queue_read_failed", error=exc.detail)
        for charger_id in sorted(owed):
            settings = self._drainable(charger_id)
            if settings is not None and self._connections is not None:
                self._connections.start_soon(self._drain_if_owed, settings)

    def _drainable(self, charger_id: str) -> ChargerBase | None:
        """Settings to open the charger's upstreams with; None for a virtual charge point (always there)."""
        if self.config.is_virtual(charger_id):
            return None
        charger = self.config.charger(charger_id)
        if charger is None and self.config.server.accept_unknown:
            charger = ChargerSettings(id=charger_id)
        if charger is None:
            self.log.warning("drain_skipped", charger=charger_id, reason="no [[chargers]] entry any more")
        return charger

    async def _drain_if_owed(self, charger: ChargerBase, delay: bool = False) -> None:
        """Open the charger's upstreams under its identity, replay, close when empty (no wallbox)."""
        charger_id = charger.id
        if delay:
            await trio.sleep(self.config.offline.drain_delay)  # a wallbox back by then replays them itself
        if (charger_id in self.sessions or charger_id in self.drains or not self._serving
                or self.config.is_virtual(charger_id)):  # a virtual charge point reconnects by itself
            return
        if self.config.standalone(charger):  # frames queued under an earlier backend stay stored
            return
        if not await self._owed(charger_id):
            return
        log = self.log.bind(charger=charger_id)
        async with self._lease(charger_id, served=False) as refused:
            if refused is not None:  # another process serves it, and delivers its queue
                log.info("drain_skipped", reason="charger_leased_elsewhere", holder=refused.holder)
                return
            if self.leases is not None and not await self._owed(charger_id):
                return  # the process that held the lease a moment ago delivered it
            await self._drain(charger, log)

    async def _owed(self, charger_id: str) -> bool:
        return bool(self.secondaries.backlog.get(charger_id)) or bool(await self._queued(charger_id, self.log))

    async def _drain(self, charger: ChargerBase, log: Any) -> None:
        """The drain itself, the charger's lease held (several processes) or not needed (one)."""
        charger_id = charger.id
        subprotocol = self.config.server.subprotocols[0]
        if self._queue is not None:
            try:
                subprotocol = await self._queue.subprotocol(charger_id) or subprotocol
            except StorageError:
                pass
        wallbox, absent = local_pair(subprotocol)
        admit = Admit(charger, self.config.upstream_for(charger), (subprotocol,), known=True)

        async def refuse(exc: UpstreamUnavailable) -> None:
            log.warning("drain_refused", reason=exc.reason, status=exc.status)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_absent_wallbox, absent, log)
            try:
                await self._pair(admit, "drain", _accept_local(wallbox), refuse, drain=True)
            except Exception as exc:  # noqa: BLE001 - as for a connection: logged, contained
                log.error("drain_failed", error=_describe(exc))
            nursery.cancel_scope.cancel()

    def _relay_only(self, subprotocol: str, log: Any) -> None:
        """A subprotocol the proxy does not speak: said once per name, not per connection."""
        if subprotocol not in self._relay_only_seen:
            self._relay_only_seen.add(subprotocol)
            log.warning("subprotocol_relay_only", subprotocol=subprotocol[:40],
                        detail="relayed byte for byte; no offline answers, no load management")

    async def _new_session(self, charger: ChargerBase, version: OcppVersion | None = OcppVersion.V16) -> Session:
        """A session whole at construction: upstreams, mirrors, policy, offline answers and stored ids.

        ``version`` None: relay only (no offline answers, so no reconnect either).
        """
        server, charger_id = self.config.server, charger.id
        routing = self.secondaries.routing(charger)
        offline: OfflineResponder | None = None
        transactions: dict[int, int] = {}
        standalone = self.config.standalone(charger) and self._store is not None and version is not None
        if (self._queue is not None or standalone) and version is not None:
            store = self._store
            assert store is not None
            settings = self.config.offline
            offline = OfflineResponder(
                OfflineSettings(settings.heartbeat_interval, settings.auth, frozenset(settings.local_list),
                                settings.data_transfer),
                last_local_id=await self._last_local_tx(store, charger_id), version=version)
            if version is OcppVersion.V16:  # 2.0.1 stations make their own transactionIds: nothing is mapped
                try:
                    transactions = await store.transactions(charger_id)
                except StorageError as exc:  # the session still opens; ids not yet mapped stay local
                    self.log.error("queue_read_failed", charger=charger_id, error=exc.detail)
        return Session(charger_id, upstreams=routing.upstreams, call_timeout=server.call_timeout,
                       strict=server.strict, policy=routing.policy, mirrors=routing.mirrors, offline=offline,
                       transactions=transactions, version=version,
                       upstream_call_timeout=self.config.backend.call_timeout,
                       journal=self._store is not None and (self.config.offline.session_log or standalone),
                       standalone=standalone)

    async def _last_local_tx(self, store: AsyncQueue, charger_id: str) -> int:
        """The stored local id counter; if unreadable, a start far below any id handed out before.

        Local ids count down from here; starting at minus the Unix time (about -1.8e9, still a
        32-bit integer) cannot meet an id of an earlier run, which count down from -1.
        """
        try:
            return await store.last_local_tx(charger_id)
        except StorageError as exc:
            self.log.error("queue_read_failed", charger=charger_id, error=exc.detail)
            return -int(time.time())

    def _session_settings(self) -> SessionSettings:
        server, offline = self.config.server, self.config.offline
        return SessionSettings(max_message_bytes=server.max_message_bytes, ping_interval=server.ping_interval,
                               close_timeout=server.close_timeout, call_timeout=server.call_timeout,
                               reconnect_min=offline.reconnect_min, reconnect_max=offline.reconnect_max,
                               stall_timeout=self.config.backend.stall_timeout)


#: Seconds before a virtual charge point that failed is started again.
_VIRTUAL_RESTART = 5.0

#: accept() failures that mean "too busy right now", not "broken" (as in trio.serve_listeners).
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def offline_subprotocol(admit: Admit) -> str | None:
    """With the backend down, the wallbox gets the first offered subprotocol the proxy can answer in."""
    return next((p for p in admit.subprotocols if version_of(p) is not None), None)


async def _accept_request(request: wsconn.WsRequest, subprotocol: str | None) -> Connection:
    return await request.accept(subprotocol=subprotocol)


def _accept_local(connection: LocalConnection) -> Callable[[str | None], Awaitable[Connection]]:
    async def accept(subprotocol: str | None) -> Connection:
        return connection
    return accept


#: What a backend CALL gets while the proxy delivers a queue without the wallbox.
ABSENT_ERROR = "charge point not connected: ocpp-proxy is delivering its queued frames"


async def _absent_wallbox(connection: LocalConnection, log: Any) -> None:
    """The wallbox leg of a drain: a backend CALL gets a CALLERROR (and a log line), nothing else happens."""
    try:
        while True:
            frame = classify(await connection.get_message())
            if frame.kind is MessageType.CALL and frame.msg_id:
                log.warning("drain_call_refused", action=frame.action, msg_id=frame.msg_id[:40])
                await connection.send_message(build_error(frame.msg_id, "GenericError", ABSENT_ERROR))
    except ConnectionClosed:
        return


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"[:300]


class _Slots:
    """Handshakes in the works per address: ``alone`` at once while no other address has one, one
    at a time each while several have (so a flooding address yields to everyone else's wallboxes,
    and a site behind one NAT reconnecting on its own still goes at full speed)."""

    def __init__(self, alone: int) -> None:
        self.alone = alone
        self.limiters: dict[str, trio.CapacityLimiter] = {}
        self.busy: set[str] = set()

    def _share(self) -> int:
        return self.alone if len(self.busy) <= 1 else 1

    async def take(self, address: str, owner: object, timeout: float) -> bool:
        limiter = self.limiters.get(address)
        if limiter is None:
            limiter = self.limiters[address] = trio.CapacityLimiter(self._share())
        with trio.move_on_after(timeout):
            await limiter.acquire_on_behalf_of(owner)
            self._now_busy(address)
            return True
        self._forget(address, limiter)
        return False

    def release(self, address: str, owner: object) -> None:
        limiter = self.limiters[address]
        limiter.release_on_behalf_of(owner)
        if limiter.borrowed_tokens == 0 and address in self.busy:
            self.busy.discard(address)
            if len(self.busy) == 1:  # the one left is alone again
                self.limiters[next(iter(self.busy))].total_tokens = self.alone
        self._forget(address, limiter)

    def _now_busy(self, address: str) -> None:
        if address in self.busy:
            return
        self.busy.add(address)
        if len(self.busy) == 2:  # contention starts: every busy address goes one at a time
            for other in self.busy:
                self.limiters[other].total_tokens = 1

    def _forget(self, address: str, limiter: trio.CapacityLimiter) -> None:
        if limiter.borrowed_tokens == 0 and limiter.statistics().tasks_waiting == 0:
            if self.limiters.get(address) is limiter:
                del self.limiters[address]


class _Entered:
    """The exit of an async context manager already entered (``async with`` but for the enter)."""

    __slots__ = ("manager", "value")

    def __init__(self, manager: AbstractAsyncContextManager[Any], value: Any) -> None:
        self.manager, self.value = manager, value

    async def __aenter__(self) -> Any:
        return self.value

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self.manager.__aexit__(*exc_info)


#: The lease block of a proxy without leases: stateless, so one serves every session.
_NO_LEASE: AbstractAsyncContextManager[None] = nullcontext(None)


class _HandshakeSlot:
    """One connection's place in its address's handshake budget, from accept until paired or refused.

    Counted in :class:`AddressLimits` (pending) from accept. Once its upgrade request is in, it
    waits for a slot of its address (:class:`_Slots`) before the work that costs (the decision,
    the upstream connection, the 101), so a flood from one address is worked off a few at a time
    and yields to the handshakes of other addresses, while connections that are slow to send
    their request hold no slot. Released once, whichever way the handshake ends.
    """

    def __init__(self, limits: AddressLimits, slots: _Slots | None, address: str) -> None:
        self.limits, self.slots, self.address = limits, slots, address
        self.held = False
        self.released = False

    async def take(self, timeout: float) -> bool:
        """False when no slot came free within ``timeout`` (counted as a handshake timeout)."""
        if self.slots is None:
            return True
        self.held = await self.slots.take(self.address, self, timeout)
        return self.held

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.limits.done(self.address)
        if self.held and self.slots is not None:
            self.slots.release(self.address, self)


def _address_limits(config: Config) -> AddressLimits:
    server = config.server
    return AddressLimits(server.per_address_pending, server.per_address_rate, server.per_address_burst)


def _unknown_placeholder() -> ChargerSettings:
    return ChargerSettings(id="(unknown)")


def _address(stream: Any) -> str:
    """The peer's IP address (no port): what the per-address caps count."""
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, AttributeError, IndexError):
        return "?"


def _peer(stream: Any) -> str:
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
    except OSError:
        return "?"
    return f"{host}:{port}"


def process_name(configured: str) -> str:
    """``[store] process``, or host name and pid: unique among running processes unless configured twice."""
    return configured or f"{socket.gethostname()}-{os.getpid()}"


def _lease_refusal(charger_id: str, refused: leasing.Refuse) -> Refuse:
    """HTTP 503 with Retry-After: the wallbox reconnects (through HAProxy) once the lease is free."""
    if refused.holder == UNREACHABLE:
        return Refuse(503, "lease_unavailable", "the lease store cannot be reached", charger_id,
                      retry_after=refused.retry_after)
    return Refuse(503, "charger_leased_elsewhere", f"served by {refused.holder[:80]}", charger_id,
                  retry_after=refused.retry_after)


def _postgres(url: str) -> PostgresStorage:
    """``[store] url``'s store; psycopg is the optional extra ``postgres``, so its absence is named at start-up."""
    try:
        from proxy.storage.postgres import PostgresStorage
    except ImportError as exc:
        raise StorageUnusable(redact_url(url), f"{exc}; install it with pip install 'ocpp-proxy[postgres]'",
                              key="[store] url") from exc
    return PostgresStorage(url)
