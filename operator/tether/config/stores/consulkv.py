"""Consul KV as a store of the configuration engine: :mod:`tether.config.values` ↔ ``/v1/kv`` and ``/v1/txn``.

Every item becomes one check-and-set operation on ``ModifyIndex``: ``cas``
with index 0 creates only when absent, ``cas`` with an index writes only
over exactly that version, ``delete-cas`` deletes only that version. The index
record is guarded with ``check-index`` / ``check-not-exists`` when a step
leaves it alone, or written with ``cas`` itself when the step changes it.
Consul applies a transaction all or nothing and answers 409 when a guard
failed. Deletes are exact keys: never ``delete-tree``.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Final, Protocol

from tether.config import planner
from tether.config.values import Committed, Delete, Entry, Guard, Op, Put

#: Operations per transaction in the pinned Consul 1.16.3 (``maxTxnOps = 128``
#: in its ``agent/txn_endpoint.go``; more is refused with 413 "Transaction
#: contains too many operations"); the engine lowers it if a server refuses.
MAX_TXN_OPS: Final = 128

#: Consul refuses request bodies above ``txn_max_req_len`` (512 KiB by
#: default, raft's suggested maximum; 413 "Request body too large"); values
#: travel base64-encoded (4/3 of their size) inside JSON, so the budget for
#: the raw estimate stays well below.
MAX_TXN_BYTES: Final = 320 * 1024

#: Consul's ``kv_max_value_size`` (512 KiB by default) bounds one value; its
#: base64 form must also fit one transaction body.
MAX_VALUE_BYTES: Final = 360 * 1024


class Client(Protocol):
    """The parts of :class:`tether.clients.consul.client.ConsulClient` the store and its watcher use."""

    async def kv_get(self, key: str) -> dict[str, Any] | None: ...

    async def kv_tree(
        self, prefix: str, *, index: int = 0, wait: str = ""
    ) -> tuple[int, list[dict[str, Any]]]: ...

    async def kv_txn(self, ops: list[dict[str, Any]]) -> tuple[bool, list[dict[str, Any]]]: ...


def value_of(raw: Mapping[str, Any]) -> bytes:
    encoded = raw.get("Value")
    return base64.b64decode(encoded) if encoded else b""


def entry(raw: Mapping[str, Any]) -> Entry:
    return Entry(str(raw.get("Key", "")), value_of(raw), int(raw.get("ModifyIndex") or 0))


def _kv(verb: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"KV": {"Verb": verb, "Key": key, **extra}}


def operation(op: Op, guard: Guard) -> dict[str, Any]:
    """One guarded write: the operation and its guard in a single check-and-set."""
    if isinstance(op, Put):
        value = base64.b64encode(op.value).decode()
        return _kv("cas", op.key, Value=value, Index=guard.revision)
    if guard.absent:
        # Nothing to delete: make sure it stays so (the planner never plans this).
        return _kv("check-not-exists", op.key)
    return _kv("delete-cas", op.key, Index=guard.revision)


def transaction(step: planner.Step, *, index_key: str, index_revision: int) -> list[dict[str, Any]]:
    """The ``/v1/txn`` body of one step."""
    ops = [operation(item.op, item.guard) for item in step.items]
    guard = planner.index_guard(index_key, index_revision)
    if step.index is not None:
        ops.append(operation(Put(index_key, step.index), guard))
    elif step.delete_index:
        ops.append(operation(Delete(index_key), guard))
    elif guard.absent:
        ops.append(_kv("check-not-exists", index_key))
    else:
        ops.append(_kv("check-index", index_key, Index=guard.revision))
    return ops


class ConsulKVStore:
    """The configuration engine's view of Consul KV."""

    # Deleting an index record deletes it: Consul KV has no lease to expire a
    # tombstone with short of a session per record (a late transaction after a
    # release is the etcd client's case: see tether.config.stores.etcd).
    tombstones = False

    def __init__(self, client: Client, *, max_txn_ops: int = MAX_TXN_OPS) -> None:
        self.client = client
        self.limits = planner.Limits(
            store="Consul KV", max_ops=max_txn_ops, max_txn_bytes=MAX_TXN_BYTES,
            max_value_bytes=MAX_VALUE_BYTES,
        )

    async def read(self, key: str) -> Entry | None:
        raw = await self.client.kv_get(key)
        return None if raw is None else entry(raw)

    async def read_tree(self, directory: str) -> list[Entry]:
        _, entries = await self.client.kv_tree(directory)
        return [entry(e) for e in entries]

    async def commit(self, step: planner.Step, *, index_key: str, index_revision: int) -> Committed:
        ok, results = await self.client.kv_txn(
            transaction(step, index_key=index_key, index_revision=index_revision)
        )
        writes = step.index is not None or any(isinstance(i.op, Put) for i in step.items)
        # Every write of one transaction carries its raft index; checks return
        # the entry as it was, deletes return nothing, so only writes tell it.
        revision = max((int(r.get("ModifyIndex") or 0) for r in results), default=0) if writes else 0
        return Committed(ok, revision)
