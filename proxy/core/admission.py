"""Who may connect, as which charger, with which subprotocols (sans-IO).

The trio server hands over the request line's path, the headers and the
offered subprotocols; this module answers :class:`Admit` or :class:`Refuse`
with the HTTP status the wallbox should see. Passwords are compared in
constant time and never appear in a refusal's text.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from proxy.config import ChargerBase, ChargerSettings, Config, ServerSettings, UpstreamTarget


@dataclass(frozen=True)
class Admit:
    charger: ChargerBase
    upstream: UpstreamTarget
    #: What the wallbox offered and the proxy supports, in the wallbox's order:
    #: offered to the backend exactly like this.
    subprotocols: tuple[str, ...]
    known: bool


@dataclass(frozen=True)
class Refuse:
    status: int
    #: Log event name, also the metrics label for handshake rejections.
    reason: str
    detail: str
    charge_box_id: str | None = None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.status == 401:
            return [(b"WWW-Authenticate", b'Basic realm="ocpp-proxy", charset="UTF-8"')]
        return []


def charge_box_id(path: str) -> str | None:
    """Last path segment, URL-decoded; None when the path names no id."""
    segment = urlsplit(path).path.rstrip("/").rpartition("/")[2]
    decoded = unquote(segment, errors="strict") if segment else ""
    return decoded or None


def basic_password(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """Password from an ``Authorization: Basic`` header (user part ignored)."""
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        return decoded.partition(b":")[2]
    return None


def decide(config: Config, path: str, headers: Sequence[tuple[bytes, bytes]],
           offered: Sequence[str]) -> Admit | Refuse:
    try:
        cb_id = charge_box_id(path)
    except UnicodeDecodeError:
        return Refuse(400, "bad_path", "charge point id is not valid UTF-8")
    if cb_id is None:
        return Refuse(404, "no_charge_point_id", f"path {path[:100]!r} names no charge point")
    if config.is_virtual(cb_id):  # the proxy itself is that charge point; a second one would replace it
        return Refuse(409, "virtual_charge_point", "id belongs to a [[modbus_chargers]] entry", cb_id)
    charger = config.charger(cb_id)
    known = charger is not None
    if charger is None:
        if not config.server.accept_unknown:
            return Refuse(404, "unknown_charge_point", "no [[chargers]] entry", cb_id)
        charger = ChargerSettings(id=cb_id)
    expected = charger.password or config.server.password
    if expected:
        given = basic_password(headers)
        if given is None:
            return Refuse(401, "password_missing", "no Basic-auth password sent", cb_id)
        if not hmac.compare_digest(given, expected.encode("utf-8")):
            return Refuse(401, "password_wrong", "Basic-auth password does not match", cb_id)
    supported = set(config.server.subprotocols)
    protocols = tuple(p for p in offered if p in supported)
    if not protocols:
        return Refuse(400, "no_subprotocol",
                      f"offered {list(offered)[:5]}, supported {config.server.subprotocols}", cb_id)
    return Admit(charger, config.upstream_for(charger), protocols, known)


def check_client_certificate(admit: Admit, client_cn: str | None, server: ServerSettings) -> Admit | Refuse:
    """SP3: with client CAs configured, the certificate's CN must name the charger."""
    if not server.client_ca or not server.require_cn_match:
        return admit
    if client_cn != admit.charger.id:
        return Refuse(403, "certificate_cn_mismatch",
                      f"client certificate CN {client_cn!r} is not the ChargeBox id", admit.charger.id)
    return admit
