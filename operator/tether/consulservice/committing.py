"""Group commit of catalog transactions: many resources' small writes, few ``/v1/txn`` calls.

A rollout changes every ConsulService following the rolled-out Services at
about the same moment; each reconcile plans its own few operations. Sent one
transaction per resource, 100 resources cost 100 calls even when their
operations would fit in a handful. Here, while one transaction is in
flight, the batches submitted meanwhile wait and then leave together, packed
up to Consul's operation limit — no timer, no added latency for a lone
change (it leaves at once).

A submitted batch is never split (it holds whole instances, and a node
creation before them), and a resource submits its next batch only once its
previous one is applied, so its order is kept. Every operation is guarded,
so one stale guard rolls back the whole combined transaction: its batches
are then sent again one by one, and only the stale one fails, to its own
submitter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from tether.clients.consul.client import Catalog, ConsulContended, ConsulError, ConsulRejected

log = logging.getLogger(__name__)

Batch = Sequence[dict[str, Any]]


class GroupCommit:
    """Packs concurrently submitted batches into shared transactions of at most ``max_ops``."""

    def __init__(self, catalog: Catalog, *, max_ops: int) -> None:
        self.catalog = catalog
        self.max_ops = max_ops
        self._pending: list[tuple[Batch, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.calls = 0  # transactions sent (the benchmarks and tests read it)

    async def submit(self, batch: Batch) -> None:
        """Apply ``batch`` in one transaction (possibly shared); raise what Consul answered for it."""
        if len(batch) > self.max_ops:
            raise ValueError(f"a batch of {len(batch)} operations exceeds {self.max_ops}")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((batch, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="catalog-group-commit")
        await future

    async def _flush(self) -> None:
        # Bounded by the submissions: each round takes at least one, and nothing
        # is added back.
        while self._pending:
            group: list[tuple[Batch, asyncio.Future[None]]] = []
            size = 0
            rest = []
            for batch, future in self._pending:
                if future.cancelled():
                    continue
                if size + len(batch) <= self.max_ops:
                    group.append((batch, future))
                    size += len(batch)
                else:
                    rest.append((batch, future))
            self._pending = rest
            if group:
                await self._send(group)

    async def _send(self, group: list[tuple[Batch, asyncio.Future[None]]]) -> None:
        try:
            self.calls += 1
            await self.catalog.catalog_txn([op for batch, _ in group for op in batch])
        except (ConsulContended, ConsulRejected) as exc:
            if len(group) == 1:
                _settle(group[0][1], exc)
                return
            log.debug("combined catalog transaction of %d batches failed (%s); sending each alone",
                      len(group), exc)
            for batch, future in group:
                try:
                    self.calls += 1
                    await self.catalog.catalog_txn(list(batch))
                except ConsulError as each:
                    _settle(future, each)
                else:
                    _settle(future, None)
            return
        except ConsulError as exc:  # unavailable: the same for everyone in the group
            for _, future in group:
                _settle(future, exc)
            return
        except BaseException as exc:
            for _, future in group:
                _settle(future, exc if isinstance(exc, Exception) else ConsulError("cancelled"))
            raise
        for _, future in group:
            _settle(future, None)


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
