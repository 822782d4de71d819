"""Hardening (issue 14): status honesty — Healthy follows status.health, 409s back
off and refresh, resourceVersions are never ordered, a stuck resource posts one
Warning event."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from typing import Any

import pytest
from catalogmodels import consul_services

from tether import conditions
from tether.api import FINALIZER, ObjectRef
from tether.clients.consul.client import ConsulUnavailable
from tether.clients.kube.client import Involved, KubeConflict
from tether.consulservice.index import AgentIndex
from tether.reconciling import Controller, Outcome, Resource

REF = ObjectRef("things", "ns", "a")


class FakeKube:
    """The KubeClient methods the skeleton uses; resourceVersions are opaque strings."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.server: dict[str, Any] | None = None
        self.finalizer_conflicts = 0
        self.gets = 0
        self._rv = itertools.count(1000)

    def _stamp(self, body: Mapping[str, Any]) -> dict[str, Any]:
        out = {**body, "metadata": {**body["metadata"], "resourceVersion": f"x{next(self._rv)}"}}
        self.server = out
        return out

    async def set_finalizers(
        self, ref: ObjectRef, finalizers: list[str], *, resource_version: str
    ) -> dict[str, Any]:
        if self.finalizer_conflicts:
            self.finalizer_conflicts -= 1
            raise KubeConflict("conflict", 409)
        assert self.server is not None
        return self._stamp({**self.server, "metadata": {**self.server["metadata"], "finalizers": finalizers}})

    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> dict[str, Any]:
        assert self.server is not None
        return self._stamp({**self.server, "status": status})

    async def get(self, ref: ObjectRef) -> dict[str, Any] | None:
        self.gets += 1
        return self.server

    async def event(self, involved: Involved, *, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason))


class Stuck:
    """A kind stuck in one failure whose message changes at every retry."""

    kind = "Thing"
    plural = "things"

    def __init__(self) -> None:
        self.calls = 0

    async def apply(self, res: Resource) -> Outcome:
        self.calls += 1
        return Outcome.failed(conditions.BACKEND_REJECTED, f"refused (attempt {self.calls})")

    async def release(self, res: Resource) -> Outcome:
        return Outcome("False", conditions.DELETING, "gone", released=True)

    def forget(self, ref: ObjectRef) -> None:
        pass


def _body(
    rv: str, finalizers: tuple[str, ...] = (FINALIZER,), status: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": "a", "uid": "u", "generation": 1,
                     "resourceVersion": rv, "finalizers": list(finalizers)},
        "spec": {}, "status": status or {},
    }


def _controller(kube: FakeKube, reconciler: Any = None) -> Controller:
    return Controller(reconciler or Stuck(), kube, workers=1)  # type: ignore[arg-type]


async def test_a_stuck_resource_posts_one_warning_event() -> None:
    kube = FakeKube()
    ctl = _controller(kube)
    kube.server = _body("7")
    ctl.observe("ADDED", kube.server)
    for _ in range(5):
        await ctl.process(REF)
    warnings = [e for e in kube.events if e[0] == "Warning"]
    assert warnings == [("Warning", conditions.BACKEND_REJECTED)]


async def test_a_relist_after_a_restore_is_taken_although_its_version_looks_older() -> None:
    kube = FakeKube()
    ctl = _controller(kube)
    ctl.observe("ADDED", _body("900"))
    ctl._remember(_body("901"))
    # The API server was restored from a backup: the relist carries smaller
    # (and, as far as anyone may assume, unordered) versions.
    restored = _body("42", status={"restored": True})
    ctl.observe("MODIFIED", restored)
    assert ctl.cache[REF]["metadata"]["resourceVersion"] == "42"


async def test_own_echoes_are_skipped_and_never_roll_the_cache_back() -> None:
    kube = FakeKube()
    ctl = _controller(kube)
    ctl.observe("ADDED", _body("a1"))
    ctl.queue.cancel_delayed(REF)
    while len(ctl.queue):
        ref = await ctl.queue.get()
        ctl.queue.done(ref)
    ctl._remember(_body("b2"))
    ctl._remember(_body("c3"))
    ctl.observe("MODIFIED", _body("b2"))  # echo of the first of our two writes
    assert ctl.cache[REF]["metadata"]["resourceVersion"] == "c3"
    ctl.observe("MODIFIED", _body("c3"))
    assert ctl.cache[REF]["metadata"]["resourceVersion"] == "c3"
    assert len(ctl.queue) == 0  # no reconcile for our own echoes


