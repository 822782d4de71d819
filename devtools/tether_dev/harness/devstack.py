"""The dev stack from a test's side: where it lives, bringing it up, reading its env.

The stack itself is ``tether dev`` (``tether_dev``); this module only drives the
CLI the way the README tells a person to, and reads the env file it writes, so the
suites and the benchmarks find the stack exactly where a developer's shell does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tether_dev import envfiles

REPO = Path(__file__).resolve().parents[3]
#: Bound on one ``tether dev ...`` call. ``up`` takes seconds once the binaries exist
#: (a suite finds or builds them before its first test's clock starts).
UP_TIMEOUT = 300.0


def state_dir() -> Path:
    """The shared dev stack's state directory: ``$TETHER_DEV_DIR``, else ``<repo>/.tether/dev``."""
    explicit = os.environ.get("TETHER_DEV_DIR")
    return Path(explicit).resolve() if explicit else REPO / ".tether" / "dev"


def tether(*args: str, timeout: float = UP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run this checkout's ``tether`` CLI; raise with its output if it fails.

    An AssertionError, so a stack that does not come up fails the test that needed it
    with the CLI's own explanation.
    """
    done = subprocess.run(
        [sys.executable, "-m", "tether.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"`tether {' '.join(args)}` failed (exit {done.returncode})\n"
            f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
    return done


def load_env(directory: Path) -> dict[str, str]:
    """The variables of ``directory``'s env file: KUBECONFIG, CONSUL_HTTP_ADDR, ETCD_ENDPOINTS, PATH...

    Only those: start processes with ``{**os.environ, **env}``.
    """
    return envfiles.parse((directory / "env").read_text(), os.environ)


def up(directory: Path, *, timeout: float = UP_TIMEOUT) -> dict[str, str]:
    """``tether dev --dir DIRECTORY up`` (idempotent: a running stack is reused); its env."""
    tether("dev", "--dir", str(directory), "up", timeout=timeout)
    return load_env(directory)


def down(directory: Path, *, timeout: float = 120.0) -> None:
    """``tether dev --dir DIRECTORY down``: stop every component, keep nothing running."""
    tether("dev", "--dir", str(directory), "down", timeout=timeout)
