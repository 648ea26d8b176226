"""Who may connect, as which charger, with which subprotocols (sans-IO).

The trio server hands over the request line's path, the headers, the offered
subprotocols and what the TLS layer saw (TLS or not, the verified client
certificate's CN); this module answers :class:`Admit` or :class:`Refuse` with
the HTTP status the wallbox should see. The rules, with their reasons, are in
``docs/security.md``:

* the charge point id follows OCPP's identity rules (1-48 characters from
  ``a-z A-Z 0-9 * - _ = + | @ .``; ``.`` and ``..`` are not ids);
* a charger is admitted only with the credentials its profile requires: its
  Basic-auth password (username = the charge point id), and with ``client_ca``
  a verified client certificate -- a charger without a password then comes in
  only over TLS with that certificate;
* with ``accept_unknown`` an id that equals a configured one after Unicode
  compatibility normalisation and case folding is refused (it could only be
  meant to pass for that charger).

Passwords are compared in constant time and never appear in a refusal's text.
:class:`AddressLimits` caps what one IP address may have in flight before any
of this runs.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from proxy.config import (ChargerBase, ChargerSettings, Config, ServerSettings, UpstreamTarget,
                          charge_point_id_problem)

#: Longest untrusted value quoted in a refusal's detail (logs cut again at 200).
_QUOTE = 60


@dataclass(frozen=True)
class Admit:
    charger: ChargerBase
    upstream: UpstreamTarget
    #: What the wallbox offered and the proxy supports, in the wallbox's order:
    #: offered to the backend exactly like this.
    subprotocols: tuple[str, ...]
    known: bool
    #: What let the wallbox in: "password", "certificate", "certificate+password" or "none".
    credential: str = "none"
    #: The Basic-auth username the wallbox sent instead of its id, admitted
    #: because its charger has ``any_username = true`` (logged by the server).
    other_username: str | None = None


@dataclass(frozen=True)
class Refuse:
    status: int
    #: Log event name, also the metrics label for handshake rejections.
    reason: str
    detail: str
    charge_box_id: str | None = None
    #: Seconds after which the wallbox may try again (HTTP ``Retry-After``); None: not said.
    retry_after: float | None = None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.status == 401:
            return [(b"WWW-Authenticate", b'Basic realm="ocpp-proxy", charset="UTF-8"')]
        if self.retry_after is not None:
            return [(b"Retry-After", str(max(1, math.ceil(self.retry_after))).encode())]
        return []


def charge_box_id(path: str) -> str | None:
    """Last path segment, URL-decoded; None when the path names no id (``/ocpp/`` ends in an empty one)."""
    segment = urlsplit(path).path.rpartition("/")[2]
    decoded = unquote(segment, errors="strict") if segment else ""
    return decoded or None


def id_problem(cb_id: str) -> str | None:
    """Why ``cb_id`` is not an OCPP charge point identity (the rule check-config applies to configured ids)."""
    return charge_point_id_problem(cb_id)


def fold(cb_id: str) -> str:
    """The form two ids are compared in to find look-alikes: NFKC, case folded, NFKC again."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", cb_id).casefold())


def lookalike(cb_id: str, configured: Iterable[str]) -> str | None:
    """The configured id ``cb_id`` is not but folds to, if any."""
    folded = fold(cb_id)
    return next((known for known in configured if known != cb_id and fold(known) == folded), None)


def quote_untrusted(value: str) -> str:
    """A value the wallbox sent, quoted for a detail text and cut short."""
    return repr(value[:_QUOTE] + ("…" if len(value) > _QUOTE else ""))


def basic_credentials(headers: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, bytes] | None:
    """(username, password) from an ``Authorization: Basic`` header, None without a usable one."""
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
        user, _, password = decoded.partition(b":")
        return user, password
    return None


