"""Running a few long-lived coroutines as one: the first to fail ends the others.

A watcher made of several loops (two blocking queries and the scan they wake)
is only whole while every loop runs: when one raises, the others are
cancelled and the error goes up to whoever supervises the watcher, which
restarts all of it; when the watcher is cancelled, so is every loop, and none
outlives it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def together(*coros: Coroutine[Any, Any, None]) -> None:
    """Run ``coros`` as tasks until all end; the first exception (or a cancellation
    of the caller) cancels the rest, waits for them, and is raised."""
    tasks = [asyncio.create_task(coro) for coro in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
