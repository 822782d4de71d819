"""Exclusive file locks with a bounded wait.

Two ``tether dev up`` may run at once (two terminals, or pytest-xdist workers each
setting up the session stack), and two builds may race for the binary cache; an
advisory ``flock`` serialises them. The lock file may be deleted by its holder
(``tether dev down`` removes the state directory it locks), so after acquiring we
check that the path still names the inode we locked, and start over if not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tether_dev.reporting import DevStackError


@contextlib.contextmanager
def exclusive(path: Path, *, timeout: float, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` body.

    Waits at most ``timeout`` seconds; ``what`` names the lock in the error.
    """
    deadline = time.monotonic() + timeout
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise DevStackError(
                            f"{what} is locked by another process ({path}); "
                            f"gave up after {timeout:.0f} s"
                        ) from None
                    time.sleep(0.2)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield
                return
        finally:
            # Closing the descriptor releases the flock.
            os.close(fd)
        if time.monotonic() > deadline:
            raise DevStackError(f"{what}: lock file {path} keeps changing; gave up")
