"""ocpp-proxy: OCPP gateway between wallboxes and their backend.

Exit status: 0 success, 2 unusable configuration or arguments, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import trio

from proxy import __version__
from proxy.ops import logs
from proxy.config import (
    Config,
    ConfigError,
    LineIndex,
    Problem,
    StartupError,
    load,
    site_warnings,
    startup_step,
    subprotocol_warnings,
)
from proxy.storage.interface import StorageUnusable

if TYPE_CHECKING:
    from proxy.ops.certs import Issued
    from proxy.ops.metrics import Metrics
    from proxy.ops.monitor import Monitor
    from proxy.runtime.server import ProxyServer

EXIT_CONFIG = 2
_E = TypeVar("_E", bound=BaseException)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_CONFIG
    return int(args.func(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ocpp-proxy", description=__doc__.splitlines()[0],
        epilog="Exit status: 0 success, 2 unusable configuration or arguments, 1 runtime failure. "
               "`ocpp-proxy COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"ocpp-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", "-c", default="ocpp-proxy.toml", help="TOML file (default: %(default)s)")
    run.add_argument("--pidfile", default="", help="write the process id here (for `ocpp-proxy reload`)")
    run.set_defaults(func=cmd_run)

    reload = sub.add_parser("reload", help="make a running proxy re-read its config file (SIGHUP)")
    target = reload.add_mutually_exclusive_group()
    target.add_argument("--pidfile", default="ocpp-proxy.pid", help="pidfile of `run --pidfile` (default: %(default)s)")
    target.add_argument("--pid", type=int, help="process id of the running proxy")
    reload.add_argument("--config", "-c", help="validate this file first; do not signal if it has errors")
    reload.set_defaults(func=cmd_reload)

    check = sub.add_parser("check-config", help="validate a config file and everything `run` needs from "
                           "this machine (files, keys, addresses, directories), then exit")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    _certs_parser(sub)
    _sessions_parser(sub)

    demo = sub.add_parser("demo", help="proxy + simulated backend and wallboxes on loopback")
    demo.add_argument("--wallboxes", type=int, default=3, metavar="N", help="OCPP 1.6 wallboxes (default: %(default)s)")
    demo.add_argument("--forever", action="store_true",
                      help="a transaction per wallbox every few seconds until Ctrl-C, then the summary")
    demo.add_argument("--site-limit", type=float, default=32.0, metavar="AMPS",
                      help="site limit per phase, A (default: %(default)s)")
    demo.add_argument("--raw", action="store_true", help="print frames whole instead of action and key fields")
    demo.add_argument("--real-timing", action="store_true",
                      help="load management with a site's default ramp-up, hysteresis and hold times")
    demo.add_argument("--status-port", type=int, default=0, metavar="PORT",
                      help="status page port on 127.0.0.1 (default: any free port; the address is printed)")
    demo.set_defaults(func=cmd_demo)
    return parser


def _sessions_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sessions = sub.add_parser("sessions", help="the local session log (every charger's transactions)")
    actions = sessions.add_subparsers(dest="sessions_command", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="print transactions started in [--from, --to) as CSV or JSON",
                                description="Print the session log's transactions started in [--from, --to) "
                                            "(UTC unless the time carries an offset); signed meter data exactly "
                                            "as the wallbox sent it. See docs/standalone.md.")
    export.add_argument("--config", "-c", default="ocpp-proxy.toml", help="TOML file (default: %(default)s); "
                        "the log is in its [offline] data_dir")
    export.add_argument("--from", dest="since", metavar="TIME", help="earliest start, e.g. 2026-11-01")
    export.add_argument("--to", dest="until", metavar="TIME", help="start before this, e.g. 2026-12-01")
    export.add_argument("--format", choices=("csv", "json"), default="csv", help="(default: %(default)s)")
    export.set_defaults(func=cmd_sessions_export)


def cmd_sessions_export(args: argparse.Namespace) -> int:
    from proxy.ops.sessions import ExportError, parse_time, read_sessions, render

    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        records = read_sessions(config.offline.data_dir, parse_time(args.since, "--from"),
                                parse_time(args.until, "--to"))
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StorageUnusable as exc:
        print(f"error: {_storage_unusable(exc)}", file=sys.stderr)
        return 1
    sys.stdout.write(render(records, args.format))
    return 0


def _load_or_report(path: str) -> Config | None:
    """The config, checked against this machine too (:mod:`proxy.ops.preflight`); None after reporting."""
    from proxy.ops.preflight import preflight

    try:
        config = load(path)
        problems = preflight(config, LineIndex(Path(path).read_text(encoding="utf-8")))
        if problems:
            raise ConfigError(path, problems)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem.render(exc.source)}", file=sys.stderr)
        return None
    return config


def config_warnings(config: Config, path: str) -> list[Problem]:
    """What loads but may not do what was meant (a site limit below the chargers' minimums, relay-only
    subprotocols where load management or offline mode is on)."""
    try:
        index = LineIndex(Path(path).read_text(encoding="utf-8"))
    except OSError:
        index = LineIndex("")
    from proxy.loadmgmt.driver import load_management

    return site_warnings(config, index) + subprotocol_warnings(config, index, load_managed=load_management(config))


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load_or_report(args.file)
    if config is None:
        return EXIT_CONFIG
    for warning in config_warnings(config, args.file):
        print(f"warning: {warning.render(args.file)}", file=sys.stderr)
    virtual = f", {plural(len(config.modbus_chargers), 'Modbus wallbox')}" if config.modbus_chargers else ""
    _print_warnings(config, args.file)
    from proxy.config.checks import standalone_notes

    for note in standalone_notes(config):
        print(f"note: {note}")
    print(f"{args.file}: OK ({plural(len(config.chargers), 'charger')}{virtual})")
    return 0


def _print_warnings(config: Config, path: str) -> None:
    """What check-config accepts but an operator should see (also logged at every start)."""
    from pathlib import Path

    from proxy.config import LineIndex, security_warnings

    try:
        index = LineIndex(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        index = LineIndex("")
    for warning in security_warnings(config, index):
        print(f"warning: {warning.render(path)}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    logs.configure(config.log.level, config.log.format)
    for warning in config_warnings(config, args.config):
        logs.get_logger().warning("config_warning", key=warning.key, line=warning.line, message=warning.message)
    raise_open_file_limit()
    failures: list[OSError | str] = []
    try:
        trio.run(functools.partial(run_proxy, config, source=args.config, pidfile=args.pidfile))
    except* OSError as group:  # a port in use, an unusable data directory: before serving
        failures = [*_leaves(group)]
    except* StorageUnusable as group:
        failures = [_storage_unusable(exc) for exc in _leaves(group)]
    for failure in failures:
        named = {"key": failure.key, "value": failure.value} if isinstance(failure, StartupError) else {}
        logs.get_logger().error("startup_failed", error=str(failure), **named)
    return 1 if failures else 0


def _storage_unusable(exc: StorageUnusable) -> str:
    """The start-up message for a queue database that cannot be opened: file, key, what to do."""
    logs.get_logger().error("queue_database_unusable", file=str(exc.path), key=exc.key, error=exc.detail)
    if exc.key != "[offline] data_dir":
        return (f"the database {exc.path} (from {exc.key}) cannot be used: {exc.detail}. "
                "Check the URL, that the server is up and accepts these credentials, and that the user may "
                "create tables in it")
    return (f"the queue database {exc.path} (from [offline] data_dir) cannot be used: {exc.detail}. "
            "Fix its permissions or the disk, or move the file away to start with an empty queue "
            "(the frames in it are then not replayed)")


def _leaves(group: BaseExceptionGroup[_E]) -> list[_E]:
    found: list[_E] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def raise_open_file_limit() -> None:
    """Soft open-file limit up to the hard one: each wallbox costs two sockets.

    A shell's usual soft limit of 1024 would stop the proxy at about 500
    wallboxes while the hard limit allows far more (Go's runtime does the same).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    logs.get_logger().info("open_file_limit", soft=soft, hard=hard, max_wallboxes=(soft - 64) // 2)


@dataclass(frozen=True)
class Started:
    """What :func:`start` brought up: the server, its metrics and the monitor serving them."""

    server: ProxyServer
    metrics: Metrics
    monitor: Monitor


async def start(config: Config, nursery: trio.Nursery, source: str = "") -> Started:
    """Everything ``run`` starts, in ``nursery``: monitor, wallbox port, Modbus meter and EMS.

    Raises what start-up hits (a port in use, an unusable database, ...) with the key it came from;
    :mod:`proxy.ops.preflight` finds the rest before (tests hold the two together).
    """
    from proxy.ops.metrics import Metrics, MetricsListener
    from proxy.ops.monitor import Monitor
    from proxy.runtime.server import ProxyServer

    metrics = Metrics(charger.id for charger in config.all_chargers)
    server = ProxyServer(config, listeners=[MetricsListener(metrics)])
    server.limiter.sinks.append(metrics)
    monitor = Monitor(config, metrics, server, source=source)
    if config.metrics.listen:
        with startup_step("metrics.listen", config.metrics.listen):
            await nursery.start(monitor.serve)
    await nursery.start(server.serve)
    if config.meter.modbus or config.ems.modbus_listen:  # grid meter / EMS → limit engine
        from proxy.modbus.service import run_modbus

        with startup_step("ems.modbus_listen", config.ems.modbus_listen):
            await nursery.start(functools.partial(run_modbus, config, server.limiter.engine,
                                                  server.limiter.poke, logs.get_logger(), health=metrics))
    return Started(server, metrics, monitor)


async def run_proxy(config: Config, source: str = "", pidfile: str = "") -> None:
    """The proxy until SIGTERM/SIGINT, then a bounded graceful stop (close 1001), exit 0.

    The signal receiver is installed first, so a signal during start-up also
    takes the graceful path. A second signal while sessions drain stops at once.
    SIGHUP re-reads ``source`` (see :mod:`proxy.runtime.reload`); connections stay.
    """
    from proxy.runtime.reload import reload_from, remove_pidfile, write_pidfile

    log = logs.get_logger()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            started = await start(config, nursery, source)
            server = started.server
            freeze_startup_objects()
            if pidfile:
                write_pidfile(pidfile)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("reloading", file=source)
                    if source and reload_from(server, source, log):
                        started.metrics.set_configured(charger.id for charger in server.config.all_chargers)
                    continue
                log.info("stopping", signal=signal.Signals(signum).name, sessions=len(server.sessions))
                break
            started.monitor.stopping = True
            await _drain(server, signals, config.server.close_timeout * 2, server.config.server.drain_grace)
            # Features with durable state (the offline queue) close here, after their sessions.
            nursery.cancel_scope.cancel()
    if pidfile:
        remove_pidfile(pidfile)
    log.info("stopped")


def freeze_startup_objects() -> None:
    """Leave what start-up made (modules, classes, config, ...) out of every later garbage collection.

    A full collection walks every tracked object: with the ~75 000 that start-up
    leaves it stalled the event loop for 40-590 ms during a load run (docs/storage.md,
    "Garbage collection pauses"), longer than the whole latency budget of an
    offline answer. Frozen, they are never walked again (and never freed: they live
    as long as the process anyway); a full collection then walks only what the
    sessions made since.
    """
    import gc

    gc.collect()
    gc.freeze()


async def _drain(server: ProxyServer, signals: AsyncIterator[int], bound: float, grace: float = 0.0) -> None:
    """After ``grace`` seconds (/readyz already 503, sessions go on), stop accepting and close every
    session with 1001, within ``bound`` seconds.

    The grace lets a load balancer's health check take this process out of rotation before its
    wallboxes reconnect, so they land on another process at once (docs/cluster.md).
    """
    log = logs.get_logger()
    async with trio.open_nursery() as nursery:

        async def second_signal() -> None:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    continue  # a reload while stopping changes nothing
                log.warning("stopping_now", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()

        nursery.start_soon(second_signal)
        if grace > 0:
            log.info("draining", seconds=grace, sessions=len(server.sessions))
            await trio.sleep(grace)
        with trio.move_on_after(bound) as scope:
            await server.stop()
        if scope.cancelled_caught:
            log.warning("stop_timeout", seconds=bound, sessions=len(server.sessions))
        nursery.cancel_scope.cancel()


def cmd_reload(args: argparse.Namespace) -> int:
    from proxy.runtime.reload import read_pidfile, send_reload

    if args.config and _load_or_report(args.config) is None:
        return EXIT_CONFIG
    try:
        pid = args.pid if args.pid is not None else read_pidfile(args.pidfile)
        send_reload(pid)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"reload requested (process {pid})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo.run import run_demo

    return run_demo(wallboxes=args.wallboxes, forever=args.forever, site_limit=args.site_limit, raw=args.raw,
                    real_timing=args.real_timing, status_port=args.status_port)


#: Default validity per kind, days: a site CA for ten years; leaf certificates for 825 days,
#: the longest most TLS clients accept.
_DAYS = {"init-ca": 3650, "server": 825, "client": 825}


def _certs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = sub.add_parser("certs", help="create a root CA, server and wallbox client certificates",
                           description="A site CA, the gateway's server certificate and a client certificate per "
                                       "wallbox, one command each (docs/certificates.md). Existing files are never "
                                       "replaced without --force.")
    kinds = certs.add_subparsers(dest="kind", required=True, metavar="KIND")
    for name, text in (("init-ca", "root CA (ca.crt, ca.key)"),
                       ("server", "server certificate signed by the CA, or --self-signed"),
                       ("client", "client certificate for a wallbox id, signed by the CA (SP3)")):
        p = kinds.add_parser(name, help=text, description=text)
        p.add_argument("--dir", default="certs", help="CA directory and output directory (default: %(default)s)")
        p.add_argument("--days", type=int, default=_DAYS[name], metavar="N",
                       help="validity in days from now (default: %(default)s)")
        p.add_argument("--subject", metavar="TOML", help='file with subject fields, e.g. O = "Tiefgarage Köln GmbH"')
        for field, meaning in (("CN", "common name"), ("O", "organisation"), ("OU", "organisational unit"),
                               ("C", "country, two letters (DE)"), ("ST", "state"), ("L", "locality")):
            p.add_argument(f"--{field}", dest=f"subject_{field}", metavar="TEXT", help=f"subject: {meaning}")
        p.add_argument("--force", action="store_true",
                       help="replace existing files (a new CA key invalidates every certificate the old one issued)")
        p.set_defaults(func=cmd_certs)
    kinds.choices["server"].add_argument("--san", action="append", default=[],
                                         help="DNS name or IP address the wallboxes use in their URL (repeatable); "
                                              "without it: localhost only")
    kinds.choices["server"].add_argument("--self-signed", action="store_true",
                                         help="sign with its own key instead of the CA in --dir")
    kinds.choices["client"].add_argument("--id", required=True, help="ChargeBox id (becomes the CN)")
    for kind in ("server", "client"):
        kinds.choices[kind].add_argument("--ca-password-env", metavar="VARIABLE", default="",
                                         help="environment variable holding the passphrase of an encrypted ca.key")
    kinds.choices["client"].add_argument("--force-cn", action="store_true",
                                         help="accept a --CN or subject-file CN that differs from --id")


def _subject_fields(args: argparse.Namespace) -> dict[str, str]:
    """Subject fields from --subject and the options; a bad value is reported with where it came from."""
    import tomllib

    from proxy.ops import certs

    fields: dict[str, tuple[str, str]] = {}  # field → (value, where it was given)
    if args.subject:
        with open(args.subject, "rb") as handle:
            fields.update({k: (str(v), f"{args.subject}: {k}") for k, v in tomllib.load(handle).items()})
    fields.update({k[8:]: (v, f"--{k[8:]}") for k, v in vars(args).items() if k.startswith("subject_") and v})
    for name, (value, where) in fields.items():
        try:
            certs.subject({name: value})
        except ValueError as exc:
            hint = " (two letters, e.g. DE)" if name == "C" else ""
            raise ValueError(f"{where} {value!r}: {exc}{hint}") from None
    return {name: value for name, (value, _) in fields.items()}


def _check_client_cn(args: argparse.Namespace, fields: dict[str, str]) -> None:
    """The proxy admits a client certificate as the charger its CN names: CP_C.crt must say CN=CP_C."""
    cn = fields.get("CN")
    if cn is not None and cn != args.id and not args.force_cn:
        source = "--CN" if args.subject_CN else f"the subject file {args.subject}"
        raise ValueError(f"CN {cn!r} from {source} differs from --id {args.id!r}; the proxy would admit "
                         f"this certificate as {cn!r}. Leave CN out, or pass --force-cn")


def cmd_certs(args: argparse.Namespace) -> int:
    """The manual's OpenSSL recipes, one command each; prints what it wrote."""
    from proxy.ops import certs

    out = Path(args.dir)
    name = {"init-ca": "ca", "server": "server"}.get(args.kind) or args.id
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    found = None if args.force else certs.existing(key_path, cert_path)
    if found is not None:
        consequence = " (every certificate the old CA issued would stop verifying)" if args.kind == "init-ca" else ""
        print(f"error: {found} exists; not replaced{consequence}. Use --force to replace it, "
              f"or --dir for another directory", file=sys.stderr)
        return EXIT_CONFIG
    if args.days <= 0:
        print(f"error: --days {args.days}: must be 1 or more", file=sys.stderr)
        return EXIT_CONFIG
    try:
        fields = _subject_fields(args)
        issued = _issue(args, out, fields)
        certs.write(issued, cert_path, key_path, overwrite=args.force)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"wrote {cert_path} and {key_path} (mode 0600)")
    print(f"SHA-256 fingerprint: {certs.fingerprint(issued.certificate)}")
    if args.kind == "server" and not args.san:
        print("note: no --san given, so this certificate is valid for the name localhost only; wallboxes "
              "connecting to another name or address will refuse it. Issue it again with --force and "
              "--san NAME (repeatable) for every name and address they use.", file=sys.stderr)
    return 0


def _ca_password(args: argparse.Namespace) -> str:
    """The CA key's passphrase from the environment variable ``--ca-password-env`` names."""
    import os

    name = getattr(args, "ca_password_env", "")
    if not name:
        return ""
    if name not in os.environ:
        raise ValueError(f"--ca-password-env {name}: environment variable {name!r} is not set")
    return os.environ[name]


def _issue(args: argparse.Namespace, out: Path, fields: dict[str, str]) -> Issued:
    from proxy.ops import certs

    if args.kind == "init-ca":
        return certs.create_ca({"CN": "ocpp-proxy root CA", **fields}, args.days)
    ca = None if getattr(args, "self_signed", False) else certs.read_issued(
        out / "ca.crt", out / "ca.key", _ca_password(args))
    if args.kind == "server":
        fields = {"CN": (args.san or ["localhost"])[0], **fields}
        return certs.create_server(fields, args.san or [fields["CN"]], args.days, ca)
    assert ca is not None
    _check_client_cn(args, fields)
    return certs.create_client(args.id, ca, args.days, fields if args.force_cn else {**fields, "CN": args.id})
