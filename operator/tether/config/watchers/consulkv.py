"""The Consul KV watcher that finds ConsulConfig drift: one blocking query per root.

A *root* is the first path segment of a managed key (``shop/`` for
``shop/payments/db``), plus Tether's ownership prefix. The watcher holds one
recursive blocking query per root, however many resources live under it, so
its cost follows the distinct top-level paths Tether manages, not the number
of resources nor the rest of the KV store. When a query returns, the entries
whose ``ModifyIndex`` moved (or that vanished) are held against the shared
:class:`~tether.config.expectations.Expectations`; only resources whose keys
now differ from what they want are enqueued. Idle, each query simply waits
out its ``wait`` time and is re-issued: reads, never writes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from tether.api import ObjectRef
from tether.clients.consul.client import ConsulError
from tether.config.expectations import Expectations
from tether.config.roots import RootWatchers, root_of
from tether.config.stores.consulkv import Client, value_of
from tether.config.values import Change

log = logging.getLogger(__name__)

# Drift must be repaired within 10 s, so reconnecting after an outage waits at most this long.
_BACKOFF_CAP = 3.0


class KVWatcher:
    """Blocking queries over the KV roots that managed keys live under."""

    def __init__(
        self, client: Client, expectations: Expectations, enqueue: Callable[[ObjectRef], None],
        *, ownership_prefix: str, wait: str = "300s",
    ) -> None:
        self.client = client
        self.expectations = expectations
        self.enqueue = enqueue
        self.wait = wait
        self.roots = RootWatchers(expectations, fixed={ownership_prefix}, watch=self._poll, name="kv-watch")

    async def run(self) -> None:
        await self.roots.run()

    async def _poll(self, root: str) -> None:
        index = 0
        seen: dict[str, int] | None = None  # key → ModifyIndex at the last answer
        failures = 0
        while True:
            try:
                new_index, entries = await self.client.kv_tree(root, index=index, wait=self.wait)
                failures = 0
            except ConsulError as exc:
                failures += 1
                if failures == 1:
                    log.warning("Consul KV watch of %r failed: %s", root, exc)
                index, seen = 0, None  # the store may have restarted empty: re-list and compare all
                await asyncio.sleep(min(_BACKOFF_CAP, 0.25 * 2**failures) * random.uniform(0.5, 1.0))
                continue
            current = {str(e.get("Key", "")): int(e.get("ModifyIndex") or 0) for e in entries}
            if seen is None:
                # First answer (or after an outage): every entry is news, and so
                # is every expected key under this root that is missing.
                changes = [Change(str(e.get("Key", "")), value_of(e)) for e in entries]
                expected = self.expectations.managed_keys()
                missing = [k for k in expected if root_of(k) == root and k not in current]
            else:
                changes = [
                    Change(key, value_of(e)) for e in entries
                    if seen.get(key := str(e.get("Key", ""))) != current[key]
                ]
                missing = list(seen.keys() - current.keys())
            changes += [Change(k, None) for k in missing]
            seen = current
            for ref in sorted(self.expectations.drifted(changes)):
                self.enqueue(ref)
            if new_index < index:
                # The index went backwards (a server restored or restarted
                # empty): do not wait on it; re-list from 0, as Consul's docs ask.
                index, seen = 0, None
                await asyncio.sleep(0.1)
            else:
                index = max(new_index, 1)
