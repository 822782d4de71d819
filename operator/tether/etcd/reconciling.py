"""EtcdConfig reconciler and the one etcd watch that finds drift.

The reconciler plugs into :mod:`tether.reconciling`. ``apply`` resolves the
spec (``data`` over ``from`` sources) into ``{full key: value}``, reads what
etcd holds for it (data keys, claims, the owner's index record), asks the
pure :mod:`tether.etcd.planner` what to write and writes only that, in
compare-guarded transactions. A failed compare means etcd moved under us
(another writer, an out-of-band edit, a second replica): read again and plan
again, a bounded number of times. ``release`` is the same loop with nothing
desired: ``Delete`` prunes every owned key, ``Orphan`` only drops the claims.

The watcher holds a single watch over the whole keyspace, however many
resources exist. Each reconcile registers, *before* it reads etcd, a digest of
the value every key it manages should hold; an event whose value differs (or
a delete) enqueues the owning resource. Registering before reading closes the
race in which an edit lands between the read and the registration. Tether's
own writes carry the registered values, so they wake nobody, and with nothing
changing the watch is silent: idle means no reads beyond etcd's progress
notifications, and no writes at all.

Values may be Secret data: only key names, counts and sizes ever reach a
message, event, log line, metric or status; the watcher keeps hashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from tether import conditions, metrics
from tether.api import InvalidSpec, ObjectRef
from tether.api import etcdconfigs as api
from tether.etcd import planner
from tether.etcd.client import (
    Compacted,
    Compare,
    EtcdError,
    EtcdRejected,
    EtcdUnavailable,
    KeyValue,
    RequestTooLarge,
    TooManyOps,
    TxnResult,
    WatchEvent,
)
from tether.kube import KubeError
from tether.reconciling import Note, Outcome, Resource

log = logging.getLogger(__name__)

SourceKind = Literal["configMap", "secret"]

# Read-plan-write rounds in one reconcile. A round ends early only when a
# transaction's compares fail (at most _STALE_ROUNDS times: then the resource
# is retried with backoff) or the server refuses a transaction as too large
# (each time the chunks halve, so this ends long before the bound).
_MAX_ROUNDS = 16
_STALE_ROUNDS = 3

# Smallest byte budget the chunker is allowed to shrink to after the server
# says "request too large"; below it the server is misconfigured for Tether.
_MIN_TXN_BYTES = 16 * 1024

# Keys read in parallel when an index lists keys outside the current prefix
# (after a prefix move): enough to be quick, few enough not to flood etcd.
_READ_CONCURRENCY = 16

# Drift repairs must land within 10 s of an edit, so reconnecting after an
# outage waits at most this long.
_WATCH_BACKOFF_CAP = 3.0


class Etcd(Protocol):
    """The parts of :class:`tether.etcd.client.EtcdClient` this module uses."""

    async def get_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]: ...

    async def get(self, key: bytes) -> KeyValue | None: ...

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[planner.TxnOp],
        failure: Sequence[planner.TxnOp] = (),
    ) -> TxnResult: ...

    def watch_prefix(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]: ...

    async def status(self) -> int: ...


class Sources(Protocol):
    """Where ``spec.from`` is read: :class:`tether.kube.KubeClient`."""

    async def read_config_map(self, namespace: str, name: str) -> dict[str, bytes] | None: ...

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None: ...


class _Stale(Exception):
    """A transaction's compares failed: etcd changed since it was read."""


def _digest(value: bytes) -> bytes:
    # A keyed structure of hashes, not values, is what the watcher may hold.
    return hashlib.blake2b(value, digest_size=16).digest()


