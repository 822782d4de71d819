"""TetherPolicy enforcement in the shared skeleton, and the policy cache's bookkeeping.

The cache is fed here the way its watches feed it (events as the API server
sends them); no server is involved. End-to-end behaviour is in
``tests/e2e/test_tetherpolicy.py``.
"""

from __future__ import annotations

import copy
from typing import Any

from tether import conditions
from tether.api import ObjectRef
from tether.api.policies import Claims
from tether.policing import Policies
from tether.reconciling import Controller, Outcome, Resource


def _policy(name: str, spec: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    return {"metadata": {"name": name, "generation": generation, "resourceVersion": "1"}, "spec": spec}


def _namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels, "resourceVersion": "1"}}


class _Http:
    """Records status patches; answers them with the patched status."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, dict[str, Any]]] = []

    async def request(self, method: str, path: str, *, body: Any = None, **_: Any) -> Any:
        self.patches.append((path, copy.deepcopy(body)))
        return {"status": copy.deepcopy(body["status"])}


def _cache(default: Any = "allow") -> tuple[Policies, _Http, list[ObjectRef]]:
    http = _Http()
    cache = Policies(http, default=default)  # type: ignore[arg-type]
    enqueued: list[ObjectRef] = []
    for plural in ("consulservices", "etcdconfigs", "consulconfigs"):
        cache.subscribe(plural, enqueued.append)
    cache._replace_policies([])
    cache._policies_listed.set()
    cache._namespaces_listed.set()
    for ns, team in (("team-a", "a"), ("team-b", "b"), ("dev", "")):
        cache._namespace_event("ADDED", _namespace(ns, **({"team": team} if team else {})))
    enqueued.clear()
    return cache, http, enqueued


PAYMENTS_A = ObjectRef("consulservices", "team-a", "payments")
PAYMENTS_B = ObjectRef("consulservices", "team-b", "payments")
CONFIG_B = ObjectRef("etcdconfigs", "team-b", "cfg")


async def test_a_policy_change_enqueues_only_the_resources_whose_decision_changed() -> None:
    cache, _, enqueued = _cache()
    for ref in (PAYMENTS_A, PAYMENTS_B):
        decision = await cache.check(ref, Claims("service", "payments"))
        assert decision is not None and decision.allowed
    assert (await cache.check(CONFIG_B, Claims("etcd", "/b"))).allowed  # type: ignore[union-attr]
    cache._policy_event("ADDED", _policy("a", {
        "namespaceSelector": {"matchLabels": {"team": "a"}}, "consulServiceNames": ["payments"],
    }))
    assert enqueued == [PAYMENTS_B], "team-a's stays allowed, team-b's config is unaffected"
    refused = await cache.check(PAYMENTS_B, Claims("service", "payments"))
    assert refused is not None and not refused.allowed and refused.policies == ("a",)
    # A status-only echo of the policy decides nothing again.
    enqueued.clear()
    cache._policy_event("MODIFIED", {**_policy("a", cache._stored["a"].spec), "status": {"forbidden": 1}})
    assert enqueued == []
    # Deleting the policy allows it again.
    cache._policy_event("DELETED", _policy("a", {}))
    assert enqueued == [PAYMENTS_B]


async def test_relabelling_a_namespace_rechecks_that_namespace() -> None:
    cache, _, enqueued = _cache()
    cache._policy_event("ADDED", _policy("b", {
        "namespaceSelector": {"matchLabels": {"team": "b"}}, "etcdPrefixes": ["/b"],
    }))
    assert (await cache.check(CONFIG_B, Claims("etcd", "/b"))).allowed  # type: ignore[union-attr]
    enqueued.clear()
    cache._namespace_event("MODIFIED", _namespace("team-b", team="c"))
    assert enqueued == [CONFIG_B]
    # Unchanged labels (a metadata event for something else): nothing.
    enqueued.clear()
    cache._namespace_event("MODIFIED", _namespace("team-b", team="c"))
    assert enqueued == []


async def test_an_unknown_namespace_is_not_decided_on_a_guess() -> None:
    cache, _, _ = _cache(default="allow")
    assert await cache.check(ObjectRef("etcdconfigs", "new", "x"), Claims("etcd", "/x")) is None


async def test_status_counts_namespaces_and_refusals_and_is_written_only_on_change() -> None:
    cache, http, _ = _cache()
    cache._policy_event("ADDED", _policy("a", {
        "namespaceSelector": {"matchLabels": {"team": "a"}}, "consulServiceNames": ["payments"],
    }))
    cache._policy_event("ADDED", _policy("broken", {
        "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": []}]},
    }))
    await cache.check(PAYMENTS_B, Claims("service", "payments"))
    assert await cache._write_once() is False
    written = {path.rsplit("/", 2)[-2]: body["status"] for path, body in http.patches}
    assert written["a"]["namespaces"] == 1 and written["a"]["forbidden"] == 1
    ready = conditions.find(written["a"]["conditions"], conditions.READY)
    assert ready is not None and ready["status"] == "True"
    broken = conditions.find(written["broken"]["conditions"], conditions.READY)
    assert broken is not None and broken["status"] == "False" and "values" in broken["message"]
    assert written["broken"]["namespaces"] == 0
    # Nothing changed: nothing is written (idle means idle).
    http.patches.clear()
    await cache._write_once()
    assert http.patches == []
    # The refused resource goes away: the count follows.
    cache.forget(PAYMENTS_B)
    await cache._write_once()
    assert [body["status"]["forbidden"] for _, body in http.patches] == [0]


# -- the skeleton -----------------------------------------------------------------------


class _Kube:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.statuses: list[dict[str, Any]] = []
        self.spec = spec
        self.rv = 10

    def _body(self, ref: ObjectRef, **extra: Any) -> dict[str, Any]:
        self.rv += 1
        meta = {"namespace": ref.namespace, "name": ref.name, "resourceVersion": str(self.rv),
                "generation": 1, "finalizers": ["tether.dev/cleanup"]}
        return {"metadata": meta, "spec": self.spec, **extra}

    async def set_finalizers(self, ref: ObjectRef, finalizers: list[str], **_: Any) -> dict[str, Any]:
        return self._body(ref)

    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> dict[str, Any]:
        self.statuses.append(status)
        return self._body(ref, status=status)

    async def event(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Kind:
    kind = "ConsulService"
    plural = "consulservices"

    def __init__(self) -> None:
        self.applied = 0
        self.withdrawn: list[str] = []

    def claims(self, res: Resource) -> Claims | None:
        name = res.spec.get("name")
        return Claims("service", name) if isinstance(name, str) else None

    async def apply(self, res: Resource) -> Outcome:
        self.applied += 1
        return Outcome("True", conditions.RECONCILED, "registered")

    async def withdraw(self, res: Resource, message: str) -> Outcome:
        self.withdrawn.append(message)
        return Outcome.failed(conditions.FORBIDDEN, message, retry=False)

    async def release(self, res: Resource) -> Outcome:
        raise AssertionError("not deleted here")

    def forget(self, ref: ObjectRef) -> None:
        pass


async def test_the_skeleton_withdraws_instead_of_applying_when_refused() -> None:
    cache, _, enqueued = _cache()
    cache._policy_event("ADDED", _policy("a", {
        "namespaceSelector": {"matchLabels": {"team": "a"}}, "consulServiceNames": ["payments"],
    }))
    kube, kind = _Kube({"name": "payments"}), _Kind()
    ctl = Controller(kind, kube, workers=1)  # type: ignore[arg-type]
    ctl.use_policies(cache)
    assert cache._enqueue["consulservices"] == ctl.enqueue
    cache.subscribe("consulservices", enqueued.append)  # to see what it enqueues
    body = {"metadata": {"namespace": "team-b", "name": "payments", "resourceVersion": "5", "generation": 1},
            "spec": {"name": "payments"}}
    ctl.observe("ADDED", body)
    await ctl.process(PAYMENTS_B)
    assert kind.applied == 0 and len(kind.withdrawn) == 1
    ready = conditions.find(kube.statuses[-1]["conditions"], conditions.READY)
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "Forbidden")
    assert "payments" in ready["message"] and "a" in ready["message"]
    assert ctl.backoff.failures(PAYMENTS_B) == 0  # a refusal is not retried
    # The policy now allows team-b too: the cache enqueues it, and apply runs.
    enqueued.clear()
    cache._policy_event("MODIFIED", _policy("a", {
        "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]},
        "consulServiceNames": ["payments"],
    }, generation=2))
    assert enqueued == [PAYMENTS_B]
    await ctl.process(PAYMENTS_B)
    assert kind.applied == 1


async def test_a_spec_that_does_not_parse_goes_to_apply_unchecked() -> None:
    cache, _, _ = _cache(default="deny")
    kube, kind = _Kube({}), _Kind()
    ctl = Controller(kind, kube, workers=1)  # type: ignore[arg-type]
    ctl.use_policies(cache)
    ref = ObjectRef("consulservices", "dev", "x")
    ctl.observe("ADDED", {"metadata": {"namespace": "dev", "name": "x", "resourceVersion": "5",
                                       "generation": 1}, "spec": {}})
    await ctl.process(ref)
    assert kind.applied == 1  # apply reports the InvalidSpec itself


def test_the_cache_knows_which_namespaces_exist_and_are_not_being_deleted() -> None:
    cache, _, _ = _cache()
    assert cache.live_namespaces() == {"team-a", "team-b", "dev"}
    assert cache.namespaces_changed.is_set()
    cache.namespaces_changed.clear()
    cache._namespace_event("MODIFIED", _namespace("dev", team="x"))  # a label: the set is the same
    assert not cache.namespaces_changed.is_set()
    terminating = _namespace("team-b")
    terminating["metadata"]["deletionTimestamp"] = "2026-12-07T00:00:00Z"
    cache._namespace_event("MODIFIED", terminating)
    assert cache.live_namespaces() == {"team-a", "dev"}
    assert cache.namespaces_changed.is_set()
    cache.namespaces_changed.clear()
    cache._namespace_event("DELETED", _namespace("team-a"))
    cache._namespace_event("ADDED", _namespace("team-c"))
    assert cache.live_namespaces() == {"dev", "team-c"}
    assert cache.namespaces_changed.is_set()


async def test_allowed_resources_leave_the_policy_statuses_alone() -> None:
    """A start over thousands of allowed resources recounts no policy status."""
    cache, _, _ = _cache()
    cache._policy_event("ADDED", _policy("a", {
        "namespaceSelector": {"matchLabels": {"team": "a"}}, "consulServiceNames": ["payments"],
    }))
    cache._dirty.clear()
    for i in range(50):  # in a namespace no policy selects, and one policy a allows
        for ref, name in ((ObjectRef("consulservices", "dev", f"s{i}"), f"s{i}"), (PAYMENTS_A, "payments")):
            decision = await cache.check(ref, Claims("service", name))
            assert decision is not None and decision.allowed
    assert not cache._dirty.is_set()
    refused = await cache.check(PAYMENTS_B, Claims("service", "payments"))
    assert refused is not None and not refused.allowed
    assert cache._dirty.is_set(), "a refusal moves policy a's forbidden count"
