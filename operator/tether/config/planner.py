"""Pure planning for EtcdConfig and ConsulConfig: desired keys + what the store holds
→ guarded transactions.

Nothing here does I/O, and nothing here knows which store it plans for: etcd
and Consul KV are both key-value stores with guarded multi-key transactions,
described by :mod:`tether.config.values`. The reconciler resolves the spec
into ``{full key: value}``, reads the store, and hands both in; the planner answers either *conflict*
(nothing may be written) or the exact guarded operations that bring the store to the
desired state, packed into as few transactions as the server's limits allow.

Ownership lives in the store itself, under a reserved prefix ``P`` (``/tether/``
in etcd, ``tether/`` in Consul KV by default), so that it survives restarts and
is shared by replicas:

* a **claim** per key, ``P + "keys/" + full_key`` (without the full key's
  leading ``/`` in etcd), whose value is the owner id
  ``<cluster>/<namespace>/<name>``. Claims are the truth: a key is owned by a
  resource exactly when its claim names that resource;
* an **index** per resource, ``P + "owners/" + owner_id``, holding
  ``{"keys": [...]}``: every key the resource may own. It lets deletion and
  pruning find keys after a prefix change or a restart without scanning, so the
  index must cover every claim at every moment, including between the chunks
  of a write too large for one transaction.

Every operation is guarded by a compare on exactly the state it was planned
from (a data key's revision or its absence, a claim's absence or revision),
and every transaction also guards the index record, which any change to the
owned set rewrites. Two writers, two replicas or an
out-of-band edit can therefore never interleave silently: the transaction
fails, the reconciler re-reads and plans again.

Values are bytes and may be Secret data: they never appear in any message.

(Over 500 lines on purpose: ownership layout, validation, the plan and its
packing into transactions are one invariant — every claim covered by the
index at every moment — and read best in one place.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from tether.config.values import Delete, Entry, Guard, Op, Put


@dataclass(frozen=True)
class Limits:
    """What one store accepts: operations and bytes per transaction, bytes per key.

    ``max_ops`` bounds the operations *and* the guards of one transaction
    (etcd counts compares and operations separately against ``--max-txn-ops``;
    Consul counts check-and-set operations, one per item, plus the index
    guard). ``max_txn_bytes`` is a budget for a rough size estimate, well under
    the server's request limit; ``max_value_bytes`` is the largest key plus
    value Tether tries to write at all.
    """

    store: str  # named in messages: "etcd", "Consul KV"
    max_ops: int
    max_txn_bytes: int
    max_value_bytes: int


# Fixed cost estimated per operation or compare on top of its key and value:
# protobuf tags, lengths and revision fields.
_OP_OVERHEAD = 16

# The end of a conflict message: true of the plan; the reconciler replaces it
# when an earlier round of the same reconcile had already written chunks.
NOTHING_WRITTEN = "Nothing was written."

# How many keys a conflict message names before summarising the rest.
_CONFLICTS_SHOWN = 3



# --------------------------------------------------------------------------- layout


def owner_id(cluster: str, namespace: str, name: str) -> str:
    """The value of a claim: which resource, of which cluster, owns a key."""
    return f"{cluster}/{namespace}/{name}"


@dataclass(frozen=True)
class Layout:
    """Where the ownership records live, for one reserved prefix ``P``.

    ``rooted`` stores (etcd) have keys that start with ``/``; Consul KV keys
    do not. A claim drops the full key's leading ``/`` so that both read
    ``P + "keys/" + path``.
    """

    ownership_prefix: str
    rooted: bool = True

    def __post_init__(self) -> None:
        if not self.ownership_prefix.endswith("/") or self.ownership_prefix == "/":
            raise ValueError(f"ownership prefix {self.ownership_prefix!r} must end with '/'")
        if self.rooted != self.ownership_prefix.startswith("/"):
            raise ValueError(
                f"ownership prefix {self.ownership_prefix!r} must "
                + ("start with '/'" if self.rooted else "not start with '/'")
            )

    @property
    def claims_root(self) -> str:
        return self.ownership_prefix + "keys/"

    def claim_key(self, full_key: str) -> str:
        return self.claims_root + full_key.removeprefix("/")

    def full_key_of_claim(self, claim_key: str) -> str | None:
        """The data key a claim is about, or None if ``claim_key`` is no claim."""
        if not claim_key.startswith(self.claims_root) or claim_key == self.claims_root:
            return None
        path = claim_key[len(self.claims_root):]
        return "/" + path if self.rooted else path

    def index_key(self, owner: str) -> str:
        return self.ownership_prefix + "owners/" + owner

    def reserved(self, key: str) -> bool:
        """True for keys inside the reserved prefix, which no resource may declare."""
        return key.startswith(self.ownership_prefix)

    def valid_key(self, key: str) -> bool:
        """Whether ``key`` has this store's shape (what an index record may list)."""
        return bool(key) and key.startswith("/") == self.rooted


