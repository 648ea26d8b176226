"""Security rules across keys: who can connect without a credential, what listens where, what is not verified.

Errors stop the configuration (check-config exits 2, ``run`` does not start);
warnings are printed by check-config and logged as ``config_warning`` at every
start. The reasons are in ``docs/security.md``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from proxy.config.problems import LineIndex, Problem
from proxy.config.schema import ChargerSettings, Config, charge_point_id_problem, parse_listen


def security_problems(config: Config, index: LineIndex) -> list[Problem]:
    """Errors: credential-less chargers not explicitly allowed, ids OCPP does not allow, useless client_ca."""
    problems: list[Problem] = []
    loopback = listens_on_loopback_only(config.server.listen)
    for key, charger in _chargers(config):
        if open_charger(config, charger) and not charger.allow_unauthenticated and not loopback:
            problems.append(Problem(key, f"charger {charger.id!r} is reachable without any credential (no password, "
                                    "no client_ca): set password (or [server] password, or client_ca) or, "
                                    "to admit it anyway, allow_unauthenticated = true", index.find(key)))
    if open_unknown(config) and not config.server.allow_unauthenticated_unknown and not loopback:
        problems.append(Problem("server.accept_unknown", "any unknown charge point id would be admitted without a "
                                "credential (no [server] password, no client_ca): set one of them or, to admit "
                                "them anyway, allow_unauthenticated_unknown = true",
                                index.find("server.accept_unknown")))
    for key, entry in config.charger_entries():
        why = charge_point_id_problem(entry.id)
        if why:
            problems.append(Problem(f"{key}.id", f"{entry.id!r} is not an OCPP charge point id ({why}): 1-48 of "
                                    "a-z A-Z 0-9 * - _ = + | @ . (not . or ..)", index.find(f"{key}.id")))
    if config.server.client_ca and config.server.tls == "off":
        problems.append(Problem("server.client_ca", "client certificates need TLS: set tls = \"on\" or \"detect\"",
                                index.find("server.client_ca")))
    return problems


def open_unknown(config: Config) -> bool:
    """Unknown ids are admitted and nothing asks them for a credential."""
    return config.server.accept_unknown and not (config.server.password or config.server.client_ca)


def security_warnings(config: Config, index: LineIndex | None = None) -> list[Problem]:
    """What is allowed but worth a look: open chargers, open listeners, unverified backends."""
    index = index or LineIndex("")
    warnings: list[Problem] = []
    loopback = listens_on_loopback_only(config.server.listen)
    for key, charger in _chargers(config):
        if open_charger(config, charger):
            why = "allow_unauthenticated = true" if charger.allow_unauthenticated else "the wallbox port is loopback only"
            warnings.append(Problem(key, f"charger {charger.id!r} is admitted without any credential ({why})",
                                    index.find(key)))
    if open_unknown(config):
        where = "loopback" if loopback else "the network"
        warnings.append(Problem("server.accept_unknown", f"any unknown charge point id from {where} is admitted "
                                "without a credential (no [server] password, no client_ca)",
                                index.find("server.accept_unknown")))
    for section, listen, allow in (("ems", config.ems.modbus_listen, config.ems.allow),
                                   ("metrics", config.metrics.listen, config.metrics.allow)):
        if listen and listens_on_all(listen) and not allow:
            warnings.append(Problem(f"{section}.listen" if section == "metrics" else "ems.modbus_listen",
                                    f"{listen!r} listens on all addresses and {section}.allow is empty: anyone "
                                    "who reaches this host may connect; set allow = [addresses or networks]",
                                    index.find(f"{section}")))
    for key, verify in _verify_settings(config):
        if not verify:
            warnings.append(Problem(f"{key}.verify", "verify = false: this backend's TLS certificate is not "
                                    "checked (anyone in the path can pose as it)", index.find(f"{key}.verify")))
    return warnings


def open_charger(config: Config, charger: ChargerSettings) -> bool:
    """No password (own or [server]) and no client certificate: nothing proves who connects."""
    return not (charger.password or config.server.password or config.server.client_ca)


def listens_on_all(listen: str) -> bool:
    """``0.0.0.0:P``, ``[::]:P`` and a host-less ``:P`` bind every address."""
    try:
        host = parse_listen(listen)[0]
    except ValueError:
        return False
    return host in ("", "0.0.0.0", "::") or listen.startswith(":")


def listens_on_loopback_only(listen: str) -> bool:
    try:
        host = parse_listen(listen)[0]
    except ValueError:
        return False
    if listen.startswith(":"):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _chargers(config: Config) -> Iterator[tuple[str, ChargerSettings]]:
    for i, charger in enumerate(config.chargers):
        yield f"chargers[{i}]", charger


def _verify_settings(config: Config) -> Iterator[tuple[str, bool]]:
    yield "backend", config.backend.verify
    for name, entry in config.backends.items():
        yield f"backends.{name}", entry.verify
    for key, charger in config.charger_entries():
        for j, inline in enumerate(charger.secondary):
            yield f"{key}.secondary[{j}]", inline.verify
