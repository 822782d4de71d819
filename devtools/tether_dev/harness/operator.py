"""``tether run`` as a child process: the operator the e2e, fault and benchmark runs drive.

One class for all three, so they start the operator the same way and read the same
figures: its output goes to a log file (appended, so a restarted operator continues
the same file), its metrics and health ports are chosen once (a restarted operator
serves where the killed one did, and a test's scraper keeps working), start-up waits
until ``/metrics`` answers, and every stop is bounded (SIGTERM, then SIGKILL).

The process runs in a session of its own, so signals go to its whole group and a
Ctrl-C in the test's terminal does not reach it before the test's own clean-up does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from tether_dev.harness import waiting
from tether_dev.harness.ports import free_port

REPO = Path(__file__).resolve().parents[3]
#: The backends ``tether_backend_writes_total`` counts writes to, by its ``system`` label.
SYSTEMS = ("consul", "etcd", "kubernetes")
#: Bound on one scrape. Short: a paused operator must cost a scrape seconds, not a test.
SCRAPE_TIMEOUT = 5.0


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition as ``{'name{label="value",...}': value}``.

    The keys are the exposition's own sample names, labels as printed, so a test can
    look up exactly what ``curl /metrics`` shows. Lines that are not samples (comments,
    ``NaN``-free junk) are skipped.
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def scrape(port: int, *, timeout: float = SCRAPE_TIMEOUT) -> dict[str, float]:
    """The metrics served on ``127.0.0.1:port``, parsed by :func:`parse_metrics`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        return parse_metrics(resp.read().decode())


def writes(metrics: Mapping[str, float]) -> dict[str, int]:
    """Writes per backend (``consul``, ``etcd``, ``kubernetes``) from one scrape."""
    return {s: int(metrics.get(f'tether_backend_writes_total{{system="{s}"}}', 0)) for s in SYSTEMS}


class OperatorProcess:
    """``tether run ARGS`` with ``env``, logging to ``log_path``; start, stop, kill, pause.

    ``args`` are the scope and mode flags (``-A``, ``-n NS``, ``--leader-elect``,
    ``--log-format json``); the ports are added here. ``verbose`` adds ``--verbose``:
    the e2e tests read debug lines in a failure's log tail, while the fault and
    benchmark runs stay at info level so logging does not skew their timings.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        args: Sequence[str] = ("-A",),
        extra_env: Mapping[str, str] | None = None,
        verbose: bool = False,
    ) -> None:
        # The dev env holds only the stack's variables; the child also needs HOME etc.
        self.env = {**os.environ, **env, **(extra_env or {})}
        self.log_path = log_path
        self.args = tuple(args)
        self.verbose = verbose
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        #: How many processes were started, for reports of runs that kill and restart it.
        self.starts = 0
        #: ``time.monotonic()`` at the last start, to time start-up and catching up.
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        """The pid of the last process started (it may have exited since)."""
        if self.proc is None:
            raise RuntimeError("the operator was never started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        # `python -m tether.cli` with this interpreter rather than the `tether` script,
        # so the child runs this checkout's code whichever venv runs the tests.
        argv = [sys.executable, "-m", "tether.cli", "run", *self.args]
        argv += ["--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port)]
        # TETHER_HARNESS_VERBOSE=1: every operator a suite starts logs at debug level
        # (Kopf's watch streams included), for a run that must be explained afterwards.
        verbose = self.verbose or os.environ.get("TETHER_HARNESS_VERBOSE") == "1"
        return [*argv, "--verbose"] if verbose else argv

    def start(self, *, wait: bool = True, timeout: float = 90.0) -> OperatorProcess:
        """Start a process; with ``wait``, return once ``/metrics`` answers.

        Without ``wait`` the caller times start-up itself with :meth:`wait_serving`.
        """
        with self.log_path.open("ab") as out:
            if self.starts:
                # One file holds every process of a test that restarts the operator;
                # a line between them shows where one ended and the next began.
                out.write(f"\n--- {time.strftime('%H:%M:%S')} starting the operator again\n".encode())
                out.flush()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv(),
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        if wait:
            self.wait_serving(timeout=timeout)
        return self

    def wait_serving(self, *, timeout: float = 90.0) -> float:
        """Wait until ``/metrics`` answers; seconds since the start. Fails fast if it exits."""
        try:
            waiting.wait_for(self._serving, timeout=timeout, interval=0.05, message="operator metrics")
        except waiting.GiveUp:
            raise
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- operator log tail:\n{self.log_tail()}") from exc
        return time.monotonic() - self.started_at

    def _serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            # Not "not yet": an exited operator will never serve, so end the wait now.
            raise waiting.GiveUp(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            self.metrics(timeout=1.0)
        except OSError:
            return False
        return True

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets and leases but does nothing."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no last status patch, like an OOM kill."""
        if self.proc is None:
            return
        self._signal(signal.SIGCONT)  # a stopped process cannot die until continued
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)

    def stop(self, *, grace: float = 30.0) -> float:
        """SIGTERM, then SIGKILL after ``grace`` seconds; return how long it took to exit."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        started = time.monotonic()
        self._signal(signal.SIGCONT)  # a paused operator would never see the SIGTERM
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with self.log_path.open("a") as out:
                out.write(f"\n--- no exit {grace:.0f} s after SIGTERM; SIGKILL\n")
            self.kill()
        return time.monotonic() - started

    def metrics(self, *, timeout: float = SCRAPE_TIMEOUT) -> dict[str, float]:
        """One scrape of ``/metrics`` (see :func:`parse_metrics` for the keys)."""
        return scrape(self.metrics_port, timeout=timeout)

    def writes(self) -> dict[str, int]:
        """Writes per backend so far (see :func:`writes`)."""
        return writes(self.metrics())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the log, for a failure message."""
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:]) if text else "(no operator log)"
