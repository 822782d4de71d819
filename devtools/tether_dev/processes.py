"""Starting, recognising and stopping the components' processes (Linux).

Components are started in a session of their own, so they outlive ``tether dev
up`` and a Ctrl-C in its terminal does not reach them. A recorded pid alone proves
little (the process may have died and the pid been given to something else), so a
component counts as running only when ``/proc/<pid>/cmdline`` is exactly the
command line we started it with. A zombie has an empty cmdline and so counts as
gone, which is right: it no longer serves anything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tether_dev.reporting import DevStackError

# Children started by this Python process. Keeping the Popen objects lets us reap
# them when they exit (no zombies in a long-lived pytest process) and avoids
# Popen's "still running" warning when an object is collected.
_children: dict[int, subprocess.Popen[bytes]] = {}

#: Bound on the wait for a started program's argv to appear in /proc.
EXEC_TIMEOUT = 5.0


def read_cmdline(pid: int) -> tuple[str, ...] | None:
    """The argv of ``pid`` from /proc, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if not raw:
        return ()
    return tuple(part.decode(errors="surrogateescape") for part in raw.rstrip(b"\0").split(b"\0"))


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]


def is_running(pid: int | None, argv: Sequence[str]) -> bool:
    """Whether ``pid`` is alive *and* is the process started with ``argv``."""
    if pid is None or pid <= 0:
        return False
    _reap(pid)
    return read_cmdline(pid) == tuple(argv)


def spawn(
    argv: Sequence[str],
    *,
    log: Path,
    cwd: Path,
    env: Mapping[str, str],
    group: int | None = None,
) -> int:
    """Start ``argv`` detached, output appended to ``log``; return its pid.

    ``group`` (root only) runs the program with that primary group and no
    supplementary ones, user unchanged. The HA stack gives each member a group
    of its own: packets from its sockets then carry it, which is how the fault
    tooling tells one member's traffic from another's on the shared loopback
    (``iptables -m owner --gid-owner``).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} starting: {' '.join(argv)}\n".encode())
        out.flush()
        child = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            group=group,
            extra_groups=[] if group is not None else None,
        )
    _children[child.pid] = child
    # Popen returns once exec has closed the close-on-exec pipe, but the kernel
    # sets up the new argv only after that: for a moment /proc/<pid>/cmdline is
    # empty, and the new process would look dead. Wait (briefly) until it is ours.
    deadline = time.monotonic() + EXEC_TIMEOUT
    while read_cmdline(child.pid) != tuple(argv) and child.poll() is None:
        if time.monotonic() > deadline:
            raise DevStackError(f"{argv[0]} (pid {child.pid}) did not show its command line")
        time.sleep(0.005)
    return child.pid


def _signal(pid: int, sig: int) -> None:
    try:
        # Each component leads its own process group (start_new_session); signal
        # the group so anything it started goes too.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(alive: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return True
        time.sleep(0.05)
    return not alive()


def terminate(
    pid: int | None, argv: Sequence[str], *, grace: float = 10.0, kill_grace: float = 5.0
) -> bool:
    """Stop the process if it is still ours: SIGTERM, then SIGKILL after ``grace`` s.

    Returns whether a process was stopped. Raises if it survives SIGKILL for
    ``kill_grace`` seconds (e.g. stuck in uninterruptible I/O).
    """
    if pid is None or not is_running(pid, argv):
        return False

    def alive() -> bool:
        return is_running(pid, argv)

    _signal(pid, signal.SIGTERM)
    if _wait_gone(alive, grace):
        return True
    _signal(pid, signal.SIGKILL)
    if _wait_gone(alive, kill_grace):
        return True
    raise DevStackError(f"process {pid} ({argv[0]}) survived SIGKILL for {kill_grace:.0f} s")


def stop_child(proc: subprocess.Popen[bytes] | None, *, grace: float = 10.0) -> None:
    """Stop a child started with ``start_new_session``: SIGTERM to its group, SIGKILL after ``grace`` s.

    For the programs the suites start themselves (``tether deadman``, Jaeger);
    a child already gone is left alone.
    """
    if proc is None or proc.poll() is not None:
        return
    _signal(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def find(predicate: Callable[[tuple[str, ...]], bool]) -> list[int]:
    """Pids of every process whose argv satisfies ``predicate``."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        argv = read_cmdline(pid)
        if argv and predicate(argv):
            found.append(pid)
    return found
