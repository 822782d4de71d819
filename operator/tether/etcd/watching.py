"""The one etcd watch that finds drift for every EtcdConfig.

A single watch, however many resources exist, resumed from the last revision
it handled; after a compaction (events lost) or a store that went back in
time, every known resource is re-checked instead. Each event is held against
the shared :class:`~tether.config.expectations.Expectations`; only resources
whose keys now differ from what they want are enqueued. With nothing
changing the watch is silent: idle means no reads beyond etcd's progress
notifications, and no writes at all.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator

from tether import metrics
from tether.api import ObjectRef
from tether.config.expectations import Expectations
from tether.config.values import Change
from tether.etcd.errors import Compacted, EtcdError
from tether.etcd.store import Client, decode
from tether.etcd.values import WatchEvent

log = logging.getLogger(__name__)

# Drift repairs must land within 10 s of an edit, so reconnecting after an
# outage waits at most this long.
_WATCH_BACKOFF_CAP = 3.0


def _changes(events: Iterable[WatchEvent]) -> Iterator[Change]:
    for event in events:
        yield Change(decode(event.kv.key), None if event.type == "delete" else event.kv.value)


class EtcdWatcher:
    """One watch over all of etcd; enqueues the resources whose keys drifted."""

    def __init__(
        self, client: Client, expectations: Expectations, enqueue: Callable[[ObjectRef], None],
        *, prefix: bytes = b"", backoff_cap: float = _WATCH_BACKOFF_CAP,
    ) -> None:
        self.client = client
        self.expectations = expectations
        self.enqueue = enqueue
        # b"" is every key: Tether's keys and claims start with "/", but
        # watching everything costs one stream either way.
        self.prefix = prefix
        self.backoff_cap = backoff_cap
        self.revision: int | None = None  # last revision whose events were handled
        self.failures = 0  # consecutive failed attempts to (re)open the watch
        self.resyncs = 0

    async def run(self) -> None:
        # Lives as long as the operator: every pass awaits etcd or sleeps, and
        # cancellation (shutdown) ends it.
        while True:
            try:
                await self._watch()
                # The stream ended without an error (the client closed it):
                # open it again, but never in a hot loop.
                await asyncio.sleep(0.1)
            except Compacted as exc:
                # Events between our revision and the compaction are gone:
                # every resource re-reads etcd instead.
                log.info("etcd watch: %s; re-checking every EtcdConfig", exc)
                self.revision = None
                self._resync()
                continue
            except EtcdError as exc:
                self.failures += 1
                metrics.BACKEND_UP.labels(backend="etcd").set(0)
                if self.failures == 1:
                    log.warning("etcd watch failed: %s; resuming after revision %s", exc, self.revision)
                exponent = min(self.failures, 16)
                delay = min(self.backoff_cap, 0.1 * 2**exponent) * random.uniform(0.5, 1.0)
                await asyncio.sleep(delay)

    async def _watch(self) -> None:
        current = await self.client.status()
        if self.revision is None:
            # First start (the controllers reconcile everything anyway) or
            # after compaction (resynced already): watch from now on.
            self.revision = current
        elif current < self.revision:
            # The store went back in time (restored from a snapshot, or a new
            # cluster): resuming at our revision would wait for the future.
            log.warning(
                "etcd revision went back from %d to %d; re-checking every EtcdConfig",
                self.revision, current,
            )
            self.revision = current
            self._resync()
        stream = self.client.watch_prefix(self.prefix, self.revision + 1)
        try:
            async for revision, events in stream:
                if self.failures:
                    log.info("etcd watch resumed after revision %s", self.revision)
                    self.failures = 0
                    metrics.BACKEND_UP.labels(backend="etcd").set(1)
                if events:
                    for ref in sorted(self.expectations.drifted(_changes(events))):
                        self.enqueue(ref)
                self.revision = max(self.revision, revision)
        finally:
            if isinstance(stream, AsyncGenerator):
                await stream.aclose()

    def _resync(self) -> None:
        self.resyncs += 1
        for ref in self.expectations.known():
            self.enqueue(ref)