def _key(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _text(key: bytes) -> str:
    # etcd keys are bytes; a foreign key need not be UTF-8, and must still
    # round-trip exactly when it is guarded or deleted.
    return key.decode("utf-8", "surrogateescape")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _source_label(kind: SourceKind) -> str:
    return "ConfigMap" if kind == "configMap" else "Secret"


@dataclass
class _Observed:
    data: dict[str, KeyValue] = field(default_factory=dict)
    claims: dict[str, KeyValue] = field(default_factory=dict)
    index: KeyValue | None = None


@dataclass
class _Converged:
    """What a converge loop ended with: the final plan and the writes made."""

    plan: planner.Plan
    revisions: list[int]
    put_keys: list[str]
    deleted_keys: list[str]
    released_keys: list[str]
    claimed_keys: list[str]
    # When nothing had to be written: the newest mod_revision among what this
    # resource owns in etcd (data, claims, index), i.e. Tether's last write for
    # it — right even when the status patch after that write was lost.
    in_place_revision: int = 0


class EtcdConfigs:
    """The EtcdConfig kind for the shared reconcile skeleton."""

    kind = api.KIND
    plural = api.PLURAL

    def __init__(
        self, client: Etcd, kube: Sources, *, cluster: str, ownership_prefix: str,
        max_txn_ops: int = planner.DEFAULT_MAX_TXN_OPS,
    ) -> None:
        if max_txn_ops < 2:
            raise ValueError(
                f"TETHER_ETCD_MAX_TXN_OPS={max_txn_ops}: at least 2 are needed "
                "(an operation and the guard on the ownership index)"
            )
        self.client = client
        self.kube = kube
        self.cluster = cluster
        self.layout = planner.Layout(ownership_prefix)
        self.max_txn_ops = max_txn_ops
        # Lowered when the server proves to allow less (a smaller --max-txn-ops
        # or --max-request-bytes); a property of the server, so shared.
        self._txn_ops = max_txn_ops
        self._txn_bytes = planner.MAX_TXN_BYTES
        # etcd key → (resource, digest of the value it should hold; None:
        # should be absent). Usually one resource per key; two while both
        # declare a key and one of them is about to find itself in conflict.
        self._expect: dict[bytes, tuple[tuple[ObjectRef, bytes | None], ...]] = {}
        self._tracked: dict[ObjectRef, dict[bytes, bytes | None]] = {}
        self._known: set[ObjectRef] = set()
        self._sources: dict[ObjectRef, frozenset[tuple[SourceKind, str, str]]] = {}
        self._dependents: dict[tuple[SourceKind, str, str], set[ObjectRef]] = {}

    # -- the reconcile ----------------------------------------------------------

    def owner(self, ref: ObjectRef) -> str:
        return planner.owner_id(self.cluster, ref.namespace, ref.name)

    async def apply(self, res: Resource) -> Outcome:
        ref = res.ref
        self._known.add(ref)
        try:
            spec = api.parse(res.spec)
            problem = planner.prefix_problem(spec.prefix, self.layout)
            if problem:
                raise InvalidSpec(problem)
        except InvalidSpec as exc:
            self._set_sources(ref, ())
            self._untrack(ref)
            return _invalid(str(exc))
        # Before resolving: a source that is missing now must wake this
        # resource when it appears.
        self._set_sources(ref, [(s.kind, ref.namespace, s.name) for s in spec.sources])
        try:
            desired = await self._resolve(ref.namespace, spec)
            problem = planner.desired_problem(desired, self.layout)
            if problem:
                raise InvalidSpec(problem)
        except InvalidSpec as exc:
            self._untrack(ref)
            return _invalid(str(exc))
        except KubeError as exc:
            # 401/403: the API server answered "no" (RBAC): a person must act, but
            # a fixed Role takes effect without a restart, so keep retrying.
            reason = (
                conditions.BACKEND_REJECTED if exc.status in (401, 403) else conditions.BACKEND_UNAVAILABLE
            )
            return Outcome.failed(
                reason, f"{exc}; retrying",
                notes=(Note("Warning", reason, str(exc)),), retry=True,
            )

        owner = self.owner(ref)
        expected = self._expectations(owner, desired)
        # Same desired state as last time and the status says it was in
        # place: anything written now repairs drift (not a spec or source change).
        drift = res.reconciled() and self._tracked.get(ref) == expected
        self._track(ref, expected)
        try:
            done = await self._converge(
                owner, planner.directory(spec.prefix), desired, prune=spec.prune, adopt=spec.adopt
            )
        except (EtcdError, _Stale) as exc:
            return _backend_failure(exc, doing="write to etcd")
        metrics.BACKEND_UP.labels(backend="etcd").set(1)
        plan = done.plan
        if plan.conflict:
            self._untrack(ref)
            return Outcome.failed(
                conditions.CONFLICT, plan.conflict, fields={"keys": len(plan.owned_before)},
                notes=(Note("Warning", conditions.CONFLICT, plan.conflict),),
            )

        fields: dict[str, int] = {"keys": len(desired)}
        revision = (
            done.revisions[-1] if done.revisions else done.in_place_revision or _stored_revision(res, plan)
        )
        if revision:
            fields["revision"] = revision
        notes = []
        if done.revisions:
            if drift:
                metrics.DRIFT_REPAIRS.labels(kind=self.kind).inc()
                notes.append(Note("Warning", "DriftRepaired", _drift_message(done)))
            else:
                notes.append(Note("Normal", "Written", _written_message(done)))
        return Outcome(
            "True", conditions.RECONCILED,
            f"{_plural(len(desired), 'key')} under {spec.prefix} in etcd",
            fields=fields, notes=tuple(notes),
        )

    async def release(self, res: Resource) -> Outcome:
        ref = res.ref
        # Tether's own deletions must not look like drift.
        self._untrack(ref)
        policy = res.spec.get("deletionPolicy", "Delete")
        directory: str | None = None
        with contextlib.suppress(InvalidSpec):
            spec = api.parse(res.spec)
            policy = spec.deletion_policy
            if planner.prefix_problem(spec.prefix, self.layout) is None:
                directory = planner.directory(spec.prefix)
        delete = policy != "Orphan"
        try:
            # The index lists every owned key wherever it lives; the prefix,
            # when the spec still parses, also finds claims a damaged index lost.
            done = await self._converge(self.owner(ref), directory, {}, prune=delete, adopt=False)
        except (EtcdError, _Stale) as exc:
            failed = _backend_failure(exc, doing="clean up etcd")
            return Outcome.failed(
                failed.reason, f"{failed.message}; the finalizer stays until it can",
                notes=failed.notes, retry=True,
            )
        self._set_sources(ref, ())
        self._known.discard(ref)
        if delete:
            message = f"deleted {_plural(len(done.deleted_keys), 'key')} from etcd"
            notes = (Note("Normal", "Deleted", message),) if done.revisions else ()
        else:
            message = (
                f"released {_plural(len(done.released_keys), 'key')} in etcd "
                "(deletionPolicy Orphan: they stay, no longer owned)"
            )
            notes = (Note("Normal", "Orphaned", message),) if done.revisions else ()
        return Outcome("False", conditions.DELETING, message, released=True, notes=notes)

    def forget(self, ref: ObjectRef) -> None:
        self._untrack(ref)
        self._set_sources(ref, ())
        self._known.discard(ref)

    # -- reading the spec's sources -------------------------------------------

    async def _resolve(self, namespace: str, spec: api.EtcdConfigSpec) -> dict[str, bytes]:
        """``{full key: value}``: sources in order, later ones winning, then ``data``."""
        relative: dict[str, bytes] = {}
        for source in spec.sources:
            what = f"{_source_label(source.kind)} {namespace}/{source.name}"
            if source.kind == "configMap":
                found = await self.kube.read_config_map(namespace, source.name)
            else:
                found = await self.kube.read_secret(namespace, source.name)
            if found is None:
                if source.optional:
                    continue
                # No retry: the ConfigMap/Secret watch wakes this resource
                # through dependents() when the object appears.
                raise InvalidSpec(f"{what} not found (set optional: true to ignore it)")
            for key in sorted(found):
                problem = api.key_problem(key)
                if problem:
                    raise InvalidSpec(f"{what}: key {key!r} {problem}, so it cannot be an etcd key")
            relative.update(found)
        for key, value in spec.data:
            relative[key] = value.encode()
        return {spec.full_key(key): value for key, value in relative.items()}

    def dependents(self, kind: SourceKind, namespace: str, name: str) -> list[ObjectRef]:
        """Resources whose ``spec.from`` names this ConfigMap or Secret."""
        return sorted(self._dependents.get((kind, namespace, name), ()))

    def _set_sources(self, ref: ObjectRef, sources: Iterable[tuple[SourceKind, str, str]]) -> None:
        new = frozenset(sources)
        old = self._sources.pop(ref, frozenset())
        for source in old - new:
            refs = self._dependents.get(source)
            if refs is not None:
                refs.discard(ref)
                if not refs:
                    del self._dependents[source]
        for source in new - old:
            self._dependents.setdefault(source, set()).add(ref)
        if new:
            self._sources[ref] = new

    # -- talking to etcd -------------------------------------------------------

    async def _converge(
        self, owner: str, directory: str | None, desired: Mapping[str, bytes], *, prune: bool, adopt: bool
    ) -> _Converged:
        """Read, plan and write until etcd holds ``desired`` or a conflict forbids it."""
        stale = 0
        done = _Converged(planner.Plan("", 0, None, None), [], [], [], [], [])
        for _ in range(_MAX_ROUNDS):
            observed = await self._observe(owner, directory)
            plan = planner.plan(
                owner=owner, layout=self.layout, desired=desired, data=observed.data,
                claims=observed.claims, index=observed.index, prune=prune, adopt=adopt,
            )
            done.plan = plan
            if plan.conflict or plan.noop:
                owned = plan.owned_after
                done.in_place_revision = max(
                    [kv.mod_revision for key, kv in observed.data.items() if key in owned]
                    + [kv.mod_revision for key, kv in observed.claims.items() if key in owned]
                    + ([observed.index.mod_revision] if observed.index is not None else []),
                    default=0,
                )
                return done
            try:
                await self._execute(plan, done.revisions)
            except _Stale:
                stale += 1
                if stale >= _STALE_ROUNDS:
                    raise
                continue
            except (TooManyOps, RequestTooLarge):
                continue  # _execute lowered the limits: chunk smaller and go again
            done.put_keys.extend(plan.put_keys)
            done.deleted_keys.extend(plan.deleted_keys)
            done.released_keys.extend(plan.released_keys)
            done.claimed_keys.extend(plan.claimed_keys)
            return done
        raise _Stale()

    async def _execute(self, plan: planner.Plan, revisions: list[int]) -> None:
        """Run the plan's transactions in order, each guarded by the previous one's result."""
        index_revision = plan.index_revision
        for step in planner.steps(plan, max_ops=self._txn_ops, max_bytes=self._txn_bytes):
            compares, ops = planner.transaction(
                step, index_key=plan.index_key, index_revision=index_revision
            )
            try:
                result = await self.client.txn(compares, ops)
            except TooManyOps as exc:
                sent = max(len(ops), len(compares))
                if sent <= 2:
                    raise EtcdRejected(f"{exc}; Tether needs at least 2 per transaction") from exc
                # The server allows fewer operations than configured: remember
                # half of what it refused (not half of a shared limit that
                # another worker may have lowered already).
                self._txn_ops = max(2, min(self._txn_ops, sent // 2))
                log.warning(
                    "etcd refused a transaction of %d operations; using at most %d from now on",
                    sent, self._txn_ops,
                )
                raise
            except RequestTooLarge as exc:
                size = sum(item.size() for item in step.items)
                if len(step.items) <= 1 or size // 2 < _MIN_TXN_BYTES:
                    keys = ", ".join(_text(i.op.key) for i in step.items) or plan.index_key
                    raise EtcdRejected(f"{exc} (writing {keys})") from exc
                self._txn_bytes = min(self._txn_bytes, size // 2)
                log.warning(
                    "etcd refused a transaction of about %d bytes; using at most %d from now on",
                    size, self._txn_bytes,
                )
                raise
            if not result.succeeded:
                raise _Stale()
            metrics.WRITES.labels(system="etcd").inc()
            revisions.append(result.revision)
            index_revision = planner.index_revision_after(step, index_revision, result.revision)

    async def _observe(self, owner: str, directory: str | None) -> _Observed:
        """What etcd holds for one resource: data, claims and its index record.

        Covers every key under ``directory`` and every key the index lists;
        the reads need not be one snapshot, because every write is guarded
        by compares on exactly what it was planned from.
        """
        observed = _Observed()
        observed.index = await self.client.get(_key(self.layout.index_key(owner)))
        if directory is not None:
            _, kvs = await self.client.get_prefix(_key(directory))
            observed.data = {_text(kv.key): kv for kv in kvs}
            _, kvs = await self.client.get_prefix(_key(self.layout.claim_key(directory)))
            for kv in kvs:
                full = self.layout.full_key_of_claim(_text(kv.key))
                if full is not None:
                    observed.claims[full] = kv
        listed = planner.decode_index(observed.index.value if observed.index else None)
        outside = [k for k in listed if directory is None or not k.startswith(directory)]
        for start in range(0, len(outside), _READ_CONCURRENCY):
            batch = outside[start:start + _READ_CONCURRENCY]
            found = await asyncio.gather(
                *(self.client.get(_key(k)) for k in batch),
                *(self.client.get(_key(self.layout.claim_key(k))) for k in batch),
            )
            for key, data, claim in zip(batch, found[:len(batch)], found[len(batch):], strict=True):
                if data is not None:
                    observed.data[key] = data
                if claim is not None:
                    observed.claims[key] = claim
        return observed

    # -- drift -------------------------------------------------------------------

    def _expectations(self, owner: str, desired: Mapping[str, bytes]) -> dict[bytes, bytes | None]:
        """Digest of what each managed etcd key should hold once ``desired`` is in place."""
        owner_digest = _digest(owner.encode())
        expected: dict[bytes, bytes | None] = {}
        for key, value in desired.items():
            expected[_key(key)] = _digest(value)
            expected[_key(self.layout.claim_key(key))] = owner_digest
        index = planner.encode_index(desired)
        expected[_key(self.layout.index_key(owner))] = None if index is None else _digest(index)
        return expected

    def _track(self, ref: ObjectRef, expected: dict[bytes, bytes | None]) -> None:
        self._untrack(ref)
        self._tracked[ref] = expected
        for key, digest in expected.items():
            self._expect[key] = (*self._expect.get(key, ()), (ref, digest))

    def _untrack(self, ref: ObjectRef) -> None:
        for key in self._tracked.pop(ref, {}):
            rest = tuple(entry for entry in self._expect.get(key, ()) if entry[0] != ref)
            if rest:
                self._expect[key] = rest
            else:
                self._expect.pop(key, None)

    def drifted(self, events: Iterable[WatchEvent]) -> set[ObjectRef]:
        """Resources owning a key that an event left different from what they want."""
        out: set[ObjectRef] = set()
        for event in events:
            entries = self._expect.get(event.kv.key)
            if not entries:
                continue
            actual = None if event.type == "delete" else _digest(event.kv.value)
            out.update(ref for ref, digest in entries if digest != actual)
        return out

    def known(self) -> list[ObjectRef]:
        """Every resource reconciled and not yet forgotten (to re-check after compaction)."""
        return sorted(self._known)

    def tracked_count(self) -> int:
        return len(self._tracked)


# -- outcomes -----------------------------------------------------------------


def _invalid(message: str) -> Outcome:
    return Outcome.failed(
        conditions.INVALID_SPEC, message, notes=(Note("Warning", conditions.INVALID_SPEC, message),)
    )


def _backend_failure(exc: Exception, *, doing: str) -> Outcome:
    if isinstance(exc, _Stale):
        message = (
            f"cannot {doing}: etcd kept changing under Tether ({_STALE_ROUNDS} attempts "
            "failed their compares); retrying"
        )
        return Outcome.failed(
            conditions.CONFLICT, message, notes=(Note("Warning", conditions.CONFLICT, message),)
        )
    metrics.BACKEND_ERRORS.labels(backend="etcd").inc()
    if isinstance(exc, EtcdUnavailable):
        metrics.BACKEND_UP.labels(backend="etcd").set(0)
        reason = conditions.BACKEND_UNAVAILABLE
    else:
        reason = conditions.BACKEND_REJECTED
    # Permission and size refusals can be fixed on the server: retry, with backoff.
    message = f"cannot {doing}: {exc}"
    return Outcome.failed(reason, message, notes=(Note("Warning", reason, message),), retry=True)


def _stored_revision(res: Resource, plan: planner.Plan) -> int:
    """The revision to report when nothing was written this time."""
    stored = res.status.get("revision")
    if isinstance(stored, int) and stored > 0:
        return stored
    # Status lost (or never written): the index record is Tether's own write
    # for this resource.
    return plan.index_revision


def _written_message(done: _Converged) -> str:
    parts = [f"wrote {_plural(len(done.put_keys), 'key')}", f"deleted {len(done.deleted_keys)}"]
    if done.released_keys:
        parts.append(f"released {len(done.released_keys)} (prune: false)")
    if done.claimed_keys and not done.put_keys:
        parts.append(f"took ownership of {_plural(len(done.claimed_keys), 'key')}")
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


# -- the watcher --------------------------------------------------------------


class EtcdWatcher:
    """One watch over all of etcd; enqueues the resources whose keys drifted."""

    def __init__(
        self, client: Etcd, configs: EtcdConfigs, enqueue: Callable[[ObjectRef], None],
        *, prefix: bytes = b"", backoff_cap: float = _WATCH_BACKOFF_CAP,
    ) -> None:
        self.client = client
        self.configs = configs
        self.enqueue = enqueue
        # b"" is every key: Tether's keys and claims start with "/", but
        # watching everything costs one stream either way.
        self.prefix = prefix
        self.backoff_cap = backoff_cap
        self.revision: int | None = None  # last revision whose events were handled
        self.failures = 0  # consecutive failed attempts to (re)open the watch
        self.resyncs = 0

    async def run(self) -> None:
        # Lives as long as the operator: every pass awaits etcd or sleeps, and
        # cancellation (shutdown) ends it.
        while True:
            try:
                await self._watch()
                # The stream ended without an error (the client closed it):
                # open it again, but never in a hot loop.
                await asyncio.sleep(0.1)
            except Compacted as exc:
                # Events between our revision and the compaction are gone:
                # every resource re-reads etcd instead.
                log.info("etcd watch: %s; re-checking every EtcdConfig", exc)
                self.revision = None
                self._resync()
                continue
            except EtcdError as exc:
                self.failures += 1
                metrics.BACKEND_UP.labels(backend="etcd").set(0)
                if self.failures == 1:
                    log.warning("etcd watch failed: %s; resuming after revision %s", exc, self.revision)
                exponent = min(self.failures, 16)
                delay = min(self.backoff_cap, 0.1 * 2**exponent) * random.uniform(0.5, 1.0)
                await asyncio.sleep(delay)

    async def _watch(self) -> None:
        current = await self.client.status()
        if self.revision is None:
            # First start (the controllers reconcile everything anyway) or
            # after compaction (resynced already): watch from now on.
            self.revision = current
        elif current < self.revision:
            # The store went back in time (restored from a snapshot, or a new
            # cluster): resuming at our revision would wait for the future.
            log.warning(
                "etcd revision went back from %d to %d; re-checking every EtcdConfig",
                self.revision, current,
            )
            self.revision = current
            self._resync()
        stream = self.client.watch_prefix(self.prefix, self.revision + 1)
        try:
            async for revision, events in stream:
                if self.failures:
                    log.info("etcd watch resumed after revision %s", self.revision)
                    self.failures = 0
                    metrics.BACKEND_UP.labels(backend="etcd").set(1)
                if events:
                    for ref in sorted(self.configs.drifted(events)):
                        self.enqueue(ref)
                self.revision = max(self.revision, revision)
        finally:
            if isinstance(stream, AsyncGenerator):
                await stream.aclose()

    def _resync(self) -> None:
        self.resyncs += 1
        for ref in self.configs.known():
            self.enqueue(ref)
