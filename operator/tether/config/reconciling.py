"""The config kinds' reconciler: EtcdConfig and ConsulConfig on one engine.

It plugs into :mod:`tether.reconciling`. ``apply`` resolves the spec (``data``
over ``from`` sources) into ``{full key: value}``, registers what every key
should hold with the shared :class:`~tether.config.expectations.Expectations`
(the store's watcher reads them), reads what the store holds (data keys,
claims, the owner's index record), asks the pure :mod:`tether.config.planner`
what to write and writes only that, in guarded transactions through the
store's adapter. A failed guard means the store moved under us (another
writer, an out-of-band edit, a second replica): read again and plan again, a
bounded number of times. ``release`` is the same loop with nothing desired:
``Delete`` prunes every owned key, ``Orphan`` only drops the claims.

A kind is this class with a store and a flavor (:mod:`tether.api.configs`);
see :mod:`tether.config.etcdconfigs` and :mod:`tether.config.consulconfigs`.

Values may be Secret data: only key names, counts and sizes ever reach a
message, event, log line, metric or status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from tether import conditions, errors, metrics, reconciling
from tether.api import InvalidSpec, ObjectRef
from tether.api import configs as api
from tether.api.policies import Claims
from tether.clients.kube.client import KubeError
from tether.config import planner, sources
from tether.config.expectations import Expectations, digest
from tether.config.values import Committed, Entry
from tether.reconciling import Note, Outcome, Resource

log = logging.getLogger(__name__)

# Read-plan-write rounds in one reconcile. A round ends early only when a
# transaction's guards fail (at most _STALE_ROUNDS times, the skeleton's bound
# for every kind: then the resource is retried with backoff) or the server
# refuses a transaction as too large (each time the chunks halve, so this ends
# long before the bound).
_MAX_ROUNDS = 16
_STALE_ROUNDS = reconciling.STALE_ATTEMPTS

# Smallest byte budget the chunker may shrink to after the server says
# "request too large"; below it the server is misconfigured for Tether.
_MIN_TXN_BYTES = 16 * 1024

# Releases that find a late write land while they fence it (each such round
# prunes what landed); more means the store keeps changing: retried with backoff.
_FENCE_ROUNDS = 3

# Keys read in parallel when an index lists keys outside the current prefix
# (after a prefix move): enough to be quick, few enough not to flood the store.
_READ_CONCURRENCY = 16


class Store(Protocol):
    """A key-value store with guarded transactions, as the engine sees it."""

    #: Limits of one transaction; lowered by the engine when the server refuses.
    limits: planner.Limits
    #: Deleting an index record leaves :data:`~tether.config.planner.TOMBSTONE`,
    #: which the store removes after a while by itself (etcd: a lease; Consul KV:
    #: its sweeper); a release then leaves one too.
    tombstones: bool

    async def read(self, key: str) -> Entry | None: ...

    async def read_tree(self, directory: str) -> list[Entry]:
        """Every key starting with ``directory`` (which ends in ``/``)."""
        ...

    async def commit(self, step: planner.Step, *, index_key: str, index_revision: int) -> Committed:
        """Run one step as one transaction, every item and the index record guarded.

        Raises :class:`~tether.errors.TooManyOperations` or
        :class:`~tether.errors.RequestTooLarge` when the server refuses its size.
        """
        ...


class _Stale(errors.Contended):
    """A transaction's guards failed too often: the store kept changing under Tether."""


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


@dataclass
class _Observed:
    data: dict[str, Entry] = field(default_factory=dict)
    claims: dict[str, Entry] = field(default_factory=dict)
    index: Entry | None = None


@dataclass
class _Converged:
    """What a converge loop ended with: the final plan and the writes made."""

    plan: planner.Plan
    revisions: list[int] = field(default_factory=list)
    put_keys: list[str] = field(default_factory=list)
    deleted_keys: list[str] = field(default_factory=list)
    released_keys: list[str] = field(default_factory=list)
    claimed_keys: list[str] = field(default_factory=list)
    # When nothing had to be written: the newest revision among what this
    # resource owns (data, claims, index), i.e. Tether's last write for it —
    # right even when the status patch after that write was lost.
    in_place_revision: int = 0


