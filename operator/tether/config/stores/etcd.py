"""etcd as a store of the configuration engine: :mod:`tether.config.values` ↔ etcd's API.

A guard becomes a compare (absent: ``version = 0``; unchanged: ``mod_revision
= r``), a step becomes one ``Txn``.

Deleting an owner's index record writes a tombstone instead
(:data:`~tether.config.planner.TOMBSTONE`, on a lease of
:data:`TOMBSTONE_TTL` seconds, so it goes away by itself). etcd may apply a
transaction long after its sender gave up or died (seen in the HA fault runs:
a create applied 33 s after the operator that sent it was killed, behind a
partition). Every transaction of an owner is guarded by its index record; a
create is guarded by its absence, which a deleted record would offer again,
so that late create would land after the resource's release and leave keys
nobody owns. The tombstone fails that guard for as long as it lives.

etcd keys are bytes: a foreign key need not be UTF-8 and must still
round-trip exactly when it is guarded or deleted, hence ``surrogateescape``.
The backend-up gauge and the error counter are kept here, where the calls are
made.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Final, Protocol, TypeVar

from tether import metrics
from tether.clients.etcd import values as etcd
from tether.clients.etcd.errors import EtcdRejected, EtcdUnavailable
from tether.config import planner
from tether.config.values import Committed, Delete, Entry, Guard, Op, Put

T = TypeVar("T")

#: The server's ``--max-txn-ops`` default; counts operations and compares separately.
DEFAULT_MAX_TXN_OPS: Final = 128

#: Budget for one transaction's estimated size. etcd refuses requests above
#: ``--max-request-bytes`` (1.5 MiB by default); the estimate is rough, so a
#: third of a MiB stays free for protobuf framing and the index record.
MAX_TXN_BYTES: Final = 1024 * 1024

#: Lifetime of an index record's tombstone, far beyond any transaction's time in
#: flight (a client deadline of seconds, a partition of tens of seconds).
TOMBSTONE_TTL: Final = 600

#: A tombstone's lease is reused for this long, so tombstones live between
#: TOMBSTONE_TTL - TOMBSTONE_LEASE_REUSE and TOMBSTONE_TTL seconds, and a burst
#: of deletions costs one lease grant.
TOMBSTONE_LEASE_REUSE: Final = 120.0

#: Largest key + value Tether will try to write: it must fit one request of
#: 1.5 MiB together with its guard and the index guard.
MAX_VALUE_BYTES: Final = 1_400 * 1024


class Client(Protocol):
    """The parts of :class:`tether.clients.etcd.client.EtcdClient` the store and the watcher use."""

    async def get_prefix(self, prefix: bytes) -> tuple[int, list[etcd.KeyValue]]: ...

    async def get(self, key: bytes) -> etcd.KeyValue | None: ...

    async def txn(
        self, compares: Sequence[etcd.Compare], success: Sequence[etcd.Put | etcd.Delete],
        failure: Sequence[etcd.Put | etcd.Delete] = (),
    ) -> etcd.TxnResult: ...

    def watch_prefix(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[tuple[int, list[etcd.WatchEvent]]]: ...

    async def status(self) -> int: ...

    async def lease_grant(self, ttl: int) -> int: ...


def encode(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def decode(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


def entry(kv: etcd.KeyValue) -> Entry:
    return Entry(decode(kv.key), kv.value, kv.mod_revision)


def compare(guard: Guard) -> etcd.Compare:
    if guard.absent:
        return etcd.Compare(encode(guard.key), "version", "=", 0)
    return etcd.Compare(encode(guard.key), "mod", "=", guard.revision)


def operation(op: Op) -> etcd.Put | etcd.Delete:
    if isinstance(op, Put):
        return etcd.Put(encode(op.key), op.value)
    return etcd.Delete(encode(op.key))


def transaction(
    step: planner.Step, *, index_key: str, index_revision: int, tombstone_lease: int | None = None
) -> tuple[list[etcd.Compare], list[etcd.Put | etcd.Delete]]:
    """Compares and operations of one step, given the index record's current revision.

    With ``tombstone_lease``, deleting the index record puts the tombstone on
    that lease instead (see the module docstring).
    """
    compares = [compare(item.guard) for item in step.items]
    compares.append(compare(planner.index_guard(index_key, index_revision)))
    ops = [operation(item.op) for item in step.items]
    if step.index is not None:
        ops.append(operation(Put(index_key, step.index)))
    elif step.delete_index and tombstone_lease is not None:
        ops.append(etcd.Put(encode(index_key), planner.TOMBSTONE, lease=tombstone_lease))
    elif step.delete_index:
        ops.append(operation(Delete(index_key)))
    return compares, ops


class EtcdStore:
    """The configuration engine's view of etcd."""

    #: Deleting an index record leaves a leased tombstone (see the module docstring).
    tombstones = True

    def __init__(self, client: Client, *, max_txn_ops: int = DEFAULT_MAX_TXN_OPS) -> None:
        self.client = client
        # (lease ID, time.monotonic() of its grant) of the tombstones' current lease.
        self._lease: tuple[int, float] | None = None
        # Lowered by the engine when the server proves to allow less (a smaller
        # --max-txn-ops or --max-request-bytes); a property of the server, so shared.
        self.limits = planner.Limits(
            store="etcd", max_ops=max_txn_ops, max_txn_bytes=MAX_TXN_BYTES, max_value_bytes=MAX_VALUE_BYTES
        )

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            result = await call
        except EtcdUnavailable:
            metrics.BACKEND_UP.labels(backend="etcd").set(0)
            metrics.BACKEND_ERRORS.labels(backend="etcd").inc()
            raise
        metrics.BACKEND_UP.labels(backend="etcd").set(1)
        return result

    async def read(self, key: str) -> Entry | None:
        kv = await self._call(self.client.get(encode(key)))
        return None if kv is None else entry(kv)

    async def read_tree(self, directory: str) -> list[Entry]:
        _, kvs = await self._call(self.client.get_prefix(encode(directory)))
        return [entry(kv) for kv in kvs]

    async def _tombstone_lease(self) -> int:
        now = time.monotonic()
        if self._lease is None or now - self._lease[1] > TOMBSTONE_LEASE_REUSE:
            self._lease = (await self._call(self.client.lease_grant(TOMBSTONE_TTL)), now)
        return self._lease[0]

    async def commit(self, step: planner.Step, *, index_key: str, index_revision: int) -> Committed:
        lease = await self._tombstone_lease() if step.delete_index else None
        compares, ops = transaction(
            step, index_key=index_key, index_revision=index_revision, tombstone_lease=lease
        )
        try:
            result = await self._call(self.client.txn(compares, ops))
        except EtcdRejected as exc:
            if lease is None or "lease not found" not in str(exc):
                raise
            # The lease went before its time (revoked, a restored cluster): a
            # new one next time; the caller retries.
            self._lease = None
            raise EtcdUnavailable(f"{exc} (a tombstone's lease; granting a new one)") from exc
        return Committed(result.succeeded, result.revision)