def directory(prefix: str) -> str:
    """The key prefix every full key of ``spec.prefix`` starts with (ends in ``/``).

    ``/app/config`` lists as ``/app/config/``: listing the bare prefix would
    also return ``/app/configuration/...``, which belongs to someone else.
    """
    return prefix.rstrip("/") + "/"


#: An index record that lists nothing, left where a record was deleted, for a
#: bounded time (etcd: on a lease, see :mod:`tether.config.stores.etcd`; Consul
#: KV: with its creation time appended, see :mod:`tether.config.stores.consulkv`).
#: It owns nothing and counts as no record, except that every transaction
#: guards its revision: a transaction planned while the record was absent
#: (a create whose outcome was never known) can then no longer apply.
TOMBSTONE: Final = b'{"keys":[],"tombstone":true}'


def is_tombstone(value: bytes | None) -> bool:
    """Whether an index record's value is a tombstone: :data:`TOMBSTONE`, or it with more fields."""
    return value is not None and (value == TOMBSTONE or value.startswith(TOMBSTONE[:-1] + b","))


def encode_index(keys: Iterable[str]) -> bytes | None:
    """The index record's value for ``keys``; None when the record should not exist.

    The encoding is canonical (sorted, compact) so that an unchanged owned set
    gives byte-identical records and therefore no write.
    """
    ordered = sorted(set(keys))
    if not ordered:
        return None
    return json.dumps({"keys": ordered}, separators=(",", ":")).encode()


def decode_index(value: bytes | None, layout: Layout) -> tuple[str, ...]:
    """The keys an index record lists; a damaged record lists nothing.

    A damaged record cannot hide a key from pruning for good: claims under
    the current prefix are listed independently, and the record is rewritten.
    """
    if not value:
        return ()
    try:
        body = json.loads(value)
    except ValueError:
        return ()
    keys = body.get("keys") if isinstance(body, dict) else None
    if not isinstance(keys, list):
        return ()
    return tuple(sorted({k for k in keys if isinstance(k, str) and layout.valid_key(k)}))


