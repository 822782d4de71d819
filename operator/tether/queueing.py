"""A de-duplicating work queue with per-key backoff, for level-triggered reconciles.

Watch events, drift detectors and retries all *enqueue a key*; workers pick a
key, read the latest object from the cache and reconcile it. A key is never
processed by two workers at once, and a key added while it is being processed
is processed again afterwards, so no change is lost and none is handled twice
concurrently. Retries use capped exponential backoff with jitter; a delayed
retry is one timer handle per failing key, cancelled when the key succeeds.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Backoff(Generic[K]):
    """Capped exponential backoff with jitter, tracked per key."""

    def __init__(self, *, base: float = 0.5, cap: float = 60.0, rng: random.Random | None = None):
        self.base = base
        self.cap = cap
        self._failures: dict[K, int] = {}
        self._rng = rng or random.Random()

    def next_delay(self, key: K) -> float:
        """Record one more failure for ``key`` and return how long to wait."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        ceiling = min(self.cap, self.base * (2**n))
        # "Equal jitter": at least half the ceiling, so a storm of failing keys
        # spreads out without any key retrying much faster than the schedule.
        return float(ceiling / 2 + self._rng.uniform(0, ceiling / 2))

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def reset(self, key: K) -> None:
        self._failures.pop(key, None)


class WorkQueue(Generic[K]):
    """Keys to reconcile; duplicates collapse; one worker per key at a time."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._pending: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._delayed: dict[K, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: K) -> None:
        handle = self._delayed.pop(key, None)
        if handle is not None:
            handle.cancel()
        if key in self._pending:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        self._pending.add(key)
        self._queue.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Add ``key`` after ``delay`` seconds, unless something adds it sooner."""
        loop = asyncio.get_running_loop()
        existing = self._delayed.get(key)
        when = loop.time() + delay
        if existing is not None:
            if existing.when() <= when:
                return
            existing.cancel()
        self._delayed[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: K) -> None:
        self._delayed.pop(key, None)
        self.add(key)

    def cancel_delayed(self, key: K) -> None:
        handle = self._delayed.pop(key, None)
        if handle is not None:
            handle.cancel()

    async def get(self) -> K:
        key = await self._queue.get()
        self._pending.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def idle(self) -> bool:
        return not self._pending and not self._processing

    def depth(self) -> int:
        """Keys waiting for a worker or being processed."""
        return len(self._pending) + len(self._processing)
