"""TOML configuration: typed settings, validated on load.

The schema is the dataclasses below: each field's default, its documentation
(``doc``) and its constraints live next to each other, so the loader, the
``check-config`` command and the generated config reference cannot drift.
Every error names the dotted key and, where the file says, the line.

Secrets (fields marked ``secret``) can also be given as ``<key>_env`` (name of
an environment variable) or ``<key>_file`` (path of a file, e.g. a Docker
secret); they are never printed.
"""

from __future__ import annotations

import ipaddress
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from proxy.core.policy import known_actions
from proxy.messages.versions import DEFAULT_SUBPROTOCOLS

#: Built-in wallbox maps (proxy/modbus/wallboxes/*.toml), listed here so the schema needs no import of them.
WALLBOX_MAPS = ("alfen-eve-double", "alfen-eve-single", "bender-cc613", "heidelberg", "keba-p30x",
                "mennekes-amtron-compact", "phoenix-ev-cc", "vestel-evc04", "webasto-next")
_BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)

Check = Callable[[Any], str | None]


def setting(default: Any, doc: str, *, check: Check | None = None, secret: bool = False,
            choices: tuple[str, ...] = (), path: bool = False) -> Any:
    """A schema field: default, one line of documentation, optional constraint.

    ``path``: a file or directory name (or a list of them); a relative one is relative to the
    directory of the config file (the loader makes it absolute), one rule for every such key.
    """
    meta = {"doc": doc, "check": check, "secret": secret, "choices": choices, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def required(doc: str, *, check: Check | None = None) -> Any:
    return field(metadata={"doc": doc, "check": check, "secret": False, "choices": (),
                           "required": True})


# --- constraints -----------------------------------------------------------

def positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


def listen_address(value: Any) -> str | None:
    try:
        parse_listen(value)
    except ValueError as exc:
        return str(exc)
    return None


def websocket_url(value: Any) -> str | None:
    if value == "":
        return None
    parts = urlsplit(value)
    if parts.username is not None or parts.password is not None:
        return ("must not carry user:password@ (it would not be sent, and URLs are logged); "
                "use password / password_env / password_file")
    if parts.scheme in ("http", "https"):  # the usual slip: a web address copied from a backend's portal
        secure = "s" if parts.scheme == "https" else ""
        return f"must be a ws:// or wss:// URL, got {value!r} (for a WebSocket backend write ws{secure}://)"
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        return f"must be a ws:// or wss:// URL, got {redact_url(value)!r}"
    return None


#: OCPP charge point identity: at most 48 characters of identifierString, without ':' (docs/security.md).
CHARGE_POINT_ID_MAX = 48
_CHARGE_POINT_ID = re.compile(r"[A-Za-z0-9*\-_=+|@.]{1,48}")


def charge_point_id_problem(cb_id: str) -> str | None:
    """Why ``cb_id`` is not an OCPP charge point identity, or None when it is one (wallboxes and config alike)."""
    if cb_id in (".", ".."):
        return "a dot segment is not an id"
    if len(cb_id) > CHARGE_POINT_ID_MAX:
        return f"longer than {CHARGE_POINT_ID_MAX} characters"
    if not _CHARGE_POINT_ID.fullmatch(cb_id):
        return "only a-z A-Z 0-9 * - _ = + | @ . are allowed"
    return None


def redact_url(value: str) -> str:
    """``scheme://user:secret@host`` → ``scheme://***@host``: URLs are logged, their userinfo never."""
    return _USERINFO.sub(r"\1***@", value)


_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#@\s]*@")


def networks_problem(values: list[str]) -> str | None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"{value!r} is not an IP address or network (CIDR)"
    return None


def phase_number(value: Any) -> str | None:
    return None if value in (1, 2, 3) else "must be 1, 2 or 3"


def actions_problem(actions: list[str]) -> str | None:
    unknown = [a for a in actions if a != "*" and a not in known_actions()]
    if unknown:
        return f"unknown OCPP action {unknown[0]!r}"
    if "*" not in actions and ("StartTransaction" in actions) != ("StopTransaction" in actions):
        return "StartTransaction and StopTransaction go together (a transaction history needs both)"
    return None


def unwrap_optional(hint: Any) -> Any:
    """``X | None`` → X (an optional section); anything else unchanged."""
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return hint


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", value)
    if match is None:
        raise ValueError(f"must be HOST:PORT or [IPv6]:PORT, got {value!r}")
    host = match.group(1) or match.group(3) or "0.0.0.0"
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    if match.group(1):
        ipaddress.IPv6Address(host)
    return host, port


# --- schema ------------------------------------------------------------------

@dataclass(frozen=True)
class ServerSettings:
    listen: str = setting("0.0.0.0:19520", "address the wallboxes connect to", check=listen_address)
    tls: str = setting("off", "TLS on the wallbox port: off, detect (plain and TLS on one port) or on",
                       choices=("off", "detect", "on"))
    cert: str = setting("", "server certificate (PEM, chain after it); empty: self-signed in certs_dir",
                        path=True)
    key: str = setting("", "private key of the server certificate (PEM)", path=True)
    key_password: str = setting("", "passphrase of an encrypted key; empty: the key is not encrypted",
                                secret=True)
    client_ca: list[str] = setting([], "CA certificates for client certificates; non-empty requires them (SP3)",
                                   path=True)
    require_cn_match: bool = setting(True, "with client_ca: the client certificate CN must equal the ChargeBox id")
    certs_dir: str = setting("certs", "where the self-signed certificate is created and kept", path=True)
    password: str = setting("", "global Basic-auth password for wallboxes without their own (SP1/SP2)",
                            secret=True)
    accept_unknown: bool = setting(False, "admit charge point ids that have no [[chargers]] entry (an id "
                                   "equal to a configured one after case folding and NFKC is refused)")
    allow_unauthenticated_unknown: bool = setting(False, "with accept_unknown and neither password nor client_ca: "
                                                  "admit unknown ids with no credential at all (refused otherwise "
                                                  "unless the wallbox port is loopback only)")
    subprotocols: list[str] = setting(list(DEFAULT_SUBPROTOCOLS), "WebSocket subprotocols the proxy relays: "
                                      "ocpp1.6, ocpp2.0.1 and ocpp2.1 get offline answers and load management "
                                      "in their own version; ocpp1.2, ocpp1.5 and ocpp2.0 are relayed only")
    max_message_bytes: int = setting(1_048_576, "largest text frame accepted, in bytes (close 1009 above)",
                                     check=positive)
    handshake_timeout: float = setting(10.0, "seconds a wallbox may take for the TLS + HTTP handshake",
                                       check=positive)
    ping_interval: float = setting(30.0, "WebSocket ping interval on both legs, seconds; 0 disables",
                                   check=non_negative)
    call_timeout: float = setting(30.0, "seconds a CALL may stay unanswered before its slot is freed",
                                  check=positive)
    close_timeout: float = setting(5.0, "seconds to wait for a WebSocket close handshake", check=positive)
    drain_grace: float = setting(0.0, "seconds between SIGTERM and closing the wallboxes, while /readyz already "
                                 "answers 503 and sessions go on, so a load balancer sends new connections "
                                 "elsewhere first (docs/cluster.md); 0: close at once", check=non_negative)
    strict: bool = setting(False, "drop frames that are not valid OCPP-J instead of forwarding them")
    per_address_pending: int = setting(256, "unfinished handshakes one IP address may have at once (a site "
                                       "NATs all its wallboxes to one); 0: no cap", check=non_negative)
    per_address_rate: float = setting(20.0, "new connections per second one IP address may open, sustained, "
                                      "after per_address_burst at once; 0: no cap", check=non_negative)
    per_address_burst: int = setting(256, "new connections one IP address may open at once", check=non_negative)
    per_address_handshakes: int = setting(8, "handshakes worked on at once per IP address once their request is "
                                          "in (decision, upstream connection, 101); the address's others wait "
                                          "their turn; 0: no limit",
                                          check=non_negative)


@dataclass(frozen=True)
class BackendSettings:
    url: str = setting("", "backend URL (ws:// or wss://); the upstream id is appended", check=websocket_url)
    password: str = setting("", "Basic-auth password towards the backend", secret=True)
    ca: list[str] = setting([], "CA certificates trusted for wss:// (SP2); empty: system trust store", path=True)
    client_cert: str = setting("", "client certificate towards the backend (SP3)", path=True)
    client_key: str = setting("", "key of client_cert", path=True)
    client_key_password: str = setting("", "passphrase of an encrypted client_key", secret=True)
    verify: bool = setting(True, "false: do not verify the backend's certificate (explicit opt-in, warned at "
                           "every start; prefer ca = [its certificate])")
    connect_timeout: float = setting(10.0, "seconds for TCP + TLS + WebSocket handshake upstream",
                                     check=positive)
    call_timeout: float = setting(15.0, "seconds the backend may leave a wallbox CALL unanswered; then it counts "
                                  "as lost: offline mode answers the CALL and reconnects (keep it below the "
                                  "wallboxes' own CALL timeout, often 30 s)", check=positive)
    stall_timeout: float = setting(10.0, "seconds an upstream may stop reading (a send blocked, or a ping "
                                   "unanswered) before it counts as lost and is reconnected", check=positive)
    policy: dict[str, str] = setting({}, "the primary backend's commands to the wallbox: action = forward, "
                                     "answer or reject (\"*\": every other action); default: forward all")


@dataclass(frozen=True, kw_only=True)
class SecondarySettings:
    """A secondary backend: gets copies of a wallbox's messages, may send only what its policy allows."""

    url: str = setting("", "URL of this backend (ws:// or wss://); the upstream id is appended; required",
                       check=websocket_url)
    identity: str = setting("", "identity towards this backend; empty: the charger's upstream_id (or id)")
    password: str = setting("", "Basic-auth password towards this backend", secret=True)
    ca: list[str] = setting([], "CA certificates trusted for wss://; empty: system trust store", path=True)
    client_cert: str = setting("", "client certificate towards this backend (SP3)", path=True)
    client_key: str = setting("", "key of client_cert", path=True)
    client_key_password: str = setting("", "passphrase of an encrypted client_key", secret=True)
    verify: bool = setting(True, "false: do not verify this backend's certificate (explicit opt-in, warned "
                           "at every start)")
    connect_timeout: float = setting(10.0, "seconds for TCP + TLS + WebSocket handshake", check=positive)
    forward_actions: list[str] = setting(["*"], "wallbox CALLs this backend gets, by action; [\"*\"]: all",
                                         check=lambda v: actions_problem(v))
    policy: dict[str, str] = setting({}, "its commands to the wallbox: action = forward, answer or reject "
                                     "(\"*\": every other action); default: forward read-only ones "
                                     "(GetConfiguration, GetCompositeSchedule, TriggerMessage, ...), reject the rest")
    queue_limit: int = setting(1000, "frames kept for it while it is down or slow; when full, the oldest "
                               "that is not a transaction message is dropped", check=positive)
    replay_rate: float = setting(50.0, "frames per second at most when catching up after an outage",
                                 check=positive)


@dataclass(frozen=True, kw_only=True)
class _Named:
    name: str = required("name of this secondary (logs, metrics, policy messages)")


@dataclass(frozen=True, kw_only=True)
class InlineSecondary(SecondarySettings, _Named):
    """``[[chargers.secondary]]``: ``name`` first, then the keys of a named backend."""


@dataclass(frozen=True)
class ChargerBase:
    """What every managed charger has: an OCPP wallbox (``[[chargers]]``) or a virtual one."""

    id: str = required("charge point id: the ChargeBox id the wallbox connects with (last URL path segment); "
                       "for a Modbus wallbox, the id it gets")
    upstream_id: str = setting("", "identity towards the backend; empty: same as id")
    upstream_url: str = setting("", "backend URL for this charger; empty: [backend] url; both empty: standalone "
                                "(the proxy is its central system, docs/standalone.md)", check=websocket_url)
    upstream_password: str = setting("", "password towards the backend; empty: [backend] password",
                                     secret=True)
    upstream_ca: list[str] = setting([], "CA certificates for this charger's backend; empty: [backend] ca",
                                     path=True)
    upstream_client_cert: str = setting("", "client certificate towards the backend; empty: [backend]", path=True)
    upstream_client_key: str = setting("", "key of upstream_client_cert", path=True)
    upstream_client_key_password: str = setting("", "passphrase of an encrypted upstream_client_key; empty: "
                                                "[backend] client_key_password", secret=True)
    upstream_policy: dict[str, str] = setting({}, "this charger's primary policy, over [backend] policy")
    secondaries: list[str] = setting([], "names of [backends.NAME] tables that get copies of this wallbox")
    secondary: list[InlineSecondary] = field(default_factory=list, metadata={
        "doc": "a secondary backend for this charger alone (same keys as [backends.NAME], plus name)"})
    # Load management (used when [site], a meter or an EMS is configured).
    max_current: float = setting(16.0, "most current per phase this charger may get, A", check=positive)
    min_current: float = setting(6.0, "least current per phase a car can charge with, A; below it: paused",
                                 check=non_negative)
    phases: int = setting(3, "phases the charger is connected with (1, 2 or 3)", check=phase_number)
    first_phase: int = setting(1, "site phase (1-3) the charger's L1 is wired to", check=phase_number)
    priority: int = setting(0, "higher is served first when the site limit is short")
    enabled: bool = setting(True, "false: the proxy stops charging through it, see on_disable")
    on_disable: str = setting("clear", "with enabled = false: clear (remove the proxy's profile, the wallbox "
                              "runs on its own) or block (limit 0)", choices=("clear", "block"))
    strategy: str = setting("", "max-profile or tx-default for this charger; empty: the [site] strategy",
                            choices=("", "max-profile", "tx-default"))
    unit: str = setting("A", "unit of the proxy's charging profile: A, or W (converted with [site] voltage)",
                        choices=("A", "W"))


@dataclass(frozen=True)
class ConnectorSettings:
    """``[[chargers.connectors]]``: one connector of a multi-connector wallbox as its own load point
    (docs/load-management.md, "Connectors as load points")."""

    id: int = required("connector number as the wallbox reports it (connectorId in OCPP 1.6, evseId in 2.0.1), "
                       "1 or more", check=positive)
    max_current: float = setting(0.0, "most current per phase this connector may get, A; 0: the charger's "
                                 "max_current", check=non_negative)
    min_current: float = setting(-1.0, "least current per phase a car can charge with here, A; -1: the charger's "
                                 "min_current", check=lambda v: None if v >= 0 or v == -1
                                 else "must be -1 or 0 or greater")
    phases: int = setting(0, "phases this connector draws on (the charger's first ones); 0: the charger's phases",
                          check=lambda v: None if v in (0, 1, 2, 3) else "must be 0, 1, 2 or 3")
    priority: int = setting(0, "added to the charger's priority: higher is served first when the site is short")
    enabled: bool = setting(True, "false: this connector is held at 0 A (paused) while the others charge")


@dataclass(frozen=True, kw_only=True)
class ChargerSettings(ChargerBase):
    """A wallbox that connects over OCPP."""

    password: str = setting("", "Basic-auth password this wallbox must send (SP1/SP2), with its id as the "
                            "username", secret=True)
    any_username: bool = setting(False, "accept any Basic-auth username with the right password (wallboxes "
                                 "known to send something other than their id); logged at each connection")
    allow_unauthenticated: bool = setting(False, "admit this wallbox with no credential at all (no password, "
                                          "no client certificate); without it such a charger is refused by "
                                          "check-config unless the wallbox port listens on loopback only")
    connectors: list[ConnectorSettings] = field(default_factory=list, metadata={
        "doc": "per-connector load management: each connector listed is its own load point (absent: the "
               "wallbox is one load point, its connectors share its limit)"})


@dataclass(frozen=True, kw_only=True)
class ModbusChargerSettings(ChargerBase):
    """A Modbus-only wallbox the proxy presents to the backend as an OCPP 1.6 charge point."""

    modbus: str = setting("", "the wallbox's Modbus TCP address HOST:PORT, or its RS485 gateway's (transport "
                          "rtu-over-tcp); empty with transport = rtu",
                          check=lambda v: None if v == "" else listen_address(v))
    modbus_unit: int = setting(0, "Modbus unit (device) id; 0: the map's default (most makes 1 or 255)",
                               check=lambda v: None if 0 <= v <= 255 else "must be 0-255")
    map: str = setting("heidelberg", "built-in register map (docs/modbus.md lists them with their sources)",
                       choices=WALLBOX_MAPS)
    map_file: str = setting("", "a register map of your own (TOML, the built-in maps' format; relative to this "
                            "file); replaces map", path=True)
    transport: str = setting("tcp", "tcp (Modbus TCP), rtu-over-tcp (an RS485 gateway in transparent mode) or "
                             "rtu (serial_port on this box)", choices=("tcp", "rtu-over-tcp", "rtu"))
    serial_port: str = setting("", "transport = rtu: the RS485 device, e.g. /dev/ttyUSB0")
    baudrate: int = setting(9600, "transport = rtu: bits per second (1200-115200)",
                            check=lambda v: None if v in _BAUDRATES else f"must be one of {_BAUDRATES}")
    parity: str = setting("N", "transport = rtu: N, E or O", choices=("N", "E", "O"))
    stopbits: int = setting(1, "transport = rtu: 1 or 2", check=lambda v: None if v in (1, 2) else "must be 1 or 2")
    frame_gap: float = setting(0.0, "seconds of silence on the bus after every answer before the next request "
                               "(RS485 turnaround); rtu never goes below 3.5 characters", check=non_negative)
    fixed_id_tag: str = setting("", "idTag for Authorize and StartTransaction when a car plugs in (wallboxes "
                                "without a reader); empty: charging starts by RemoteStartTransaction only")
    vendor: str = setting("", "chargePointVendor in BootNotification; empty: the map's vendor")
    model: str = setting("", "chargePointModel in BootNotification; empty: the map's model")
    serial_number: str = setting("", "chargePointSerialNumber in BootNotification; empty: not sent")
    poll_interval: float = setting(1.0, "seconds between reads of the wallbox's registers", check=positive)
    timeout: float = setting(1.0, "seconds per Modbus request", check=positive)
    fault_after: float = setting(10.0, "seconds without an answer before the charge point reports Faulted",
                                 check=positive)
    meter_interval: int = setting(60, "MeterValueSampleInterval, seconds between MeterValues in a transaction "
                                  "(the backend may change it with ChangeConfiguration)", check=non_negative)


@dataclass(frozen=True)
class SiteSettings:
    """Local load management; without this section the proxy injects nothing."""

    max_current: float = required("site limit per phase (main fuse), A", check=positive)
    name: str = setting("site", "the site's name in a database shared by several proxies ([store] url): the key of "
                        "its lease and its fuse reservations; one name per site (docs/cluster.md)",
                        check=lambda v: None if v and len(v) <= 100 else "must be 1 to 100 characters")
    phases: int = setting(3, "phases of the site connection (1 or 3)", check=lambda v: None if v in (1, 3)
                          else "must be 1 or 3")
    voltage: float = setting(230.0, "phase voltage for A ↔ W conversion, V", check=positive)
    interval: float = setting(5.0, "recompute limits at least this often, seconds", check=positive)
    meter_timeout: float = setting(10.0, "seconds after which a grid meter reading is stale", check=positive)
    fallback_current: float = setting(-1.0, "limit per charger while inputs are stale or unknown, A; "
                                      "-1: each charger's min_current", check=lambda v: None if v >= 0 or v == -1
                                      else "must be -1 or 0 or greater")
    fail_closed: bool = setting(False, "stale or unknown inputs pause every charger (fallback 0)")
    ramp_up_interval: float = setting(15.0, "limits go up at most this often per charger, seconds",
                                      check=non_negative)
    hysteresis: float = setting(1.0, "smallest increase worth sending, A", check=non_negative)
    min_hold_time: float = setting(60.0, "a charger paused for lack of current stays paused this long, seconds",
                                   check=non_negative)
    profile_id: int = setting(990001, "chargingProfileId reserved for the proxy's profile", check=positive)
    stack_level: int = setting(8, "stackLevel of the proxy's ChargePointMaxProfile (above the backend's)",
                               check=non_negative)
    tx_default_stack_level: int = setting(0, "stackLevel of the proxy's TxDefaultProfile (tx-default strategy; "
                                          "below the backend's)", check=non_negative)
    lost_charger_hold: float = setting(28800.0, "a charger whose connection is lost keeps its reservation (the "
                                       "limit it last accepted, else max_current) this long unless it comes back "
                                       "and is known not to draw, seconds; 8 h covers a full charge on an "
                                       "installed profile", check=non_negative)
    strategy: str = setting("max-profile", "max-profile (ChargePointMaxProfile) or tx-default (clamp the "
                            "backend's TxDefault/Tx profiles); max-profile falls back to tx-default per charger "
                            "when a wallbox rejects it", choices=("max-profile", "tx-default"))


@dataclass(frozen=True)
class LogSettings:
    level: str = setting("info", "debug, info, warning or error",
                         choices=("debug", "info", "warning", "error"))
    format: str = setting("auto", "auto (console on a terminal, else JSON), json or console",
                          choices=("auto", "json", "console"))


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = setting("127.0.0.1:9520", "Prometheus /metrics, /healthz, /readyz and the read-only status "
                          "page (/, /api/status); empty disables",
                          check=lambda v: None if v == "" else listen_address(v))
    allow: list[str] = setting([], "client addresses or networks (CIDR) allowed to connect; empty: any "
                               "(check-config warns when listen is all addresses)", check=lambda v: networks_problem(v))


@dataclass(frozen=True)
class OfflineSettingsSection:
    enabled: bool = setting(True, "keep wallboxes connected and answer locally while the backend is down; "
                                  "false: a backend outage closes or refuses the wallbox")
    data_dir: str = setting("data", "directory of the durable queue (SQLite) of frames answered offline",
                            path=True)
    auth: str = setting("local_list", "Authorize/StartTransaction while offline and for standalone chargers: "
                                      "local_list (local_list plus idTags the backend accepted while online), "
                                      "accept_all or reject_all",
                        choices=("local_list", "accept_all", "reject_all"))
    local_list: list[str] = setting([], "idTags accepted while offline and by standalone chargers "
                                    "(auth = local_list)")
    heartbeat_interval: int = setting(300, "interval in the local BootNotification answer (offline and "
                                      "standalone), seconds", check=positive)
    data_transfer: str = setting("Rejected", "local answer to DataTransfer while offline (and always for "
                                 "standalone chargers)",
                                 choices=("Accepted", "Rejected", "UnknownVendorId", "UnknownMessageId"))
    session_log: bool = setting(True, "record every charger's transactions in data_dir (`ocpp-proxy sessions "
                                "export`, the status page); false: only standalone chargers' (always recorded)")
    reconnect_min: float = setting(1.0, "first reconnect delay, seconds (doubles per failure, with jitter)",
                                   check=positive)
    reconnect_max: float = setting(60.0, "longest reconnect delay, seconds", check=positive)
    drain_delay: float = setting(10.0, "seconds after a wallbox left (or after start-up) before the proxy delivers "
                                 "its queued frames itself; a wallbox back by then replays them", check=non_negative)


def store_url(value: Any) -> str | None:
    if value == "" or str(value).startswith(("postgresql://", "postgres://")):
        return None
    return "must be empty (SQLite in [offline] data_dir) or a postgresql:// URL"


@dataclass(frozen=True)
class StoreSettings:
    url: str = setting("", "where the durable state lives: empty for SQLite in [offline] data_dir (the default); "
                           "postgresql://user:password@host/db to share one PostgreSQL database "
                           "(docs/cluster.md)", secret=True, check=store_url)
    process: str = setting("", "this process's name in the charger and site leases (several proxies on one "
                           "database, docs/cluster.md); unique per running process; empty: host name and pid")
    lease_seconds: float = setting(15.0, "life of a charger or site lease, seconds: renewed every third of it; "
                                   "after a crash another process serves the charger at most this long later",
                                   check=positive)


@dataclass(frozen=True)
class MeterRegister:
    name: str = required("which value: l1, l2, l3 (phase currents, A), power (W) or energy (Wh)")
    address: int = required("register address (0-based, as on the wire)", check=non_negative)
    kind: str = setting("input", "input or holding register", choices=("input", "holding"))
    type: str = setting("float32", "uint16, int16, uint32, int32 or float32",
                        choices=("uint16", "int16", "uint32", "int32", "float32"))
    word_order: str = setting("big", "big: high word first; little: low word first", choices=("big", "little"))
    scale: float = setting(1.0, "physical value = raw value x scale")


@dataclass(frozen=True)
class MeterSettings:
    modbus: str = setting("", "grid meter Modbus TCP address HOST:PORT; empty: no meter",
                          check=lambda v: None if v == "" else listen_address(v))
    unit: int = setting(1, "Modbus unit (device) id", check=non_negative)
    map: str = setting("sdm630", "register map: sdm630, em24 or generic ([[meter.registers]])",
                       choices=("sdm630", "em24", "generic"))
    poll_interval: float = setting(1.0, "seconds between readings", check=positive)
    timeout: float = setting(1.0, "seconds per Modbus request", check=positive)
    stale_after: float = setting(10.0, "seconds without a good reading before the engine falls back",
                                 check=positive)
    registers: list[MeterRegister] = setting([], "map = generic: l1, l2, l3 (and optionally power, energy)")


@dataclass(frozen=True)
class EmsSettings:
    modbus_listen: str = setting("", "Modbus TCP server for an energy manager, HOST:PORT; empty: off",
                                 check=lambda v: None if v == "" else listen_address(v))
    ems_timeout: float = setting(0.0, "seconds an EMS limit stays valid without being written again; 0: forever",
                                 check=non_negative)
    allow: list[str] = setting(["127.0.0.1", "::1"], "client addresses or networks (CIDR) allowed to write "
                               "and read; empty: any (check-config warns when listen is all addresses)",
                               check=lambda v: networks_problem(v))


@dataclass(frozen=True)
class UpstreamTarget:
    """Everything needed to open one upstream connection, defaults resolved."""

    url: str
    identity: str
    password: str
    ca: tuple[str, ...]
    client_cert: str
    client_key: str
    connect_timeout: float
    client_key_password: str = ""
    #: False only by an explicit ``verify = false``: the backend's certificate is not checked.
    verify: bool = True

    def __repr__(self) -> str:  # the password must not reach logs through a repr
        return f"UpstreamTarget(url={redact_url(self.url)!r}, identity={self.identity!r})"


@dataclass(frozen=True)
class Config:
    server: ServerSettings = field(default_factory=ServerSettings, metadata={"doc": "wallbox side"})
    backend: BackendSettings = field(default_factory=BackendSettings,
                                     metadata={"doc": "defaults for every charger's upstream"})
    log: LogSettings = field(default_factory=LogSettings, metadata={"doc": "logging"})
    metrics: MetricsSettings = field(default_factory=MetricsSettings, metadata={"doc": "monitoring"})
    offline: OfflineSettingsSection = field(default_factory=OfflineSettingsSection,
                                            metadata={"doc": "backend outages"})
    store: StoreSettings = field(default_factory=StoreSettings,
                                 metadata={"doc": "durable state: SQLite (default) or PostgreSQL"})
    meter: MeterSettings = field(default_factory=MeterSettings, metadata={"doc": "grid meter (Modbus TCP)"})
    ems: EmsSettings = field(default_factory=EmsSettings, metadata={"doc": "energy manager interface (Modbus TCP)"})
    chargers: list[ChargerSettings] = field(default_factory=list,
                                            metadata={"doc": "one entry per wallbox"})
    modbus_chargers: list[ModbusChargerSettings] = field(default_factory=list, metadata={
        "doc": "Modbus-only wallboxes, each presented to the backend as an OCPP 1.6 charge point"})
    site: SiteSettings | None = field(default=None, metadata={
        "doc": "local load management; absent: the proxy injects no charging profile"})
    backends: dict[str, SecondarySettings] = field(default_factory=dict, metadata={
        "doc": "named secondary backends, referenced by chargers' secondaries"})

    @property
    def all_chargers(self) -> list[ChargerBase]:
        """Every managed charger: OCPP wallboxes, then virtual charge points (the EMS register order)."""
        return [*self.chargers, *self.modbus_chargers]

    def charger(self, charge_box_id: str) -> ChargerSettings | None:
        """The OCPP wallbox allowed to connect as ``charge_box_id`` (virtual ones never connect)."""
        for charger in self.chargers:
            if charger.id == charge_box_id:
                return charger
        return None

    def is_virtual(self, charge_box_id: str) -> bool:
        return any(c.id == charge_box_id for c in self.modbus_chargers)

    def settings_for(self, charger_id: str) -> ChargerBase | None:
        """Any charger's settings, virtual ones included (load management, secondaries)."""
        return next((c for c in self.all_chargers if c.id == charger_id), None)

    def charger_entries(self) -> Iterator[tuple[str, ChargerBase]]:
        """(config key, charger) for every entry, so checks name the right table."""
        for i, charger in enumerate(self.chargers):
            yield f"chargers[{i}]", charger
        for i, virtual in enumerate(self.modbus_chargers):
            yield f"modbus_chargers[{i}]", virtual

    def standalone(self, charger: ChargerBase) -> bool:
        """No backend URL for this charger (its own nor [backend] url): the proxy is its central system."""
        return not (charger.upstream_url or self.backend.url)

    def session_log_on(self) -> bool:
        """The session log is kept: asked for, or needed (a standalone charger's only record)."""
        return self.offline.session_log or any(self.standalone(c) for c in self.all_chargers)

    def upstream_for(self, charger: ChargerBase) -> UpstreamTarget:
        backend = self.backend
        identity = charger.upstream_id or charger.id
        return UpstreamTarget(
            url=upstream_url(charger.upstream_url or backend.url, identity),
            identity=identity,
            password=charger.upstream_password or backend.password,
            ca=tuple(charger.upstream_ca or backend.ca),
            client_cert=charger.upstream_client_cert or backend.client_cert,
            client_key=charger.upstream_client_key or backend.client_key,
            connect_timeout=backend.connect_timeout,
            client_key_password=charger.upstream_client_key_password or backend.client_key_password,
            verify=backend.verify,
        )


    def secondaries_for(self, charger: ChargerBase) -> list[SecondaryTarget]:
        """The charger's secondaries in config order: referenced ones, then inline ones."""
        entries: list[tuple[str, SecondarySettings]] = [
            (name, self.backends[name]) for name in charger.secondaries if name in self.backends]
        entries += [(entry.name, entry) for entry in charger.secondary]
        return [SecondaryTarget(name, _secondary_target(charger, entry), entry) for name, entry in entries]

    def primary_policy(self, charger: ChargerBase) -> dict[str, str]:
        return {**self.backend.policy, **charger.upstream_policy}


@dataclass(frozen=True)
class SecondaryTarget:
    name: str
    target: UpstreamTarget
    settings: SecondarySettings

    @property
    def forward_actions(self) -> frozenset[str] | None:
        """None: every action."""
        actions = self.settings.forward_actions
        return None if "*" in actions else frozenset(actions)


def _secondary_target(charger: ChargerBase, entry: SecondarySettings) -> UpstreamTarget:
    identity = entry.identity or charger.upstream_id or charger.id
    return UpstreamTarget(url=upstream_url(entry.url, identity), identity=identity, password=entry.password,
                          ca=tuple(entry.ca), client_cert=entry.client_cert, client_key=entry.client_key,
                          connect_timeout=entry.connect_timeout, client_key_password=entry.client_key_password,
                          verify=entry.verify)


#: What a URL path segment may carry as it is besides letters, digits and ``-._~`` (RFC 3986
#: pchar: sub-delims, ":" and "@"). ``DE*ABC*E001`` stays ``DE*ABC*E001``; "/", "?", "#",
#: "%", spaces and non-ASCII are percent-encoded.
PATH_SEGMENT_SAFE = "!$&'()*+,;=:@"


def upstream_url(base: str, identity: str) -> str:
    """Append the identity unless the URL already ends in it.

    Only what a path segment cannot carry is percent-encoded: a backend that
    compares the path with the Basic-auth username must see the same id.
    """
    quoted = quote(identity, safe=PATH_SEGMENT_SAFE)
    path = urlsplit(base).path
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if last in (identity, quoted):
        return base
    return base.rstrip("/") + "/" + quoted
