"""The wallbox port's TLS layer (trio): off, detect or on, per ``[server] tls``.

``detect`` peeks at the first byte of each TCP connection without consuming
it: 0x16 starts a TLS handshake, anything else is plain HTTP for the WebSocket
upgrade. ``on`` and ``off`` peek too, so a wallbox speaking the wrong one is
refused with a log line that says so instead of an opaque parse error.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import trio

from proxy.ops.certs import ensure_self_signed, fingerprint, load_certificates
from proxy.config import ServerSettings, parse_listen
from proxy.wire.tls import looks_like_tls, peer_common_name, server_context


@dataclass(frozen=True)
class Secured:
    stream: trio.abc.Stream
    #: CN of a verified client certificate (SP3), None without one.
    client_cn: str | None
    tls: bool


class SecureLayer:
    """``on_refused(reason, detail)``: told of every connection refused here (the refusal counter)."""

    def __init__(self, settings: ServerSettings, log: Any,
                 on_refused: Callable[[str, str], None] = lambda reason, detail: None) -> None:
        self.on_refused = on_refused
        self.mode = settings.tls
        self.timeout = settings.handshake_timeout
        self.require_client_cert = bool(settings.client_ca)
        self.log = log
        self.context: ssl.SSLContext | None = None
        if self.mode != "off":
            self.context = server_context(*self._certificate(settings), settings.client_ca,
                                          key_password=settings.key_password)

    def _certificate(self, settings: ServerSettings) -> tuple[Path, Path]:
        if settings.cert:
            return Path(settings.cert), Path(settings.key)
        host = parse_listen(settings.listen)[0]
        hosts = [host] if host not in ("", "0.0.0.0", "::") else []
        cert, key, created = ensure_self_signed(Path(settings.certs_dir), hosts)
        leaf = load_certificates(cert)[0]
        self.log.info("self_signed_certificate", path=str(cert), created=created,
                      sha256=fingerprint(leaf))
        return cert, key

    async def wrap(self, stream: trio.SocketStream, peer: str) -> Secured | None:
        """The stream to speak WebSocket on, or None when the connection was refused.

        Raises trio.TooSlowError when the peer says nothing, or does not finish
        the TLS handshake, within ``handshake_timeout``.
        """
        with trio.fail_after(self.timeout):
            first = await stream.socket.recv(1, socket.MSG_PEEK)
        if not first:
            return None  # closed before saying anything
        wants_tls = looks_like_tls(first)
        if self.mode == "off" or (self.mode == "detect" and not wants_tls):
            if wants_tls:
                self._refused("tls_refused", peer, "TLS handshake on a port with tls = off")
                return None
            return Secured(stream, None, tls=False)
        if not wants_tls:
            self._refused("plaintext_refused", peer, "plain connection while tls = on")
            return None
        return await self._handshake(stream, peer)

    async def _handshake(self, stream: trio.SocketStream, peer: str) -> Secured | None:
        assert self.context is not None
        secured = trio.SSLStream(stream, self.context, server_side=True)
        try:
            with trio.fail_after(self.timeout):
                await secured.do_handshake()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            reason = getattr(cause, "reason", None) or str(cause or exc)
            self._refused("tls_handshake_failed", peer, reason)
            return None
        return Secured(secured, peer_common_name(secured), tls=True)

    def _refused(self, event: str, peer: str, reason: str) -> None:
        self.log.warning(event, peer=peer, reason=reason)
        self.on_refused(event, reason)
