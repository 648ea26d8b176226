"""Command line: ``ocpp-proxy run | check-config | reload | demo``.

Exit status: 0 success, 2 unusable configuration or arguments, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import trio

from proxy import __version__
from proxy.ops import logs
from proxy.config import Config, ConfigError, load
from proxy.storage.offline_queue import StorageUnusable

if TYPE_CHECKING:
    from proxy.runtime.server import ProxyServer

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_CONFIG
    return int(args.func(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ocpp-proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ocpp-proxy {__version__}")
    sub = parser.add_subparsers(dest="command")

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

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    _certs_parser(sub)

    demo = sub.add_parser("demo", help="proxy + simulated backend and wallboxes on loopback")
    demo.add_argument("--wallboxes", type=int, default=3)
    demo.add_argument("--forever", action="store_true", help="keep running until Ctrl-C")
    demo.add_argument("--site-limit", type=float, default=32.0, help="site limit per phase, A (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)
    return parser


def _load_or_report(path: str) -> Config | None:
    try:
        return load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem.render(exc.source)}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load_or_report(args.file)
    if config is None:
        return EXIT_CONFIG
    virtual = f", {len(config.modbus_chargers)} Modbus wallboxes" if config.modbus_chargers else ""
    print(f"{args.file}: OK ({len(config.chargers)} chargers{virtual})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    logs.configure(config.log.level, config.log.format)
    raise_open_file_limit()
    failures: list[str] = []
    try:
        trio.run(functools.partial(run_proxy, config, source=args.config, pidfile=args.pidfile))
    except* OSError as group:  # a port in use, an unreadable certificate: before serving
        failures = _messages(group)
    except* StorageUnusable as group:
        failures = [_storage_unusable(exc) for exc in _leaves(group)]
    for failure in failures:
        logs.get_logger().error("startup_failed", error=failure)
    return 1 if failures else 0


def _storage_unusable(exc: StorageUnusable) -> str:
    """The start-up message for a queue database that cannot be opened: file, key, what to do."""
    logs.get_logger().error("queue_database_unusable", file=str(exc.path), key="[offline] data_dir",
                            error=exc.detail)
    return (f"the queue database {exc.path} (from [offline] data_dir) cannot be used: {exc.detail}. "
            "Fix its permissions or the disk, or move the file away to start with an empty queue "
            "(the frames in it are then not replayed)")


def _leaves(group: BaseExceptionGroup[StorageUnusable]) -> list[StorageUnusable]:
    found: list[StorageUnusable] = []
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


def _messages(group: BaseExceptionGroup[OSError]) -> list[str]:
    found: list[str] = []
    for exc in group.exceptions:
        found.extend(_messages(exc) if isinstance(exc, BaseExceptionGroup) else [str(exc)])
    return found


async def run_proxy(config: Config, source: str = "", pidfile: str = "") -> None:
    """The proxy until SIGTERM/SIGINT, then a bounded graceful stop (close 1001), exit 0.

    The signal receiver is installed first, so a signal during start-up also
    takes the graceful path. A second signal while sessions drain stops at once.
    SIGHUP re-reads ``source`` (see :mod:`proxy.runtime.reload`); connections stay.
    """
    from proxy.ops.metrics import Metrics, MetricsListener
    from proxy.ops.monitor import Monitor
    from proxy.runtime.reload import reload_from, remove_pidfile, write_pidfile
    from proxy.runtime.server import ProxyServer

    log = logs.get_logger()
    metrics = Metrics(charger.id for charger in config.all_chargers)
    server = ProxyServer(config, listeners=[MetricsListener(metrics)])
    server.limiter.sinks.append(metrics)
    monitor = Monitor(config, metrics, server, source=source)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            if config.metrics.listen:
                await nursery.start(monitor.serve)
            await nursery.start(server.serve)
            if config.meter.modbus or config.ems.modbus_listen:  # grid meter / EMS → limit engine
                from proxy.modbus.service import run_modbus

                await nursery.start(functools.partial(run_modbus, config, server.limiter.engine,
                                                      server.limiter.poke, log, health=metrics))
            if pidfile:
                write_pidfile(pidfile)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("reloading", file=source)
                    if source and reload_from(server, source, log):
                        metrics.set_configured(charger.id for charger in server.config.all_chargers)
                    continue
                log.info("stopping", signal=signal.Signals(signum).name, sessions=len(server.sessions))
                break
            monitor.stopping = True
            await _drain(server, signals, config.server.close_timeout * 2)
            # Features with durable state (the offline queue) close here, after their sessions.
            nursery.cancel_scope.cancel()
    if pidfile:
        remove_pidfile(pidfile)
    log.info("stopped")


async def _drain(server: ProxyServer, signals: AsyncIterator[int], bound: float) -> None:
    """Stop accepting and close every session with 1001, within ``bound`` seconds."""
    log = logs.get_logger()
    async with trio.open_nursery() as nursery:

        async def second_signal() -> None:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    continue  # a reload while stopping changes nothing
                log.warning("stopping_now", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()

        nursery.start_soon(second_signal)
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

    return run_demo(wallboxes=args.wallboxes, forever=args.forever, site_limit=args.site_limit)


def _certs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = sub.add_parser("certs", help="create a root CA, server and wallbox client certificates")
    kinds = certs.add_subparsers(dest="kind", required=True)
    for name, text in (("init-ca", "root CA (ca.crt, ca.key)"),
                       ("server", "server certificate signed by the CA, or --self-signed"),
                       ("client", "client certificate for a wallbox id, signed by the CA (SP3)")):
        p = kinds.add_parser(name, help=text)
        p.add_argument("--dir", default="certs", help="CA directory and output directory (default: %(default)s)")
        p.add_argument("--days", type=int, default=3650 if name == "init-ca" else 825)
        p.add_argument("--subject", metavar="TOML", help='file with subject fields, e.g. O = "Tiefgarage Köln GmbH"')
        for field in ("CN", "O", "OU", "C", "ST", "L"):
            p.add_argument(f"--{field}", dest=f"subject_{field}", metavar="TEXT")
        p.set_defaults(func=cmd_certs)
    kinds.choices["server"].add_argument("--san", action="append", default=[],
                                         help="DNS name or IP address (repeatable)")
    kinds.choices["server"].add_argument("--self-signed", action="store_true")
    kinds.choices["client"].add_argument("--id", required=True, help="ChargeBox id (becomes the CN)")


def _subject_fields(args: argparse.Namespace) -> dict[str, str]:
    import tomllib

    fields: dict[str, str] = {}
    if args.subject:
        with open(args.subject, "rb") as handle:
            fields.update({k: str(v) for k, v in tomllib.load(handle).items()})
    fields.update({k[8:]: v for k, v in vars(args).items() if k.startswith("subject_") and v})
    return fields


def cmd_certs(args: argparse.Namespace) -> int:
    """The manual's OpenSSL recipes, one command each; prints what it wrote."""
    from pathlib import Path

    from proxy.ops import certs

    out = Path(args.dir)
    try:
        fields = _subject_fields(args)
        if args.kind == "init-ca":
            issued, name = certs.create_ca({"CN": "ocpp-proxy root CA", **fields}, args.days), "ca"
        else:
            ca = None if getattr(args, "self_signed", False) else certs.read_issued(out / "ca.crt", out / "ca.key")
            if args.kind == "server":
                fields = {"CN": (args.san or ["localhost"])[0], **fields}
                issued, name = certs.create_server(fields, args.san or [fields["CN"]], args.days, ca), "server"
            else:
                assert ca is not None
                issued, name = certs.create_client(args.id, ca, args.days, fields), args.id
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    certs.write(issued, out / f"{name}.crt", out / f"{name}.key")
    print(f"wrote {out / (name + '.crt')} and {out / (name + '.key')} (mode 0600)")
    print(f"SHA-256 fingerprint: {certs.fingerprint(issued.certificate)}")
    return 0
