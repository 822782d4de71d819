"""The shared machinery: work queue, backoff, conditions, status building, the one
mapping of errors to conditions, and the Warning events the skeleton posts."""

from __future__ import annotations

import asyncio
import copy
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether import conditions, errors
from tether.api import FINALIZER, InvalidSpec, ObjectRef
from tether.clients.consul.client import ConsulRejected, ConsulUnavailable
from tether.clients.etcd.errors import EtcdRejected, EtcdUnavailable
from tether.clients.kube.http import KubeRejected, KubeUnavailable, kube_error
from tether.conditions import Condition
from tether.queueing import Backoff, WorkQueue
from tether.reconciling import Controller, Note, Outcome, Resource, build_status


async def test_queue_collapses_duplicates() -> None:
    q: WorkQueue[str] = WorkQueue()
    for _ in range(5):
        q.add("a")
    q.add("b")
    assert len(q) == 2
    assert await q.get() == "a"
    assert await q.get() == "b"
    assert len(q) == 0


async def test_key_added_while_processing_is_processed_again_after() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    key = await q.get()
    q.add("a")  # a change arrives mid-reconcile
    assert len(q) == 0, "never handed to a second worker concurrently"
    q.done(key)
    assert len(q) == 1 and await q.get() == "a"


async def test_add_after_fires_once_and_sooner_wins() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add_after("a", 10.0)
    q.add_after("a", 0.01)
    await asyncio.sleep(0.05)
    assert len(q) == 1
    q.add_after("b", 0.01)
    q.add("b")  # an immediate add cancels the delayed one
    await asyncio.sleep(0.05)
    assert len(q) == 2


async def test_cancel_delayed() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add_after("a", 0.01)
    q.cancel_delayed("a")
    await asyncio.sleep(0.05)
    assert len(q) == 0 and q.idle()


