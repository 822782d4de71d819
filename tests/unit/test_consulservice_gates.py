"""The readiness gate tether.dev/consul-passing: its decisions, the planner's gated
endpoints, and endpoints mode's reconcile against the in-memory catalog."""

from __future__ import annotations

from typing import Any

import pytest
from catalogmodels import NODE, CatalogModel, FakeCatalog

from tether.api import ObjectRef
from tether.api import consulservices as api
from tether.clients.kube.client import KubeNotFound, KubeRejected
from tether.consulservice import endpoints, gates
from tether.consulservice.catalog import CatalogServices
from tether.consulservice.gating import Gating
from tether.consulservice.index import CatalogIndex, GateIndex
from tether.reconciling import Resource

REF = ObjectRef("consulservices", "team-a", "web")
NOW = "2026-01-01T00:00:00Z"


def pod_body(name: str, *, gated: bool = True, ready: bool | None = True,
             gate: dict[str, str] | None = None, uid: str = "") -> dict[str, Any]:
    conds: list[dict[str, str]] = []
    if ready is not None:
        conds.append({"type": "ContainersReady", "status": "True" if ready else "False"})
    if gate is not None:
        conds.append({"type": gates.GATE, **gate})
    return {
        "metadata": {"name": name, "uid": uid or f"uid-{name}"},
        "spec": {"readinessGates": [{"conditionType": gates.GATE}] if gated else []},
        "status": {"conditions": conds},
    }


def slim(name: str, **kw: Any) -> gates.Pod:
    view = gates.slim(pod_body(name, **kw))
    assert view is not None
    return view


# -- the pure decisions ----------------------------------------------------------------------


def test_only_gated_pods_are_kept_and_only_what_is_needed() -> None:
    assert gates.slim(pod_body("a", gated=False)) is None
    body = pod_body("a", ready=False, gate={"status": "True", "reason": "ConsulPassing",
                                            "lastTransitionTime": "t0"})
    body["spec"]["containers"] = [{"name": "big", "image": "x" * 1000}]
    assert gates.slim(body) == gates.Pod(
        "a", "uid-a", containers_ready=False, condition=gates.Condition("True", "ConsulPassing", "", "t0")
    )


def test_endpoint_health_follows_containers_ready_but_terminating_wins() -> None:
    assert gates.endpoint_health(slim("a"), {"ready": False, "serving": False})[0] == "passing"
    assert gates.endpoint_health(slim("a", ready=False), {"ready": False})[0] == "critical"
    assert gates.endpoint_health(slim("a", ready=None), {})[0] == "critical"
    assert gates.endpoint_health(slim("a"), {"ready": False, "terminating": True})[0] == "critical"


@pytest.mark.parametrize(("want", "consul", "status"), [
    ({"i1": "passing"}, {"i1": "passing"}, "True"),
    ({"i1": "passing"}, {"i1": None}, "False"),  # not registered yet
    ({"i1": "passing"}, {"i1": "critical"}, "False"),  # Tether wrote it; Consul does not say so yet
    ({"i1": "passing"}, {"i1": "warning"}, "False"),
    # Consul still says passing, but Tether is about to make it critical: never True.
    ({"i1": "critical"}, {"i1": "passing"}, "False"),
    ({"i1": "passing", "i2": "passing"}, {"i1": "passing", "i2": None}, "False"),  # every address
    ({}, {}, "False"),
])
def test_the_gate_opens_only_on_consuls_passing(
    want: dict[str, gates.Status], consul: dict[str, str | None], status: str
) -> None:
    cond = gates.wanted(want, consul)
    assert cond.status == status
    assert cond.reason == (gates.PASSING if status == "True" else gates.NOT_PASSING)
    assert cond.message


def test_idle_means_no_patch_and_the_time_moves_only_on_a_flip() -> None:
    true = gates.Condition("True", gates.PASSING, "passing")
    false = gates.Condition("False", gates.NOT_PASSING, "critical")
    # Absent → a patch, with the time.
    first = gates.decide(slim("a"), true, now=NOW)
    assert first is not None and first.condition == gates.Condition("True", gates.PASSING, "passing", NOW)
    # Already says it (even with another message) → nothing.
    has_true = slim("a", gate={"status": "True", "reason": gates.PASSING, "lastTransitionTime": "t0"})
    assert gates.decide(has_true, gates.Condition("True", gates.PASSING, "other"), now=NOW) is None
    # A flip → the new time.
    flip = gates.decide(has_true, false, now=NOW)
    assert flip is not None and flip.condition.last_transition == NOW
    # Same status, another reason (set by hand): patched, the time kept.
    odd = slim("a", gate={"status": "False", "reason": "Manual", "lastTransitionTime": "t0"})
    fix = gates.decide(odd, false, now=NOW)
    assert fix is not None and fix.condition.last_transition == "t0"


