"""The reconcile skeleton both kinds share: cache, queue, finalizer, status, retries.

A kind supplies a :class:`Reconciler` (``apply`` and ``release``: compute the
desired external state with a pure planner, read the actual one, write only
the difference) and this module does the rest, the same way for both:

* every watch event stores the newest object in a cache and enqueues its key;
  drift detectors and ConfigMap/Secret watchers enqueue keys too;
* a worker takes the key, reads the newest object, ensures the finalizer,
  calls ``apply`` (or ``release`` when the object is being deleted), and
  patches ``status`` only if the computed status differs from the stored one;
* ``Conflict`` and ``BackendUnavailable`` outcomes are retried with capped
  exponential backoff and jitter; ``InvalidSpec`` waits for the spec to change;
* a backend's error becomes a condition in one place, :meth:`Outcome.from_error`,
  and a failure is announced with one Warning event when the ``Ready``
  condition turns to it, by the skeleton, not by each kind (a resource stuck
  in the same failure posts nothing more: that would be an idle write);
* what every kind's release and repair say is said here once: the released
  outcome (:meth:`Outcome.release_done`, which also logs a release that found
  nothing), a release that failed (:meth:`Outcome.release_failed`: the
  finalizer stays), drift repaired (:func:`drift_repaired`: a Warning and the
  metric), and ``spec.deletionPolicy`` (:attr:`Resource.deletion_policy`);
* a backend watcher that finds something owned by a resource the cache does
  not hold never removes it itself: it calls :meth:`Controller.enqueue_orphan`,
  and a worker asks the kind to :meth:`~Reconciler.collect` it. The
  reconciler stays the only writer.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from tether import conditions, errors, metrics, tracing
from tether.api import FINALIZER, InvalidSpec, ObjectRef
from tether.api.policies import Claims, Decision
from tether.clients.kube.client import Involved, KubeClient, KubeConflict, KubeError, KubeNotFound
from tether.conditions import Condition, Status
from tether.queueing import Backoff, WorkQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resource:
    """The parts of a custom resource a reconcile reads."""

    ref: ObjectRef
    uid: str
    generation: int
    resource_version: str
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    finalizers: tuple[str, ...]
    deleting: bool

    @classmethod
    def from_body(cls, plural: str, body: Mapping[str, Any]) -> Resource:
        meta = body.get("metadata") or {}
        return cls(
            ref=ObjectRef(plural, meta.get("namespace", ""), meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            generation=int(meta.get("generation") or 0),
            resource_version=str(meta.get("resourceVersion", "")),
            spec=body.get("spec") or {},
            status=body.get("status") or {},
            finalizers=tuple(meta.get("finalizers") or ()),
            deleting=bool(meta.get("deletionTimestamp")),
        )

    @property
    def deletion_policy(self) -> Literal["Delete", "Orphan"]:
        """``spec.deletionPolicy``, read the same way by every kind.

        Read from the raw spec, not the parsed one: a resource whose spec no
        longer parses must still be released as its policy says. Anything but
        ``Orphan`` (the schema allows nothing else) deletes.
        """
        return "Orphan" if self.spec.get("deletionPolicy") == "Orphan" else "Delete"

    def reconciled(self) -> bool:
        """True when the stored status says this generation is already in place."""
        ready = conditions.find(self.status.get("conditions"), conditions.READY)
        return (
            ready is not None
            and ready.get("status") == "True"
            and self.status.get("observedGeneration") == self.generation
        )


@dataclass(frozen=True)
class Note:
    """A Kubernetes event to record on the resource."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Outcome:
    """What one reconcile decided: the Ready condition, status fields, events."""

    ready: Status
    reason: str
    message: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    conditions: tuple[Condition, ...] = ()
    notes: tuple[Note, ...] = ()
    retry: bool = False
    released: bool = False
    #: Where a release looked ("Consul", "etcd"): named in the log line of a
    #: release that found nothing to remove.
    backend: str = ""

    @classmethod
    def failed(
        cls, reason: str, message: str, *, fields: Mapping[str, Any] | None = None,
        conditions: tuple[Condition, ...] = (), retry: bool | None = None,
    ) -> Outcome:
        """Ready=False with ``reason``; retried unless the reason says it is pointless."""
        if retry is None:
            retry = reason != _INVALID_SPEC
        return cls("False", reason, message, fields or {}, conditions=conditions, retry=retry)

    @classmethod
    def from_error(
        cls, exc: Exception, *, doing: str, fields: Mapping[str, Any] | None = None,
        conditions: tuple[Condition, ...] = (),
    ) -> Outcome:
        """The one mapping of an error to the ``Ready`` condition, for every kind.

        It reads only the :mod:`tether.errors` base an error subclasses, never
        a backend's status code: each client chose that base already.
        ``doing`` completes "cannot ...": what the reconcile was trying to do.
        """
        if isinstance(exc, InvalidSpec):
            return cls.failed(_INVALID_SPEC, str(exc), fields=fields, conditions=conditions)
        if isinstance(exc, errors.Contended):
            reason = _CONFLICT
        elif isinstance(exc, errors.BackendUnavailable):
            reason = _UNAVAILABLE
        elif isinstance(exc, errors.BackendRejected):
            reason = _REJECTED
        else:
            raise TypeError(f"not a backend error: {type(exc).__name__}") from exc
        # Every one of these is retried with capped backoff: an outage ends, a
        # fixed ACL policy or Role takes effect without a restart.
        return cls.failed(
            reason, f"cannot {doing}: {exc}; retrying", fields=fields, conditions=conditions, retry=True
        )


    @classmethod
    def release_done(cls, message: str, *, backend: str, note: Note | None) -> Outcome:
        """A finished release: the finalizer may go.

        ``note`` says what was removed or left (Deregistered, Deleted,
        Orphaned); None when nothing of the resource was found in ``backend``.
        That case posts no event but is still logged by the skeleton: a
        silent release hid the orphans an earlier run had left under other
        names.
        """
        return cls(
            "False", conditions.DELETING, message, notes=(note,) if note else (), released=True,
            backend=backend,
        )

    @classmethod
    def release_failed(cls, exc: Exception, *, doing: str) -> Outcome:
        """A release the backend refused or could not take: the finalizer stays, and it is retried."""
        failed = cls.from_error(exc, doing=doing)
        return cls.failed(failed.reason, f"{failed.message}; the finalizer stays until it can")


