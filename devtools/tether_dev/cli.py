"""``tether dev ...``: the dev stack's commands, added to the ``tether`` CLI.

Registered under the entry-point group ``tether.commands`` (devtools/pyproject.toml),
so the command exists wherever the developer tools are installed and nowhere else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from tether_dev import faults, reporting, stack


class DevCommand:
    """``tether dev up|status|env|down``, as DESIGN.md §3 fixes them."""

    help = "local control plane: kube-apiserver, etcd, Consul"

    def configure(self, dev: argparse.ArgumentParser) -> None:
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

    def run(self, args: argparse.Namespace) -> int:
        try:
            return _dev(args)
        except reporting.DevStackError as exc:
            print(f"tether dev: {exc}", file=sys.stderr)
            return 1


COMMAND = DevCommand()


def _dev(args: argparse.Namespace) -> int:
    state_dir = (args.dir or Path.cwd() / ".tether" / "dev").resolve()
    dev_stack = stack.DevStack(state_dir)
    if args.dev_command == "up":
        if args.ha:
            _heal_stale_faults()
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


def _heal_stale_faults() -> None:
    """Remove network faults a killed fault session left on this machine.

    The HA members each listen on a 127.0.0.x of their own; a partition rule whose
    session died before healing it (a run stopped by a time limit) would drop their
    traffic forever, and the stack would not come up. Rules of a live session stay.
    """
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        return
    for line in faults.heal_all():
        print(f"tether dev: removed a stale network fault: {line}", file=sys.stderr)