@given(st.integers(min_value=1, max_value=40), st.integers(min_value=0, max_value=2**32))
def test_backoff_is_capped_and_jittered(failures: int, seed: int) -> None:
    backoff: Backoff[str] = Backoff(base=0.5, cap=60.0, rng=random.Random(seed))
    delays = [backoff.next_delay("k") for _ in range(failures)]
    for n, delay in enumerate(delays):
        ceiling = min(60.0, 0.5 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset("k")
    assert backoff.failures("k") == 0


def test_transition_time_moves_only_on_flip() -> None:
    first = conditions.merge([], [Condition("Ready", "False", "Conflict", "x")], generation=1, timestamp="t1")
    same = conditions.merge(
        first, [Condition("Ready", "False", "BackendUnavailable", "y")], generation=2, timestamp="t2"
    )
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["reason"] == "BackendUnavailable"
    flipped = conditions.merge(
        same, [Condition("Ready", "True", "Reconciled", "z")], generation=2, timestamp="t3"
    )
    assert flipped[0]["lastTransitionTime"] == "t3" and flipped[0]["observedGeneration"] == 2


def test_unchanged_outcome_gives_identical_status() -> None:
    outcome = Outcome(
        "True",
        "Reconciled",
        "ok",
        fields={"keys": 3},
        conditions=(Condition("Healthy", "True", "Passing", "fine"),),
    )
    status = build_status({}, outcome, generation=4, timestamp="t1")
    again = build_status(status, outcome, generation=4, timestamp="t2")
    assert again == status, "an unchanged outcome must not cause a status patch"
    assert [c["type"] for c in status["conditions"]] == ["Healthy", "Ready"]


def test_failed_outcomes_retry_only_when_waiting_helps() -> None:
    assert Outcome.failed(conditions.CONFLICT, "m").retry
    assert Outcome.failed(conditions.BACKEND_UNAVAILABLE, "m").retry
    assert not Outcome.failed(conditions.INVALID_SPEC, "m").retry


class _RecordingKube:
    """Stands in for the Kubernetes writes of one controller (unit level only)."""

    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []
        self.finalizer_patches = 0
        self.rv = 10

    def _body(self, ref: ObjectRef, **extra: Any) -> dict[str, Any]:
        self.rv += 1
        meta = {
            "namespace": ref.namespace,
            "name": ref.name,
            "resourceVersion": str(self.rv),
            "generation": 1,
            "finalizers": [FINALIZER],
        }
        return {"metadata": meta, **extra}

    async def set_finalizers(
        self, ref: ObjectRef, finalizers: list[str], *, resource_version: str
    ) -> dict[str, Any]:
        self.finalizer_patches += 1
        return self._body(ref)

    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> dict[str, Any]:
        self.statuses.append(status)
        return self._body(ref, status=status)

    async def event(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Broken:
    kind = "ConsulService"
    plural = "consulservices"

    async def apply(self, res: Resource) -> Outcome:
        raise RuntimeError("a bug")

    async def release(self, res: Resource) -> Outcome:
        raise RuntimeError("a bug")

    def forget(self, ref: ObjectRef) -> None:
        pass


async def test_a_bug_in_a_reconciler_becomes_an_honest_status_and_a_retry() -> None:
    kube = _RecordingKube()
    ctl = Controller(_Broken(), kube, workers=1)  # type: ignore[arg-type]
    body = {"metadata": {"namespace": "ns", "name": "x", "resourceVersion": "5", "generation": 1}, "spec": {}}
    ctl.observe("ADDED", body)
    ref = await ctl.queue.get()
    await ctl.process(ref)
    ctl.queue.done(ref)
    assert kube.finalizer_patches == 1
    ready = kube.statuses[-1]["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("Unknown", "Reconciling")
    assert "RuntimeError" in ready["message"]
    assert ctl.backoff.failures(ref) == 1, "retried with backoff"
    # The echo of our own patches does not trigger another reconcile.
    ctl.observe("MODIFIED", {**body, "metadata": {**body["metadata"], "resourceVersion": str(kube.rv)}})
    assert len(ctl.queue) == 0


# --------------------------------------------------------------------------- one error vocabulary


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (errors.BackendUnavailable("down"), "BackendUnavailable"),
        (EtcdUnavailable("etcd: no leader"), "BackendUnavailable"),
        (ConsulUnavailable("Consul agent did not answer"), "BackendUnavailable"),
        (errors.BackendRejected("no"), "BackendRejected"),
        (errors.TooManyOperations("too many operations"), "BackendRejected"),
        (errors.RequestTooLarge("too large"), "BackendRejected"),
        (EtcdRejected("etcdserver: permission denied"), "BackendRejected"),
        (ConsulRejected("Consul refused: Permission denied"), "BackendRejected"),
        (errors.Contended("kept changing"), "Conflict"),
        # Kubernetes' errors come from the one response check, one of each class.
        (kube_error("read ConfigMap a/b", 403, b'{"message": "forbidden"}'), "BackendRejected"),
        (kube_error("read ConfigMap a/b", 401, b"Unauthorized"), "BackendRejected"),
        (kube_error("read ConfigMap a/b", 422, b'{"message": "invalid"}'), "BackendRejected"),
        (kube_error("read ConfigMap a/b", 400, b"bad request"), "BackendRejected"),
        (kube_error("read ConfigMap a/b", 404, b"not found"), "BackendRejected"),
        (kube_error("read ConfigMap a/b", 500, b"internal error"), "BackendUnavailable"),
        (kube_error("read ConfigMap a/b", 503, b""), "BackendUnavailable"),
        (kube_error("read ConfigMap a/b", 429, b"too many requests"), "BackendUnavailable"),
        (kube_error("read ConfigMap a/b", 410, b"too old"), "BackendUnavailable"),
        (kube_error("read ConfigMap a/b", 0, "ClientConnectorError: connection refused"),
         "BackendUnavailable"),
        (kube_error("patch status of a/b", 409, b"the object has been modified"), "Conflict"),
    ],
)
def test_every_backend_error_maps_to_one_reason_and_is_retried(exc: Exception, reason: str) -> None:
    out = Outcome.from_error(exc, doing="write to etcd", fields={"keys": 0})
    assert (out.ready, out.reason, out.retry) == ("False", reason, True)
    assert out.message == f"cannot write to etcd: {exc}; retrying"
    assert out.fields == {"keys": 0} and not out.released


def test_the_type_decides_not_the_status() -> None:
    # No Kubernetes special case is left in the mapping: an error's class, chosen
    # once by the response check, is all that counts.
    assert Outcome.from_error(KubeUnavailable("odd", 403), doing="x").reason == "BackendUnavailable"
    assert Outcome.from_error(KubeRejected("odd", 500), doing="x").reason == "BackendRejected"


def test_an_invalid_spec_is_not_retried_and_says_only_what_is_wrong() -> None:
    out = Outcome.from_error(InvalidSpec("spec.prefix: 'x' must start with '/'"), doing="read the sources")
    assert (out.ready, out.reason, out.retry) == ("False", "InvalidSpec", False)
    assert out.message == "spec.prefix: 'x' must start with '/'"


def test_a_non_backend_error_is_a_bug_not_a_condition() -> None:
    with pytest.raises(TypeError, match="ValueError"):
        Outcome.from_error(ValueError("a bug"), doing="register")


def test_conditions_ride_along_with_an_error() -> None:
    healthy = Condition("Healthy", "Unknown", "Unknown", "not known")
    out = Outcome.from_error(errors.BackendUnavailable("down"), doing="register", conditions=(healthy,))
    assert out.conditions == (healthy,)


# --------------------------------------------------------------------------- warnings from the skeleton


class _Kube:
    """One stored object; finalizer and status patches, and the events posted."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = copy.deepcopy(body)
        self.events: list[tuple[str, str, str]] = []
        self.status_patches = 0

    def _bump(self) -> dict[str, Any]:
        meta = self.body["metadata"]
        meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
        return copy.deepcopy(self.body)

    async def set_finalizers(
        self, ref: ObjectRef, finalizers: list[str], *, resource_version: str
    ) -> dict[str, Any]:
        self.body["metadata"]["finalizers"] = list(finalizers)
        return self._bump()

    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> dict[str, Any]:
        self.status_patches += 1
        self.body["status"] = copy.deepcopy(status)
        return self._bump()

    async def event(self, involved: Any, *, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))


class _Scripted:
    """A kind whose ``apply`` returns the outcomes it is given, in order."""

    kind = "EtcdConfig"
    plural = "etcdconfigs"

    def __init__(self) -> None:
        self.next: Outcome | None = None

    async def apply(self, res: Resource) -> Outcome:
        assert self.next is not None
        return self.next

    async def release(self, res: Resource) -> Outcome:
        raise AssertionError("not deleted in these tests")

    def forget(self, ref: ObjectRef) -> None:
        pass


_BODY = {"metadata": {"namespace": "ns", "name": "cfg", "resourceVersion": "5", "generation": 1}, "spec": {}}


def _scripted() -> tuple[_Kube, Callable[[Outcome], Awaitable[list[tuple[str, str, str]]]]]:
    """A controller over one resource whose reconciles return the outcomes given;
    ``reconcile(outcome)`` answers the events that reconcile posted."""
    kube, kind = _Kube(_BODY), _Scripted()
    ctl = Controller(kind, kube, workers=1)  # type: ignore[arg-type]
    ctl.observe("ADDED", _BODY)
    ref = ObjectRef("etcdconfigs", "ns", "cfg")

    async def reconcile(outcome: Outcome) -> list[tuple[str, str, str]]:
        kind.next = outcome
        seen = len(kube.events)
        await ctl.process(ref)
        return kube.events[seen:]

    return kube, reconcile


async def test_the_skeleton_warns_once_per_failure_transition() -> None:
    kube, reconcile = _scripted()

    down = Outcome.from_error(errors.BackendUnavailable("etcd is down"), doing="write to etcd")
    assert await reconcile(down) == [("Warning", "BackendUnavailable", down.message)]
    patches = kube.status_patches
    # The same failure again: no event, and no status patch either (no idle writes).
    assert await reconcile(down) == []
    assert await reconcile(down) == []
    assert kube.status_patches == patches

    # The same reason with another message is the same failure: the status
    # shows the new detail, no second event (issue 14: no idle writes when stuck).
    worse = Outcome.from_error(errors.BackendUnavailable("etcd has no leader"), doing="write to etcd")
    assert await reconcile(worse) == []
    conflict = Outcome.failed("Conflict", "key /app/a is owned by EtcdConfig ns/other. Nothing was written.")
    assert await reconcile(conflict) == [("Warning", "Conflict", conflict.message)]
    assert await reconcile(conflict) == []

    # Recovery posts only what the kind itself says; a relapse is announced again.
    written = Note("Normal", "Written", "wrote 1 key")
    ok = Outcome("True", "Reconciled", "1 key under /app in etcd", notes=(written,))
    assert await reconcile(ok) == [("Normal", "Written", "wrote 1 key")]
    assert await reconcile(down) == [("Warning", "BackendUnavailable", down.message)]
    invalid = Outcome.from_error(InvalidSpec("spec.prefix: must start with '/'"), doing="read the sources")
    assert await reconcile(invalid) == [("Warning", "InvalidSpec", invalid.message)]
    assert await reconcile(invalid) == []


async def test_the_skeleton_does_not_warn_about_progress() -> None:
    kube, kind = _Kube(_BODY), _Scripted()
    ctl = Controller(kind, kube, workers=1)  # type: ignore[arg-type]
    ctl.observe("ADDED", _BODY)
    kind.next = Outcome("Unknown", "Reconciling", "waiting for the first scan", retry=True)
    await ctl.process(ObjectRef("etcdconfigs", "ns", "cfg"))
    assert kube.events == []
    ready = kube.body["status"]["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("Unknown", "Reconciling")


async def test_a_routine_creation_posts_no_event_but_changes_do() -> None:
    """The first successful reconcile is logged, not posted: the status says it (one write fewer)."""
    kube, reconcile = _scripted()

    created = Outcome("True", "Reconciled", "2 keys", notes=(Note("Normal", "Written", "wrote 2 keys"),))
    assert await reconcile(created) == []
    assert kube.status_patches == 1
    # Ready is now on record: a later change is a real transition, and an event.
    updated = Outcome("True", "Reconciled", "3 keys", notes=(Note("Normal", "Written", "wrote 1 key"),))
    assert await reconcile(updated) == [("Normal", "Written", "wrote 1 key")]
    # A first reconcile that warns still posts its warning.
    _, reconcile2 = _scripted()
    repaired = Outcome("True", "Reconciled", "ok", notes=(Note("Warning", "DriftRepaired", "restored"),))
    assert await reconcile2(repaired) == [("Warning", "DriftRepaired", "restored")]


def test_the_cache_keeps_only_what_a_reconcile_reads() -> None:
    from tether.reconciling import slim

    body = {
        "apiVersion": "tether.dev/v1alpha1", "kind": "EtcdConfig",
        "metadata": {
            **_BODY["metadata"], "uid": "u", "finalizers": ["tether.dev/finalizer"],
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
        },
        "spec": {"prefix": "/a"}, "status": {"keys": 1},
    }
    kept = slim(body)
    assert "managedFields" not in kept["metadata"] and "annotations" not in kept["metadata"]
    assert Resource.from_body("etcdconfigs", kept) == Resource.from_body("etcdconfigs", body)


async def test_depth_counts_keys_waiting_and_in_process() -> None:
    queue: WorkQueue[str] = WorkQueue()
    assert queue.depth() == 0 and queue.idle()
    for key in ("a", "b", "c", "a"):
        queue.add(key)
    assert queue.depth() == 3
    taken = await queue.get()
    assert queue.depth() == 3 and not queue.idle()
    queue.add(taken)  # added again while in process: once more afterwards, still one key
    assert queue.depth() == 3
    queue.done(taken)
    assert queue.depth() == 3
    queue.done(await queue.get())
    assert queue.depth() == 2