def describe_owner(raw: bytes, *, cluster: str, kind: str) -> str:
    """Who a claim names, for a person; never echoes bytes that are not an owner id."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "an unrecognised ownership record"
    parts = text.rsplit("/", 2)
    if len(parts) != 3 or not all(parts):
        return "an unrecognised ownership record"
    their_cluster, namespace, name = parts
    where = "" if their_cluster == cluster else f" in cluster {their_cluster}"
    return f"{kind} {namespace}/{name}{where}"


# --------------------------------------------------------------------------- validation


def prefix_problem(prefix: str, layout: Layout) -> str | None:
    """Why ``spec.prefix`` cannot hold keys, given the reserved prefix; None if it can."""
    if directory(prefix).startswith(layout.ownership_prefix):
        return (
            f"spec.prefix: {prefix!r} is inside {layout.ownership_prefix!r}, where Tether "
            "keeps its ownership records; choose another prefix"
        )
    return None


def desired_problem(desired: Mapping[str, bytes], layout: Layout, limits: Limits, *, kind: str) -> str | None:
    """Why the resolved keys cannot be written as they are; None if they can.

    Names keys, never values (a size is fine: Kubernetes itself shows sizes
    of Secret data).
    """
    for key in sorted(desired):
        if layout.reserved(key):
            return (
                f"key {key} is inside {layout.ownership_prefix!r}, where Tether keeps its "
                "ownership records; choose another prefix or key"
            )
        size = len(_encode(key)) + len(desired[key])
        if size > limits.max_value_bytes:
            return (
                f"key {key}: its value is {len(desired[key])} bytes, more than {limits.store} "
                f"accepts (about {limits.max_value_bytes // 1024} KiB including the key); "
                "store large data elsewhere"
            )
    index = encode_index(desired)
    if index is not None and len(index) > limits.max_value_bytes:
        return (
            f"{len(desired)} keys are too many for one {kind}: their ownership record "
            f"would exceed what {limits.store} accepts for one value; split the keys over "
            "several resources"
        )
    return None


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Item:
    """One operation and the compare that makes it safe: nothing changed since the read."""

    op: Op
    guard: Guard

    def size(self) -> int:
        value = self.op.value if isinstance(self.op, Put) else b""
        return 2 * len(_encode(self.op.key)) + len(value) + 2 * _OP_OVERHEAD


@dataclass(frozen=True)
class Plan:
    """What to do for one EtcdConfig.

    ``writes`` (claims, then puts, key by key) come before ``deletes`` (data,
    then claim, key by key): a key is claimed no later than it is written, and
    unclaimed no earlier than it is deleted, so a crash between chunks leaves
    every written key owned.
    """

    index_key: str
    index_revision: int  # observed revision of the index record; 0 when absent
    index_before: bytes | None  # observed value of the index record
    index_after: bytes | None  # value it must have afterwards; None: no record
    owned_before: frozenset[str] = frozenset()
    owned_after: frozenset[str] = frozenset()
    writes: tuple[Item, ...] = ()
    deletes: tuple[Item, ...] = ()
    conflict: str | None = None  # why nothing may be written; ends with NOTHING_WRITTEN
    put_keys: tuple[str, ...] = ()  # data keys written
    deleted_keys: tuple[str, ...] = ()  # data keys deleted (prune, deletion)
    released_keys: tuple[str, ...] = ()  # claims dropped while the data stays
    claimed_keys: tuple[str, ...] = ()  # claims created (new or adopted keys)
    # (claim key, full key) of every claim this plan creates: the chunker grows
    # the index together with each, never ahead of it.
    new_claims: tuple[tuple[str, str], ...] = ()

    @property
    def noop(self) -> bool:
        """Nothing to write: the store already matches (or a conflict forbids writing)."""
        return not self.writes and not self.deletes and self.index_before == self.index_after


def _listed(value: bytes | None) -> tuple[str, ...]:
    """Every key an index record this planner wrote lists (no shape filter needed)."""
    if not value:
        return ()
    body = json.loads(value)
    return tuple(body.get("keys", ()))


def _encode(key: str) -> bytes:
    # surrogateescape round-trips keys that were read from etcd as non-UTF-8.
    return key.encode("utf-8", "surrogateescape")


def _absent(key: str) -> Guard:
    return Guard(key, 0)


def _unchanged(key: str, entry: Entry) -> Guard:
    return Guard(key, entry.revision)


def plan(
    *,
    owner: str,
    layout: Layout,
    desired: Mapping[str, bytes],
    data: Mapping[str, Entry],
    claims: Mapping[str, Entry],
    index: Entry | None,
    prune: bool,
    adopt: bool,
    kind: str,
) -> Plan:
    """Decide the guarded writes for one resource.

    ``data`` and ``claims`` are keyed by full key and must cover every desired
    key and every key the index lists (absent from the map: absent in the store);
    they may hold more (foreign keys under the prefix), which are ignored.
    ``desired`` must already have passed :func:`desired_problem`.

    With ``prune`` false, owned keys that are no longer declared are
    *released*: their claims are removed and the data stays, unowned, as if
    it had never been managed. Keeping them owned instead would let a later
    deletion with ``deletionPolicy: Delete`` remove keys the spec stopped
    mentioning long ago, and let them block other resources forever.
    """
    owner_bytes = owner.encode()
    cluster = owner.rsplit("/", 2)[0]
    index_key = layout.index_key(owner)
    listed = decode_index(index.value if index else None, layout)
    # Claims are the truth; the index only says where to look. A claim naming
    # this owner that the index misses (a damaged index) is still owned.
    owned = frozenset(
        key
        for key in (*listed, *claims)
        if (claim := claims.get(key)) is not None and claim.value == owner_bytes
    )
    # A key the index lists whose claim is gone (deleted out of band) is still
    # this owner's: the index record is written only by this owner, and never
    # lists a key before its claim is committed (see steps()), so a listed key
    # without a claim lost it (or is being released by this owner). Its claim
    # is drift to restore; treating the key as foreign would block the
    # resource on its own keys for good and leave them behind on deletion.
    lost = frozenset(key for key in listed if key not in claims)
    index_revision = index.revision if index else 0
    # A tombstone is no record (nothing to delete, nothing listed) but is guarded.
    index_before = index.value if index and not is_tombstone(index.value) else None

    conflicts: list[str] = []
    for key in sorted(desired):
        claim = claims.get(key)
        if claim is not None and claim.value != owner_bytes:
            conflicts.append(
                f"key {key} is owned by {describe_owner(claim.value, cluster=cluster, kind=kind)}"
            )
        elif claim is None and key in data and not adopt and key not in lost:
            conflicts.append(
                f"key {key} exists and is not managed by Tether; set adopt: true to take it over"
            )
    if conflicts:
        shown = "; ".join(conflicts[:_CONFLICTS_SHOWN])
        more = len(conflicts) - _CONFLICTS_SHOWN
        suffix = f"; and {more} more conflicting keys" if more > 0 else ""
        return Plan(
            index_key=index_key, index_revision=index_revision, index_before=index_before,
            index_after=index_before, owned_before=owned, owned_after=owned,
            conflict=f"{shown}{suffix}. {NOTHING_WRITTEN}",
        )

    writes: list[Item] = []
    put_keys: list[str] = []
    claimed: list[str] = []
    new_claims: list[tuple[str, str]] = []
    for key in sorted(desired):
        value = desired[key]
        claim_key = layout.claim_key(key)
        if key not in owned:
            claimed.append(key)
            new_claims.append((claim_key, key))
            writes.append(Item(Put(claim_key, owner_bytes), _absent(claim_key)))
        current = data.get(key)
        if current is None or current.value != value:
            put_keys.append(key)
            guard = _absent(key) if current is None else _unchanged(key, current)
            writes.append(Item(Put(key, value), guard))

    deletes: list[Item] = []
    deleted: list[str] = []
    released: list[str] = []
    for key in sorted((owned | lost) - desired.keys()):
        current = data.get(key)
        if prune and current is not None:
            deleted.append(key)
            deletes.append(Item(Delete(key), _unchanged(key, current)))
        elif not prune and current is not None and key in owned:
            released.append(key)
        if key in owned:  # a lost claim has nothing left to delete
            claim_key = layout.claim_key(key)
            deletes.append(Item(Delete(claim_key), _unchanged(claim_key, claims[key])))

    return Plan(
        index_key=index_key,
        index_revision=index_revision,
        index_before=index_before,
        index_after=encode_index(desired),
        owned_before=owned,
        owned_after=frozenset(desired),
        writes=tuple(writes),
        deletes=tuple(deletes),
        put_keys=tuple(put_keys),
        deleted_keys=tuple(deleted),
        released_keys=tuple(released),
        claimed_keys=tuple(claimed),
        new_claims=tuple(new_claims),
    )


# --------------------------------------------------------------------------- transactions


@dataclass(frozen=True)
class Step:
    """One transaction of a plan: guarded items, plus the index record's new state.

    ``index`` is the value the step writes to the record; ``delete_index``
    says it deletes the record instead; neither: the record is left alone.
    """

    items: tuple[Item, ...] = ()
    index: bytes | None = None
    delete_index: bool = False

    @property
    def writes_index(self) -> bool:
        return self.index is not None or self.delete_index


@dataclass
class _Packer:
    """Greedy packing of items into transactions within the server's limits."""

    max_ops: int
    max_bytes: int
    index_key_size: int
    steps: list[Step] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    index: bytes | None = None
    delete_index: bool = False
    wrote_index: bool = False  # the open step already carries an index write

    def _size(self) -> int:
        index = len(self.index) if self.index is not None else 0
        return sum(i.size() for i in self.items) + self.index_key_size + _OP_OVERHEAD + index

    def _fits(self, extra_items: int, extra_ops: int, extra_bytes: int) -> bool:
        items = len(self.items) + extra_items
        ops = items + (1 if self.wrote_index else 0) + extra_ops
        compares = items + 1  # every step guards the index record
        if ops > self.max_ops or compares > self.max_ops:
            return False
        empty = not self.items and not self.wrote_index
        # One oversized item still goes out, alone: it was vetted against the store's
        # real request limit by desired_problem().
        return empty or self._size() + extra_bytes <= self.max_bytes

    def add_item(self, item: Item) -> None:
        if not self._fits(1, 0, item.size()):
            self.flush()
        self.items.append(item)

    def add_claim(self, item: Item, index: bytes) -> None:
        """A new claim, with the index grown to list its key in the same transaction."""
        old = len(self.index) if self.index is not None else 0
        if not self._fits(1, 0 if self.wrote_index else 1, item.size() + len(index) - old):
            self.flush()
        self.items.append(item)
        # The step's one index write takes the newest union: every claim of the
        # step commits with it.
        self.index, self.delete_index, self.wrote_index = index, False, True

    def add_index(self, value: bytes | None) -> None:
        size = (len(value) if value is not None else 0) + self.index_key_size + _OP_OVERHEAD
        # Two writes of the record cannot share a transaction (both stores refuse a
        # key twice), and the union must be committed before what it covers.
        if self.wrote_index or not self._fits(0, 1, size):
            self.flush()
        self.index, self.delete_index, self.wrote_index = value, value is None, True

    def flush(self) -> None:
        if self.items or self.wrote_index:
            self.steps.append(Step(tuple(self.items), self.index, self.delete_index))
        self.items, self.index, self.delete_index, self.wrote_index = [], None, False, False


