"""Command line: ``tether run`` (the operator), ``tether deadman`` and the commands other distributions add.

The CLI only parses arguments and hands over: the operator lives in
:mod:`tether.running`. Further commands come from the entry-point group
``tether.commands``: the developer tools (``devtools/``, ``tether dev ...``)
register theirs there, so a machine without them (the operator's image) has no
such command rather than a broken one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Protocol


class Command(Protocol):
    """What a distribution registers under ``tether.commands``."""

    help: str

    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def version() -> str:
    """The installed distribution's version (what the image and `--version` report)."""
    try:
        return metadata.version("tether")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "0+unknown"


def _commands() -> dict[str, Command]:
    found: dict[str, Command] = {}
    for entry in metadata.entry_points(group="tether.commands"):
        if entry.name not in ("run", "deadman"):
            found[entry.name] = entry.load()
    return found


def _parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tether {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="namespace to watch (repeatable)"
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch all namespaces (default)"
    )
    run.add_argument("--metrics-port", type=int, default=0, help="serve /metrics on this port")
    run.add_argument(
        "--metrics-secure", action="store_true", default=None,
        help="serve /metrics over HTTPS to callers allowed by a TokenReview and a "
        "SubjectAccessReview (also TETHER_METRICS_SECURE=true); needs --metrics-cert-dir",
    )
    run.add_argument(
        "--metrics-cert-dir", type=Path, default=None, metavar="DIR",
        help="directory with tls.crt and tls.key for --metrics-secure (re-read when they change)",
    )
    run.add_argument("--health-port", type=int, default=0, help="serve /healthz on this port")
    run.add_argument("--log-format", choices=["text", "json"], default="text")
    run.add_argument(
        "--leader-elect", action="store_true", help="run only while holding the leader Lease"
    )
    run.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="info",
        help="least severe level logged (default: info)",
    )
    run.add_argument("--verbose", "-v", action="store_true", help="same as --log-level debug")

    deadman = sub.add_parser(
        "deadman", help="the dead-man switch: set the synthetic node's check critical while no "
        "replica holds the leader Lease",
    )
    deadman.add_argument(
        "--interval", type=float, default=2.0, help="seconds between Lease reads (default 2)"
    )
    deadman.add_argument(
        "--margin", type=float, default=5.0,
        help="seconds of silence allowed beyond the Lease's duration (default 5)",
    )
    deadman.add_argument("--health-port", type=int, default=0, help="serve /healthz on this port")
    deadman.add_argument("--log-format", choices=["text", "json"], default="text")
    deadman.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="info",
        help="least severe level logged (default: info)",
    )
    for name, command in sorted(commands.items()):
        command.configure(sub.add_parser(name, help=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    commands = _commands()
    parser = _parser(commands)
    args = parser.parse_args(argv)
    if args.command == "run":
        from tether import metricsserving, running

        secure = metricsserving.env_secure() if args.metrics_secure is None else args.metrics_secure
        options = metricsserving.Options(secure=secure, cert_dir=args.metrics_cert_dir)
        problem = options.problem()
        if problem:
            # Before anything starts: a usage error, not a crash loop after the Lease is won.
            parser.error(problem)
        metricsserving.configure(options)

        code = running.run(
            namespaces=args.namespace,
            metrics_port=args.metrics_port,
            health_port=args.health_port,
            log_format=args.log_format,
            log_level="debug" if args.verbose else args.log_level,
            leader_elect=args.leader_elect,
        )
        running.exit_now(code)
    if args.command == "deadman":
        from tether import deadman as dead_man

        if not 0.1 <= args.interval <= 10 or not 0 <= args.margin <= 60:
            parser.error("--interval must be within 0.1-10 s and --margin within 0-60 s")
        return dead_man.run(
            interval=args.interval, margin=args.margin, health_port=args.health_port,
            log_format=args.log_format, log_level=args.log_level,
        )
    handler: Callable[[argparse.Namespace], int] = commands[args.command].run
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
