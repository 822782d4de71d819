"""The fault injector's clean-up: whose rules a later session may remove.

A fault session killed at a time limit leaves its iptables rules behind; the next
``tether dev up --ha`` removes them, but never those of a live session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tether_dev import faults


def test_this_process_is_never_a_live_other_session() -> None:
    assert not faults._alive(os.getpid())


def test_a_dead_pid_is_not_alive() -> None:
    # A pid past the kernel's maximum cannot name a process.
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert not faults._alive(pid_max + 1)


def test_a_pid_reused_by_another_program_does_not_keep_rules() -> None:
    other = subprocess.Popen(["sh", "-c", "echo up; exec sleep 30"], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline() == "up\n"
        assert not faults._alive(other.pid)
    finally:
        other.kill()
        other.wait(timeout=10)


def test_a_live_python_session_keeps_its_rules() -> None:
    session = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert session.stdout is not None and session.stdout.readline() == "up\n"  # exec done
        assert faults._alive(session.pid)
    finally:
        session.kill()
        session.wait(timeout=10)


def test_rule_comments_name_their_session() -> None:
    comment = faults.comment_of(7, pid=4242)
    assert faults.owner_of(f'-A TETHER-FAULT -m comment --comment "{comment}" -j DROP') == (4242, 7)
    assert faults.owner_of("-A OUTPUT -j ACCEPT") is None
