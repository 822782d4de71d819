"""The state directory's lock: exclusive, bounded, and safe when its file is removed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tether_dev import locks
from tether_dev.reporting import DevStackError

HOLD = """
import sys, time
from pathlib import Path
from tether_dev import locks
with locks.exclusive(Path(sys.argv[1]), timeout=5, what="test"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(path: Path, seconds: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_lock_times_out_with_a_clear_error(tmp_path: Path) -> None:
    holder = hold(tmp_path / "lock", 5)
    try:
        started = time.monotonic()
        with (
            pytest.raises(DevStackError, match="the dev stack is locked"),
            locks.exclusive(tmp_path / "lock", timeout=0.5, what="the dev stack"),
        ):
            pass
        assert time.monotonic() - started < 3
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_the_lock_is_acquired_once_released(tmp_path: Path) -> None:
    holder = hold(tmp_path / "lock", 0.3)
    try:
        with locks.exclusive(tmp_path / "lock", timeout=10, what="test"):
            assert holder.wait(timeout=10) == 0
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_a_removed_lock_file_is_recreated(tmp_path: Path) -> None:
    path = tmp_path / "state" / "lock"
    with locks.exclusive(path, timeout=1, what="test"):
        path.unlink()  # as `down` does when it removes the state directory
    with locks.exclusive(path, timeout=1, what="test"):
        assert path.exists()