def test_the_patch_merges_by_type_and_is_guarded_by_uid() -> None:
    patch = gates.decide(slim("a"), gates.Condition("True", gates.PASSING, "m"), now=NOW)
    assert patch is not None
    assert patch.body() == {
        "metadata": {"uid": "uid-a"},
        "status": {"conditions": [{
            "type": gates.GATE, "status": "True", "reason": gates.PASSING, "message": "m",
            "lastTransitionTime": NOW,
        }]},
    }


def test_instance_status_is_the_worst_check() -> None:
    assert gates.instance_statuses([
        {"ServiceID": "a", "Status": "passing"}, {"ServiceID": "a", "Status": "warning"},
        {"ServiceID": "b", "Status": "maintenance"}, {"ServiceID": "", "Status": "critical"},
    ]) == {"a": "warning", "b": "critical"}


# -- the planner -----------------------------------------------------------------------------


def _slice(*eps: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": [address], "conditions": conditions,
             "targetRef": {"kind": "Pod", "name": pod, "uid": f"uid-{pod}"}}
            for address, pod, conditions in eps
        ],
    }


def test_gated_endpoints_take_containers_ready_and_name_their_pod() -> None:
    held = {"ready": False, "serving": False, "terminating": False}
    slices = [_slice(("10.0.0.1", "a", held), ("10.0.0.2", "b", held), ("10.0.0.3", "c", held))]
    pods = {"a": slim("a"), "b": slim("b", ready=False)}
    eps = {ep.address: ep for ep in endpoints.endpoints(slices, "http", pods)}
    assert (eps["10.0.0.1"].status, eps["10.0.0.1"].pod) == ("passing", "a")
    assert (eps["10.0.0.2"].status, eps["10.0.0.2"].pod) == ("critical", "b")
    assert (eps["10.0.0.3"].status, eps["10.0.0.3"].pod) == ("critical", "")  # not gated: ready
    # Without the Pods (the gate off): the endpoint's conditions, as before.
    assert [ep.status for ep in endpoints.endpoints(slices, "http")] == ["critical"] * 3


def test_a_namesake_pod_is_not_the_endpoints_pod() -> None:
    slices = [_slice(("10.0.0.1", "a", {"ready": False}))]
    other = slim("a", uid="uid-new")
    [ep] = endpoints.endpoints(slices, "http", {"a": other})
    assert (ep.status, ep.pod) == ("critical", "")


def test_gate_index_maps_pods_and_moves() -> None:
    index = GateIndex()
    index.record(REF, {"a"}, {"i1": None})
    assert index.backed_by("team-a", "a") == [REF]
    assert index.moved({}) == []
    assert index.moved({"i1": "passing"}) == [REF]
    index.record(REF, {"a"}, {"i1": "passing"})
    assert index.moved({"i1": "passing"}) == []
    assert index.moved({"i1": "critical"}) == [REF]
    index.forget(REF)
    assert index.backed_by("team-a", "a") == [] and index.moved({}) == []


# -- the reconcile -----------------------------------------------------------------------------


