"""TLS settings for both legs, per the OCPP 1.6 security whitepaper (edition 3).

TLS 1.2 or higher; for 1.2 only the whitepaper's ECDHE + AES-GCM suites;
TLS 1.3 with the library's defaults. The server side optionally requires
client certificates (SP3); the client side trusts configured CA files or the
system store (SP2) and presents a client certificate when configured (SP3).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxy.ops.certs import CertificateProblem, check_pair, load_certificates

#: OCPP 1.6 security whitepaper, edition 3, section 4.1.3 (TLS 1.2 cipher suites).
WHITEPAPER_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
])

TLS_HANDSHAKE_RECORD = 0x16


def looks_like_tls(first_byte: bytes) -> bool:
    """A TLS connection starts with a handshake record (0x16); HTTP starts with a letter."""
    return first_byte[:1] == bytes([TLS_HANDSHAKE_RECORD])


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(WHITEPAPER_CIPHERS)
    return context


def _load_cas(context: ssl.SSLContext, cas: Sequence[str]) -> None:
    """Every listed certificate is a trust anchor, a root CA or not.

    Charging-manager guides deposit the backend's own (leaf) certificate, or a
    wallbox's, as "the CA certificate". With partial-chain verification
    OpenSSL ends the chain at any certificate in the trust store, so such a
    pinned leaf is trusted as itself; hostname and CN checks stay as they are
    (docs/certificates.md).
    """
    for ca in cas:
        load_certificates(Path(ca))  # a clear error naming the file, before OpenSSL's
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise CertificateProblem(ca, f"unusable CA file: {exc.reason}") from exc
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN


def _load_chain(context: ssl.SSLContext, cert: str, key: str, password: str) -> None:
    check_pair(Path(cert), Path(key), password)  # names the file and the reason first
    try:
        context.load_cert_chain(cert, key, password=password.encode("utf-8") if password else None)
    except ssl.SSLError as exc:
        raise CertificateProblem(cert, f"unusable certificate chain: {exc.reason}") from exc


def server_context(cert: str | Path, key: str | Path, client_ca: Sequence[str] = (),
                   key_password: str = "") -> ssl.SSLContext:
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(context, str(cert), str(key), key_password)
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        _load_cas(context, client_ca)
    return context


def client_context(ca: Sequence[str], client_cert: str = "", client_key: str = "", *,
                   client_key_password: str = "", verify: bool = True) -> ssl.SSLContext:
    """TLS towards a backend: ``ca`` as trust anchors (else the system store); ``verify=False``
    checks nothing, only by an explicit ``verify = false`` in the configuration."""
    context = _harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH))
    if ca or not verify:
        context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca:
        _load_cas(context, ca)
    if client_cert:
        _load_chain(context, client_cert, client_key or client_cert, client_key_password)
    return context


def peer_common_name(ssl_object: Any) -> str | None:
    """CN of the verified client certificate, if there is one."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