def drift_repaired(kind: str, message: str) -> Note:
    """The Warning of a repair of something changed outside Kubernetes, counted in the metric."""
    metrics.DRIFT_REPAIRS.labels(kind=kind).inc()
    return Note("Warning", "DriftRepaired", message)


#: Read-plan-write rounds a reconcile runs again at once when a guarded write
#: lost a race (another writer moved what it had read), before it gives up
#: with ``Conflict`` and the skeleton's backoff takes over. Every kind with
#: guarded writes uses this bound.
STALE_ATTEMPTS = 3


_INVALID_SPEC = conditions.INVALID_SPEC
_CONFLICT = conditions.CONFLICT
_UNAVAILABLE = conditions.BACKEND_UNAVAILABLE
_REJECTED = conditions.BACKEND_REJECTED

# Ready reasons announced with a Warning event when the condition turns to them.
_WARNING_REASONS = frozenset({_INVALID_SPEC, _CONFLICT, _UNAVAILABLE, _REJECTED, conditions.FORBIDDEN})


class Reconciler(Protocol):
    """What a kind supplies to the shared skeleton."""

    kind: str
    plural: str

    async def apply(self, res: Resource) -> Outcome: ...

    async def release(self, res: Resource) -> Outcome: ...

    def forget(self, ref: ObjectRef) -> None: ...

    async def collect(self, ref: ObjectRef) -> None:
        """Remove what a resource the cache does not hold left in the backend, if it is gone.

        Called by a worker for a key given to :meth:`Controller.enqueue_orphan`
        when the cache has no object for it. The kind asks Kubernetes first
        (the cache may just not have caught up) and removes nothing of a
        resource that exists and still wants it. Raises a backend error when it
        could not finish; the watcher that found the orphan asks again later.
        """
        ...


