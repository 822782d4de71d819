"""ConsulService endpoints mode, and switching modes, against an in-memory Consul catalog.

The catalog is :mod:`catalogmodels`: it runs the real ``/v1/txn`` bodies the
planner builds, with Consul's check-and-set guards, and evaluates the
filters Tether sends. The fixed-instance side is the fake agent of
:mod:`test_consul_reconciler`. The tests drive the kind's reconciler (the
dispatcher) and check what Consul holds afterwards.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from catalogmodels import NODE, CatalogModel, consul_services
from test_consul_reconciler import FakeAgent

from tether import conditions
from tether.api import FINALIZER, ObjectRef
from tether.clients.consul.client import ConsulUnavailable
from tether.consulservice import endpoints
from tether.consulservice.index import AgentIndex
from tether.consulservice.reconciling import ConsulServices
from tether.reconciling import Controller, Outcome, Resource

CLUSTER = "kubernetes"
REF = ObjectRef("consulservices", "team-a", "web")
ENDPOINTS_SPEC: dict[str, Any] = {"endpoints": {"service": "web"}, "tags": ["v1"]}
FIXED_SPEC: dict[str, Any] = {"address": "10.0.0.5", "port": 8080}
OWNER_META = {
    "external-source": "kubernetes", "tether-cluster": CLUSTER,
    "tether-namespace": "team-a", "tether-name": "web",
}


class Cluster:
    """The Kubernetes reads endpoints mode makes: one Service, its slices, the resources."""

    def __init__(self) -> None:
        self.ready: dict[str, bool] = {}  # endpoint address → ready
        self.resources: dict[ObjectRef, dict[str, Any]] = {}
        # False: the Service is deleted, while its slices stay (a custom
        # controller's, or before garbage collection).
        self.service_exists = True

    async def read_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        if (namespace, name) != ("team-a", "web") or not self.service_exists:
            return None
        return {"spec": {"ports": [{"name": "http", "port": 80}]}}

    async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
        if (namespace, service) != ("team-a", "web"):
            return []
        return [{
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": [address], "conditions": {"ready": ready}}
                for address, ready in sorted(self.ready.items())
            ],
        }]

    async def get(self, ref: ObjectRef) -> dict[str, Any] | None:
        return self.resources.get(ref)


class Rig:
    def __init__(self) -> None:
        self.model = CatalogModel()
        self.kube = Cluster()
        self.agent = FakeAgent()
        self.services: ConsulServices = consul_services(
            self.agent, AgentIndex(cluster=CLUSTER, plural="consulservices"), cluster=CLUSTER,
            model=self.model, kube=self.kube,
        )

    def ids(self) -> list[str]:
        return sorted(self.model.instances(NODE))


def resource(spec: dict[str, Any], status: dict[str, Any] | None = None, *, ref: ObjectRef = REF,
             generation: int = 1, deleting: bool = False) -> Resource:
    return Resource(
        ref=ref, uid="u", generation=generation, resource_version="1", spec=spec, status=status or {},
        finalizers=(FINALIZER,), deleting=deleting,
    )


def iid(address: str) -> str:
    return endpoints.instance_id("team-a-web", address, 8080)


def reasons(out: Outcome) -> list[tuple[str, str]]:
    return [(n.type, n.reason) for n in out.notes]


@pytest.fixture
def rig() -> Rig:
    return Rig()


async def test_apply_registers_every_endpoint_then_writes_nothing(rig: Rig) -> None:
    rig.kube.ready = {"10.0.0.1": True, "10.0.0.2": False}
    out = await rig.services.apply(resource(ENDPOINTS_SPEC))
    assert out.ready == "True", out.message
    assert out.fields["instances"] == {"total": 2, "passing": 1, "warning": 0, "critical": 1}
    assert rig.ids() == [iid("10.0.0.1"), iid("10.0.0.2")]
    assert rig.model.nodes[NODE]["Meta"] == {"external-source": "kubernetes", "tether-cluster": CLUSTER}
    inst = rig.model.instances(NODE)[iid("10.0.0.1")]
    assert (inst["Service"], inst["Port"], inst["Tags"]) == ("web", 8080, ["v1"])
    assert {k: inst["Meta"][k] for k in OWNER_META} == OWNER_META
    assert rig.model.check_status(NODE) == {iid("10.0.0.1"): "passing", iid("10.0.0.2"): "critical"}
    txns = rig.model.txns
    again = await rig.services.apply(resource(ENDPOINTS_SPEC, {"instances": out.fields["instances"]}))
    assert again.ready == "True"
    assert rig.model.txns == txns  # nothing changed, nothing written


async def test_endpoint_changes_reach_the_catalog(rig: Rig) -> None:
    rig.kube.ready = {"10.0.0.1": True, "10.0.0.2": True}
    await rig.services.apply(resource(ENDPOINTS_SPEC))
    rig.kube.ready = {"10.0.0.2": False, "10.0.0.3": True}
    out = await rig.services.apply(resource(ENDPOINTS_SPEC, {"instances": {}}, generation=1))
    assert out.ready == "True"
    assert rig.ids() == [iid("10.0.0.2"), iid("10.0.0.3")]
    assert rig.model.check_status(NODE) == {iid("10.0.0.2"): "critical", iid("10.0.0.3"): "passing"}


async def test_drift_is_repaired_with_a_warning(rig: Rig) -> None:
    rig.kube.ready = {"10.0.0.1": True}
    first = await rig.services.apply(resource(ENDPOINTS_SPEC))
    status = {
        "instances": first.fields["instances"], "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Reconciled"}],
    }
    # Someone deletes the instance in Consul.
    assert rig.model.txn([{"Service": {"Verb": "delete-cas", "Node": NODE, "Service": {
        "ID": iid("10.0.0.1"), "Service": "web",
        "ModifyIndex": rig.model.instances(NODE)[iid("10.0.0.1")]["ModifyIndex"]}}}])
    out = await rig.services.apply(resource(ENDPOINTS_SPEC, status))
    assert reasons(out) == [("Warning", "DriftRepaired")]
    assert rig.ids() == [iid("10.0.0.1")]


async def test_release_removes_the_instances_and_the_empty_node(rig: Rig) -> None:
    rig.kube.ready = {"10.0.0.1": True, "10.0.0.2": True}
    await rig.services.apply(resource(ENDPOINTS_SPEC))
    out = await rig.services.release(resource(ENDPOINTS_SPEC, {"instances": {}}, deleting=True))
    assert out.released and out.reason == conditions.DELETING
    assert reasons(out) == [("Normal", "Deregistered")]
    assert NODE not in rig.model.nodes


async def test_orphan_release_leaves_the_instances_unowned(rig: Rig) -> None:
    rig.kube.ready = {"10.0.0.1": True}
    await rig.services.apply(resource(ENDPOINTS_SPEC))
    spec = {**ENDPOINTS_SPEC, "deletionPolicy": "Orphan"}
    out = await rig.services.release(resource(spec, {"instances": {}}, deleting=True))
    assert out.released and reasons(out) == [("Normal", "Orphaned")]
    (inst,) = rig.model.instances(NODE).values()
    assert inst["Meta"] == {"external-source": "kubernetes"}
    assert rig.model.check_status(NODE) == {iid("10.0.0.1"): "passing"}


async def test_a_release_that_finds_nothing_is_released_without_an_event(rig: Rig) -> None:
    out = await rig.services.release(resource(ENDPOINTS_SPEC, deleting=True))
    assert out.released and out.notes == ()
    assert out.backend == "Consul's catalog"


async def test_a_failed_release_keeps_the_finalizer(rig: Rig) -> None:
    rig.kube.ready = {"10.0.0.1": True}
    await rig.services.apply(resource(ENDPOINTS_SPEC))
    rig.services.endpoints.catalog.failure = ConsulUnavailable("connection refused")  # type: ignore[attr-defined]
    out = await rig.services.release(resource(ENDPOINTS_SPEC, deleting=True))
    assert not out.released and out.reason == conditions.BACKEND_UNAVAILABLE and out.retry
    assert out.message.endswith("the finalizer stays until it can")
    assert rig.ids() == [iid("10.0.0.1")]


async def test_a_foreign_instance_under_a_wanted_id_is_a_conflict_and_untouched(rig: Rig) -> None:
    rig.kube.ready = {"10.0.0.1": True, "10.0.0.2": True}
    rig.model.plant_node(NODE, {"external-source": "kubernetes", "tether-cluster": CLUSTER})
    foreign_meta = {**OWNER_META, "tether-namespace": "team-b"}
    rig.model.plant_service(NODE, {"ID": iid("10.0.0.1"), "Service": "web", "Address": "192.0.2.9",
                                   "Port": 1, "Meta": foreign_meta})
    before = rig.model.instances(NODE)[iid("10.0.0.1")]
    out = await rig.services.apply(resource(ENDPOINTS_SPEC))
    assert out.reason == conditions.CONFLICT and iid("10.0.0.1") in out.message
    assert rig.model.instances(NODE)[iid("10.0.0.1")] == before
    assert rig.ids() == [iid("10.0.0.1"), iid("10.0.0.2")]  # the other instance is registered
    await rig.services.release(resource(ENDPOINTS_SPEC, {"instances": {}}, deleting=True))
    assert rig.model.instances(NODE) == {iid("10.0.0.1"): before}


async def test_a_node_of_another_cluster_is_a_conflict(rig: Rig) -> None:
    rig.kube.ready = {"10.0.0.1": True}
    rig.model.plant_node(NODE, {"external-source": "kubernetes", "tether-cluster": "other"})
    out = await rig.services.apply(resource(ENDPOINTS_SPEC))
    assert out.reason == conditions.CONFLICT
    assert rig.ids() == []


# --------------------------------------------------------------------------- a missing Service


@pytest.mark.parametrize("port", [None, "http", 80], ids=["no-port", "port-name", "port-number"])
async def test_a_deleted_service_removes_every_instance_whatever_slices_remain(
    rig: Rig, port: str | int | None,
) -> None:
    """Issue 23 item 3: leftover slices stayed registered, Ready=True, Healthy=True."""
    spec = {**ENDPOINTS_SPEC, "endpoints": {"service": "web", **({"port": port} if port else {})}}
    rig.kube.ready = {"10.0.0.1": True, "10.0.0.2": True}
    first = await rig.services.apply(resource(spec))
    assert first.ready == "True" and len(rig.ids()) == 2
    rig.kube.service_exists = False
    rig.kube.ready = {"10.0.0.1": True, "10.0.0.3": True}  # a leftover slice changes
    out = await rig.services.apply(resource(spec, {"instances": first.fields["instances"]}))
    assert rig.ids() == []
    assert (out.ready, out.reason) == ("False", conditions.INVALID_SPEC)
    assert "Service team-a/web not found" in out.message
    assert not out.retry  # the Service watch wakes it when the Service appears
    assert out.fields["instances"] == {"total": 0, "passing": 0, "warning": 0, "critical": 0}
    assert out.fields["health"] == "critical"
    (healthy,) = out.conditions
    assert (healthy.type, healthy.status) == ("Healthy", "False")
    assert "team-a/web" in healthy.message


async def test_a_service_that_appears_later_gets_its_instances(rig: Rig) -> None:
    rig.kube.service_exists = False
    rig.kube.ready = {"10.0.0.1": True}
    out = await rig.services.apply(resource(ENDPOINTS_SPEC))
    assert (out.ready, out.reason) == ("False", conditions.INVALID_SPEC)
    assert rig.ids() == [] and rig.model.txns == 0
    rig.kube.service_exists = True
    out = await rig.services.apply(resource(ENDPOINTS_SPEC, {"instances": out.fields["instances"]}))
    assert out.ready == "True", out.message
    assert rig.ids() == [iid("10.0.0.1")]
    assert out.fields["health"] == "passing"


# --------------------------------------------------------------------------- mode switches


async def test_endpoints_to_fixed_removes_the_catalog_instances_in_the_same_reconcile(rig: Rig) -> None:
    """Issue 23 item 2: the instances stayed, still passing, until a sweep."""
    rig.kube.ready = {"10.0.0.1": True, "10.0.0.2": True}
    first = await rig.services.apply(resource(ENDPOINTS_SPEC))
    status = {"instances": first.fields["instances"], "serviceID": "team-a-web"}
    out = await rig.services.apply(resource(FIXED_SPEC, status, generation=2))
    assert out.ready == "True", out.message
    assert "team-a-web" in rig.agent.registered
    assert rig.ids() == []
    assert NODE not in rig.model.nodes
    assert ("Normal", "Deregistered") in reasons(out)


async def test_endpoints_to_fixed_after_a_restart_still_removes_the_instances(rig: Rig) -> None:
    rig.kube.ready = {"10.0.0.1": True}
    first = await rig.services.apply(resource(ENDPOINTS_SPEC))
    restarted = Rig()
    restarted.model, restarted.kube = rig.model, rig.kube
    restarted.services = consul_services(
        restarted.agent, AgentIndex(cluster=CLUSTER, plural="consulservices"), cluster=CLUSTER,
        model=rig.model, kube=rig.kube,
    )
    out = await restarted.services.apply(resource(FIXED_SPEC, {"instances": first.fields["instances"]}))
    assert out.ready == "True"
    assert restarted.ids() == []


async def test_a_failed_catalog_removal_after_a_switch_is_retried(rig: Rig) -> None:
    rig.kube.ready = {"10.0.0.1": True}
    first = await rig.services.apply(resource(ENDPOINTS_SPEC))
    rig.services.endpoints.catalog.failure = ConsulUnavailable("down")  # type: ignore[attr-defined]
    out = await rig.services.apply(resource(FIXED_SPEC, {"instances": first.fields["instances"]}))
    assert out.reason == conditions.BACKEND_UNAVAILABLE and out.retry
    rig.services.endpoints.catalog.failure = None  # type: ignore[attr-defined]
    out = await rig.services.apply(resource(FIXED_SPEC, {"instances": first.fields["instances"]}))
    assert out.ready == "True" and rig.ids() == []


async def test_fixed_to_endpoints_removes_the_agent_registration_first(rig: Rig) -> None:
    rig.kube.ready = {"10.0.0.1": True}
    await rig.services.apply(resource(FIXED_SPEC))
    assert "team-a-web" in rig.agent.registered
    out = await rig.services.apply(resource(ENDPOINTS_SPEC, {"serviceID": "team-a-web"}, generation=2))
    assert out.ready == "True", out.message
    assert rig.agent.registered == {}
    assert rig.ids() == [iid("10.0.0.1")]
    assert [w[0] for w in rig.agent.writes][-1] == "deregister"


async def test_fixed_mode_without_a_catalog_past_reads_no_catalog(rig: Rig) -> None:
    await rig.services.apply(resource(FIXED_SPEC))
    assert rig.services.endpoints.catalog.reads == 0  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- orphans


def _plant_orphan(rig: Rig, name: str) -> None:
    rig.model.plant_node(NODE, {"external-source": "kubernetes", "tether-cluster": CLUSTER})
    meta = {**OWNER_META, "tether-name": name}
    rig.model.plant_service(NODE, {"ID": f"team-a-{name}-1", "Service": name, "Meta": meta})


async def test_collect_removes_the_instances_of_a_deleted_resource(rig: Rig) -> None:
    _plant_orphan(rig, "gone")
    await rig.services.collect(ObjectRef("consulservices", "team-a", "gone"))
    assert NODE not in rig.model.nodes


async def test_collect_leaves_a_resource_that_exists_in_endpoints_mode(rig: Rig) -> None:
    _plant_orphan(rig, "late")
    ref = ObjectRef("consulservices", "team-a", "late")
    rig.kube.resources[ref] = {"spec": {"endpoints": {"service": "late"}}}
    await rig.services.collect(ref)
    assert rig.ids() == ["team-a-late-1"]


async def test_collect_never_touches_other_owners(rig: Rig) -> None:
    _plant_orphan(rig, "gone")
    other_cluster = {**OWNER_META, "tether-cluster": "b"}
    rig.model.plant_service(NODE, {"ID": "x-1", "Service": "x", "Meta": other_cluster})
    rig.model.plant_service(NODE, {"ID": "y-1", "Service": "y", "Meta": {}})
    await rig.services.collect(ObjectRef("consulservices", "team-a", "gone"))
    assert rig.ids() == ["x-1", "y-1"]
    assert NODE in rig.model.nodes


class _Kube:
    async def event(self, *args: Any, **kwargs: Any) -> None:
        pass


async def test_the_controller_collects_an_orphan_not_in_its_cache(rig: Rig) -> None:
    _plant_orphan(rig, "gone")
    ctl = Controller(rig.services, _Kube())  # type: ignore[arg-type]
    ref = ObjectRef("consulservices", "team-a", "gone")
    ctl.enqueue_orphan(ref)
    assert await ctl.queue.get() == ref
    await ctl.process(ref)
    assert rig.ids() == []


async def test_a_plain_deletion_event_collects_nothing(rig: Rig) -> None:
    _plant_orphan(rig, "gone")
    ctl = Controller(rig.services, _Kube())  # type: ignore[arg-type]
    await ctl.process(ObjectRef("consulservices", "team-a", "gone"))
    assert rig.ids() == ["team-a-gone-1"]


async def test_the_skeleton_logs_a_release_that_found_nothing(
    rig: Rig, caplog: pytest.LogCaptureFixture,
) -> None:
    class Kube(_Kube):
        async def set_finalizers(self, ref: ObjectRef, finalizers: list[str], **_: Any) -> dict[str, Any]:
            return {"metadata": {"namespace": ref.namespace, "name": ref.name, "finalizers": finalizers}}

    ctl = Controller(rig.services, Kube())  # type: ignore[arg-type]
    ctl.cache[REF] = {
        "metadata": {"namespace": "team-a", "name": "web", "finalizers": [FINALIZER],
                     "deletionTimestamp": "2026-01-01T00:00:00Z", "resourceVersion": "3"},
        "spec": ENDPOINTS_SPEC,
    }
    with caplog.at_level(logging.INFO, logger="tether.reconciling"):
        await ctl.process(REF)
    assert any("released: nothing of this resource was found in Consul's catalog" in r.getMessage()
               for r in caplog.records)
