"""Rules that span several keys (duplicate ids, backends, ports, secondaries and their policies)."""

from __future__ import annotations

import re

from proxy.config.problems import LineIndex, Problem
from proxy.config.schema import ChargerBase, ChargerSettings, Config, ConnectorSettings, parse_listen
from proxy.core.policy import ANY, COMMANDS, MODES, conflicts
from proxy.messages.versions import KNOWN, RELAY_ONLY, SUPPORTED


def cross_checks(config: Config, index: LineIndex, failed: frozenset[str] = frozenset()) -> list[Problem]:
    """Rules that span several keys; ``failed``: keys already reported (their rules would repeat them)."""
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for key, charger in config.charger_entries():
        if charger.id in seen:
            problems.append(Problem(f"{key}.id", f"duplicate charger id {charger.id!r} "
                                    f"(also {seen[charger.id]})", index.find(f"{key}.id")))
        seen.setdefault(charger.id, key)
        if charger.min_current > charger.max_current:
            problems.append(Problem(f"{key}.min_current", f"is above max_current ({charger.max_current})",
                                    index.find(f"{key}.min_current")))
    if config.server.accept_unknown and not config.backend.url and "backend.url" not in failed:
        # Unknown ids are never run standalone: anyone could connect and be accepted by the proxy itself.
        problems.append(Problem("backend.url", "accept_unknown needs a default backend URL (a standalone site "
                                "lists its wallboxes as [[chargers]]; unknown ids are not run standalone)",
                                index.find("backend")))
    problems += _port_clashes(config, index)
    if config.meter.map == "generic" and config.meter.modbus:
        names = {r.name for r in config.meter.registers}
        if not {"l1", "l2", "l3"} <= names:
            problems.append(Problem("meter.registers", "map = generic needs registers named l1, l2 and l3",
                                    index.find("meter")))
    if bool(config.server.cert) != bool(config.server.key):
        problems.append(Problem("server.key" if config.server.cert else "server.cert",
                                "cert and key must be given together", index.find("server")))
    problems += _subprotocol_checks(config, index)
    problems += _secondary_checks(config, index)
    problems += _modbus_checks(config, index)
    problems += _connector_checks(config, index)
    return problems


def connector_max(charger: ChargerBase, connector: ConnectorSettings) -> float:
    """A connector's max_current with its default (0: the charger's)."""
    return connector.max_current or charger.max_current


def connector_min(charger: ChargerBase, connector: ConnectorSettings) -> float:
    return charger.min_current if connector.min_current < 0 else connector.min_current


def connector_phases(charger: ChargerBase, connector: ConnectorSettings) -> int:
    return connector.phases or charger.phases


def _connector_checks(config: Config, index: LineIndex) -> list[Problem]:
    """Per-connector settings that cannot work: the connector does not exist as numbered, is listed twice, or
    asks for more than its wallbox (which stays bounded by its own max_current)."""
    problems: list[Problem] = []

    def problem(key: str, message: str) -> None:
        problems.append(Problem(key, message, index.find(key) or index.find(key.rpartition(".")[0])))

    for i, charger in enumerate(config.chargers):
        base = f"chargers[{i}]"
        seen: dict[int, str] = {}
        for j, connector in enumerate(charger.connectors):
            key = f"{base}.connectors[{j}]"
            if connector.id in seen:
                problem(f"{key}.id", f"connector {connector.id} is listed twice (also {seen[connector.id]})")
            seen.setdefault(connector.id, key)
            top, least = connector_max(charger, connector), connector_min(charger, connector)
            if top > charger.max_current:
                problem(f"{key}.max_current", f"{top:g} A is above the charger's max_current "
                        f"({charger.max_current:g} A): the wallbox as a whole stays bounded by it")
            if least > top:
                problem(f"{key}.min_current", f"{least:g} A is above the connector's max_current ({top:g} A)")
            if connector_phases(charger, connector) > charger.phases:
                problem(f"{key}.phases", f"{connector.phases} is more than the charger's phases ({charger.phases})")
        if charger.connectors and charger.unit == "W":
            problem(f"{base}.unit", "per-connector limits are sent in A: unit = \"W\" cannot be combined with "
                    "[[chargers.connectors]]")
    return problems


def has_connectors(charger: ChargerBase) -> bool:
    return isinstance(charger, ChargerSettings) and bool(charger.connectors)


def standalone_notes(config: Config) -> list[str]:
    """One line per charger without a backend URL (check-config prints them: not an error any more)."""
    return [f"{key} ({charger.id}): no backend URL: runs standalone, the proxy is its central system "
            f"(docs/standalone.md)" for key, charger in config.charger_entries() if config.standalone(charger)]


