"""Freed memory handed back to the system once a burst of work is over.

Python frees a burst's objects (a start over thousands of resources, a rollout:
watch events, response bodies, plans), but the C allocator keeps the freed pages
in its heap, so the resident size stays at the burst's peak for the life of the
process. glibc's ``malloc_trim(0)`` returns the free pages; it costs a few
milliseconds. It runs once after each burst — when reconciles have run since the
last check and none is queued or in process — and never while nothing happens:
an idle operator only wakes every ``interval`` seconds to compare two numbers.
Where the C library has no ``malloc_trim`` (musl), nothing runs.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable

from tether import metrics

log = logging.getLogger(__name__)

#: Seconds between two looks at the reconcile counters.
CHECK_SECONDS = 30.0

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def trimmer() -> Callable[[], object] | None:
    """The C library's ``malloc_trim(0)``, or None where there is none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def resident_bytes() -> int:
    """This process's resident size (0 where /proc cannot tell)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


async def trim_after_bursts(
    progress: Callable[[], tuple[bool, int]], *, interval: float = CHECK_SECONDS,
    trim: Callable[[], object] | None = None,
) -> None:
    """Trim once each time reconciles ran and are all done; ``progress`` gives (busy, count)."""
    trim = trim or trimmer()
    if trim is None:
        log.debug("no malloc_trim in this C library: freed memory stays with the process")
        return
    last = progress()[1]
    while True:
        await asyncio.sleep(interval)
        busy, processed = progress()
        if busy or processed == last:
            continue
        last = processed
        before = resident_bytes()
        trim()
        released = max(0, before - resident_bytes())
        metrics.MEMORY_RELEASED.inc(released)
        log.debug("after %d reconciles, %.1f MiB of freed memory handed back", processed, released / 2**20)
