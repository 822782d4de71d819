"""The ConsulService reconciler against a fake Consul agent.

The fake keeps what the reconciler relies on: registrations by ID as the
agent re-renders them (``Service`` for the name, checks listed apart with a
``Type``, empty definitions), their checks' states, and the writes made. The
tests check outcomes: what the agent holds afterwards, the status fields,
the conditions and the events, and what the shared
:class:`~tether.consulservice.index.AgentIndex` tells the watcher.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest
from catalogmodels import consul_services

from tether.api import ObjectRef
from tether.api import consulservices as api
from tether.clients.consul.client import ConsulRejected, ConsulUnavailable
from tether.consulservice import planner
from tether.consulservice.index import AgentIndex
from tether.consulservice.reconciling import ConsulServices
from tether.reconciling import Outcome, Resource

REF = ObjectRef("consulservices", "team-a", "web")
OWNER = planner.Owner("kubernetes", "team-a", "web")
URL = "http://127.0.0.1:8500"


class FakeAgent:
    """The :class:`tether.clients.consul.client.Agent` protocol over a dict of registrations."""

    def __init__(self) -> None:
        self.registered: dict[str, dict[str, Any]] = {}
        self.check_states: dict[str, dict[str, Any]] = {}
        self.writes: list[tuple[str, str]] = []  # (verb, service ID)
        self.failure: Exception | None = None  # raised by every call while set

    def _call(self) -> None:
        if self.failure is not None:
            raise self.failure

    # -- planting state the way someone else would -----------------------------------
    def plant(self, body: Mapping[str, Any], *, status: str = "critical") -> None:
        """A registration made outside this reconciler (another tool, an earlier run)."""
        self.registered[body["ID"]] = {
            "ID": body["ID"], "Service": body.get("Name", body["ID"]), "Address": body.get("Address", ""),
            "Port": body.get("Port", 0), "Tags": list(body.get("Tags") or []) or None,
            "Meta": dict(body.get("Meta") or {}), "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
        }
        for cid in [cid for cid, c in self.check_states.items() if c["ServiceID"] == body["ID"]]:
            del self.check_states[cid]
        for c in body.get("Checks") or []:
            kind = next(t for t in ("HTTP", "TCP", "GRPC", "TTL") if t in c).lower()
            self.check_states[c["CheckID"]] = {
                "CheckID": c["CheckID"], "Name": c["Name"], "Status": status, "ServiceID": body["ID"],
                "Type": kind, "Interval": c.get("Interval", ""), "Timeout": c.get("Timeout", ""),
                "Definition": {},
            }

    def set_status(self, service_id: str, status: str) -> None:
        for c in self.check_states.values():
            if c["ServiceID"] == service_id:
                c["Status"] = status

    # -- the Agent protocol ------------------------------------------------------------
    async def service(self, service_id: str) -> dict[str, Any] | None:
        self._call()
        found = self.registered.get(service_id)
        return copy.deepcopy(found)

    async def service_checks(self, service_id: str) -> list[dict[str, Any]]:
        self._call()
        return [dict(c) for c in self.check_states.values() if c["ServiceID"] == service_id]

    async def services(self) -> dict[str, dict[str, Any]]:
        self._call()
        return copy.deepcopy(self.registered)

    async def checks(self) -> dict[str, dict[str, Any]]:
        self._call()
        return copy.deepcopy(self.check_states)

    async def register(self, body: Mapping[str, Any], *, replace_checks: bool = True) -> None:
        self._call()
        self.writes.append(("register", body["ID"]))
        kept = {cid: c for cid, c in self.check_states.items() if c["ServiceID"] == body["ID"]}
        self.plant(body)
        if not replace_checks:  # the agent keeps checks the body does not list
            self.check_states.update({cid: c for cid, c in kept.items() if cid not in self.check_states})

    async def node_name(self) -> str:
        self._call()
        return "node-1"

    async def checks_with_ids(self, check_ids: Any) -> list[dict[str, Any]]:
        self._call()
        return [dict(c) for cid, c in self.check_states.items() if cid in set(check_ids)]

    async def deregister(self, service_id: str) -> None:
        self._call()
        self.writes.append(("deregister", service_id))
        self.registered.pop(service_id, None)
        for cid in [cid for cid, c in self.check_states.items() if c["ServiceID"] == service_id]:
            del self.check_states[cid]

    async def wait_services(self, index: int, wait: str) -> int:
        raise NotImplementedError("the reconciler never blocks on the catalog")

    async def wait_health(self, index: int, wait: str) -> int:
        raise NotImplementedError("the reconciler never blocks on health")


def resource(
    spec: dict[str, Any], *, reconciled: bool = False, service_id: str = "", generation: int = 1
) -> Resource:
    status: dict[str, Any] = {}
    if reconciled:
        status = {"observedGeneration": generation, "conditions": [{"type": "Ready", "status": "True"}]}
    if service_id:
        status["serviceID"] = service_id
    return Resource(REF, "uid", generation, "1", spec, status, (), False)


def rig() -> tuple[FakeAgent, AgentIndex, ConsulServices]:
    agent = FakeAgent()
    index = AgentIndex(cluster="kubernetes", plural="consulservices")
    services: ConsulServices = consul_services(agent, index, cluster="kubernetes", agent_url=URL)
    return agent, index, services


def notes(out: Outcome) -> list[tuple[str, str]]:
    return [(n.type, n.reason) for n in out.notes]


def healthy(out: Outcome) -> tuple[str, str]:
    (condition,) = out.conditions
    assert condition.type == "Healthy"
    return condition.status, condition.reason


SPEC: dict[str, Any] = {"address": "10.0.0.5", "port": 8080, "tags": ["v1"], "meta": {"team": "a"}}
TTL_SPEC: dict[str, Any] = {**SPEC, "checks": [{"name": "alive", "ttl": "30s"}]}


# --------------------------------------------------------------------------- register


async def test_register_then_nothing_to_do() -> None:
    agent, index, services = rig()
    out = await services.apply(resource(SPEC))
    assert (out.ready, out.reason, out.retry) == ("True", "Reconciled", False)
    assert out.message == f"Registered as 'team-a-web' with the Consul agent {URL}"
    assert out.fields == {"serviceID": "team-a-web", "health": "passing"}
    assert healthy(out) == ("True", "Passing")
    assert notes(out) == [("Normal", "Registered")]
    svc = agent.registered["team-a-web"]
    assert (svc["Address"], svc["Port"], svc["Tags"]) == ("10.0.0.5", 8080, ["v1"])
    assert planner.owner_of(svc["Meta"]) == OWNER and svc["Meta"]["team"] == "a"
    assert agent.writes == [("register", "team-a-web")]

    # What the watcher sees of it is no drift...
    assert index.drifted(await agent.services(), await agent.checks()) == []
    # ...and the next reconcile writes nothing.
    out = await services.apply(resource(SPEC, reconciled=True, service_id="team-a-web"))
    assert out.ready == "True" and out.notes == () and agent.writes == [("register", "team-a-web")]


async def test_health_comes_from_the_agents_checks() -> None:
    agent, index, services = rig()
    out = await services.apply(resource(TTL_SPEC))
    assert out.fields["health"] == "critical" and healthy(out) == ("False", "Critical")
    agent.set_status("team-a-web", "passing")
    assert index.drifted(await agent.services(), await agent.checks()) == [REF], "health moved"
    out = await services.apply(resource(TTL_SPEC, reconciled=True, service_id="team-a-web"))
    assert out.fields["health"] == "passing" and healthy(out) == ("True", "Passing")
    assert out.notes == () and len(agent.writes) == 1, "a health change is not a write"
    assert index.drifted(await agent.services(), await agent.checks()) == []


async def test_out_of_band_change_is_repaired_as_drift() -> None:
    agent, index, services = rig()
    await services.apply(resource(SPEC))
    agent.registered["team-a-web"]["Port"] = 9999
    assert index.drifted(await agent.services(), await agent.checks()) == [REF]
    out = await services.apply(resource(SPEC, reconciled=True, service_id="team-a-web"))
    assert notes(out) == [("Warning", "DriftRepaired")]
    assert "port 9999 → 8080" in out.notes[0].message
    assert agent.registered["team-a-web"]["Port"] == 8080


async def test_a_deregistered_service_is_registered_again() -> None:
    agent, index, services = rig()
    await services.apply(resource(SPEC))
    await agent.deregister("team-a-web")
    assert index.drifted(await agent.services(), await agent.checks()) == [REF]
    out = await services.apply(resource(SPEC, reconciled=True, service_id="team-a-web"))
    assert notes(out) == [("Warning", "DriftRepaired")] and "team-a-web" in agent.registered


async def test_a_spec_change_is_an_update_not_drift() -> None:
    agent, _, services = rig()
    await services.apply(resource(SPEC))
    changed = {**SPEC, "port": 9090}
    # The status still describes generation 1; this is generation 2.
    res = resource(changed, generation=2, service_id="team-a-web")
    out = await services.apply(res)
    assert notes(out) == [("Normal", "Updated")] and "port 8080 → 9090" in out.notes[0].message
    assert agent.registered["team-a-web"]["Port"] == 9090


# --------------------------------------------------------------------------- conflicts


@pytest.mark.parametrize(
    ("meta", "who"),
    [
        ({"external-source": "nomad"}, "something outside Tether"),
        (planner.Owner("kubernetes", "team-b", "web").meta(), "team-b/web in cluster kubernetes"),
        (planner.Owner("west", "team-a", "web").meta(), "team-a/web in cluster west"),
    ],
)
async def test_a_foreign_registration_is_a_conflict_and_never_touched(meta: dict[str, str], who: str) -> None:
    agent, index, services = rig()
    foreign = {"ID": "team-a-web", "Name": "web", "Address": "10.9.9.9", "Port": 1, "Meta": meta}
    agent.plant(foreign)
    before = copy.deepcopy(agent.registered)
    out = await services.apply(resource(SPEC))
    assert (out.ready, out.reason, out.retry) == ("False", "Conflict", True)
    assert who in out.message and "'team-a-web'" in out.message
    assert out.fields == {"serviceID": "team-a-web", "health": "unknown"}
    assert agent.writes == [] and agent.registered == before
    # Not tracked: the watcher has nothing to repair for it.
    assert index.drifted(await agent.services(), await agent.checks()) == []
    # Deleting the resource leaves the foreign registration alone too.
    out = await services.release(resource(SPEC, service_id="team-a-web"))
    assert out.released and out.notes == ()
    assert agent.writes == [] and agent.registered == before


# --------------------------------------------------------------------------- ID moves


async def test_an_id_move_deregisters_the_old_registration() -> None:
    agent, _, services = rig()
    await services.apply(resource({**SPEC, "id": "old"}))
    out = await services.apply(resource({**SPEC, "id": "new"}, generation=2, service_id="old"))
    assert out.ready == "True" and out.fields["serviceID"] == "new"
    assert set(agent.registered) == {"new"}
    assert agent.writes[-2:] == [("register", "new"), ("deregister", "old")]
    assert ("Normal", "Deregistered") in notes(out)


async def test_an_id_move_cut_short_is_finished_through_the_owner_index() -> None:
    """A crash after registering the new ID, before the status named it."""
    agent, index, services = rig()
    await services.apply(resource({**SPEC, "id": "old"}))
    moved = resource({**SPEC, "id": "new"}, generation=2)  # no serviceID in the status
    # Before the watcher's first scan nothing says "old" is this resource's...
    await services.apply(moved)
    assert set(agent.registered) == {"old", "new"}
    # ...but the scan flags the resource, and its next reconcile removes "old".
    index.refresh(await agent.services())
    assert index.owned_ids(OWNER) == {"old", "new"}
    assert index.drifted(await agent.services(), await agent.checks()) == [REF]
    out = await services.apply(moved)
    assert out.ready == "True" and set(agent.registered) == {"new"}
    assert agent.writes[-1] == ("deregister", "old") and index.owned_ids(OWNER) == {"new"}


async def test_an_id_move_never_deregisters_a_foreign_registration_under_the_old_id() -> None:
    agent, _, services = rig()
    agent.plant({"ID": "old", "Name": "web", "Port": 1, "Meta": {"external-source": "nomad"}})
    out = await services.apply(resource({**SPEC, "id": "new"}, generation=2, service_id="old"))
    assert out.ready == "True" and set(agent.registered) == {"old", "new"}
    assert ("deregister", "old") not in agent.writes


# --------------------------------------------------------------------------- release


async def test_release_deletes_every_owned_registration() -> None:
    agent, index, services = rig()
    await services.apply(resource({**SPEC, "id": "old"}))
    agent.plant(
        {"ID": "new", "Name": "web", "Port": 8080, "Meta": OWNER.meta()}
    )  # registered by an apply whose status was lost
    agent.plant({"ID": "bystander", "Name": "db", "Port": 5432, "Meta": {}})
    index.refresh(await agent.services())
    out = await services.release(resource({**SPEC, "id": "new"}, service_id="old"))
    assert (out.ready, out.reason, out.released) == ("False", "Deleting", True)
    assert set(agent.registered) == {"bystander"}
    assert sorted(agent.writes[-2:]) == [("deregister", "new"), ("deregister", "old")]
    assert notes(out) == [("Normal", "Deregistered")]
    assert index.owned_ids(OWNER) == set()
    assert index.drifted(await agent.services(), await agent.checks()) == []


async def test_orphan_release_leaves_the_registration() -> None:
    agent, index, services = rig()
    spec = {**SPEC, "deletionPolicy": "Orphan"}
    await services.apply(resource(spec))
    out = await services.release(resource(spec, service_id="team-a-web"))
    assert out.released and notes(out) == [("Normal", "Orphaned")]
    assert "team-a-web" in agent.registered and ("deregister", "team-a-web") not in agent.writes
    # Released (issue 14): no ownership meta left, so no later resource finds it as its own.
    assert planner.owner_of(agent.registered["team-a-web"]["Meta"]) is None
    # No longer watched: an edit of it now is nobody's drift.
    agent.registered["team-a-web"]["Port"] = 1
    assert index.drifted(await agent.services(), await agent.checks()) == []


async def test_release_of_an_invalid_spec_uses_the_status() -> None:
    agent, _, services = rig()
    await services.apply(resource(SPEC))
    out = await services.release(resource({"port": 0}, service_id="team-a-web"))
    assert out.released and agent.registered == {}


# --------------------------------------------------------------------------- failures


async def test_invalid_spec_is_not_retried_and_writes_nothing() -> None:
    agent, _, services = rig()
    out = await services.apply(resource({"port": 70000}))
    assert (out.ready, out.reason, out.retry) == ("False", "InvalidSpec", False)
    assert agent.writes == []


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (ConsulUnavailable("Consul agent at http://127.0.0.1:8500 is unreachable"), "BackendUnavailable"),
        (ConsulRejected("Consul refused registration: permission denied"), "BackendRejected"),
    ],
)
async def test_agent_failures_become_conditions_and_retries(failure: Exception, reason: str) -> None:
    agent, _, services = rig()
    agent.failure = failure
    out = await services.apply(resource(SPEC))
    assert (out.ready, out.reason, out.retry) == ("False", reason, True)
    assert out.message.startswith("cannot register 'team-a-web' in Consul: ") and str(failure) in out.message
    assert out.fields == {"serviceID": "team-a-web", "health": "unknown"}
    out = await services.release(resource(SPEC, service_id="team-a-web"))
    assert not out.released and out.reason == reason
    assert out.message.endswith("the finalizer stays until it can")
    agent.failure = None
    assert (await services.apply(resource(SPEC))).ready == "True"


# --------------------------------------------------------------------------- orphans on the agent


class _Lookup:
    """Kubernetes as the collector asks it: which ConsulServices exist."""

    def __init__(self, *existing: ObjectRef) -> None:
        self.existing = set(existing)
        self.asked: list[ObjectRef] = []

    async def get(self, ref: ObjectRef) -> dict[str, Any] | None:
        self.asked.append(ref)
        return {"spec": {}} if ref in self.existing else None


def orphan_rig(*existing: ObjectRef) -> tuple[FakeAgent, AgentIndex, ConsulServices, _Lookup]:
    agent, index, services = rig()
    lookup = _Lookup(*existing)
    services.lookup = lookup
    return agent, index, services, lookup


async def test_a_registration_landing_after_the_release_is_collected() -> None:
    # The registration's outcome was unknown (Consul paused past the deadline); the
    # resource was deleted and its release found nothing; then the write landed.
    agent, index, services, lookup = orphan_rig()
    released = await services.release(resource(SPEC, reconciled=True, service_id="team-a-web"))
    assert released.released and agent.writes == []
    agent.plant(planner.registration(api.parse("team-a", "web", SPEC), OWNER))
    index.refresh(await agent.services())  # the watcher's next scan
    assert index.untracked() == [REF]
    assert services.fixed.may_hold_orphan(REF)
    await services.collect(REF)
    assert agent.registered == {} and agent.writes[-1] == ("deregister", "team-a-web")
    assert lookup.asked == [REF]
    assert not services.fixed.may_hold_orphan(REF)


async def test_collect_leaves_the_registration_of_a_resource_that_exists() -> None:
    agent, index, services, lookup = orphan_rig(REF)
    agent.plant(planner.registration(api.parse("team-a", "web", SPEC), OWNER))
    index.refresh(await agent.services())
    await services.collect(REF)
    assert "team-a-web" in agent.registered and agent.writes == []
    assert lookup.asked == [REF]


async def test_collect_never_touches_other_owners_or_clusters() -> None:
    agent, index, services, _ = orphan_rig()
    mine = planner.registration(api.parse("team-a", "web", SPEC), OWNER)
    agent.plant(mine)
    other_cluster = planner.registration(
        api.parse("team-a", "web", {**SPEC, "id": "b-web"}), planner.Owner("b", "team-a", "web")
    )
    agent.plant(other_cluster)
    agent.plant({"ID": "hand-made", "Name": "hand-made", "Meta": {}})
    index.refresh(await agent.services())
    assert index.untracked() == [REF]  # the other cluster's owner is not ours to ask about
    await services.collect(REF)
    assert sorted(agent.registered) == ["b-web", "hand-made"]


async def test_collect_keeps_a_registration_taken_over_since_the_scan() -> None:
    # Someone re-registered the ID without our meta between the scan and the collection.
    agent, index, services, _ = orphan_rig()
    agent.plant(planner.registration(api.parse("team-a", "web", SPEC), OWNER))
    index.refresh(await agent.services())
    agent.plant({"ID": "team-a-web", "Name": "web", "Meta": {"owner": "someone"}})
    await services.collect(REF)
    assert agent.registered["team-a-web"]["Meta"] == {"owner": "someone"} and agent.writes == []


async def test_a_tracked_resource_is_never_collected() -> None:
    agent, index, services, lookup = orphan_rig()
    await services.apply(resource(SPEC))
    index.refresh(await agent.services())
    assert index.untracked() == [] and not services.fixed.may_hold_orphan(REF)
    await services.collect(REF)
    assert "team-a-web" in agent.registered and lookup.asked == []