def _modbus_checks(config: Config, index: LineIndex) -> list[Problem]:
    """Each Modbus wallbox's transport has its address, and its own map file is valid (problems named by
    the map file's key and line)."""
    from proxy.config.problems import ConfigError
    from proxy.modbus.wallboxmap import load_map_file

    problems: list[Problem] = []
    for i, charger in enumerate(config.modbus_chargers):
        base = f"modbus_chargers[{i}]"
        if charger.transport == "rtu" and not charger.serial_port:
            problems.append(Problem(f"{base}.serial_port", "is required with transport = rtu", index.find(base)))
        if charger.transport != "rtu" and not charger.modbus:
            problems.append(Problem(f"{base}.modbus", f"is required with transport = {charger.transport} "
                                    "(HOST:PORT)", index.find(base)))
        if charger.map_file:
            try:
                load_map_file(charger.map_file)
            except ConfigError as exc:
                line = index.find(f"{base}.map_file")
                problems += [Problem(f"{base}.map_file", p.render(exc.source), line) for p in exc.problems]
    return problems


def _subprotocol_checks(config: Config, index: LineIndex) -> list[Problem]:
    """Only registered OCPP names; say which of them the proxy answers and load-manages in."""
    problems: list[Problem] = []
    supported = ", ".join(SUPPORTED)
    for j, name in enumerate(config.server.subprotocols):
        if name not in KNOWN:
            problems.append(Problem(
                f"server.subprotocols[{j}]",
                f"unknown subprotocol {name[:40]!r}: use {supported} ([site] load management and offline mode "
                f"work in these) or {', '.join(RELAY_ONLY)} (relayed only: nothing injected or answered locally)",
                index.find("server.subprotocols")))
    if not config.server.subprotocols:
        problems.append(Problem("server.subprotocols", f"is empty: no wallbox could connect (use {supported})",
                                index.find("server.subprotocols")))
    return problems


#: The addresses the proxy listens on, by key (each binds its own port).
_LISTENERS = {"server.listen": "the wallbox port", "metrics.listen": "the metrics port",
              "ems.modbus_listen": "the EMS Modbus port"}


def _port_clashes(config: Config, index: LineIndex) -> list[Problem]:
    """Two listeners on one port clash unless both name different specific hosts."""
    bound: list[tuple[str, str, int]] = []
    problems: list[Problem] = []
    for key, what in _LISTENERS.items():
        section, _, name = key.partition(".")
        value = getattr(getattr(config, section), name)
        if not value:
            continue
        host, port = parse_listen(value)
        for other, other_host, other_port in bound:
            wildcard = {host, other_host} & {"", "0.0.0.0", "::"}
            if port == other_port != 0 and (wildcard or host == other_host):
                problems.append(Problem(key, f"port {port} is already {_LISTENERS[other]} ({other}); "
                                        f"{what} needs its own", index.find(key)))
        bound.append((key, host, port))
    return problems


# --- several backends per wallbox ------------------------------------------------------

#: Names a secondary may not have: the session's own leg names.
_RESERVED_NAMES = ("primary", "wallbox", "proxy")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")


def _policy_problems(table: dict[str, str], key: str, index: LineIndex) -> list[Problem]:
    """Checked per entry, so each message names its own key and line."""
    problems = []
    for action, mode in table.items():
        message = None
        if action != ANY and action not in COMMANDS:
            message = "not a command a backend sends to a wallbox (nor \"*\")"
        elif mode not in MODES:
            message = f"must be one of {', '.join(MODES)}; got {mode!r}"
        if message:
            problems.append(Problem(f"{key}.{action}", message, index.find(f"{key}.{action}")))
    return problems


def _secondary_checks(config: Config, index: LineIndex) -> list[Problem]:
    """Names resolve and are unique, URLs are set, and no two upstreams own the same wallbox state."""
    problems: list[Problem] = []

    def problem(key: str, message: str) -> None:
        problems.append(Problem(key, message, index.find(key)))

    problems += _policy_problems(config.backend.policy, "backend.policy", index)
    for name, entry in config.backends.items():
        problems += _policy_problems(entry.policy, f"backends.{name}.policy", index)
        if not _NAME.fullmatch(name) or name in _RESERVED_NAMES:
            problem(f"backends.{name}", "name must be 1-40 of A-Z a-z 0-9 _ - and not primary, wallbox or proxy")
        if not entry.url:
            problem(f"backends.{name}.url", "is required")
    for base, charger in config.charger_entries():
        problems += _policy_problems(charger.upstream_policy, f"{base}.upstream_policy", index)
        where: dict[str, str] = {}  # secondary name → its table's key
        for j, name in enumerate(charger.secondaries):
            key = f"{base}.secondaries[{j}]"
            if name not in config.backends:
                known = ", ".join(sorted(config.backends)) or "none"
                problem(key, f"no [backends.{name}] table (defined: {known})")
            elif name in where:
                problem(key, f"{name!r} is listed twice")
            else:
                where[name] = f"backends.{name}"
        for j, entry in enumerate(charger.secondary):
            key = f"{base}.secondary[{j}]"
            if not _NAME.fullmatch(entry.name) or entry.name in _RESERVED_NAMES:
                problem(f"{key}.name", "must be 1-40 of A-Z a-z 0-9 _ - and not primary, wallbox or proxy")
            elif entry.name in where:
                problem(f"{key}.name", f"{entry.name!r} is already a secondary of this charger ({where[entry.name]})")
            else:
                where[entry.name] = key
            if not entry.url:
                problem(f"{key}.url", "is required")
            problems += _policy_problems(entry.policy, f"{key}.policy", index)
        problems += _policy_conflicts(config, base, charger, where, index)
    return problems