def basic_password(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """Password from an ``Authorization: Basic`` header."""
    credentials = basic_credentials(headers)
    return None if credentials is None else credentials[1]


def decide(config: Config, path: str, headers: Sequence[tuple[bytes, bytes]], offered: Sequence[str], *,
           tls: bool = False, client_cn: str | None = None) -> Admit | Refuse:
    """The whole admission decision for one WebSocket upgrade request.

    ``tls`` says whether the request came over TLS and ``client_cn`` is the CN
    of the client certificate the TLS layer verified (None without one).
    """
    found = _charger(config, path)
    if isinstance(found, Refuse):
        return found
    charger, known = found
    credential = _credentials(config.server, charger, headers, tls, client_cn)
    if isinstance(credential, Refuse):
        return credential
    supported = set(config.server.subprotocols)
    protocols = tuple(p for p in offered if p in supported)
    if not protocols:
        shown = ", ".join(quote_untrusted(p) for p in list(offered)[:5])
        return Refuse(400, "no_subprotocol", f"offered [{shown}], supported {config.server.subprotocols}",
                      charger.id)
    kind, other_username = credential
    return Admit(charger, config.upstream_for(charger), protocols, known, kind, other_username)


def _charger(config: Config, path: str) -> tuple[ChargerSettings, bool] | Refuse:
    """The charger the path names, or why there is none."""
    try:
        cb_id = charge_box_id(path)
    except UnicodeDecodeError:
        return Refuse(400, "bad_path", "charge point id is not valid UTF-8")
    if cb_id is None:
        return Refuse(404, "no_charge_point_id", f"path {quote_untrusted(path)} names no charge point")
    problem = id_problem(cb_id)
    if problem:
        return Refuse(400, "bad_charge_point_id", f"id {quote_untrusted(cb_id)}: {problem}")
    if config.is_virtual(cb_id):  # the proxy itself is that charge point; a second one would replace it
        return Refuse(409, "virtual_charge_point", "id belongs to a [[modbus_chargers]] entry", cb_id)
    charger = config.charger(cb_id)
    if charger is not None:
        return charger, True
    if not config.server.accept_unknown:
        return Refuse(404, "unknown_charge_point", "no [[chargers]] entry", cb_id)
    if not config.backend.url:  # an unknown id is never run standalone (check-config refuses this config)
        return Refuse(404, "unknown_charge_point", "no [[chargers]] entry and no default backend", cb_id)
    twin = lookalike(cb_id, (c.id for c in config.all_chargers))
    if twin is not None:
        return Refuse(403, "lookalike_charge_point_id",
                      f"equals configured id {twin!r} after case folding and NFKC", cb_id)
    return ChargerSettings(id=cb_id), False


def _credentials(server: ServerSettings, charger: ChargerSettings, headers: Sequence[tuple[bytes, bytes]],
                 tls: bool, client_cn: str | None) -> tuple[str, str | None] | Refuse:
    """(what admitted the wallbox, a tolerated other username) or the refusal."""
    expected = charger.password or server.password
    certificate = bool(server.client_ca) and tls  # the TLS layer requires and verifies it
    if server.client_ca and not tls and not expected:
        return Refuse(403, "certificate_required",
                      "this charger authenticates with a client certificate: connect with wss://", charger.id)
    if certificate and server.require_cn_match and client_cn != charger.id:
        shown = quote_untrusted(client_cn) if client_cn is not None else "none"
        return Refuse(403, "certificate_cn_mismatch", f"client certificate CN {shown} is not the ChargeBox id",
                      charger.id)
    if not expected:
        return ("certificate" if certificate else "none"), None
    checked = _password(expected, charger, headers)
    if isinstance(checked, Refuse):
        return checked
    return ("certificate+password" if certificate else "password"), checked


def _password(expected: str, charger: ChargerSettings, headers: Sequence[tuple[bytes, bytes]]) -> str | None | Refuse:
    """Basic auth: the password, and the username equal to the charge point id (OCPP security whitepaper)."""
    credentials = basic_credentials(headers)
    if credentials is None:
        return Refuse(401, "password_missing", "no Basic-auth password sent", charger.id)
    user_bytes, given = credentials
    if not hmac.compare_digest(given, expected.encode("utf-8")):
        return Refuse(401, "password_wrong", "Basic-auth password does not match", charger.id)
    user = user_bytes.decode("utf-8", errors="replace")
    if user == charger.id:
        return None
    if charger.any_username:
        return user
    return Refuse(401, "username_mismatch",
                  f"Basic-auth username {quote_untrusted(user)} is not the charge point id", charger.id)


# --- what each charger needs, for the start-up log and check-config ----------------------------------


@dataclass(frozen=True)
class Profile:
    """What a charger must present, per transport; ``None``: that transport is refused."""

    charger: str
    plain: str | None
    tls: str | None

    @property
    def open(self) -> bool:
        """Reachable without any credential."""
        return self.plain == "nothing" or self.tls == "nothing"

    @property
    def name(self) -> str:
        """The OCPP security profile the weakest admitted way matches (0: no credential)."""
        if self.open:
            return "none"
        if self.plain is not None:
            return "SP1"
        return "SP3" if self.tls is not None and "certificate" in self.tls else "SP2"


def profile(server: ServerSettings, charger: ChargerSettings) -> Profile:
    """The effective profile of one charger under ``server``'s settings (the rules of :func:`decide`)."""
    password = bool(charger.password or server.password)
    needs: list[str] = []
    if server.client_ca:
        needs.append(f"client certificate{' CN=' + charger.id if server.require_cn_match else ''}")
    if password:
        needs.append("Basic auth (user = id)" if not charger.any_username else "Basic auth (any user)")
    over_tls = " + ".join(needs) or "nothing"
    over_plain: str | None = "Basic auth" if password else ("nothing" if not server.client_ca else None)
    if over_plain == "Basic auth" and charger.any_username:
        over_plain = "Basic auth (any user)"
    elif over_plain == "Basic auth":
        over_plain = "Basic auth (user = id)"
    return Profile(charger.id, over_plain if server.tls != "on" else None, over_tls if server.tls != "off" else None)


# --- per-address caps, before any handshake work ---------------------------------------------------------


@dataclass
class _Address:
    pending: int = 0
    tokens: float = 0.0
    stamp: float = 0.0


@dataclass
class AddressLimits:
    """Unfinished handshakes and new connections per second, per peer address.

    :meth:`arrive` is asked before a new TCP connection gets any work (a task,
    a TLS handshake, a read); :meth:`done` is called when its handshake is over
    either way. Rates are a token bucket: ``burst`` connections at once, then
    ``rate`` per second. 0 switches a cap off.
    """

    max_pending: int
    rate: float
    burst: int
    _peers: dict[str, _Address] = field(default_factory=dict)
    _prune_at: int = 1024

    def arrive(self, address: str, now: float) -> str | None:
        """None: go ahead (counted as pending); else the refusal reason."""
        entry = self._peers.get(address)
        if entry is None:
            self._prune(now)
            entry = self._peers[address] = _Address(tokens=float(self.burst), stamp=now)
        if self.max_pending and entry.pending >= self.max_pending:
            return "too_many_pending_handshakes"
        if self.rate and self.burst:
            entry.tokens = min(float(self.burst), entry.tokens + (now - entry.stamp) * self.rate)
            entry.stamp = now
            if entry.tokens < 1.0:
                return "connection_rate_exceeded"
            entry.tokens -= 1.0
        entry.pending += 1
        return None

    def done(self, address: str) -> None:
        entry = self._peers.get(address)
        if entry is not None and entry.pending > 0:
            entry.pending -= 1

    def tracked(self) -> int:
        return len(self._peers)

    def _prune(self, now: float) -> None:
        """Forget addresses with nothing pending whose bucket is full again (bounded memory)."""
        if len(self._peers) < self._prune_at:
            return
        full = float(self.burst)
        for address in [a for a, e in self._peers.items()
                        if e.pending == 0 and (not self.rate or e.tokens + (now - e.stamp) * self.rate >= full)]:
            del self._peers[address]
        self._prune_at = max(1024, 2 * len(self._peers))  # amortised: a scan per doubling, not per connection


# --- who may reach the EMS and metrics ports -------------------------------------------------------


class Allowlist:
    """Client addresses or networks (``[ems] allow``, ``[metrics] allow``); empty: everyone.

    An IPv4 client seen on a dual-stack socket as ``::ffff:a.b.c.d`` is
    matched as ``a.b.c.d``.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(e, strict=False) for e in entries]

    def allows(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)
