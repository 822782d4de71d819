"""Command line: ``tether run`` (the operator) and ``tether dev ...`` (the local stack).

The CLI only parses arguments and hands over: the operator lives in
:mod:`tether.running`, the dev stack in :mod:`tether.devstack`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def version() -> str:
    """The installed distribution's version (what the image and `--version` report)."""
    from importlib import metadata

    try:
        return metadata.version("tether")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "0+unknown"


def _parser() -> argparse.ArgumentParser:
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

    dev = sub.add_parser("dev", help="local control plane: kube-apiserver, etcd, Consul")
    dev.add_argument(
        "--dir", type=Path, default=None, help="state directory (default: ./.tether/dev)"
    )
    dsub = dev.add_subparsers(dest="dev_command", required=True)
    up = dsub.add_parser("up", help="start (or restart) every component that is down")
    up.add_argument(
        "--ha",
        action="store_true",
        help="highly available variant: 3 etcd members, 3 Consul servers and a client agent",
    )
    status = dsub.add_parser("status", help="show the components")
    status.add_argument("--json", action="store_true")
    dsub.add_parser("env", help="print the environment file (source it)")
    dsub.add_parser("down", help="stop everything and remove the state")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        from tether import running

        return running.run(
            namespaces=args.namespace,
            metrics_port=args.metrics_port,
            health_port=args.health_port,
            log_format=args.log_format,
            log_level="debug" if args.verbose else args.log_level,
            leader_elect=args.leader_elect,
        )

    try:
        from tether.devstack import reporting, stack
    except ImportError:
        # The operator image does not ship the developers' local control plane.
        print("tether dev: the dev stack is not installed here (it is not part of the operator "
              "image); run it from a source checkout (make venv)", file=sys.stderr)
        return 2

    try:
        return _dev(args, stack)
    except reporting.DevStackError as exc:
        print(f"tether dev: {exc}", file=sys.stderr)
        return 1


def _dev(args: argparse.Namespace, stack: Any) -> int:
    state_dir = (args.dir or Path.cwd() / ".tether" / "dev").resolve()
    dev_stack = stack.DevStack(state_dir)
    if args.dev_command == "up":
        dev_stack.up(ha=args.ha)
        print(f"dev stack is up; environment in {dev_stack.env_file}")
        print(f"  source {dev_stack.env_file}")
        return 0
    if args.dev_command == "status":
        report = dev_stack.status()
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for name, comp in report["components"].items():
                state = "running" if comp["running"] else "down"
                print(f"{name:16} {state:8} pid={comp['pid']} {comp['url']}")
        return 0
    if args.dev_command == "env":
        if not dev_stack.env_file.exists():
            print("dev stack is not up: run `tether dev up`", file=sys.stderr)
            return 1
        print(dev_stack.env_file.read_text(), end="")
        return 0
    if args.dev_command == "down":
        dev_stack.down()
        print("dev stack is down")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