def _policy_conflicts(config: Config, entry: str, charger: ChargerBase, where: dict[str, str],
                      index: LineIndex) -> list[Problem]:
    """Two upstreams that may both change one kind of wallbox state: refused, naming both."""
    tables: dict[str, tuple[dict[str, str], str]] = {"primary": (config.primary_policy(charger), "")}
    for target in config.secondaries_for(charger):
        tables[target.name] = (target.settings.policy, where.get(target.name, ""))
    upstreams = [(name, table, name == "primary") for name, (table, _) in tables.items()]
    problems: list[Problem] = []
    for conflict in conflicts(upstreams):
        table, base = tables[conflict.second]
        action = next((a for a in conflict.actions if a in table), ANY if ANY in table else conflict.actions[0])
        key = f"{base}.policy.{action}" if base else f"{entry}.upstream_policy"
        first = _describe_upstream(conflict.first, tables[conflict.first][1])
        second = _describe_upstream(conflict.second, base)
        via = "" if conflict.actions == (conflict.state,) else f" ({', '.join(conflict.actions)})"
        problems.append(Problem(key, (
            f"upstreams {first} and {second} may both send {conflict.state}{via} to charger {charger.id!r}; "
            f"set {conflict.actions[0]} to \"reject\" or \"answer\" in one of their policies"), index.find(key)))
    return problems


def _describe_upstream(name: str, base: str) -> str:
    return f"{name!r} ({base or 'backend'})"


# --- warnings: a file that loads, but does not do what its author may think ----------------------

def site_warnings(config: Config, index: LineIndex) -> list[Problem]:
    """A site limit too small for a charger's minimum, or for all minimums at once.

    Not errors: the limit engine handles both (docs/load-management.md, "When the site is
    short"): a charger whose minimum never fits never charges; when the minimums together
    do not fit, chargers are admitted by priority, running ones first, then by id, and the
    rest wait paused at 0 A.
    """
    site = config.site
    if site is None:
        return []
    warnings: list[Problem] = []
    per_phase = [0.0] * site.phases
    points = 0
    for key, charger, least, phases, what in _load_points(config):
        if not (charger.enabled or charger.on_disable == "block"):
            continue
        points += 1
        if least > site.max_current:
            warnings.append(Problem(f"{key}.min_current", (
                f"{least:g} A is above the site limit ([site] max_current = {site.max_current:g} A): "
                f"{what} can never charge"), index.find(f"{key}.min_current") or index.find(key)))
        first = (charger.first_phase - 1) % site.phases
        for i in range(min(phases, site.phases)):
            per_phase[(first + i) % site.phases] += least
    worst = max(per_phase, default=0.0)
    if worst > site.max_current and points > 1:
        phase = per_phase.index(worst) + 1
        warnings.append(Problem("site.max_current", (
            f"{site.max_current:g} A is below the sum of the chargers' min_current on phase L{phase} ({worst:g} A): "
            "when all charge, the lower priorities (then the later arrivals, then by id) wait at 0 A"),
            index.find("site.max_current") or index.find("site")))
    return warnings


def _load_points(config: Config) -> list[tuple[str, ChargerBase, float, int, str]]:
    """(config key, charger, min_current, phases, name) per load point: a charger, or each of its enabled
    connectors (docs/load-management.md, "Connectors as load points")."""
    out: list[tuple[str, ChargerBase, float, int, str]] = []
    for key, charger in config.charger_entries():
        connectors = charger.connectors if isinstance(charger, ChargerSettings) else []
        if not connectors:
            out.append((key, charger, charger.min_current, charger.phases, f"charger {charger.id!r}"))
        for j, c in enumerate(connectors):
            if c.enabled:
                out.append((f"{key}.connectors[{j}]", charger, connector_min(charger, c), connector_phases(charger, c),
                            f"connector {c.id} of charger {charger.id!r}"))
    return out


def subprotocol_warnings(config: Config, index: LineIndex, *, load_managed: bool) -> list[Problem]:
    """Relay-only subprotocols listed: their sessions get no offline answers and no load management."""
    relayed = [name for name in config.server.subprotocols if name in RELAY_ONLY]
    if not relayed:
        return []
    missing = [what for what, on in (("[site] load management", load_managed),
                                     ("offline mode", config.offline.enabled)) if on]
    if not missing:
        return []
    return [Problem("server.subprotocols", (
        f"{', '.join(relayed)} {'is' if len(relayed) == 1 else 'are'} relayed only: {' and '.join(missing)} "
        f"work in {', '.join(SUPPORTED)}; a station on {relayed[0]} gets neither (its backend's outage closes it)"),
        index.find("server.subprotocols"))]

