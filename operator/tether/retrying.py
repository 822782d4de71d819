"""One retry policy for every long-lived stream: backoff, jitter, and quiet logs.

Every stream the operator keeps open (a Consul blocking query, an etcd watch,
a Kubernetes watch, a supervised background task) fails now and then and must
come back by itself. :class:`Retry` is the one object they share:

* **capped exponential backoff with jitter**: the n-th consecutive failure
  waits ``min(cap, base * 2**(n-1))`` scaled by a random factor in
  ``[1 - jitter, 1]``, so a hundred streams that broke together do not
  reconnect in the same instant, and none retries faster than half its
  schedule (with the default jitter);
* **reset on success**: the first success after failures starts the schedule
  over; so does a failure that comes after the stream ran for ``reset_after``
  seconds (a crash of a task that ran for an hour is a new incident, not the
  next step of the old one);
* **one line per outage**: the first failure is a WARNING that names the
  stream and the error, later failures of the same outage are DEBUG, and the
  first success after failures is one INFO line saying how long it took.
  An agent that stays down for an hour costs two lines, not thousands.

It keeps no task and does no I/O: the caller awaits :meth:`Retry.pause` (or
sleeps :meth:`Retry.failed`'s delay itself). The random source, the clock and
the sleep are injectable, so tests are deterministic.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# 2**32 times any sensible base is far beyond any cap: the exponent stops
# there, so a stream that fails for a week never overflows a float.
_MAX_EXPONENT = 32


class Retry:
    """Backoff and outage logging for one named stream; see the module docstring."""

    def __init__(
        self,
        stream: str,
        *,
        base: float,
        cap: float,
        jitter: float = 0.5,
        reset_after: float | None = None,
        logger: logging.Logger | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not 0 < base <= cap:
            raise ValueError(f"need 0 < base <= cap, not base={base} cap={cap}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter is a fraction in [0, 1], not {jitter}")
        if reset_after is not None and reset_after <= 0:
            raise ValueError(f"reset_after must be positive, not {reset_after}")
        self.stream = stream
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self.reset_after = reset_after
        self._log = logger or log
        self._rng = rng or random.Random()
        self._clock = clock
        self._sleep = sleep
        self._failures = 0
        self._outage_since = 0.0  # clock() at the first failure of the current outage
        self._attempt_since: float | None = None  # clock() at the last started()

    @property
    def failures(self) -> int:
        """Consecutive failures of the current outage (0 while healthy)."""
        return self._failures

    def started(self) -> None:
        """Mark the start of an attempt, for ``reset_after`` (supervised tasks)."""
        self._attempt_since = self._clock()

    def failed(self, error: BaseException | str, *, exc_info: bool = False) -> float:
        """Record one failure, log it (once per outage), return how long to wait."""
        now = self._clock()
        if (
            self._failures
            and self.reset_after is not None
            and self._attempt_since is not None
            and now - self._attempt_since >= self.reset_after
        ):
            # The attempt ran long enough to count as a recovery in between.
            self._recovered(now)
        self._failures += 1
        delay = self.delay(self._failures)
        if self._failures == 1:
            self._outage_since = now
            self._log.warning(
                "%s failed: %s; retrying in %.1fs", self.stream, error, delay, exc_info=exc_info
            )
        else:
            self._log.debug(
                "%s failed again (%d failures in a row): %s; retrying in %.1fs",
                self.stream, self._failures, error, delay, exc_info=exc_info,
            )
        return delay

    def succeeded(self) -> bool:
        """Record a success; True (and one INFO line) if it ends an outage."""
        if not self._failures:
            return False
        self._recovered(self._clock())
        return True

    async def pause(self, error: BaseException | str, *, exc_info: bool = False) -> float:
        """:meth:`failed`, then sleep the delay it returns (returned too)."""
        delay = self.failed(error, exc_info=exc_info)
        await self._sleep(delay)
        return delay

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th consecutive failure (draws jitter)."""
        exponent = min(max(failures, 1) - 1, _MAX_EXPONENT)
        ceiling = min(self.cap, self.base * 2**exponent)
        return float(ceiling * self._rng.uniform(1.0 - self.jitter, 1.0))

    def _recovered(self, now: float) -> None:
        failures, self._failures = self._failures, 0
        self._log.info(
            "%s recovered after %d failure%s/%.1f s",
            self.stream, failures, "" if failures == 1 else "s", now - self._outage_since,
        )
