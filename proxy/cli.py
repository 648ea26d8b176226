"""Command line: ``ocpp-proxy run | check-config | demo``.

Exit status: 0 success, 2 unusable configuration or arguments, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import trio

from proxy import __version__, logs
from proxy.config import Config, ConfigError, load

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
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    demo = sub.add_parser("demo", help="proxy + simulated backend and wallboxes on loopback")
    demo.add_argument("--wallboxes", type=int, default=3)
    demo.add_argument("--forever", action="store_true", help="keep running until Ctrl-C")
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
    print(f"{args.file}: OK ({len(config.chargers)} chargers)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    logs.configure(config.log.level, config.log.format)
    try:
        trio.run(run_proxy, config)
    except OSError as exc:
        logs.get_logger().error("startup_failed", error=str(exc))
        return 1
    return 0


async def run_proxy(config: Config) -> None:
    """The proxy until SIGTERM/SIGINT, then a graceful stop (close 1001)."""
    from proxy.server import ProxyServer

    server = ProxyServer(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logs.get_logger().info("stopping", signal=signal.Signals(signum).name)
                break
        with trio.move_on_after(config.server.close_timeout * 2):
            await server.stop()
        nursery.cancel_scope.cancel()


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(wallboxes=args.wallboxes, forever=args.forever)