def steps(plan: Plan, *, max_ops: int, max_bytes: int) -> list[Step]:
    """The transactions that carry out ``plan``, in order.

    One transaction when everything fits. Otherwise ordered chunks: claims and
    puts, then deletes, and finally the index shrinks to the new set. The index
    grows in the very transaction that writes a new claim, so that at every
    moment each claim of this owner is listed in the index, and the index never
    lists a key whose claim was not committed (a listed key without a claim
    therefore lost its claim out of band: see plan()).
    """
    if max_ops < 2:
        raise ValueError(f"max_ops must be at least 2 (one operation and the index guard), not {max_ops}")
    if plan.noop or plan.conflict:
        return []
    items = [*plan.writes, *plan.deletes]
    index_key_size = len(_encode(plan.index_key))
    final_changes = plan.index_after != plan.index_before

    single = _Packer(max_ops, max_bytes, index_key_size)
    if final_changes:
        single.add_index(plan.index_after)
    for item in items:
        single.add_item(item)
    single.flush()
    if len(single.steps) <= 1:
        return single.steps

    packer = _Packer(max_ops, max_bytes, index_key_size)
    before = set(_listed(plan.index_before))
    # Owned keys the record failed to list (a damaged record) are listed
    # first, so that the invariant holds from the first chunk on.
    listed = before | plan.owned_before
    current = plan.index_before
    if listed != before:
        current = encode_index(listed)
        packer.add_index(current)
    new_claims = dict(plan.new_claims)
    for item in items:
        full = new_claims.get(item.op.key) if isinstance(item.op, Put) else None
        if full is not None and full not in listed:
            listed.add(full)
            current = encode_index(listed)
            assert current is not None  # it lists at least ``full``
            packer.add_claim(item, current)
        else:
            packer.add_item(item)
    if plan.index_after != current:
        packer.add_index(plan.index_after)
    packer.flush()
    return packer.steps


def index_guard(index_key: str, index_revision: int) -> Guard:
    """The guard every step carries: the index record is as this plan last left it."""
    return Guard(index_key, index_revision)


def index_revision_after(step: Step, index_revision: int, txn_revision: int) -> int:
    """The index record's revision once ``step`` committed at ``txn_revision``.

    Every operation of one transaction carries the transaction's revision, so
    the next step can guard the record without reading it again.
    """
    if step.index is not None:
        return txn_revision
    if step.delete_index:
        return 0
    return index_revision


def summary(keys: Sequence[str], *, limit: int = 3) -> str:
    """A few key names for a message, with a count of the rest."""
    shown = ", ".join(keys[:limit])
    more = len(keys) - limit
    return f"{shown} and {more} more" if more > 0 else shown
