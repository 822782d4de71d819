"""In-memory models of the two config stores, for unit tests of the config engine.

Both models keep what the engine relies on and nothing more: a per-key
modification stamp and a store-wide one that moves with every write,
all-or-nothing transactions, and each store's own way of guarding them:

* :class:`EtcdModel` — etcd's ``Txn``: compares (``version = 0`` for absent,
  ``mod = r`` for unchanged), then puts and single-key deletes, all carrying
  the new revision. It runs what :func:`tether.config.stores.etcd.transaction` builds.
* :class:`ConsulModel` — Consul's ``/v1/txn``: ``cas`` (index 0: create only),
  ``delete-cas``, ``check-index``, ``check-not-exists``, rolled back as a whole
  when one of them fails (Consul's 409). It runs what
  :func:`tether.config.stores.consulkv.transaction` builds. As in Consul's state store, a
  ``delete-cas`` of a key that is already gone succeeds. Consul KV has no
  lease: a tombstone stays until Tether's sweeper deletes it (with a
  :class:`FakeClock`, tests move its time on).

So a plan is exercised through the real translation to each store's wire
shape, and the tests check outcomes: what the store holds afterwards. Both
models also refuse a transaction above the server's operation or request
limit, and a key twice in one transaction (etcd refuses that; Consul's
answer would depend on the order, which Tether must never rely on).

:class:`FakeEtcdClient` and :class:`FakeConsulKV` put the models behind the
async client protocols the stores take (``tether.config.stores.etcd.Client``,
``tether.config.stores.consulkv.Client``), for reconciler tests.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.clients.consul.client import ConsulRequestTooLarge, ConsulTooManyOps, ConsulUnavailable
from tether.clients.etcd import values as etcd
from tether.clients.etcd.errors import EtcdRejected, EtcdUnavailable, RequestTooLarge, TooManyOps
from tether.config import planner
from tether.config.stores import consulkv as consul_kv
from tether.config.stores import etcd as etcd_store
from tether.config.values import Committed, Entry, Put

#: etcd's default ``--max-request-bytes``.
ETCD_REQUEST_LIMIT = 1536 * 1024
#: Consul's default ``txn_max_req_len``.
CONSUL_REQUEST_LIMIT = 512 * 1024


class Model:
    """What both models share: the data, the stamps, and out-of-band writes."""

    name: str
    kind: str
    layout: planner.Layout
    limits: planner.Limits

    def __init__(self) -> None:
        self.stamp = 1  # etcd's revision, Consul's raft index
        self.txns = 0  # transactions that committed

    @classmethod
    def k(cls, path: str) -> str:
        """The store's full key for a path: ``/app/a`` in etcd, ``app/a`` in Consul KV."""
        return "/" + path if cls.layout.rooted else path

    # -- reads --------------------------------------------------------------------
    def entries(self) -> dict[str, Entry]:
        raise NotImplementedError

    def entry(self, key: str) -> Entry | None:
        return self.entries().get(key)

    def values(self) -> dict[str, bytes]:
        return {k: e.value for k, e in self.entries().items()}

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        return {k: (e.value, e.revision) for k, e in self.entries().items()}

    def tombstones(self) -> list[str]:
        """Index records that are tombstones, by key."""
        raise NotImplementedError

    # -- writes by someone else than Tether (a person, another tool) ------------------
    def put(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    # -- one step of a plan, through the store's own translation -------------------------
    def commit(
        self, step: planner.Step, *, index_key: str, index_revision: int, max_ops: int | None = None
    ) -> Committed:
        raise NotImplementedError


class EtcdModel(Model):
    """etcd's KV semantics that plans rely on: revisions, compares, atomic txns."""

    name = "etcd"
    kind = "EtcdConfig"
    layout = planner.Layout("/tether/", rooted=True)
    limits = etcd_store.EtcdStore(None).limits  # type: ignore[arg-type]

    def __init__(self) -> None:
        super().__init__()
        self.kv: dict[bytes, etcd.KeyValue] = {}
        # Leases granted (ID → TTL) and the lease each key is attached to.
        self.leases: dict[int, int] = {}
        self.attached: dict[bytes, int] = {}

    def lease_grant(self, ttl: int) -> int:
        lease = 0x1000 + len(self.leases)
        self.leases[lease] = ttl
        return lease

    def expire_leases(self) -> list[str]:
        """Every lease runs out, as after its TTL: its keys go (one revision each); their names."""
        gone = sorted(k for k, lease in self.attached.items() if lease in self.leases)
        for key in gone:
            self.stamp += 1
            self.kv.pop(key, None)
            del self.attached[key]
        self.leases.clear()
        return [etcd_store.decode(k) for k in gone]

    def tombstones(self) -> list[str]:
        """Index records that are tombstones (on a lease), by key."""
        return sorted(
            etcd_store.decode(k) for k, kv in self.kv.items()
            if kv.value == planner.TOMBSTONE and self.attached.get(k) in self.leases
        )

    def entries(self) -> dict[str, Entry]:
        return {etcd_store.decode(k): etcd_store.entry(kv) for k, kv in self.kv.items()}

    def put(self, key: str, value: bytes) -> None:
        self.stamp += 1
        self._put(etcd_store.encode(key), value)

    def delete(self, key: str) -> None:
        self.stamp += 1
        self.kv.pop(etcd_store.encode(key), None)

    def _put(self, key: bytes, value: bytes) -> None:
        old = self.kv.get(key)
        self.kv[key] = etcd.KeyValue(
            key, value, old.create_revision if old else self.stamp, self.stamp,
            old.version + 1 if old else 1,
        )

    def _holds(self, c: etcd.Compare) -> bool:
        kv = self.kv.get(c.key)
        if c.target == "value":
            if kv is None:
                return False  # etcd: a value compare on a missing key fails
            actual: int | bytes = kv.value
        else:
            attr = {"version": "version", "create": "create_revision", "mod": "mod_revision"}[c.target]
            actual = getattr(kv, attr) if kv else 0
        if c.op == "=":
            return actual == c.value
        if c.op == "!=":
            return actual != c.value
        if c.op == "<":
            return actual < c.value  # type: ignore[operator]
        return actual > c.value  # type: ignore[operator]

    @staticmethod
    def request_size(compares: Sequence[etcd.Compare], ops: Sequence[etcd.Put | etcd.Delete]) -> int:
        size = sum(len(c.key) + 16 for c in compares)
        return size + sum(len(op.key) + (len(op.value) if isinstance(op, etcd.Put) else 0) + 16 for op in ops)

    def txn(self, compares: Sequence[etcd.Compare], ops: Sequence[etcd.Put | etcd.Delete]) -> etcd.TxnResult:
        keys = [op.key for op in ops]
        assert len(keys) == len(set(keys)), "etcd refuses a key twice in one transaction"
        assert self.request_size(compares, ops) <= ETCD_REQUEST_LIMIT, "over --max-request-bytes"
        if not all(self._holds(c) for c in compares):
            return etcd.TxnResult(False, self.stamp)
        for op in ops:
            if isinstance(op, etcd.Put) and op.lease and op.lease not in self.leases:
                # etcd refuses the whole transaction (the chosen branch names a lost lease).
                raise EtcdRejected("etcdserver: requested lease not found")
        self.txns += 1
        self.stamp += 1
        for op in ops:
            if isinstance(op, etcd.Put):
                self._put(op.key, op.value)
                if op.lease:
                    self.attached[op.key] = op.lease
                else:
                    self.attached.pop(op.key, None)  # a put without a lease detaches the key
            else:
                self.kv.pop(op.key, None)
                self.attached.pop(op.key, None)
        return etcd.TxnResult(True, self.stamp)

    def commit(
        self, step: planner.Step, *, index_key: str, index_revision: int, max_ops: int | None = None
    ) -> Committed:
        compares, ops = etcd_store.transaction(step, index_key=index_key, index_revision=index_revision)
        if max_ops is not None:
            # etcd counts compares and operations separately against --max-txn-ops.
            assert len(ops) <= max_ops and len(compares) <= max_ops, (len(ops), len(compares), max_ops)
        result = self.txn(compares, ops)
        return Committed(result.succeeded, result.revision)


class ConsulModel(Model):
    """Consul KV's transaction semantics: check-and-set on ModifyIndex, all or nothing."""

    name = "consul"
    kind = "ConsulConfig"
    layout = planner.Layout("tether/", rooted=False)
    limits = consul_kv.ConsulKVStore(None).limits  # type: ignore[arg-type]

    def __init__(self) -> None:
        super().__init__()
        self.kv: dict[str, dict[str, Any]] = {}

    def entries(self) -> dict[str, Entry]:
        return {k: consul_kv.entry(raw) for k, raw in self.kv.items()}

    def tombstones(self) -> list[str]:
        """Index records that are tombstones (Consul KV has no lease: they carry their time), by key."""
        owners = self.layout.index_key("")
        return sorted(
            k for k, e in self.entries().items() if k.startswith(owners) and planner.is_tombstone(e.value)
        )

    def raw(self, key: str) -> dict[str, Any] | None:
        found = self.kv.get(key)
        return None if found is None else dict(found)

    def put(self, key: str, value: bytes) -> None:
        self.stamp += 1
        self._put(self.kv, key, value, self.stamp)

    def delete(self, key: str) -> None:
        self.stamp += 1
        self.kv.pop(key, None)

    @staticmethod
    def _put(kv: dict[str, dict[str, Any]], key: str, value: bytes, stamp: int) -> dict[str, Any]:
        old = kv.get(key)
        kv[key] = {
            "Key": key, "Flags": 0, "LockIndex": 0,
            # Consul returns null for an empty value.
            "Value": base64.b64encode(value).decode() if value else None,
            "CreateIndex": old["CreateIndex"] if old else stamp, "ModifyIndex": stamp,
        }
        return kv[key]

    def txn(self, ops: list[dict[str, Any]]) -> tuple[bool, list[dict[str, Any]]]:
        """``PUT /v1/txn``: (True, results) when applied, (False, []) when rolled back (409)."""
        keys = [op["KV"]["Key"] for op in ops]
        assert len(keys) == len(set(keys)), "a key twice in one Consul transaction"
        assert len(json.dumps(ops).encode()) <= CONSUL_REQUEST_LIMIT, "over txn_max_req_len"
        work = dict(self.kv)
        stamp = self.stamp + 1
        results: list[dict[str, Any]] = []
        for op in ops:
            kv = op["KV"]
            verb, key = kv["Verb"], kv["Key"]
            existing = work.get(key)
            if verb == "cas":
                index = kv["Index"]
                if (index == 0 and existing is not None) or (
                    index != 0 and (existing is None or existing["ModifyIndex"] != index)
                ):
                    return False, []
                results.append(dict(self._put(work, key, base64.b64decode(kv.get("Value") or ""), stamp)))
            elif verb == "delete-cas":
                if existing is not None:
                    if existing["ModifyIndex"] != kv["Index"]:
                        return False, []
                    del work[key]
            elif verb == "check-index":
                if existing is None or existing["ModifyIndex"] != kv["Index"]:
                    return False, []
                results.append(dict(existing))
            elif verb == "check-not-exists":
                if existing is not None:
                    return False, []
            else:
                raise AssertionError(f"Tether must not send the verb {verb!r} (only exact, guarded ops)")
        self.kv = work
        self.stamp = stamp
        self.txns += 1
        return True, results

    def commit(
        self, step: planner.Step, *, index_key: str, index_revision: int, max_ops: int | None = None
    ) -> Committed:
        ops = consul_kv.transaction(step, index_key=index_key, index_revision=index_revision)
        if max_ops is not None:
            assert len(ops) <= max_ops, (len(ops), max_ops)
        ok, results = self.txn(ops)
        writes = step.index is not None or any(isinstance(i.op, Put) for i in step.items)
        revision = max((int(r["ModifyIndex"]) for r in results), default=0) if writes else 0
        return Committed(ok, revision)


MODELS: dict[str, type[Model]] = {"etcd": EtcdModel, "consul": ConsulModel}


@dataclass
class FakeClock:
    """A monotonic and a wall clock that move only when a test says so."""

    monotonic: float = 1000.0
    wall: float = 1_765_000_000.0

    def now(self) -> float:
        return self.monotonic

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall += seconds


# --------------------------------------------------------------------------- async clients


@dataclass
class Faults:
    """What a fake client does besides answering: limits, hooks and outages."""

    max_ops: int | None = None  # the server's operation limit (None: the store's own)
    max_request: int | None = None  # the server's request-size limit, in bytes
    unavailable: bool = False  # every call fails as if the server were down
    fail_reads_under: str | None = None  # only listings under this prefix fail
    before_txn: list[Callable[[], None]] = field(default_factory=list)
    txn_sizes: list[int] = field(default_factory=list)  # operations per transaction sent


class FakeEtcdClient:
    """:class:`tether.config.stores.etcd.Client` over an :class:`EtcdModel`."""

    def __init__(self, model: EtcdModel, faults: Faults | None = None) -> None:
        self.model = model
        self.faults = faults or Faults()

    def _check(self, what: str) -> None:
        if self.faults.unavailable:
            raise EtcdUnavailable(f"etcd is down ({what})")

    async def get_prefix(self, prefix: bytes) -> tuple[int, list[etcd.KeyValue]]:
        self._check("range")
        if self.faults.fail_reads_under is not None and prefix.startswith(
            etcd_store.encode(self.faults.fail_reads_under)
        ):
            raise EtcdUnavailable("etcd failed a range read")
        kvs = sorted((kv for k, kv in self.model.kv.items() if k.startswith(prefix)), key=lambda kv: kv.key)
        return self.model.stamp, kvs

    async def get(self, key: bytes) -> etcd.KeyValue | None:
        self._check("get")
        return self.model.kv.get(key)

    async def txn(
        self, compares: Sequence[etcd.Compare], success: Sequence[etcd.Put | etcd.Delete],
        failure: Sequence[etcd.Put | etcd.Delete] = (),
    ) -> etcd.TxnResult:
        self._check("txn")
        assert not failure, "Tether's transactions have no failure branch"
        limit = self.faults.max_ops
        if limit is not None and (len(success) > limit or len(compares) > limit):
            raise TooManyOps("etcdserver: too many operations in txn request")
        request = self.faults.max_request
        if request is not None and EtcdModel.request_size(compares, success) > request:
            raise RequestTooLarge("etcdserver: request is too large")
        self.faults.txn_sizes.append(len(success))
        for hook in self.faults.before_txn:
            hook()
        return self.model.txn(compares, success)

    def watch_prefix(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[tuple[int, list[etcd.WatchEvent]]]:
        raise NotImplementedError("the reconciler never watches")

    async def status(self) -> int:
        self._check("status")
        return self.model.stamp

    async def lease_grant(self, ttl: int) -> int:
        self._check("lease grant")
        return self.model.lease_grant(ttl)


class FakeConsulKV:
    """:class:`tether.config.stores.consulkv.Client` over a :class:`ConsulModel`."""

    def __init__(self, model: ConsulModel, faults: Faults | None = None) -> None:
        self.model = model
        self.faults = faults or Faults()

    def _check(self, what: str) -> None:
        if self.faults.unavailable:
            raise ConsulUnavailable(f"Consul agent is unreachable ({what})")

    async def kv_get(self, key: str) -> dict[str, Any] | None:
        self._check("get")
        return self.model.raw(key)

    async def kv_tree(
        self, prefix: str, *, index: int = 0, wait: str = ""
    ) -> tuple[int, list[dict[str, Any]]]:
        self._check("list")
        if self.faults.fail_reads_under is not None and prefix.startswith(self.faults.fail_reads_under):
            raise ConsulUnavailable("Consul failed a list")
        found = [dict(e) for k, e in sorted(self.model.kv.items()) if k.startswith(prefix)]
        return self.model.stamp, found

    async def kv_txn(self, ops: list[dict[str, Any]]) -> tuple[bool, list[dict[str, Any]]]:
        self._check("txn")
        if self.faults.max_ops is not None and len(ops) > self.faults.max_ops:
            raise ConsulTooManyOps("Consul refused a KV transaction: too many operations")
        request = self.faults.max_request
        if request is not None and len(json.dumps(ops).encode()) > request:
            raise ConsulRequestTooLarge("Consul refused a KV transaction: Request body too large")
        self.faults.txn_sizes.append(len(ops))
        for hook in self.faults.before_txn:
            hook()
        return self.model.txn(ops)