class Cluster:
    """One Service, its slice with Pod targetRefs, and the Pods (the test stands in for the kubelet)."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.endpoint_ready: dict[str, bool] = {}  # pod name → endpoint ready
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.refuse: type[Exception] | None = None

    async def read_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return {"spec": {"ports": [{"name": "http", "port": 80}]}} if name == "web" else None

    async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
        return [_slice(*(
            (f"10.0.0.{i + 1}", name, {"ready": self.endpoint_ready.get(name, False)})
            for i, name in enumerate(sorted(self.pods))
        ))]

    async def get(self, ref: ObjectRef) -> dict[str, Any] | None:
        return None

    # Pods
    async def gated(self, namespace: str) -> dict[str, gates.Pod]:
        return {name: view for name, body in self.pods.items() if (view := gates.slim(body)) is not None}

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        if self.refuse is not None:
            raise self.refuse("patch", 403 if self.refuse is KubeRejected else 404)
        self.patches.append((name, patch))
        assert patch["metadata"]["uid"] == self.pods[name]["metadata"]["uid"]
        conds = [c for c in self.pods[name]["status"]["conditions"] if c["type"] != gates.GATE]
        self.pods[name]["status"]["conditions"] = conds + patch["status"]["conditions"]

    def gate(self, name: str) -> str | None:
        for c in self.pods[name]["status"]["conditions"]:
            if c["type"] == gates.GATE:
                return str(c["status"])
        return None


class Rig:
    def __init__(self) -> None:
        self.model = CatalogModel()
        self.kube = Cluster()
        self.gate_index = GateIndex()
        self.services = CatalogServices(
            FakeCatalog(self.model), self.kube, CatalogIndex(cluster="kubernetes", plural="consulservices"),
            cluster="kubernetes", node=NODE, gating=Gating(self.kube, self.gate_index, now=lambda: NOW),
        )
        self.spec = api.parse("team-a", "web", {"endpoints": {"service": "web"}})

    async def apply(self) -> Any:
        res = Resource(ref=REF, uid="u", generation=1, resource_version="1",
                       spec={"endpoints": {"service": "web"}}, status={}, finalizers=(), deleting=False)
        return await self.services.apply(res, self.spec)

    def statuses(self) -> dict[str, str]:
        return gates.instance_statuses(self.model.checks.get(NODE, {}).values())


def iid(n: int) -> str:
    return endpoints.instance_id("team-a-web", f"10.0.0.{n}", 8080)


@pytest.fixture
def rig() -> Rig:
    return Rig()


async def test_a_gated_pod_passes_in_consul_before_its_gate_opens(rig: Rig) -> None:
    rig.kube.pods = {"a": pod_body("a", ready=True)}
    out = await rig.apply()
    assert out.ready == "True", out.message
    # Registered from ContainersReady, although the endpoint is not ready…
    assert rig.model.check_status(NODE) == {iid(1): "passing"}
    # …but the gate was decided on what Consul held before the write: not yet.
    assert rig.kube.gate("a") == "False"
    # The catalog watcher now sees the instance passing, and enqueues the resource.
    assert rig.gate_index.moved(rig.statuses()) == [REF]
    await rig.apply()
    assert rig.kube.gate("a") == "True"
    assert rig.gate_index.moved(rig.statuses()) == []
    # Idle: another reconcile writes nothing, to Consul or to the Pod.
    txns, patches = rig.model.txns, len(rig.kube.patches)
    await rig.apply()
    assert (rig.model.txns, len(rig.kube.patches)) == (txns, patches)


async def test_containers_not_ready_closes_the_gate_with_the_instance_critical(rig: Rig) -> None:
    rig.kube.pods = {"a": pod_body("a", ready=True)}
    await rig.apply()
    await rig.apply()
    assert rig.kube.gate("a") == "True"
    rig.kube.pods["a"]["status"]["conditions"][0]["status"] = "False"  # the kubelet's probe fails
    await rig.apply()
    assert rig.model.check_status(NODE) == {iid(1): "critical"}
    assert rig.kube.gate("a") == "False"
    [(_, last)] = rig.kube.patches[-1:]
    assert last["status"]["conditions"][0]["reason"] == gates.NOT_PASSING


async def test_ungated_pods_are_never_patched(rig: Rig) -> None:
    rig.kube.pods = {"a": pod_body("a", gated=False)}
    rig.kube.endpoint_ready = {"a": True}
    await rig.apply()
    await rig.apply()
    assert rig.model.check_status(NODE) == {iid(1): "passing"}
    assert rig.kube.patches == []
    assert rig.gate_index.moved({}) == []


async def test_a_refused_patch_is_retried_with_a_warning_and_a_vanished_pod_is_not(rig: Rig) -> None:
    rig.kube.pods = {"a": pod_body("a", ready=False)}
    rig.kube.refuse = KubeRejected
    out = await rig.apply()
    assert out.retry and [n.reason for n in out.notes] == ["ReadinessGateNotSet"]
    rig.kube.refuse = KubeNotFound
    out = await rig.apply()
    assert not out.retry and out.notes == ()


def test_a_gated_pod_change_wakes_its_resources_or_else_its_namespaces_followers() -> None:
    from tether.consulservice.gating import pod_cache

    class Followers:
        def followers_in(self, namespace: str) -> list[ObjectRef]:
            return [REF, ObjectRef("consulservices", namespace, "other")]

    index = GateIndex()
    woken: list[ObjectRef] = []
    cache = pod_cache(None, Followers(), index, woken.append)  # type: ignore[arg-type]
    cache.changed("team-a", "a")  # not tied to a resource yet: every follower
    assert woken == [REF, ObjectRef("consulservices", "team-a", "other")]
    woken.clear()
    index.record(REF, {"a"}, {"i1": "passing"})
    cache.changed("team-a", "a")
    assert woken == [REF]
