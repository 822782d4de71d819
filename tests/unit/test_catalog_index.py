"""The catalog index compares only what changed: it must agree with a full comparison.

:class:`~tether.consulservice.index.CatalogIndex` keeps the synthetic node's previous
answer and compares again only the resources an entry that changed concerns, those
whose wanted instances were recorded since, and those that differed last time. The
model here compares every resource with the whole node on every answer, as the index
once did; any sequence of reconciles, releases and edits behind Tether's back must give
both the same drifted resources, untracked owners and owners present.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.api import ObjectRef
from tether.consulservice import endpoints, planner
from tether.consulservice.index import CatalogIndex

CLUSTER = "kubernetes"
PLURAL = "consulservices"
NAMES = ("a", "b", "c")
ADDRESSES = ("10.0.0.1", "10.0.0.2", "10.0.0.3")


def owner(name: str, cluster: str = CLUSTER) -> planner.Owner:
    return planner.Owner(cluster, "team", name)


def instance(name: str, address: str, *, status: str = "passing", port: int = 80) -> endpoints.Instance:
    meta = tuple(sorted(owner(name).meta().items()))
    iid = endpoints.instance_id(f"{name}-svc", address, 80)
    return endpoints.Instance(iid, name, address, port, (), meta, status, "")  # type: ignore[arg-type]


def owned_by(services: list[dict[str, Any]]) -> dict[planner.Owner, list[str]]:
    """This cluster's instances on the node, by owner (as the index once derived them)."""
    out: dict[planner.Owner, list[str]] = {}
    for svc in services:
        found = planner.owner_of(svc.get("Meta"))
        if found is not None and found.cluster == CLUSTER:
            out.setdefault(found, []).append(str(svc.get("ID", "")))
    return out


def full_comparison(
    wanted: Mapping[ObjectRef, Mapping[str, endpoints.Instance]],
    services: list[dict[str, Any]], checks: list[dict[str, Any]],
) -> tuple[list[ObjectRef], list[planner.Owner], frozenset[planner.Owner]]:
    """Every wanted resource against the whole node (the index's former comparison)."""
    by_id = {str(s.get("ID", "")): s for s in services}
    check_by_id = {str(c.get("CheckID", "")): c for c in checks}
    owned = owned_by(services)
    extra = {
        str(c.get("ServiceID")) for c in checks
        if c.get("ServiceID") and c.get("CheckID") != endpoints.check_id(str(c.get("ServiceID")))
    }
    out = []
    for ref, want in wanted.items():
        ids = set(owned.get(owner(ref.name), ()))
        if ids != set(want) or ids & extra or any(
            not endpoints.matches(inst, by_id.get(iid), check_by_id.get(inst.check_id))
            for iid, inst in want.items()
        ):
            out.append(ref)
    untracked = [o for o in owned if ObjectRef(PLURAL, o.namespace, o.name) not in wanted]
    return sorted(out), sorted(untracked, key=lambda o: (o.namespace, o.name)), frozenset(owned)


# What may be on the node for one (name, address): nothing, the instance as wanted,
# edited, with its check in another status, with a foreign check on it, or another
# cluster's instance under the same ID.
ENTRY = st.sampled_from(["absent", "exact", "port", "critical", "foreign-check", "no-check", "other-cluster"])
NODE = st.dictionaries(st.tuples(st.sampled_from(NAMES), st.sampled_from(ADDRESSES)), ENTRY, max_size=9)
STEP = st.one_of(
    st.tuples(st.just("track"), st.sampled_from(NAMES), st.sets(st.sampled_from(ADDRESSES), max_size=3),
              st.sampled_from(["passing", "critical"])),
    st.tuples(st.just("unwant"), st.sampled_from(NAMES)),
    st.tuples(st.just("untrack"), st.sampled_from(NAMES)),
    st.tuples(st.just("node"), NODE),
)


def node_entries(node: Mapping[tuple[str, str], str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    services: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    for (name, address), entry in sorted(node.items()):
        if entry == "absent":
            continue
        inst = instance(name, address, port=81 if entry == "port" else 80)
        body = endpoints.service_body(inst)
        if entry == "other-cluster":
            body["Meta"] = owner(name, "elsewhere").meta()
        services.append(body)
        if entry != "no-check":
            check = endpoints.check_body("node", inst)
            check["Status"] = "critical" if entry == "critical" else "passing"
            checks.append(check)
        if entry == "foreign-check":
            checks.append({"CheckID": f"{inst.id}:theirs", "ServiceID": inst.id, "Status": "passing"})
    return services, checks


@settings(max_examples=300, deadline=None)
@given(st.lists(STEP, min_size=1, max_size=25))
def test_the_incremental_comparison_agrees_with_the_full_one(steps: list[tuple[Any, ...]]) -> None:
    index = CatalogIndex(cluster=CLUSTER, plural=PLURAL)
    wanted: dict[ObjectRef, dict[str, endpoints.Instance]] = {}
    services: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    for step in steps:
        ref = ObjectRef(PLURAL, "team", step[1]) if step[0] != "node" else None
        if step[0] == "track" and ref is not None:
            want = {i.id: i for i in (instance(ref.name, a, status=step[3]) for a in step[2])}
            index.track(ref, want)
            wanted[ref] = want
        elif step[0] in ("unwant", "untrack") and ref is not None:
            getattr(index, step[0])(ref)
            wanted.pop(ref, None)
        else:
            services, checks = node_entries(step[1])
        # Compare after every step: the same answer again must give the same result.
        drifted, untracked = index.drifted(services, checks)
        assert (drifted, untracked, index.present()) == full_comparison(wanted, services, checks)
        assert all(index.holds(o) for o in index.present())


def test_an_unchanged_node_compares_only_what_differed_last_time() -> None:
    index = CatalogIndex(cluster=CLUSTER, plural=PLURAL)
    refs = [ObjectRef(PLURAL, "team", n) for n in NAMES]
    for ref in refs:
        inst = instance(ref.name, ADDRESSES[0])
        index.track(ref, {inst.id: inst})
    services, checks = node_entries({(n, ADDRESSES[0]): "exact" for n in NAMES[:2]})  # c is missing
    assert index.drifted(services, checks) == ([refs[2]], [])
    compared: list[ObjectRef] = []
    real = index._differs

    def counting(ref: ObjectRef) -> bool:
        compared.append(ref)
        return real(ref)

    index._differs = counting  # type: ignore[method-assign]
    # The same answer: only the resource that differed is compared again.
    assert index.drifted(services, checks) == ([refs[2]], [])
    assert compared == [refs[2]]
    # One check of a moves: a (touched) and c (still differing) only.
    compared.clear()
    checks[0] = {**checks[0], "Status": "critical"}
    assert index.drifted(services, checks) == ([refs[0], refs[2]], [])
    assert sorted(compared) == [refs[0], refs[2]]