async def test_a_409_on_the_finalizer_refreshes_and_backs_off() -> None:
    kube = FakeKube()
    ctl = _controller(kube)
    kube.server = _body("s1", finalizers=())
    ctl.observe("ADDED", _body("stale", finalizers=()))
    kube.finalizer_conflicts = 3
    for _ in range(3):
        await ctl.process(REF)
    assert kube.gets == 3  # read afresh each time
    assert ctl.backoff.failures(REF) == 3  # and the retries back off
    assert ctl.cache[REF]["metadata"]["resourceVersion"] == "s1"


# -- Healthy follows status.health ----------------------------------------------------

class ForeignAgent:
    """An agent whose service ID belongs to someone else, or which is down."""

    def __init__(self, *, down: bool = False) -> None:
        self.down = down

    async def node_name(self) -> str:
        if self.down:
            raise ConsulUnavailable("agent down")
        return "node-1"

    async def service(self, service_id: str) -> dict[str, Any] | None:
        if self.down:
            raise ConsulUnavailable("agent down")
        return {"ID": service_id, "Service": "web", "Meta": {"owner": "someone"}}

    async def service_checks(self, service_id: str) -> list[dict[str, Any]]:
        return []

    async def checks_with_ids(self, check_ids: Any) -> list[dict[str, Any]]:
        return []


def _consul_resource() -> Resource:
    status = {
        "health": "passing",
        "conditions": [{"type": "Healthy", "status": "True", "reason": "Passing", "message": "ok"}],
    }
    return Resource(
        ref=ObjectRef("consulservices", "ns", "web"), uid="u", generation=1, resource_version="1",
        spec={"address": "10.0.0.1", "port": 80}, status=status, finalizers=(FINALIZER,), deleting=False,
    )


async def test_healthy_is_unknown_with_health_on_conflict_and_outage() -> None:
    for agent in (ForeignAgent(), ForeignAgent(down=True)):
        services = consul_services(agent, AgentIndex(cluster="k", plural="consulservices"), cluster="k")  # type: ignore[arg-type]
        outcome = await services.apply(_consul_resource())
        assert outcome.ready == "False"
        assert outcome.fields["health"] == "unknown"
        healthy = [c for c in outcome.conditions if c.type == conditions.HEALTHY]
        assert [c.status for c in healthy] == ["Unknown"]


async def test_healthy_is_unknown_on_invalid_spec() -> None:
    services = consul_services(ForeignAgent(), AgentIndex(cluster="k", plural="consulservices"), cluster="k")  # type: ignore[arg-type]
    res = _consul_resource()
    bad = Resource(**{**res.__dict__, "spec": {"address": "10.0.0.1", "port": 0}})
    outcome = await services.apply(bad)
    assert outcome.reason == conditions.INVALID_SPEC
    assert [c.status for c in outcome.conditions if c.type == conditions.HEALTHY] == ["Unknown"]


async def test_a_reused_version_after_a_restore_is_not_taken_for_our_echo() -> None:
    kube = FakeKube()
    ctl = _controller(kube)
    ctl.observe("ADDED", _body("900"))
    ctl._remember(_body("901"))  # its echo is lost: the API server is restored from a backup
    ctl.observe("MODIFIED", _body("42"))  # the relist
    while len(ctl.queue):
        ctl.queue.done(await ctl.queue.get())
    ctl.observe("MODIFIED", _body("901", status={"someone": "else"}))  # later, a real change
    assert len(ctl.queue) == 1 and ctl.cache[REF]["status"] == {"someone": "else"}


class Hanging(Stuck):
    """A kind whose apply waits for an answer that never comes (a call without a deadline)."""

    async def apply(self, res: Resource) -> Outcome:
        self.calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_reconcile_that_hangs_is_abandoned_with_a_status_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kube = FakeKube()
    hanging = Hanging()
    ctl = Controller(hanging, kube, workers=1, deadline=0.05)  # type: ignore[arg-type]
    kube.server = _body("7")
    ctl.observe("ADDED", kube.server)
    await asyncio.wait_for(ctl.process(REF), 5)
    ready = conditions.find(ctl.cache[REF].get("status", {}).get("conditions"), conditions.READY)
    assert ready is not None and (ready["status"], ready["reason"]) == ("Unknown", conditions.RECONCILING)
    assert "did not finish in 0s" in ready["message"]
    assert hanging.calls == 1
    stuck = [r for r in caplog.records if "did not finish" in r.getMessage()]
    assert stuck and stuck[0].exc_info is not None  # the log shows where it waited
