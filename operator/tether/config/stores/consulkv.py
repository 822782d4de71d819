"""Consul KV as a store of the configuration engine: :mod:`tether.config.values` ↔ ``/v1/kv`` and ``/v1/txn``.

Every item becomes one check-and-set operation on ``ModifyIndex``: ``cas``
with index 0 creates only when absent, ``cas`` with an index writes only
over exactly that version, ``delete-cas`` deletes only that version. The index
record is guarded with ``check-index`` / ``check-not-exists`` when a step
leaves it alone, or written with ``cas`` itself when the step changes it.
Consul applies a transaction all or nothing and answers 409 when a guard
failed. Deletes are exact keys: never ``delete-tree``.

**Tombstones.** A transaction can reach the store long after its sender gave
up or died (etcd applied one 33 s after its operator was killed; Consul's
HTTP API offers no bound either: the agent forwards to a server, which queues
it for raft). A create is guarded by its index record's absence, which a
release would offer again, so a create that lands after the release would
leave keys nobody owns. Deleting an index record therefore writes a tombstone
in its place, :data:`~tether.config.planner.TOMBSTONE` with its creation time
(``{"keys":[],"tombstone":true,"created":<unix seconds>}``); the late create
fails its guard for as long as it lives, and a new resource of the same name
writes over it like over any record. After ``TETHER_CONSUL_TOMBSTONE_SECONDS``
(600 s) :class:`Tombstones` deletes it, with ``delete-cas`` on the index it
saw, so a record written over the tombstone since is never touched.

Consul KV has no lease. Its nearest thing, a session with ``Behavior=delete``,
was rejected, because a session is a lock holder, not a timer: a key written
over a session-held tombstone *keeps* the session (a plain ``cas`` never
releases a lock), so the re-created resource's record would be deleted when
the session ends; a session is invalidated with its node's health checks and
destroyed with its node (the agent Tether talks to), i.e. early, when
something is failing, which is when late transactions happen; a TTL session
ends anywhere between its TTL and twice that, and its timer restarts at each
Consul leader election; and it needs ``session:write`` on a node on top of
``key:write``. The operator deletes its own tombstones instead: it remembers
those it writes and those it meets when reading an index record, lists
``<ownership prefix>owners/`` once when it starts (leaving a tombstone behind
by dying is the case this is for), and keeps one timer for the earliest. Idle,
that is no read and no write at all; each tombstone costs one delete.
The lifetime relies on the replicas' clocks agreeing to well within it (NTP).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

from tether import errors
from tether.config import planner
from tether.config.values import Committed, Delete, Entry, Guard, Op, Put

log = logging.getLogger(__name__)

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

#: Default lifetime of an index record's tombstone (``TETHER_CONSUL_TOMBSTONE_SECONDS``),
#: far beyond any transaction's time in flight; etcd's lease is as long.
TOMBSTONE_SECONDS: Final = 600

# Expired tombstones deleted per round of the sweeper, one transaction each:
# a burst of expiries (after a mass deletion) yields to the loop in between.
_SWEEP_BATCH = 64

# A sweep that failed (Consul down) is tried again after at most this long.
_RETRY_CAP = 30.0


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


def tombstone(created: float) -> bytes:
    """An index record's tombstone that says when it was written (unix seconds)."""
    return planner.TOMBSTONE[:-1] + b',"created":%d}' % int(created)


def created_of(value: bytes) -> float | None:
    """When a tombstone was written, or None when it does not say (or is no tombstone)."""
    try:
        created = json.loads(value).get("created")
    except (ValueError, AttributeError):
        return None
    return float(created) if isinstance(created, int | float) and not isinstance(created, bool) else None


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


def transaction(
    step: planner.Step, *, index_key: str, index_revision: int, tombstone: bytes | None = None
) -> list[dict[str, Any]]:
    """The ``/v1/txn`` body of one step.

    With ``tombstone``, deleting the index record writes that value over it
    instead, guarded like the delete (see the module docstring).
    """
    ops = [operation(item.op, item.guard) for item in step.items]
    guard = planner.index_guard(index_key, index_revision)
    if step.index is not None:
        ops.append(operation(Put(index_key, step.index), guard))
    elif step.delete_index and tombstone is not None:
        ops.append(operation(Put(index_key, tombstone), guard))
    elif step.delete_index:
        ops.append(operation(Delete(index_key), guard))
    elif guard.absent:
        ops.append(_kv("check-not-exists", index_key))
    else:
        ops.append(_kv("check-index", index_key, Index=guard.revision))
    return ops