# TetherPolicy enforcement, once for every kind. A kind opts in with two more
# methods beside the Reconciler protocol's (see Controller._policed):
#   claims(res) -> Claims | None     what the spec asks for (None: the spec does
#                                    not parse; apply reports InvalidSpec)
#   withdraw(res, message) -> Outcome
#                                    the Forbidden outcome, after taking back
#                                    what must not stay (Consul instances); a
#                                    kind without it writes nothing and keeps all.
class PolicyGate(Protocol):
    """The policy cache the skeleton asks before every apply (:mod:`tether.policing`)."""

    def subscribe(self, plural: str, enqueue: Callable[[ObjectRef], None]) -> None: ...

    async def check(self, ref: ObjectRef, claims: Claims) -> Decision | None: ...

    def forget(self, ref: ObjectRef) -> None: ...


def build_status(
    old: Mapping[str, Any], outcome: Outcome, *, generation: int, timestamp: str
) -> dict[str, Any]:
    """The status an outcome implies; equal to ``old`` when nothing changed."""
    status = {k: v for k, v in old.items() if k not in ("conditions", "observedGeneration")}
    status.update(outcome.fields)
    ready = Condition(conditions.READY, outcome.ready, outcome.reason, outcome.message)
    status["conditions"] = conditions.merge(
        old.get("conditions"),
        (ready, *outcome.conditions),
        generation=generation,
        timestamp=timestamp,
    )
    status["observedGeneration"] = generation
    return status


def _announcement(old: Mapping[str, Any], outcome: Outcome) -> tuple[Note, ...]:
    """A Warning event for a failure, once: when ``Ready`` turns to its reason.

    Only the reason counts: a resource stuck in one failure whose message
    varies between retries (a timeout, then a refused connection) is still
    the same failure, and an event per retry would be an idle write. The
    message in the status shows the latest detail.
    """
    if outcome.ready != "False" or outcome.reason not in _WARNING_REASONS:
        return ()
    before = conditions.find(old.get("conditions"), conditions.READY) or {}
    if (before.get("status"), before.get("reason")) == ("False", outcome.reason):
        return ()
    return (Note("Warning", outcome.reason, outcome.message),)


