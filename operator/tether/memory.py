"""Giving memory back after a burst of work.

Converging thousands of resources at once decodes tens of thousands of bodies
and events; Python frees them, but glibc's allocator keeps the freed pages of
its heap for reuse and the process's resident memory stays at the burst's high
water mark — what a container's memory limit sees. Once the queues are idle
again after some work, one ``malloc_trim(0)`` returns those pages to the system.
It runs from one process-wide check every ``INTERVAL`` seconds, only after
work was done since the last trim: an idle operator does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

INTERVAL = 30.0


def _libc_trim() -> Callable[[], object] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], object] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    return lambda: trim(0)


async def trim_after_bursts(progress: Callable[[], tuple[bool, int]], *, interval: float = INTERVAL) -> None:
    """``progress()`` is (busy, items processed so far); trim when idle after new work."""
    trim = _libc_trim()
    if trim is None:
        log.debug("malloc_trim is not available; resident memory is left to the allocator")
        return
    trimmed_at = progress()[1]
    while True:
        await asyncio.sleep(interval)
        busy, processed = progress()
        if busy or processed == trimmed_at:
            continue
        gc.collect()
        trim()
        trimmed_at = processed
