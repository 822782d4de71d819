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

import logging
from collections.abc import Callable
from typing import Any

from tether.api import ObjectRef
from tether.clients.consul import blocking
from tether.config.expectations import Expectations
from tether.config.roots import RootWatchers, root_of
from tether.config.stores.consulkv import Client, value_of
from tether.config.values import Change
from tether.retrying import Retry

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
        seen: dict[str, int] | None = None  # key → ModifyIndex at the last answer

        def answered(answer: blocking.Answer[list[dict[str, Any]]]) -> None:
            nonlocal seen
            entries = answer.value
            current = {str(e.get("Key", "")): int(e.get("ModifyIndex") or 0) for e in entries}
            if answer.fresh or seen is None:
                # First answer, after an outage, or an index that went backwards
                # (the store may have restarted empty or been restored): every
                # entry is news, and so is every expected key under this root
                # that is missing.
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

        async def fetch(index: int, wait: str) -> tuple[int, list[dict[str, Any]]]:
            return await self.client.kv_tree(root, index=index, wait=wait)

        cap = _BACKOFF_CAP  # read here, not at import: tests shorten it
        retry = Retry(f"Consul KV watch of {root!r}", base=min(0.5, cap), cap=cap, logger=log)
        await blocking.follow(fetch, answered, retry=retry, wait=self.wait)
