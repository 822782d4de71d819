"""Recognising the dev stack's processes by pid *and* command line."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tether_dev import processes


def test_our_own_process_is_recognised_by_its_command_line() -> None:
    argv = processes.read_cmdline(os.getpid())
    assert argv is not None
    assert processes.is_running(os.getpid(), argv)


def test_a_reused_pid_running_something_else_counts_as_down() -> None:
    # Our pid is alive, but it is not the recorded program.
    assert not processes.is_running(os.getpid(), ["/usr/bin/etcd", "--name=kube-etcd"])


def test_missing_or_absent_pids_count_as_down() -> None:
    assert not processes.is_running(None, ["x"])
    assert not processes.is_running(0, ["x"])
    assert processes.read_cmdline(2**22 + 12345) is None  # above Linux' pid_max


def test_spawn_detaches_and_terminate_stops(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path)]
    log = tmp_path / "sleeper.log"
    pid = processes.spawn(argv, log=log, cwd=tmp_path, env=dict(os.environ))
    try:
        assert processes.is_running(pid, argv)
        # A session of its own: Ctrl-C in our terminal does not reach it.
        assert os.getsid(pid) == pid
        assert "starting:" in log.read_text()
        assert processes.terminate(pid, argv, grace=5.0)
        assert not processes.is_running(pid, argv)
    finally:
        processes.terminate(pid, argv, grace=0.1)
    assert not processes.terminate(pid, argv)  # already gone: nothing to do


def test_a_process_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    argv = [sys.executable, "-c", code]
    log = tmp_path / "stubborn.log"
    pid = processes.spawn(argv, log=log, cwd=tmp_path, env=dict(os.environ))
    deadline = time.monotonic() + 10
    while "ready" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    assert processes.terminate(pid, argv, grace=0.5, kill_grace=5.0)
    assert time.monotonic() - started < 5.0
    assert not processes.is_running(pid, argv)


def test_an_exited_child_counts_as_down(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "pass"]
    pid = processes.spawn(argv, log=tmp_path / "log", cwd=tmp_path, env=dict(os.environ))
    deadline = time.monotonic() + 10
    while processes.is_running(pid, argv) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes.is_running(pid, argv)


def test_find_matches_on_the_command_line(tmp_path: Path) -> None:
    marker = str(tmp_path / "marker")
    argv = [sys.executable, "-c", "import time; time.sleep(60)", marker]
    pid = processes.spawn(argv, log=tmp_path / "log", cwd=tmp_path, env=dict(os.environ))
    try:
        assert processes.find(lambda args: marker in args) == [pid]
    finally:
        processes.terminate(pid, argv, grace=1.0)
