"""Group commit of catalog transactions: many resources' small writes, few ``/v1/txn`` calls.

A rollout changes every ConsulService following the rolled-out Services at
about the same moment; each reconcile plans its own few operations. Sent one
transaction per resource, 100 resources cost 100 calls even when their
operations would fit in a handful. Here, while one transaction is in
flight, the batches submitted meanwhile wait and then leave together, packed
up to Consul's operation limit — no timer, no added latency for a lone
change (it leaves at once).

A transaction is filled to the limit: when the next batch does not fit
whole, its leading instances that fit go now and the rest leads the next
transaction. An instance (its service operation and its check's) is never
split — an instance whose check arrived a transaction later would count as
passing meanwhile — and the node creation that opens a batch goes first.
A rollout's batches are whole resources of 30 operations (10 endpoints, each
removed and added with its check): unsplit, four filled 120 of every 128
places, 250 transactions for the minimum 235. Parts of one batch are sent in
order, and a resource submits its next batch only once its previous one is
applied, so its order is kept; its ``submit`` returns when all its parts are
applied, or raises the first failure (a part already applied is then a valid
intermediate state: the reconcile reads and plans again). Every operation is
guarded, so one stale guard rolls back the whole combined transaction: its
batches are then sent again one by one, and only the stale one fails, to
its own submitter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from tether.clients.consul.client import Catalog, ConsulContended, ConsulError, ConsulRejected

log = logging.getLogger(__name__)

Batch = Sequence[dict[str, Any]]


class _Entry:
    """One submitted batch: the instances (units) not sent yet, and its submitter's future."""

    __slots__ = ("future", "units")

    def __init__(self, units: list[list[dict[str, Any]]], future: asyncio.Future[None]) -> None:
        self.units = units
        self.future = future

    def size(self) -> int:
        return sum(len(unit) for unit in self.units)


#: One part of a transaction: operations of one entry, and whether they are its last.
_Part = tuple[list[dict[str, Any]], _Entry, bool]


def units(batch: Batch) -> list[list[dict[str, Any]]]:
    """``batch`` cut where it may be split: a check operation stays with the operations of
    its own service just before it (its service's write, or its other checks)."""
    out: list[list[dict[str, Any]]] = []
    current: str | None = None
    for op in batch:
        sid = _service_id(op)
        if out and "Check" in op and sid is not None and sid == current:
            out[-1].append(op)
        else:
            out.append([op])
            current = sid
    return out


def _service_id(op: dict[str, Any]) -> str | None:
    if "Service" in op:
        return str((op["Service"].get("Service") or {}).get("ID") or "") or None
    if "Check" in op:
        return str((op["Check"].get("Check") or {}).get("ServiceID") or "") or None
    return None


class GroupCommit:
    """Packs concurrently submitted batches into shared transactions of at most ``max_ops``."""

    def __init__(self, catalog: Catalog, *, max_ops: int) -> None:
        self.catalog = catalog
        self.max_ops = max_ops
        self._pending: list[_Entry] = []
        self._flusher: asyncio.Task[None] | None = None
        self.calls = 0  # transactions sent (the benchmarks and tests read it)

    async def submit(self, batch: Batch) -> None:
        """Apply ``batch`` (in one or two shared transactions); raise what Consul answered for it."""
        if len(batch) > self.max_ops:
            raise ValueError(f"a batch of {len(batch)} operations exceeds {self.max_ops}")
        if not batch:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Entry(units(batch), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="catalog-group-commit")
        await future

    async def _flush(self) -> None:
        # Bounded by the submissions: each round sends at least one instance of the
        # first entry, and nothing is added back but what remains of a split entry.
        while self._pending:
            group: list[_Part] = []
            size = 0
            rest: list[_Entry] = []
            for entry in self._pending:
                if entry.future.done():  # cancelled, or a part failed: the rest is not sent
                    continue
                room = self.max_ops - size
                whole = entry.size()
                if whole <= room:
                    group.append(([op for unit in entry.units for op in unit], entry, True))
                    size += whole
                    continue
                taken = 0
                ops: list[dict[str, Any]] = []
                while entry.units and taken + len(entry.units[0]) <= room:
                    unit = entry.units.pop(0)
                    ops += unit
                    taken += len(unit)
                if ops:
                    group.append((ops, entry, False))
                    size += taken
                rest.append(entry)
            self._pending = rest
            if group:
                await self._send(group)

    async def _send(self, group: list[_Part]) -> None:
        try:
            self.calls += 1
            await self.catalog.catalog_txn([op for ops, _, _ in group for op in ops])
        except (ConsulContended, ConsulRejected) as exc:
            if len(group) == 1:
                _settle(group[0][1].future, exc)
                return
            log.debug("combined catalog transaction of %d batches failed (%s); sending each alone",
                      len(group), exc)
            for ops, entry, last in group:
                if entry.future.done():
                    continue
                try:
                    self.calls += 1
                    await self.catalog.catalog_txn(list(ops))
                except ConsulError as each:
                    _settle(entry.future, each)
                else:
                    if last:
                        _settle(entry.future, None)
            return
        except ConsulError as exc:  # unavailable: the same for everyone in the group
            for _, entry, _ in group:
                _settle(entry.future, exc)
            return
        except BaseException as exc:
            for _, entry, _ in group:
                _settle(entry.future, exc if isinstance(exc, Exception) else ConsulError("cancelled"))
            raise
        for _, entry, last in group:
            if last:
                _settle(entry.future, None)


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
