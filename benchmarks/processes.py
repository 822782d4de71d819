"""The processes a benchmark drives: its own dev stack, py-spy, and /proc readings.

The benchmark keeps its dev stack in its own state directory (never the
shared ``.tether/dev``) and starts a fresh one for every phase that needs a
clean slate: bringing one up takes seconds, far less than deleting thousands
of resources through finalizers would.

CPU time and memory are read from ``/proc`` so the figures are the kernel's
own accounting, with no sampling in between.

With ``ha`` the stack is ``tether dev up --ha`` (3 etcd members, 3 Consul
servers and a client agent): its env file points the floor and the operator
at every etcd member and at the client agent, so both pay replication alike
and the ratio to the floor shows what Tether adds on top of it.

The operator process, ``tether dev`` and the metrics parsing are
``tether_dev.harness``'s, the same code the end-to-end and fault suites run the
operator with, so a figure here and a test there measure one thing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tether_dev.harness import devstack
from tether_dev.harness.operator import SYSTEMS

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ /proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (its threads included); 0 if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may contain spaces or parentheses: split after the last ')'.
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def machine_busy(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Fraction of all cores busy between two :func:`machine_cpu` readings."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total, 3) if total > 0 else 0.0


def self_cpu_seconds() -> float:
    return cpu_seconds(os.getpid())


# ------------------------------------------------------------------ the dev stack


@dataclass
class Stack:
    """A dev stack under ``state_dir``, started and stopped with ``tether dev``."""

    state_dir: Path
    ha: bool = False
    env: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    def up(self) -> None:
        started = time.monotonic()
        if self.ha:
            devstack.tether("dev", "--dir", str(self.state_dir), "up", "--ha", timeout=600)
            self.env = devstack.load_env(self.state_dir)
        else:
            self.env = devstack.up(self.state_dir, timeout=600)
        status = devstack.tether("dev", "--dir", str(self.state_dir), "status", "--json", timeout=60)
        report = json.loads(status.stdout)
        self.pids = {
            name: int(comp["pid"]) for name, comp in report["components"].items() if comp["pid"]
        }
        kind = "HA dev stack" if self.ha else "dev stack"
        log(f"{kind} up in {self.state_dir} ({time.monotonic() - started:.1f}s)")

    def down(self) -> None:
        if self.state_dir.exists():
            devstack.down(self.state_dir)
        self.env, self.pids = {}, {}

    def fresh(self) -> None:
        """A new, empty stack: the clean slate every measured phase starts from."""
        self.down()
        self.up()

    @property
    def kubeconfig(self) -> Path:
        return Path(self.env["KUBECONFIG"])

    @property
    def consul_url(self) -> str:
        return self.env["CONSUL_HTTP_ADDR"].rstrip("/")

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}


# ------------------------------------------------------------------ the operator


def summed(metrics: Mapping[str, float], name: str) -> float:
    """Sum of every sample of ``name`` whatever its labels."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def labelled(metrics: Mapping[str, float], name: str) -> dict[str, float]:
    """``name``'s samples by their labels, written ``{kind=ConsulService,result=ready}``.

    Unquoted, as the results files have always written them, so they compare with old runs.
    """
    return {k[len(name):].replace('"', ""): v for k, v in metrics.items() if k.startswith(name + "{")}


def delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in SYSTEMS}


# ------------------------------------------------------------------ py-spy


def find_py_spy() -> str | None:
    """py-spy on PATH, next to this Python, or in TETHER_BENCH_PY_SPY."""
    candidates = [os.environ.get("TETHER_BENCH_PY_SPY"), shutil.which("py-spy"), str(VENV_BIN / "py-spy")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class Profiler:
    """``py-spy record`` attached to the operator: sampled, so it barely slows it.

    ``--gil`` keeps only samples where a thread holds the GIL, i.e. the
    operator's Python code actually running: a thread blocked in a socket read
    is not cost, and without the flag it shows up as the top "hot spot".
    """

    def __init__(self, py_spy: str, pid: int, out: Path, *, rate: int = 100) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate),
             "--nonblocking", "--gil", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )

    def stop(self) -> str:
        """Stop sampling (SIGINT makes py-spy write its output); py-spy's stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        return err.decode(errors="replace")[-2000:]


def summarize_profile(path: Path, *, top: int = 30) -> dict[str, object]:
    """Top functions by own samples and by inclusive samples, from py-spy's raw output."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    if not path.exists():
        return {"samples": 0, "own": [], "inclusive": []}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        # py-spy's frames are "function (file:line)"; aggregate by function and
        # file, not line, so one hot function is one entry.
        names = [_frame_name(f) for f in frames]
        own[names[-1]] = own.get(names[-1], 0) + count
        for name in set(names):
            if not any(marker in name for marker in _PLUMBING):
                inclusive[name] = inclusive.get(name, 0) + count

    def ranked(table: dict[str, int]) -> list[dict[str, object]]:
        best = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [{"function": k, "samples": v, "percent": round(100 * v / max(total, 1), 1)} for k, v in best]

    return {"samples": total, "own": ranked(own), "inclusive": ranked(inclusive)}


# Frames every sample passes through (interpreter start, event loop, thread
# bootstrap): listing them as "inclusive cost" would say nothing.
_PLUMBING = (
    "(<frozen runpy>)", "(asyncio/runners.py)", "(asyncio/base_events.py)", "(asyncio/events.py)",
    "(threading.py)", "(concurrent/futures/thread.py)", "(tether/cli.py)", "run (tether/running.py)",
)


def _frame_name(frame: str) -> str:
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/operator/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{name} ({file})" if file else name