class Tombstones:
    """The index tombstones this process knows of, each deleted once its lifetime is over.

    One dict (key → the ``ModifyIndex`` seen and its deadline) and a heap of
    deadlines; :meth:`run` sleeps until the earliest, or for good when there
    is none. A deadline is on the monotonic clock; a tombstone met, not
    written, here gets what is left of its lifetime by its ``created`` time
    (never more than a whole lifetime from now: a clock ahead must not keep
    it for ever).
    """

    def __init__(
        self, client: Client, *, owners: str, lifetime: float,
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
    ) -> None:
        if lifetime <= 0:
            raise ValueError(f"a tombstone's lifetime must be positive, not {lifetime}")
        self.client = client
        self.owners = owners  # where index records live: <ownership prefix>owners/
        self.lifetime = lifetime
        self.clock = clock
        self.wall = wall
        self._known: dict[str, tuple[int, float]] = {}
        self._heap: list[tuple[float, str, int]] = []
        self._wake = asyncio.Event()
        self.scanned = False

    def pending(self) -> dict[str, int]:
        """Tombstones waiting for their deadline: key → ModifyIndex."""
        return {key: index for key, (index, _) in self._known.items()}

    def _schedule(self, key: str, index: int, deadline: float) -> None:
        known = self._known.get(key)
        if known is not None and known[0] >= index:
            return  # the same tombstone, or an older one read late
        self._known[key] = (index, deadline)
        heapq.heappush(self._heap, (deadline, key, index))
        self._wake.set()

    def wrote(self, key: str, index: int) -> None:
        """This process wrote a tombstone at ``index`` just now."""
        self._schedule(key, index, self.clock() + self.lifetime)

    def met(self, found: Entry) -> None:
        """A read found ``found``: remember it if it is a tombstone of an index record."""
        if not found.key.startswith(self.owners) or not planner.is_tombstone(found.value):
            return
        created = created_of(found.value)
        left = self.lifetime if created is None else created + self.lifetime - self.wall()
        self._schedule(found.key, found.revision, self.clock() + max(0.0, min(self.lifetime, left)))

    async def scan(self) -> int:
        """List every index record once and remember the tombstones; how many there are."""
        _, found = await self.client.kv_tree(self.owners)
        for raw in found:
            self.met(entry(raw))
        self.scanned = True
        return len(self._known)

    def _next(self) -> float | None:
        """The earliest live deadline (stale heap entries dropped), or None."""
        while self._heap:
            deadline, key, index = self._heap[0]
            if self._known.get(key) == (index, deadline):
                return deadline
            heapq.heappop(self._heap)
        return None

    async def sweep(self) -> int:
        """Delete up to a batch of expired tombstones; how many were deleted.

        ``delete-cas`` on the index seen: a record written over the tombstone
        since (the resource created again) fails it and stays. Raises
        :class:`~tether.errors.BackendError` when Consul fails; what is left
        stays pending.
        """
        deleted = 0
        for _ in range(_SWEEP_BATCH):
            deadline = self._next()
            if deadline is None or deadline > self.clock():
                break
            _, key, index = self._heap[0]
            ok, _ = await self.client.kv_txn([_kv("delete-cas", key, Index=index)])
            # Done with it either way (its heap entry goes stale and is dropped
            # by _next), unless a newer tombstone took its place meanwhile.
            if self._known.get(key) == (index, deadline):
                del self._known[key]
            if ok:
                deleted += 1
            else:
                log.debug("Consul KV: %s was written over since its tombstone; kept", key)
        if deleted:
            log.debug("Consul KV: deleted %d expired ownership tombstones", deleted)
        return deleted

    async def run(self) -> None:
        """Scan once, then delete each tombstone when its time comes; idle, do nothing at all."""
        failures = 0
        while True:
            try:
                if not self.scanned:
                    await self.scan()
                await self.sweep()
                failures = 0
            except errors.BackendError as exc:
                failures += 1
                if failures == 1:
                    log.warning("Consul KV: deleting expired ownership tombstones failed: %s", exc)
                await asyncio.sleep(min(_RETRY_CAP, 0.5 * 2**failures) * random.uniform(0.5, 1.0))
                continue
            deadline = self._next()
            self._wake.clear()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)


class ConsulKVStore:
    """The configuration engine's view of Consul KV."""

    #: Deleting an index record leaves a tombstone, deleted by :attr:`sweeper`
    #: after its lifetime (see the module docstring).
    tombstones = True

    def __init__(
        self, client: Client, *, max_txn_ops: int = MAX_TXN_OPS, ownership_prefix: str = "tether/",
        tombstone_seconds: float = TOMBSTONE_SECONDS,
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.limits = planner.Limits(
            store="Consul KV", max_ops=max_txn_ops, max_txn_bytes=MAX_TXN_BYTES,
            max_value_bytes=MAX_VALUE_BYTES,
        )
        owners = planner.Layout(ownership_prefix, rooted=False).index_key("")
        #: Run :meth:`Tombstones.run` next to the store's watcher (only while leading).
        self.sweeper = Tombstones(client, owners=owners, lifetime=tombstone_seconds, clock=clock, wall=wall)

    async def read(self, key: str) -> Entry | None:
        raw = await self.client.kv_get(key)
        if raw is None:
            return None
        found = entry(raw)
        self.sweeper.met(found)
        return found

    async def read_tree(self, directory: str) -> list[Entry]:
        _, entries = await self.client.kv_tree(directory)
        return [entry(e) for e in entries]

    async def commit(self, step: planner.Step, *, index_key: str, index_revision: int) -> Committed:
        stone = tombstone(self.sweeper.wall()) if step.delete_index else None
        ok, results = await self.client.kv_txn(
            transaction(step, index_key=index_key, index_revision=index_revision, tombstone=stone)
        )
        writes = step.writes_index or any(isinstance(i.op, Put) for i in step.items)
        # Every write of one transaction carries its raft index; checks return
        # the entry as it was, deletes return nothing, so only writes tell it.
        revision = max((int(r.get("ModifyIndex") or 0) for r in results), default=0) if writes else 0
        if ok and stone is not None and revision:
            self.sweeper.wrote(index_key, revision)
        return Committed(ok, revision)
