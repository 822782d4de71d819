"""The agent index compares only what changed: it must agree with a full comparison.

:class:`~tether.consulservice.index.AgentIndex` keeps the previous listing and looks
only at the entries that differ, the resources recorded since, and those flagged last
time. A model here compares everything on every scan, as the index once did; any
sequence of reconciles and edits behind Tether's back must give both the same answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.api import ObjectRef
from tether.api import consulservices as api
from tether.consulservice import planner
from tether.consulservice.index import AgentIndex, Tracked

CLUSTER = "kubernetes"
NAMES = ("a", "b", "c")
IDS = ("id-a", "id-b", "id-c", "id-x")


def registration(name: str, sid: str, port: int, *, cluster: str = CLUSTER) -> dict[str, Any]:
    spec = api.parse("team", name, {"address": "10.0.0.5", "port": port, "id": sid,
                                    "checks": [{"name": "alive", "ttl": "30s"}]})
    return planner.registration(spec, planner.Owner(cluster, "team", name))


def agent_view(body: Mapping[str, Any]) -> dict[str, Any]:
    return {"ID": body["ID"], "Service": body["Name"], "Address": body["Address"], "Port": body["Port"],
            "Tags": None, "Meta": dict(body["Meta"])}


def agent_checks(body: Mapping[str, Any], status: str) -> dict[str, dict[str, Any]]:
    return {c["CheckID"]: {"CheckID": c["CheckID"], "Name": c["Name"], "Type": "ttl", "Status": status,
                           "ServiceID": body["ID"], "Interval": "", "Timeout": ""}
            for c in body["Checks"]}


def full_comparison(
    tracked: Mapping[ObjectRef, Tracked], services: Mapping[str, Mapping[str, Any]],
    checks: Mapping[str, Mapping[str, Any]],
) -> set[ObjectRef]:
    """Every tracked resource against the whole listing."""
    by_service: dict[str, list[Mapping[str, Any]]] = {}
    for check in checks.values():
        by_service.setdefault(str(check.get("ServiceID", "")), []).append(check)
    out = set()
    for ref, t in tracked.items():
        svc = services.get(t.service_id)
        svc_checks = by_service.get(t.service_id, [])
        health = planner.aggregate_health([str(c.get("Status", "")) for c in svc_checks])
        if svc is None or planner.observed_signature(svc, svc_checks) != t.signature or health != t.health:
            out.add(ref)
    for sid, svc in services.items():
        owner = planner.owner_of(svc.get("Meta"))
        if owner is None or owner.cluster != CLUSTER:
            continue
        ref = ObjectRef("consulservices", owner.namespace, owner.name)
        if ref in tracked and tracked[ref].service_id != sid:
            out.add(ref)
    return out


steps = st.lists(
    st.one_of(
        # A reconcile records what it wrote (sometimes after writing it).
        st.tuples(st.just("track"), st.sampled_from(NAMES), st.sampled_from(IDS),
                  st.integers(1, 3), st.sampled_from(["passing", "critical"]), st.booleans()),
        st.tuples(st.just("untrack"), st.sampled_from(NAMES)),
        # Someone else: registers (for any owner, or another cluster), edits, deregisters.
        st.tuples(st.just("register"), st.sampled_from(NAMES), st.sampled_from(IDS),
                  st.integers(1, 3), st.sampled_from([CLUSTER, "other"])),
        st.tuples(st.just("deregister"), st.sampled_from(IDS)),
        st.tuples(st.just("health"), st.sampled_from(IDS), st.sampled_from(["passing", "critical"])),
        st.tuples(st.just("unowned"), st.sampled_from(IDS)),
        st.tuples(st.just("scan"),),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_the_incremental_comparison_agrees_with_a_full_one(script: list[tuple[Any, ...]]) -> None:
    index = AgentIndex(cluster=CLUSTER, plural="consulservices")
    tracked: dict[ObjectRef, Tracked] = {}
    services: dict[str, dict[str, Any]] = {}
    checks: dict[str, dict[str, Any]] = {}

    def put(body: Mapping[str, Any], status: str) -> None:
        services[body["ID"]] = agent_view(body)
        for cid in [cid for cid, c in checks.items() if c["ServiceID"] == body["ID"]]:
            del checks[cid]
        checks.update(agent_checks(body, status))

    for step in [*script, ("scan",)]:
        verb = step[0]
        if verb == "track":
            _, name, sid, port, health, write = step
            body = registration(name, sid, port)
            if write:
                put(body, health)
            ref = ObjectRef("consulservices", "team", name)
            tracked[ref] = Tracked(sid, planner.desired_signature(body), health)
            index.track(ref, tracked[ref])
        elif verb == "untrack":
            ref = ObjectRef("consulservices", "team", step[1])
            tracked.pop(ref, None)
            index.untrack(ref)
        elif verb == "register":
            _, name, sid, port, cluster = step
            put(registration(name, sid, port, cluster=cluster), "passing")
        elif verb == "deregister":
            services.pop(step[1], None)
            for cid in [cid for cid, c in checks.items() if c["ServiceID"] == step[1]]:
                del checks[cid]
        elif verb == "health":
            for c in checks.values():
                if c["ServiceID"] == step[1]:
                    c["Status"] = step[2]
        elif verb == "unowned" and step[1] in services:
            services[step[1]] = {**services[step[1]], "Meta": {}}
        elif verb == "scan":
            # Fresh objects each time, as a new listing from the agent would be.
            listed = {sid: {**svc, "Meta": dict(svc["Meta"])} for sid, svc in services.items()}
            listed_checks = {cid: dict(c) for cid, c in checks.items()}
            index.refresh(listed)
            assert set(index.drifted(listed, listed_checks)) == full_comparison(
                tracked, listed, listed_checks
            )
            owners: dict[planner.Owner, set[str]] = {}
            for sid, svc in listed.items():
                owner = planner.owner_of(svc.get("Meta"))
                if owner is not None:
                    owners.setdefault(owner, set()).add(sid)
            for owner, ids in owners.items():
                assert index.owned_ids(owner) == ids


def test_a_scan_after_nothing_changed_compares_nothing(monkeypatch: Any) -> None:
    index = AgentIndex(cluster=CLUSTER, plural="consulservices")
    services, checks = {}, {}
    for name in NAMES:
        body = registration(name, f"id-{name}", 1)
        services[body["ID"]] = agent_view(body)
        checks.update(agent_checks(body, "passing"))
        index.track(ObjectRef("consulservices", "team", name), Tracked(
            body["ID"], planner.desired_signature(body), "passing"))
    assert index.drifted(services, checks) == []
    compared: list[Any] = []
    original = planner.observed_signature
    monkeypatch.setattr(planner, "observed_signature", lambda *a: compared.append(a) or original(*a))
    assert index.drifted(dict(services), dict(checks)) == []
    assert compared == [], "no entry changed, no resource recorded since: nothing to compare"
    services["id-b"] = {**services["id-b"], "Port": 9}
    assert index.drifted(dict(services), dict(checks)) == [ObjectRef("consulservices", "team", "b")]
    assert len(compared) == 1
