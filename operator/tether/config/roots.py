"""One watch per *root* of the managed keys, for the stores' drift watchers.

A root is the first path segment of a key (``/app/`` for ``/app/web/db``,
``shop/`` for ``shop/payments/db``). Watching roots rather than the whole
keyspace keeps foreign writes elsewhere from ever reaching the operator and
works under a least-privilege role (read on its prefixes only); watching
roots rather than each resource's prefix keeps the number of watches at the
number of distinct top-level paths, not the number of resources.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from tether.config.expectations import Expectations, root_of

__all__ = ["RootWatchers", "root_of"]


class RootWatchers:
    """Keeps one task per root running: ``watch(root)``, started and stopped as roots come and go."""

    def __init__(
        self, expectations: Expectations, *, fixed: set[str],
        watch: Callable[[str], Coroutine[Any, Any, None]], name: str,
    ) -> None:
        self.expectations = expectations
        self.fixed = {root_of(root) for root in fixed}
        self.watch = watch
        self.name = name
        self._changed = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        expectations.subscribe(self._changed.set)

    def roots(self) -> set[str]:
        return self.fixed | self.expectations.roots()

    def running(self) -> list[str]:
        return sorted(self._tasks)

    async def run(self) -> None:
        try:
            while True:
                self._changed.clear()
                wanted = self.roots()
                for root in sorted(wanted - self._tasks.keys()):
                    self._tasks[root] = asyncio.create_task(self.watch(root), name=f"{self.name} {root}")
                for root in sorted(self._tasks.keys() - wanted):
                    self._tasks.pop(root).cancel()
                for root, task in list(self._tasks.items()):
                    if task.done() and not task.cancelled():
                        # A watch must never end; if it crashed, start it again
                        # on the next change rather than losing the root for good.
                        self._tasks.pop(root)
                        self._changed.set()
                await self._changed.wait()
        finally:
            for task in self._tasks.values():
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            self._tasks.clear()
