"""Polling until something is true, always bounded in time.

Every wait in the suites goes through :func:`wait_for`, so a hung server or a
resource that never gets Ready fails the test with a message after a deadline
instead of hanging CI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class GiveUp(AssertionError):
    """Raised by a predicate to end a wait at once: what it waits for can no longer happen.

    For example the operator process exited while a wait expected it to serve. An
    AssertionError, so pytest reports it as a failed test.
    """


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.25,
    message: str = "condition",
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    An exception from the predicate counts as "not yet": a server restarting or a
    resource not created yet is what a wait is for (except :class:`GiveUp`, which
    ends the wait). When ``timeout`` seconds have
    passed, raise :class:`AssertionError` (pytest reports a failure, not an error)
    whose text starts with ``message`` and names the last value or error; the last
    error is also chained to it.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    last_value: T | None = None
    while True:
        try:
            last_value = predicate()
            if last_value:
                return last_value
            last_error = None
        except GiveUp:
            raise
        except Exception as exc:
            last_error = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f"last error: {last_error!r}" if last_error else f"last value: {last_value!r}"
            raise AssertionError(f"{message}: not true after {timeout:.0f} s ({detail})") from last_error
        time.sleep(min(interval, remaining))


def timed(predicate: Callable[[], object], timeout: float, interval: float = 0.01) -> float:
    """Seconds until ``predicate`` is true (polled every ``interval``); for measurements.

    The same bounded wait as :func:`wait_for`, with a short default interval since
    the result is a latency.
    """
    started = time.monotonic()
    wait_for(predicate, timeout=timeout, interval=interval, message="condition not reached")
    return time.monotonic() - started