_KEPT_METADATA = (
    "name", "namespace", "uid", "generation", "resourceVersion", "finalizers", "deletionTimestamp",
)


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the cache keeps of a body: what :meth:`Resource.from_body` reads, nothing more.

    A body as served carries ``managedFields`` and, after a client-side
    ``kubectl apply``, a copy of itself in an annotation: most of its bytes. At
    N = 1000 + 1000 the full bodies were the largest part of the operator's
    memory per resource.
    """
    meta = body.get("metadata") or {}
    out: dict[str, Any] = {"metadata": {k: compact(meta[k]) for k in _KEPT_METADATA if k in meta}}
    for part in ("spec", "status"):
        if part in body:
            out[part] = compact(body[part])
    return out


#: Strings up to this length are interned by :func:`compact`: keys, condition
#: types, reasons and statuses, timestamps, health words. Longer ones (messages)
#: are mostly unique to one resource and kept as they are.
_INTERNED_UP_TO = 48


def compact(value: Any) -> Any:
    """A copy of decoded JSON whose keys and short strings are shared between copies.

    Every watch event is decoded on its own, so each cached body holds its own
    copies of "lastTransitionTime", "observedGeneration", "Ready", "True"...
    Interned, they are stored once per process: the cached body of a
    ConsulService went from 4.1 to 2.0 KiB and of an EtcdConfig from 3.5 to
    1.4 KiB (tracemalloc, bodies as the operator caches them). Interned strings
    are freed with their last reference (CPython's interning is not immortal).
    """
    if isinstance(value, dict):
        return {sys.intern(k) if isinstance(k, str) else k: compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compact(v) for v in value]
    if isinstance(value, str) and len(value) <= _INTERNED_UP_TO:
        return sys.intern(value)
    return value


def _first_success(old: Mapping[str, Any], outcome: Outcome) -> bool:
    """A resource's first reconcile, and it succeeded: the routine creation.

    Its Normal notes ("Registered", "Written") are logged but not posted as
    events: the status (Ready=True, observedGeneration) already says it, and an
    event per created resource was a third Kubernetes write per resource where
    the status patch alone will do. Warnings, later changes (an update, drift
    repaired, a recovery after a failure) and deletions are still events, as
    Kubernetes' own controllers record them.
    """
    return outcome.ready == "True" and conditions.find(old.get("conditions"), conditions.READY) is None


def _fields(ref: ObjectRef) -> dict[str, dict[str, str]]:
    """Structured log fields naming the resource (JSON logs carry them as keys).

    One ``extra`` key: LogRecord refuses extras that shadow its own attributes
    (``name`` among them), and a logging error must never cost a worker.
    """
    return {"tether_ref": {"namespace": ref.namespace, "name": ref.name, "kind": ref.plural}}


def _rv(body: Mapping[str, Any]) -> str:
    """The resourceVersion: an opaque string, compared for equality only, never ordered.

    Ordering them as integers broke after an API server restore: the relisted
    objects carried smaller versions, every event was dropped as "older", the
    cache stayed stale and every finalizer patch met 409 forever.
    """
    return str((body.get("metadata") or {}).get("resourceVersion") or "")


# How long one apply or release may take before it is abandoned and retried: far
# beyond a healthy reconcile (milliseconds) and every client's own request deadline.
RECONCILE_DEADLINE_SECONDS = 30.0


class Controller:
    """Runs one kind's reconciles: a cache, a work queue and a pool of workers."""

    def __init__(
        self, reconciler: Reconciler, kube: KubeClient, *, workers: int = 8,
        backoff: Backoff[ObjectRef] | None = None, deadline: float = RECONCILE_DEADLINE_SECONDS,
    ) -> None:
        self.reconciler = reconciler
        self.deadline = deadline
        self.kube = kube
        self.workers = workers
        self.queue: WorkQueue[ObjectRef] = WorkQueue()
        self.backoff: Backoff[ObjectRef] = backoff or Backoff()
        self.cache: dict[ObjectRef, Mapping[str, Any]] = {}
        self.listeners: list[Callable[[ObjectRef, Mapping[str, Any] | None], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.processed = 0  # reconciles finished (liveness watches it move)
        # Ready reason of every resource not Ready, for the not-ready gauge.
        self._not_ready: dict[ObjectRef, str] = {}
        # resourceVersions our own patches produced, oldest first, whose watch
        # echoes need no reconcile (the watch delivers them in this order)
        self._own_writes: dict[ObjectRef, list[str]] = {}
        self.policies: PolicyGate | None = None
        # Keys a backend watcher found orphans of, not in the cache when asked.
        self._orphans: set[ObjectRef] = set()

    def use_policies(self, gate: PolicyGate) -> None:
        """Check every apply against ``gate``; it enqueues the resources its changes concern."""
        self.policies = gate
        gate.subscribe(self.reconciler.plural, self.enqueue)

    # -- inputs -----------------------------------------------------------
    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Feed one watch event (Kopf's ``on.event``); enqueue the key."""
        res_meta = body.get("metadata") or {}
        ref = ObjectRef(self.reconciler.plural, res_meta.get("namespace", ""), res_meta.get("name", ""))
        if event_type == "DELETED":
            self.cache.pop(ref, None)
            self._own_writes.pop(ref, None)
        else:
            # The echo of our own status/finalizer patch: the cache already holds
            # it (or a later write of ours) and nothing outside changed, so
            # reconciling again would only re-read the backend. Drift is the
            # backend watchers' business. The watch delivers in order, so the
            # echoes of earlier writes of ours are consumed along the way.
            own = self._own_writes.get(ref)
            rv = _rv(body)
            if own and rv in own:
                position = own.index(rv)
                del own[: position + 1]
                if not own:
                    self.cache[ref] = slim(body)
                metrics.MANAGED.labels(kind=self.reconciler.kind).set(len(self.cache))
                return
            # Anything else is taken as the watch says: the watch's order is the
            # only order resourceVersions have. Echoes still expected are
            # forgotten: after a restore they may never come, and a version
            # reused later must not pass for one (an echo that does come costs
            # one reconcile that writes nothing).
            self.cache[ref] = slim(body)
            self._own_writes.pop(ref, None)
        metrics.MANAGED.labels(kind=self.reconciler.kind).set(len(self.cache))
        self.queue.add(ref)

    def enqueue(self, ref: ObjectRef) -> None:
        """Ask for a reconcile of ``ref`` (drift, a dependency changed, …)."""
        if ref in self.cache:
            self.queue.add(ref)

    def enqueue_orphan(self, ref: ObjectRef) -> None:
        """A backend watcher found what ``ref`` owns; reconcile it whether cached or not.

        A cached resource is reconciled as usual (its ``apply`` removes what it
        no longer wants). For one the cache does not hold, the worker calls the
        kind's :meth:`~Reconciler.collect`. Watchers rate-limit their calls.
        """
        if ref not in self.cache:
            self._orphans.add(ref)
        self.queue.add(ref)

    # -- workers ----------------------------------------------------------
    def start(self) -> None:
        for i in range(self.workers):
            self._tasks.append(
                asyncio.create_task(self._worker(), name=f"{self.reconciler.plural}-worker-{i}")
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _worker(self) -> None:
        while True:
            ref = await self.queue.get()
            # One trace per reconcile (when tracing is on): the backend calls
            # below are its child spans; process() adds generation and result.
            try:
                with tracing.span(
                    f"reconcile {ref.plural}", kind=self.reconciler.kind, namespace=ref.namespace,
                    name=ref.name,
                ):
                    try:
                        await self.process(ref)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception(
                            "reconcile of %s failed unexpectedly; will retry", ref, extra=_fields(ref)
                        )
                        tracing.annotate(result="error")
                        self.queue.add_after(ref, self.backoff.next_delay(ref))
            finally:
                self.processed += 1
                self.queue.done(ref)
                metrics.QUEUE_DEPTH.labels(kind=self.reconciler.kind).set(len(self.queue))

    async def process(self, ref: ObjectRef) -> None:
        """Reconcile ``ref`` once against the newest cached object."""
        body = self.cache.get(ref)
        orphan = ref in self._orphans
        self._orphans.discard(ref)
        if body is None:
            tracing.annotate(result="gone")
            if self.policies is not None:
                self.policies.forget(ref)
            self.reconciler.forget(ref)
            self._count_not_ready(ref, None)
            self.backoff.reset(ref)
            self.queue.cancel_delayed(ref)
            if orphan:
                await self._collect(ref)
            return
        res = Resource.from_body(self.reconciler.plural, body)
        tracing.annotate(generation=res.generation)
        started = time.monotonic()
        kind = self.reconciler.kind
        try:
            if res.deleting:
                if FINALIZER not in res.finalizers:
                    tracing.annotate(result="gone")
                    return
                outcome = await self._guarded(self.reconciler.release, res)
                if outcome.released:
                    if not outcome.notes:
                        log.info(
                            "%s released: nothing of this resource was found in %s", ref,
                            outcome.backend or "the backend", extra=_fields(ref),
                        )
                    await self._record(res, outcome.notes)
                    remaining = [f for f in res.finalizers if f != FINALIZER]
                    self._remember(await self.kube.set_finalizers(
                        ref, remaining, resource_version=res.resource_version))
                    self.reconciler.forget(ref)
                    self.backoff.reset(ref)
                    metrics.RECONCILES.labels(kind=kind, result="released").inc()
                    tracing.annotate(result="released")
                    return
            else:
                if FINALIZER not in res.finalizers:
                    body = await self.kube.set_finalizers(
                        ref, [*res.finalizers, FINALIZER], resource_version=res.resource_version
                    )
                    self._remember(body)
                    res = Resource.from_body(self.reconciler.plural, body)
                outcome = await self._policed(res) or await self._guarded(self.reconciler.apply, res)
            await self._finish(res, outcome)
        except KubeNotFound:
            tracing.annotate(result="gone")
            return  # gone; its DELETED event cleans up
        except KubeConflict:
            tracing.annotate(result="KubernetesConflict")
            # Stale cache: the newer object is usually on its way through the
            # watch, but not always (an API server restored from backup): read
            # it afresh, and retry with backoff, never at a fixed rate.
            metrics.BACKEND_ERRORS.labels(backend="kubernetes").inc()
            await self._refresh(ref)
            self.queue.add_after(ref, self.backoff.next_delay(ref))
        except KubeError as exc:
            tracing.annotate(result="KubernetesError")
            metrics.BACKEND_ERRORS.labels(backend="kubernetes").inc()
            log.warning("Kubernetes call failed for %s: %s", ref, exc, extra=_fields(ref))
            self.queue.add_after(ref, self.backoff.next_delay(ref))
        finally:
            metrics.RECONCILE_SECONDS.labels(kind=kind).observe(time.monotonic() - started)

    async def _policed(self, res: Resource) -> Outcome | None:
        """None when the policies allow what ``res`` asks for; else the outcome instead of apply.

        Checked before any backend write, from the in-memory policy cache (no
        API call). A refused resource is not retried: a policy or namespace
        change that concerns it enqueues it again.
        """
        gate = self.policies
        claims_of: Callable[[Resource], Claims | None] | None = getattr(self.reconciler, "claims", None)
        if gate is None or claims_of is None:
            return None
        claims = claims_of(res)
        if claims is None:
            gate.forget(res.ref)
            return None  # the spec does not parse: apply says why
        decision = await gate.check(res.ref, claims)
        if decision is None:
            return Outcome(
                "Unknown", conditions.RECONCILING,
                "waiting to read the TetherPolicies and the namespace's labels; retrying", retry=True,
            )
        if decision.allowed:
            return None
        withdraw: Callable[[Resource, str], Awaitable[Outcome]] | None = getattr(
            self.reconciler, "withdraw", None
        )
        if withdraw is None:
            return Outcome.failed(conditions.FORBIDDEN, decision.message, retry=False)
        message = decision.message
        return await self._guarded(lambda r: withdraw(r, message), res)
    async def _collect(self, ref: ObjectRef) -> None:
        """Let the kind remove an orphan's leftovers; a failure waits for the watcher to ask again."""
        try:
            await self.reconciler.collect(ref)
        except (errors.BackendError, KubeError) as exc:
            log.warning("could not collect what %s left behind: %s", ref, exc, extra=_fields(ref))

    async def _guarded(self, step: Callable[[Resource], Awaitable[Outcome]], res: Resource) -> Outcome:
        """Run ``apply``/``release``; a bug or a hang there becomes an honest status, not silence.

        A step that has not finished after ``deadline`` seconds is abandoned and
        retried with backoff: a call that never answers must not hold a worker,
        and the resource, for ever without a status (the log shows where it hung).
        Abandoning a step is a crash in mid-reconcile, which every step tolerates.
        """
        limit = asyncio.timeout(self.deadline)
        try:
            async with limit:
                return await step(res)
        except (asyncio.CancelledError, KubeError):
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and limit.expired():
                log.warning(
                    "reconcile of %s did not finish in %.0fs; abandoned, retrying (where it waited below)",
                    res.ref, self.deadline, exc_info=True, extra=_fields(res.ref),
                )
                return Outcome(
                    "Unknown", conditions.RECONCILING,
                    f"reconcile did not finish in {self.deadline:.0f}s; retrying — see the operator log",
                    retry=True,
                )
            log.exception("reconcile of %s failed unexpectedly; will retry", res.ref, extra=_fields(res.ref))
            return Outcome(
                "Unknown", conditions.RECONCILING,
                f"reconcile failed unexpectedly ({type(exc).__name__}); retrying — see the operator log",
                retry=True,
            )

    async def _finish(self, res: Resource, outcome: Outcome) -> None:
        ref = res.ref
        status = build_status(
            res.status, outcome, generation=res.generation, timestamp=conditions.now()
        )
        if status != dict(res.status):
            self._remember(await self.kube.patch_status(ref, status))
        notes = (*_announcement(res.status, outcome), *outcome.notes)
        await self._record(res, notes, routine=_first_success(res.status, outcome))
        result = outcome.reason if outcome.ready != "True" else "ready"
        tracing.annotate(result=result)
        metrics.RECONCILES.labels(kind=self.reconciler.kind, result=result).inc()
        self._count_not_ready(ref, None if outcome.ready == "True" else outcome.reason)
        if outcome.retry:
            delay = self.backoff.next_delay(ref)
            log.info(
                "%s: %s (%s); retrying in %.1fs", ref, outcome.reason, outcome.message, delay,
                extra=_fields(ref),
            )
            self.queue.add_after(ref, delay)
        else:
            self.backoff.reset(ref)
            self.queue.cancel_delayed(ref)

    def _count_not_ready(self, ref: ObjectRef, reason: str | None) -> None:
        """Keep ``tether_resources_not_ready`` in step (None: Ready, or gone)."""
        before = self._not_ready.get(ref)
        if before == reason:
            return
        if reason is None:
            self._not_ready.pop(ref, None)
        else:
            self._not_ready[ref] = reason
        for changed in {before, reason} - {None}:
            count = sum(1 for r in self._not_ready.values() if r == changed)
            metrics.NOT_READY.labels(kind=self.reconciler.kind, reason=changed).set(count)

    async def _record(self, res: Resource, notes: tuple[Note, ...], *, routine: bool = False) -> None:
        """Log every note; post it as an event unless it is a ``routine`` Normal one."""
        involved = Involved(self.reconciler.kind, res.ref, res.uid)
        for note in notes:
            # Notes never carry values (Secret data), so they are safe to log too.
            log.log(
                logging.WARNING if note.type == "Warning" else logging.INFO,
                "%s %s: %s", res.ref, note.reason, note.message, extra=_fields(res.ref),
            )
            if routine and note.type == "Normal":
                continue
            await self.kube.event(involved, type_=note.type, reason=note.reason, message=note.message)

    async def _refresh(self, ref: ObjectRef) -> None:
        """Replace the cached object by the API server's current one (after a 409)."""
        try:
            body = await self.kube.get(ref)
        except KubeError as exc:
            log.info("could not re-read %s after a conflict: %s", ref, exc, extra=_fields(ref))
            return
        if body is None:
            return  # deleted: its DELETED event cleans up
        if ref in self.cache:
            self.cache[ref] = slim(body)
            self._own_writes.pop(ref, None)

    def _remember(self, body: Mapping[str, Any]) -> None:
        """Cache the response of our own patch: the newest version we know of."""
        meta = body.get("metadata") or {}
        ref = ObjectRef(self.reconciler.plural, meta.get("namespace", ""), meta.get("name", ""))
        if ref in self.cache:
            self.cache[ref] = slim(body)
            own = self._own_writes.setdefault(ref, [])
            if len(own) >= 16:  # echoes that never came (a missed watch event)
                own.clear()
            own.append(_rv(body))
