"""The shared machinery: work queue, backoff, conditions and status building."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tether import conditions
from tether.api import FINALIZER, ObjectRef
from tether.conditions import Condition
from tether.queueing import Backoff, WorkQueue
from tether.reconciling import Controller, Outcome, Resource, build_status


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
