"""Hardening (issue 14) of ConsulService planning: check-ID ownership, Orphan release,
default-ID collisions, and input Consul refuses caught as InvalidSpec."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tether.api import consulservices as api
from tether.consulservice import planner

OWNER = planner.Owner("kubernetes", "team-a", "web")


def _spec(namespace: str = "team-a", name: str = "web", **raw: Any) -> api.ConsulServiceSpec:
    body: dict[str, Any] = {"address": "10.0.0.5", "port": 8080, **raw}
    return api.parse(namespace, name, body)


def _ttl(name: str) -> dict[str, str]:
    return {"name": name, "ttl": "30s"}


# -- check IDs -------------------------------------------------------------------

def test_check_ids_of_two_resources_cannot_collide() -> None:
    """id ``a`` with check ``y:z`` and id ``a:y`` with check ``z`` used to share ``a:y:z``."""
    one = planner.registration(_spec(id="a", checks=[_ttl("y:z")]), OWNER)
    two = planner.registration(
        _spec(name="other", id="a:y", checks=[_ttl("z")]), planner.Owner("kubernetes", "team-a", "other")
    )
    assert one["Checks"][0]["CheckID"] != two["Checks"][0]["CheckID"]


_ID = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}", fullmatch=True)
_CHECK = st.text(min_size=1, max_size=20)


@given(_ID, _CHECK, _ID, _CHECK)
def test_check_id_is_one_to_one(sid1: str, c1: str, sid2: str, c2: str) -> None:
    if (sid1, c1) != (sid2, c2):
        assert planner.check_id(sid1, c1) != planner.check_id(sid2, c2)


def test_a_foreign_check_under_our_check_id_is_a_conflict_never_taken_over() -> None:
    desired = planner.registration(_spec(id="web-1", checks=[_ttl("alive")]), OWNER)
    cid = desired["Checks"][0]["CheckID"]
    foreign = {"CheckID": cid, "ServiceID": "someone-else", "Status": "critical", "Name": "x"}
    plan = planner.plan(desired, OWNER, None, [], {}, other_checks=[foreign])
    assert plan.conflict is not None and cid in plan.conflict and "someone-else" in plan.conflict
    assert plan.register is None and plan.deregister == ()


def test_a_node_check_under_our_check_id_is_a_conflict() -> None:
    desired = planner.registration(_spec(id="web-1", checks=[_ttl("alive")]), OWNER)
    cid = desired["Checks"][0]["CheckID"]
    plan = planner.plan(desired, OWNER, None, [], {}, other_checks=[{"CheckID": cid, "ServiceID": ""}])
    assert plan.conflict is not None and "node" in plan.conflict


def test_our_own_checks_are_not_foreign() -> None:
    desired = planner.registration(_spec(id="web-1", checks=[_ttl("alive")]), OWNER)
    cid = desired["Checks"][0]["CheckID"]
    plan = planner.plan(desired, OWNER, None, [], {}, other_checks=[{"CheckID": cid, "ServiceID": "web-1"}])
    assert plan.conflict is None and plan.register is not None


# -- Orphan ---------------------------------------------------------------------

def _as_agent(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "ID": body["ID"], "Service": body["Name"], "Address": body["Address"], "Port": body["Port"],
        "Tags": body["Tags"], "Meta": dict(body["Meta"]), "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False, "ContentHash": "abc", "Datacenter": "dc1",
    }


def test_released_registration_names_no_owner_and_keeps_the_rest() -> None:
    body = planner.registration(_spec(id="web-1", tags=["t"], meta={"team": "x"}, checks=[_ttl("a")]), OWNER)
    released = planner.released(_as_agent(body))
    assert planner.owner_of(released["Meta"]) is None
    assert released["Meta"] == {"team": "x", "external-source": "kubernetes"}
    assert (released["ID"], released["Name"], released["Address"], released["Port"], released["Tags"]) == (
        "web-1", "web", "10.0.0.5", 8080, ["t"]
    )
    # No Checks key: the agent keeps the running checks (sent without replace-existing-checks).
    assert "Checks" not in released


def test_an_orphan_is_never_touched_by_a_later_resource_of_the_same_name() -> None:
    body = planner.registration(_spec(id="web-1"), OWNER)
    orphan = _as_agent(planner.released(_as_agent(body)) | {"Name": "web"})
    # Not indexed as anyone's, not released or deregistered again...
    assert planner.release(OWNER, {"web-1": orphan}) == ()
    # ...and a new resource of the same namespace/name meets a conflict on it.
    again = planner.plan(body, OWNER, orphan, [], {})
    assert again.conflict is not None and again.register is None
    stale = planner.plan(planner.registration(_spec(id="web-2"), OWNER), OWNER, None, [], {"web-1": orphan})
    assert stale.deregister == ()


# -- default IDs across namespaces -------------------------------------------------

def test_default_id_collision_across_namespaces_is_a_conflict_that_leaves_the_first() -> None:
    first_owner = planner.Owner("kubernetes", "a-b", "c")
    second_owner = planner.Owner("kubernetes", "a", "b-c")
    first = planner.registration(_spec("a-b", "c"), first_owner)
    second = planner.registration(_spec("a", "b-c"), second_owner)
    assert first["ID"] == second["ID"] == "a-b-c"  # the contract's default: <namespace>-<name>
    plan = planner.plan(second, second_owner, _as_agent(first), [], {})
    assert plan.conflict is not None and "a-b/c" in plan.conflict and "spec.id" in plan.conflict
    assert plan.register is None and plan.deregister == ()
    assert planner.release(second_owner, {"a-b-c": _as_agent(first)}) == ()
