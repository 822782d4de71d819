"""The etcd watches that find drift for every EtcdConfig: one per root of the managed keys.

One watch per distinct top-level path that managed keys live under (and one
on the ownership prefix), however many resources share it — see
:mod:`tether.config.roots` — so foreign writes elsewhere never reach the
operator, and a role with access to its own prefixes only is enough. Each
watch resumes from the last revision it handled; after a compaction (events
lost), a store that went back in time, or a root newly watched, the known
resources are re-checked instead. Each event is held against
the shared :class:`~tether.config.expectations.Expectations`; only resources
whose keys now differ from what they want are enqueued. With nothing
changing the watch is silent: idle means no reads beyond etcd's progress
notifications, and no writes at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator

from tether import metrics
from tether.api import ObjectRef
from tether.clients.etcd.errors import Compacted, EtcdError
from tether.clients.etcd.values import WatchEvent
from tether.config.expectations import Expectations
from tether.config.roots import RootWatchers
from tether.config.stores.etcd import Client, decode, encode
from tether.config.values import Change
from tether.retrying import Retry

log = logging.getLogger(__name__)

# Drift repairs must land within 10 s of an edit, so reconnecting after an
# outage waits at most this long.
_WATCH_BACKOFF_CAP = 3.0


def _changes(events: Iterable[WatchEvent]) -> Iterator[Change]:
    for event in events:
        yield Change(decode(event.kv.key), None if event.type == "delete" else event.kv.value)


class EtcdWatcher:
    """The watches over the roots of the managed keys and the ownership prefix."""

    def __init__(
        self,
        client: Client,
        expectations: Expectations,
        enqueue: Callable[[ObjectRef], None],
        *,
        ownership_prefix: str,
        backoff_cap: float = _WATCH_BACKOFF_CAP,
    ) -> None:
        self.client = client
        self.expectations = expectations
        self.enqueue = enqueue
        self.backoff_cap = backoff_cap
        self.roots = RootWatchers(
            expectations, fixed={ownership_prefix}, watch=self._watch_root, name="etcd-watch"
        )

    async def run(self) -> None:
        await self.roots.run()

    async def _watch_root(self, root: str) -> None:
        watch = PrefixWatch(
            self.client, self.expectations, self.enqueue, prefix=encode(root), backoff_cap=self.backoff_cap
        )
        await watch.run()


class PrefixWatch:
    """One watch over one prefix; enqueues the resources whose keys drifted."""

    def __init__(
        self,
        client: Client,
        expectations: Expectations,
        enqueue: Callable[[ObjectRef], None],
        *,
        prefix: bytes,
        backoff_cap: float = _WATCH_BACKOFF_CAP,
    ) -> None:
        self.client = client
        self.expectations = expectations
        self.enqueue = enqueue
        self.prefix = prefix
        self.backoff_cap = backoff_cap
        self.revision: int | None = None  # last revision whose events were handled
        self.resyncs = 0
        self.retry = Retry(
            f"etcd watch of {decode(prefix)!r}", base=min(0.2, backoff_cap), cap=backoff_cap, logger=log
        )

    @property
    def failures(self) -> int:
        """Consecutive failed attempts to (re)open the watch."""
        return self.retry.failures

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
                metrics.BACKEND_UP.labels(backend="etcd").set(0)
                await self.retry.pause(f"{exc}; resuming after revision {self.revision}")

    async def _watch(self) -> None:
        current = await self.client.status()
        if self.revision is None:
            # First start, or after compaction (resynced already): watch from
            # now on. A resource reconciled before this moment read the store
            # at an older revision, and a change in between would be missed:
            # re-check the resources with keys here, reading at >= current.
            if self.resyncs == 0:
                self._resync(self.expectations.under(decode(self.prefix)))
            self.revision = current
        elif current < self.revision:
            # The store went back in time (restored from a snapshot, or a new
            # cluster): resuming at our revision would wait for the future.
            log.warning(
                "etcd revision went back from %d to %d; re-checking every EtcdConfig",
                self.revision,
                current,
            )
            self.revision = current
            self._resync()
        stream = self.client.watch_prefix(self.prefix, self.revision + 1)
        try:
            async for revision, events in stream:
                if self.retry.succeeded():
                    metrics.BACKEND_UP.labels(backend="etcd").set(1)
                if events:
                    for ref in sorted(self.expectations.drifted(_changes(events))):
                        self.enqueue(ref)
                self.revision = max(self.revision, revision)
        finally:
            if isinstance(stream, AsyncGenerator):
                await stream.aclose()

    def _resync(self, refs: list[ObjectRef] | None = None) -> None:
        """Re-check ``refs`` (default: every known resource) by reading the store again."""
        self.resyncs += 1
        for ref in self.expectations.known() if refs is None else refs:
            self.enqueue(ref)
