"""``tether deadman`` as a child process, the way :mod:`tether_dev.harness.operator` runs ``tether run``.

The dead-man switch must outlive the operator, so on the dev stack it is a process of
its own, started by the test that needs it, with the same environment as the operator
it watches (``POD_NAMESPACE`` and ``TETHER_LEASE_NAME`` name the Lease;
``TETHER_CLUSTER_NAME`` or ``TETHER_CONSUL_NODE`` the node). Its output goes to a log
file; each catalog write it makes is one WARNING line that says ``critical (1 catalog
write``, which :meth:`DeadmanProcess.writes` counts. Every stop is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from tether_dev import processes
from tether_dev.harness.operator import REPO

#: The words of the deadman's log line for each catalog write it makes.
WRITE_MARK = "critical (1 catalog write"


class DeadmanProcess:
    """``tether deadman`` with ``env``, logging to ``log_path``."""

    def __init__(
        self, env: Mapping[str, str], log_path: Path, *, interval: float = 2.0, margin: float = 5.0,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.env = {**os.environ, **env, **(extra_env or {})}
        self.log_path = log_path
        self.interval = interval
        self.margin = margin
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "tether.cli", "deadman", "--interval", str(self.interval),
            "--margin", str(self.margin), "--log-level", "debug",
        ]

    def start(self) -> DeadmanProcess:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv(), env=self.env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        processes.stop_child(self.proc, grace=grace)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:]) if text else "(no deadman log)"

    def writes(self) -> int:
        """Catalog writes the deadman made so far (one log line each)."""
        return self.log_text().count(WRITE_MARK)