class ConfigReconciler:
    """One config kind (a flavor and a store) for the shared reconcile skeleton."""

    def __init__(
        self, flavor: api.Flavor, store: Store, kube: sources.Sources, *, cluster: str,
        layout: planner.Layout, expectations: Expectations, source_index: sources.SourceIndex,
    ) -> None:
        if store.limits.max_ops < 2:
            raise ValueError(
                f"{flavor.store}: at least 2 operations per transaction are needed "
                "(an operation and the guard on the ownership index)"
            )
        self.flavor = flavor
        self.kind = flavor.kind
        self.plural = flavor.plural
        self.store = store
        self.kube = kube
        self.cluster = cluster
        self.layout = layout
        self.expectations = expectations
        self.sources = source_index
        # The expectations of each resource's last successful converge in this
        # process: proof that it owned every one of those keys at that moment.
        self._confirmed: dict[ObjectRef, Mapping[str, bytes | None]] = {}

    def owner(self, ref: ObjectRef) -> str:
        return planner.owner_id(self.cluster, ref.namespace, ref.name)

    # -- the reconcile ----------------------------------------------------------

    def _parse(self, spec: Mapping[str, object]) -> api.ConfigSpec:
        parsed = api.parse(spec, self.flavor)
        problem = planner.prefix_problem(parsed.prefix, self.layout)
        if problem:
            raise InvalidSpec(problem)
        return parsed

    async def apply(self, res: Resource) -> Outcome:
        ref = res.ref
        self.expectations.seen(ref)
        confirmed = self._confirmed.pop(ref, None)
        try:
            spec = self._parse(res.spec)
            # Before resolving: a source that is missing now must wake this
            # resource when it appears.
            self.sources.set(ref, [(s.kind, ref.namespace, s.name) for s in spec.sources])
            desired = await sources.resolve(self.kube, ref.namespace, spec, store=self.flavor.store)
            problem = planner.desired_problem(desired, self.layout, self.store.limits, kind=self.kind)
            if problem:
                raise InvalidSpec(problem)
        except (InvalidSpec, KubeError) as exc:
            if isinstance(exc, InvalidSpec):
                self.expectations.untrack(ref)
            return Outcome.from_error(exc, doing=f"read the sources of {self.kind} {ref.name}")

        owner = self.owner(ref)
        expected = self._expectations(owner, desired)
        # Same desired state as last time and the status says it was in
        # place: anything written now repairs drift (not a spec or source change).
        drift = res.reconciled() and self.expectations.expected(ref) == expected
        self.expectations.track(ref, expected)
        # The same keys converged last time, so each of them was this
        # resource's: a claim deleted out of band since is taken back, not a
        # conflict. (Another owner's claim still is one: adopt never overrides it.)
        reclaim = confirmed == expected
        try:
            done = await self._converge(
                owner, planner.directory(spec.prefix), desired, prune=spec.prune, adopt=spec.adopt or reclaim
            )
        except errors.BackendError as exc:
            return Outcome.from_error(exc, doing=f"write to {self.flavor.store}")
        plan = done.plan
        if plan.conflict:
            self.expectations.untrack(ref)
            return Outcome.failed(
                conditions.CONFLICT, _conflict_message(plan.conflict, done),
                fields={"keys": len(plan.owned_before)},
            )

        self._confirmed[ref] = expected
        fields: dict[str, int] = {"keys": len(desired)}
        revision = max(done.revisions, default=0) or done.in_place_revision or self._stored(res, plan)
        if revision:
            fields[self.flavor.revision_field] = revision
        notes = []
        if done.revisions:
            if drift:
                notes.append(reconciling.drift_repaired(self.kind, _drift_message(done)))
            else:
                notes.append(Note("Normal", "Written", _written_message(done)))
        return Outcome(
            "True", conditions.RECONCILED,
            f"{_plural(len(desired), 'key')} under {spec.prefix} in {self.flavor.store}",
            fields=fields, notes=tuple(notes),
        )

    async def release(self, res: Resource) -> Outcome:
        ref = res.ref
        # Tether's own deletions must not look like drift.
        self.expectations.untrack(ref)
        self._confirmed.pop(ref, None)
        directory: str | None = None
        with contextlib.suppress(InvalidSpec):
            directory = planner.directory(self._parse(res.spec).prefix)
        delete = res.deletion_policy == "Delete"
        try:
            # The index lists every owned key wherever it lives; the prefix,
            # when the spec still parses, also finds claims a damaged index lost.
            done = await self._release_fenced(self.owner(ref), directory, prune=delete)
        except errors.BackendError as exc:
            return Outcome.release_failed(exc, doing=f"clean up {self.flavor.store}")
        self.sources.forget(ref)
        self.expectations.forget(ref)
        if delete:
            message = f"deleted {_plural(len(done.deleted_keys), 'key')} from {self.flavor.store}"
            note = Note("Normal", "Deleted", message)
        else:
            message = (
                f"released {_plural(len(done.released_keys), 'key')} in {self.flavor.store} "
                "(deletionPolicy Orphan: they stay, no longer owned)"
            )
            note = Note("Normal", "Orphaned", message)
        return Outcome.release_done(message, backend=self.flavor.store, note=note if done.revisions else None)

    async def _release_fenced(self, owner: str, directory: str | None, *, prune: bool) -> _Converged:
        """Remove (or release) everything ``owner`` has, and leave a tombstone on its index record.

        A transaction of this owner sent earlier may still be on its way (its
        sender timed out, or was killed, and etcd applies it later): if it
        was planned while the record was absent, it is guarded by that
        absence. Pruning ends with a tombstone in the record's place (the
        store writes it instead of deleting); when there was no record to
        delete, the tombstone is put here, guarded by the absence the release
        observed. A late write that landed first fails that guard: the
        release reads again and prunes it. Once the tombstone is in, a late
        write can only fail its own guard.
        """
        done = await self._converge(owner, directory, {}, prune=prune, adopt=False)
        if not self.store.tombstones:
            return done
        for _ in range(_FENCE_ROUNDS):
            if done.plan.index_revision != 0:
                # The record (or a tombstone) was there and the converge replaced
                # it by a tombstone, or it was a tombstone already.
                return done
            fence = planner.Step(delete_index=True)
            result = await self.store.commit(fence, index_key=done.plan.index_key, index_revision=0)
            if result.succeeded:
                metrics.WRITES.labels(system=_system(self.flavor)).inc()
                return done
            log.info(
                "%s: a write for %s landed while releasing it; releasing again", self.flavor.store, owner
            )
            again = await self._converge(owner, directory, {}, prune=prune, adopt=False)
            again.revisions[:0] = done.revisions
            again.deleted_keys[:0] = done.deleted_keys
            again.released_keys[:0] = done.released_keys
            done = again
        raise _Stale(f"{self.flavor.store} kept changing while releasing {owner} ({_FENCE_ROUNDS} attempts)")

    def forget(self, ref: ObjectRef) -> None:
        self.expectations.forget(ref)
        self.sources.forget(ref)
        self._confirmed.pop(ref, None)

    # -- TetherPolicy (the skeleton checks claims before apply) -----------------

    def claims(self, res: Resource) -> Claims | None:
        """The prefix and whether the resource adopts (None: the spec does not parse)."""
        try:
            spec = self._parse(res.spec)
        except InvalidSpec:
            return None
        return Claims("etcd" if self.flavor.rooted else "consulkv", spec.prefix, spec.adopt)

    async def withdraw(self, res: Resource, message: str) -> Outcome:
        """Forbidden: nothing is written and nothing deleted — a policy change never
        deletes config. The keys stay owned; drift is no longer watched for or
        repaired until the resource is allowed again (then apply restores them)."""
        self.expectations.untrack(res.ref)
        self._confirmed.pop(res.ref, None)
        return Outcome.failed(
            conditions.FORBIDDEN,
            f"{message}; nothing is written to {self.flavor.store}: its keys stay as they are, "
            "still owned, and are not repaired",
            retry=False,
        )
    async def collect(self, ref: ObjectRef) -> None:
        """Nothing to do: the store watchers compare keys with what cached resources
        expect and never report owners the cache does not hold."""

    def _stored(self, res: Resource, plan: planner.Plan) -> int:
        """The revision to report when nothing was written this time."""
        stored = res.status.get(self.flavor.revision_field)
        if isinstance(stored, int) and stored > 0:
            return stored
        # Status lost (or never written): the index record is Tether's own write
        # for this resource.
        return plan.index_revision

    # -- talking to the store ----------------------------------------------------

    async def _converge(
        self, owner: str, directory: str | None, desired: Mapping[str, bytes], *, prune: bool, adopt: bool
    ) -> _Converged:
        """Read, plan and write until the store holds ``desired`` or a conflict forbids it."""
        stale = 0
        done = _Converged(planner.Plan("", 0, None, None))
        for _ in range(_MAX_ROUNDS):
            observed = await self._observe(owner, directory)
            plan = planner.plan(
                owner=owner, layout=self.layout, desired=desired, data=observed.data,
                claims=observed.claims, index=observed.index, prune=prune, adopt=adopt, kind=self.kind,
            )
            done.plan = plan
            if plan.conflict or plan.noop:
                owned = plan.owned_after
                done.in_place_revision = max(
                    [e.revision for key, e in observed.data.items() if key in owned]
                    + [e.revision for key, e in observed.claims.items() if key in owned]
                    + ([observed.index.revision] if observed.index is not None else []),
                    default=0,
                )
                return done
            try:
                await self._execute(plan, done.revisions)
            except _Stale:
                stale += 1
                if stale >= _STALE_ROUNDS:
                    raise _Stale(
                        f"{self.flavor.store} kept changing under Tether ({_STALE_ROUNDS} attempts "
                        "failed their guards)"
                    ) from None
                continue
            except (errors.TooManyOperations, errors.RequestTooLarge):
                continue  # _execute lowered the limits: chunk smaller and go again
            done.put_keys.extend(plan.put_keys)
            done.deleted_keys.extend(plan.deleted_keys)
            done.released_keys.extend(plan.released_keys)
            done.claimed_keys.extend(plan.claimed_keys)
            return done
        raise _Stale(f"{self.flavor.store} did not settle within {_MAX_ROUNDS} rounds")

    async def _execute(self, plan: planner.Plan, revisions: list[int]) -> None:
        """Run the plan's transactions in order, each guarded by the previous one's result."""
        limits = self.store.limits
        index_revision = plan.index_revision
        for step in planner.steps(plan, max_ops=limits.max_ops, max_bytes=limits.max_txn_bytes):
            try:
                result = await self.store.commit(
                    step, index_key=plan.index_key, index_revision=index_revision
                )
            except errors.TooManyOperations as exc:
                sent = len(step.items) + 1
                if sent <= 2:
                    raise errors.BackendRejected(f"{exc}; Tether needs at least 2 per transaction") from exc
                # The server allows fewer operations than configured: remember
                # half of what it refused (not half of a shared limit that
                # another worker may have lowered already).
                self.store.limits = _lowered(self.store.limits, ops=sent // 2)
                log.warning(
                    "%s refused a transaction of %d operations; using at most %d from now on",
                    self.flavor.store, sent, self.store.limits.max_ops,
                )
                raise
            except errors.RequestTooLarge as exc:
                size = sum(item.size() for item in step.items)
                if len(step.items) <= 1 or size // 2 < _MIN_TXN_BYTES:
                    keys = ", ".join(i.op.key for i in step.items) or plan.index_key
                    raise errors.BackendRejected(f"{exc} (writing {keys})") from exc
                self.store.limits = _lowered(self.store.limits, size=size // 2)
                log.warning(
                    "%s refused a transaction of about %d bytes; using at most %d from now on",
                    self.flavor.store, size, self.store.limits.max_txn_bytes,
                )
                raise
            if not result.succeeded:
                raise _Stale("a transaction's guards failed")
            metrics.WRITES.labels(system=_system(self.flavor)).inc()
            # 0 when the store did not say (a Consul transaction of deletes only).
            revisions.append(result.revision)
            index_revision = planner.index_revision_after(step, index_revision, result.revision)

    async def _observe(self, owner: str, directory: str | None) -> _Observed:
        """What the store holds for one resource: data, claims and its index record.

        Covers every key under ``directory`` and every key the index lists;
        the reads need not be one snapshot, because every write is guarded by
        exactly what it was planned from.
        """
        observed = _Observed()
        observed.index = await self.store.read(self.layout.index_key(owner))
        if directory is not None:
            observed.data = {e.key: e for e in await self.store.read_tree(directory)}
            for e in await self.store.read_tree(self.layout.claim_key(directory)):
                full = self.layout.full_key_of_claim(e.key)
                if full is not None:
                    observed.claims[full] = e
        listed = planner.decode_index(observed.index.value if observed.index else None, self.layout)
        outside = [k for k in listed if directory is None or not k.startswith(directory)]
        for start in range(0, len(outside), _READ_CONCURRENCY):
            batch = outside[start:start + _READ_CONCURRENCY]
            found = await asyncio.gather(
                *(self.store.read(k) for k in batch),
                *(self.store.read(self.layout.claim_key(k)) for k in batch),
            )
            for key, data, claim in zip(batch, found[:len(batch)], found[len(batch):], strict=True):
                if data is not None:
                    observed.data[key] = data
                if claim is not None:
                    observed.claims[key] = claim
        return observed

    def _expectations(self, owner: str, desired: Mapping[str, bytes]) -> dict[str, bytes | None]:
        """Digest of what each managed key should hold once ``desired`` is in place."""
        owner_digest = digest(owner.encode())
        expected: dict[str, bytes | None] = {}
        for key, value in desired.items():
            expected[key] = digest(value)
            expected[self.layout.claim_key(key)] = owner_digest
        index = planner.encode_index(desired)
        expected[self.layout.index_key(owner)] = None if index is None else digest(index)
        return expected


def _system(flavor: api.Flavor) -> str:
    """The ``system`` label of the writes metric."""
    return "etcd" if flavor.rooted else "consul"


def _lowered(limits: planner.Limits, *, ops: int | None = None, size: int | None = None) -> planner.Limits:
    return planner.Limits(
        store=limits.store,
        max_ops=max(2, min(limits.max_ops, ops)) if ops is not None else limits.max_ops,
        max_txn_bytes=min(limits.max_txn_bytes, size) if size is not None else limits.max_txn_bytes,
        max_value_bytes=limits.max_value_bytes,
    )


def _conflict_message(conflict: str, done: _Converged) -> str:
    """The conflict, and honestly whether this reconcile wrote anything before meeting it.

    A multi-chunk write can commit its first chunks and then find, on the
    next read, that a concurrent writer took a key: those chunks stay (every
    written key is owned and listed), so "nothing was written" would be false.
    """
    if not done.revisions:
        return conflict
    txns = len(done.revisions)
    wrote = (
        f"Part of this update was already written ({_plural(txns, 'transaction')}, every key in it "
        "owned by this resource) before the conflict appeared; the rest waits until it is resolved."
    )
    return conflict.removesuffix(planner.NOTHING_WRITTEN).rstrip() + " " + wrote


def _written_message(done: _Converged) -> str:
    parts = [f"wrote {_plural(len(done.put_keys), 'key')}", f"deleted {len(done.deleted_keys)}"]
    if done.released_keys:
        parts.append(f"released {len(done.released_keys)} (prune: false)")
    if done.claimed_keys and not done.put_keys:
        parts.append(f"took ownership of {_plural(len(done.claimed_keys), 'key')}")
    txns = len(done.revisions)
    parts.append("in one transaction" if txns == 1 else f"in {txns} ordered transactions")
    return ", ".join(parts)


def _drift_message(done: _Converged) -> str:
    changed = sorted({*done.put_keys, *done.deleted_keys})
    if changed:
        return (
            f"restored {_plural(len(changed), 'key')} changed or deleted outside Kubernetes: "
            f"{planner.summary(changed)}"
        )
    claims = sorted(done.claimed_keys)
    if claims:
        return f"restored ownership records of {planner.summary(claims)}"
    return "restored Tether's ownership index for this resource"
