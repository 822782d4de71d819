"""Endpoints mode's planner: EndpointSlices and the synthetic node's catalog → guarded txn ops.

The catalog here is a small model of Consul's transaction semantics (check-
and-set on ``ModifyIndex``, index 0 meaning "only if absent", a failed guard
rolling back the whole transaction, a deleted service taking its checks with
it), so that the properties are about what Consul would end up holding.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.api import InvalidSpec
from tether.api import consulservices as api
from tether.clients.consul.client import ConsulContended
from tether.consulservice import committing, endpoints
from tether.consulservice.committing import GroupCommit
from tether.consulservice.planner import Owner

CLUSTER = "blue"
NODE = "tether-blue"
OWNER = Owner(CLUSTER, "shop", "web")


def spec(**overrides: Any) -> api.ConsulServiceSpec:
    raw: dict[str, Any] = {"endpoints": {"service": "web"}}
    raw.update(overrides)
    return api.parse("shop", "web", raw)


def slice_(ports: list[tuple[str, int]], eps: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    return {
        "metadata": {"labels": {endpoints.SERVICE_NAME_LABEL: "web"}},
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
        "endpoints": [{"addresses": [a], "conditions": c} for a, c in eps],
    }


# -- a model of the catalog ------------------------------------------------------------------


@dataclass
class Catalog:
    """Consul's catalog for one node, as far as the txn verbs Tether uses go."""

    node: dict[str, Any] | None = None
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    index: int = 10
    txns: int = 0

    def view(self) -> tuple[bool, list[dict[str, Any]], list[dict[str, Any]]]:
        return (
            self.node is not None,
            copy.deepcopy(list(self.services.values())),
            copy.deepcopy(list(self.checks.values())),
        )

    def txn(self, ops: tuple[dict[str, Any], ...]) -> bool:
        """Apply atomically; False (and nothing changed) when a guard fails."""
        assert len(ops) <= endpoints.MAX_TXN_OPS, "Consul answers 413 above its limit"
        self.txns += 1
        saved = copy.deepcopy((self.node, self.services, self.checks, self.index))
        for op in ops:
            if not self._apply(op):
                self.node, self.services, self.checks, self.index = saved
                return False
        return True

    def _guard(self, existing: dict[str, Any] | None, index: int) -> bool:
        if index == 0:
            return existing is None
        return existing is not None and existing["ModifyIndex"] == index

    def _apply(self, op: dict[str, Any]) -> bool:
        self.index += 1
        if "Node" in op:
            verb, body = op["Node"]["Verb"], op["Node"]["Node"]
            if not self._guard(self.node, body["ModifyIndex"]):
                return False
            if verb == "cas":
                self.node = {**body, "ModifyIndex": self.index}
            else:
                self.node, self.services, self.checks = None, {}, {}
            return True
        if "Service" in op:
            verb, body = op["Service"]["Verb"], op["Service"]["Service"]
            existing = self.services.get(body["ID"])
            # Consul validates the body whatever the verb: a service op needs the name.
            assert body.get("Service"), f"Consul: Must provide service name ({op})"
            if self.node is None or not self._guard(existing, body["ModifyIndex"]):
                return False
            if verb == "cas":
                self.services[body["ID"]] = {**body, "ModifyIndex": self.index}
            else:
                del self.services[body["ID"]]
                self.checks = {k: c for k, c in self.checks.items() if c.get("ServiceID") != body["ID"]}
            return True
        verb, body = op["Check"]["Verb"], op["Check"]["Check"]
        existing = self.checks.get(body["CheckID"])
        if not self._guard(existing, body["ModifyIndex"]):
            return False
        if verb == "cas":
            if body.get("ServiceID") and body["ServiceID"] not in self.services:
                return False
            self.checks[body["CheckID"]] = {**body, "ModifyIndex": self.index}
        else:
            del self.checks[body["CheckID"]]
        return True


def plan_for(
    cat: Catalog, want: dict[str, endpoints.Instance], *, max_ops: int = endpoints.MAX_TXN_OPS
) -> endpoints.CatalogPlan:
    present, services, checks = cat.view()
    return endpoints.plan(
        want, services, checks, owner=OWNER, node=NODE, node_present=present, cluster=CLUSTER,
        max_ops=max_ops,
    )


def converge(
    cat: Catalog, want: dict[str, endpoints.Instance], *, max_ops: int = endpoints.MAX_TXN_OPS
) -> endpoints.CatalogPlan:
    plan = plan_for(cat, want, max_ops=max_ops)
    for ops in plan.batches:
        assert cat.txn(ops), f"a guard failed on a catalog nobody else touched: {ops}"
    return plan


# -- strategies ------------------------------------------------------------------------------

conditions = st.fixed_dictionaries(
    {},
    optional={"ready": st.booleans(), "serving": st.booleans(), "terminating": st.booleans()},
)
addresses = st.sampled_from([f"10.0.0.{i}" for i in range(1, 40)] + ["fd00::1", "fd00::2"])
endpoint_lists = st.lists(st.tuples(addresses, conditions), max_size=40)
ports = st.sampled_from([8080, 8443, 9000])


@st.composite
def wanted(draw: st.DrawFn) -> dict[str, endpoints.Instance]:
    eps = draw(st.lists(st.builds(
        lambda a, p, c: endpoints.Endpoint(a, p, *endpoints.health_of(c)), addresses, ports, conditions,
    ), max_size=60, unique_by=lambda e: (e.address, e.port)))
    tags = draw(st.sampled_from([(), ("v1",), ("v1", "canary")]))
    return endpoints.desired(spec(tags=list(tags)), OWNER, eps)


FOREIGN_OWNERS = [
    {**Owner("green", "shop", "web").meta()},  # another cluster, same resource name
    {**Owner(CLUSTER, "shop", "api").meta()},  # another resource of this cluster
    {"external-source": "nomad"},  # another tool
    {},
]


@st.composite
def catalogs(draw: st.DrawFn) -> Catalog:
    """A node holding a mix of this owner's (possibly stale or drifted) instances and others'."""
    cat = Catalog()
    if not draw(st.booleans()):
        return cat
    cat.node = {"Node": NODE, "Meta": endpoints.node_meta(CLUSTER), "ModifyIndex": 1}
    mine = draw(wanted())
    for inst in mine.values():
        body = endpoints.service_body(inst)
        if draw(st.booleans()):
            body["Port"] = body["Port"] + 1  # drifted
        cat.services[inst.id] = {**body, "ModifyIndex": draw(st.integers(1, 9))}
        if draw(st.booleans()):
            check = endpoints.check_body(NODE, inst)
            check["Status"] = draw(st.sampled_from(["passing", "warning", "critical"]))
            cat.checks[inst.check_id] = {**check, "ModifyIndex": draw(st.integers(1, 9))}
        if draw(st.integers(0, 9)) == 0:
            cat.checks["extra"] = {"CheckID": "extra", "ServiceID": inst.id, "Status": "critical",
                                   "Name": "x", "ModifyIndex": 3}
    for n, (address, port) in enumerate(draw(st.lists(st.tuples(addresses, ports), max_size=20))):
        meta = draw(st.sampled_from(FOREIGN_OWNERS))
        # Some foreign entries sit exactly on an ID this owner would use.
        sid = endpoints.instance_id("shop-web", address, port) if draw(st.booleans()) else f"other-{n}"
        cat.services[sid] = {"ID": sid, "Service": "web", "Address": address, "Port": port,
                             "Meta": dict(meta), "ModifyIndex": 5}
        cat.checks[f"{sid}:endpoint"] = {"CheckID": f"{sid}:endpoint", "ServiceID": sid,
                                         "Status": "passing", "Name": "theirs", "ModifyIndex": 5}
    return cat


def foreign_ids(cat: Catalog) -> set[str]:
    return {sid for sid, svc in cat.services.items() if svc.get("Meta", {}).get("tether-name") != "web"
            or svc.get("Meta", {}).get("tether-cluster") != CLUSTER
            or svc.get("Meta", {}).get("tether-namespace") != "shop"}


# -- properties ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(catalogs(), wanted())
def test_fixed_point_after_one_plan(cat: Catalog, want: dict[str, endpoints.Instance]) -> None:
    """One plan's writes make the catalog match; planning again writes nothing."""
    converge(cat, want)
    again = plan_for(cat, want)
    assert again.batches == ()
    for iid, inst in want.items():
        if iid in again.conflicts:
            continue
        assert endpoints.matches(inst, cat.services.get(iid), cat.checks.get(inst.check_id))


@settings(max_examples=150, deadline=None)
@given(catalogs(), wanted())
def test_never_an_op_on_a_foreign_instance(cat: Catalog, want: dict[str, endpoints.Instance]) -> None:
    foreign = foreign_ids(cat)
    before = {sid: copy.deepcopy(cat.services[sid]) for sid in foreign}
    foreign_checks = {k: copy.deepcopy(c) for k, c in cat.checks.items() if c.get("ServiceID") in foreign}
    plan = plan_for(cat, want)
    for ops in plan.batches:
        for op in ops:
            if "Service" in op:
                assert op["Service"]["Service"]["ID"] not in foreign
            if "Check" in op:
                assert op["Check"]["Check"].get("ServiceID") not in foreign
    assert set(plan.conflicts) == set(want) & foreign
    converge(cat, want)
    assert {sid: cat.services[sid] for sid in foreign} == before
    assert {k: c for k, c in cat.checks.items() if c.get("ServiceID") in foreign} == foreign_checks


@settings(max_examples=100, deadline=None)
@given(catalogs(), wanted(), st.integers(3, endpoints.MAX_TXN_OPS))
def test_batches_respect_the_limit_and_never_split_an_instance(
    cat: Catalog, want: dict[str, endpoints.Instance], max_ops: int
) -> None:
    plan = plan_for(cat, want, max_ops=max_ops)
    seen: dict[str, int] = {}
    for n, ops in enumerate(plan.batches):
        assert 0 < len(ops) <= max_ops
        for op in ops:
            sid = op["Service"]["Service"]["ID"] if "Service" in op else (
                op["Check"]["Check"].get("ServiceID") if "Check" in op else "node")
            assert seen.setdefault(sid, n) == n, f"{sid} split across transactions"
    if plan.batches and not cat.node:
        assert "Node" in plan.batches[0][0]
    # As few transactions as the limit allows: every batch but the last was full enough
    # that the next unit (at most 3 operations) did not fit.
    for ops in plan.batches[:-1]:
        assert len(ops) > max_ops - 3


@settings(max_examples=100, deadline=None)
@given(catalogs(), wanted(), st.integers(0, 5))
def test_a_crash_between_batches_still_converges(
    cat: Catalog, want: dict[str, endpoints.Instance], applied: int
) -> None:
    plan = plan_for(cat, want, max_ops=4)
    for ops in plan.batches[:applied]:
        assert cat.txn(ops)
    converge(cat, want, max_ops=4)
    assert plan_for(cat, want, max_ops=4).batches == ()


@settings(max_examples=100, deadline=None)
@given(catalogs(), st.booleans())
def test_release_touches_only_the_owners_instances(cat: Catalog, orphan: bool) -> None:
    foreign = foreign_ids(cat)
    before = {sid: copy.deepcopy(cat.services[sid]) for sid in foreign}
    mine = set(cat.services) - foreign
    _, services, checks = cat.view()
    plan = endpoints.release(services, checks, owner=OWNER, node=NODE, orphan=orphan)
    for ops in plan.batches:
        assert cat.txn(ops)
    assert {sid: cat.services[sid] for sid in foreign} == before
    if orphan:
        assert set(cat.services) >= mine
        assert all(endpoints.owner_of(cat.services[sid]["Meta"]) is None for sid in mine)
    else:
        assert not set(cat.services) & mine
    assert plan.removed == len(mine)


def test_a_guard_fails_when_someone_wrote_in_between() -> None:
    """Check-and-set: an entry changed after the read rolls the transaction back."""
    cat = Catalog()
    eps = [endpoints.Endpoint("10.0.0.1", 8080, "passing", "ready")]
    want = endpoints.desired(spec(), OWNER, eps)
    plan = plan_for(cat, want)
    # Another writer puts something on the same ID before our transaction lands.
    cat.node = {"Node": NODE, "Meta": endpoints.node_meta(CLUSTER), "ModifyIndex": 1}
    cat.services["shop-web-10.0.0.1-8080"] = {"ID": "shop-web-10.0.0.1-8080", "Meta": {}, "ModifyIndex": 2}
    assert not cat.txn(plan.batches[0])
    assert cat.services["shop-web-10.0.0.1-8080"]["Meta"] == {}


def test_a_rollout_is_one_transaction_per_128_operations() -> None:
    cat = Catalog()
    old = [endpoints.Endpoint(f"10.0.1.{i}", 8080, "passing", "ready") for i in range(50)]
    converge(cat, endpoints.desired(spec(), OWNER, old))
    new = [endpoints.Endpoint(f"10.0.2.{i}", 8080, "passing", "ready") for i in range(50)]
    cat.txns = 0
    plan = converge(cat, endpoints.desired(spec(), OWNER, new))
    # 50 new instances, each a service and a check, + 50 removals = 150 operations.
    assert plan.ops == 150 and cat.txns == 2
    assert (plan.added, plan.removed) == (50, 50)


def test_a_readiness_flip_is_one_check_write() -> None:
    cat = Catalog()
    eps = [endpoints.Endpoint(f"10.0.1.{i}", 8080, "passing", "ready") for i in range(10)]
    converge(cat, endpoints.desired(spec(), OWNER, eps))
    eps[3] = endpoints.Endpoint("10.0.1.3", 8080, "critical", "not ready")
    plan = converge(cat, endpoints.desired(spec(), OWNER, eps))
    assert plan.ops == 1 and "Check" in plan.batches[0][0]


def test_a_rename_updates_instances_and_checks_in_place() -> None:
    """spec.name changes, spec.id does not: same instance IDs, their checks still filed under the old name."""
    cat = Catalog()
    eps = [endpoints.Endpoint(f"10.0.1.{i}", 8080, "passing", "ready") for i in range(3)]
    converge(cat, endpoints.desired(spec(), OWNER, eps))
    _, services, _ = cat.view()
    # The reconciler reads the checks of every name the owner's instances carry.
    where = endpoints.checks_filter("api", services, OWNER)
    assert where == 'ServiceName == "api" or ServiceName == "web"'
    old_checks = {k: c["ModifyIndex"] for k, c in cat.checks.items()}
    plan = converge(cat, endpoints.desired(spec(name="api"), OWNER, eps))
    # Each instance: its service and its check rewritten under their guards, none re-created.
    assert (plan.added, plan.updated, plan.removed) == (0, 3, 0)
    check_ops = [op["Check"]["Check"] for ops in plan.batches for op in ops if "Check" in op]
    assert sorted((c["CheckID"], c["ModifyIndex"]) for c in check_ops) == sorted(old_checks.items())
    assert {c["ServiceName"] for c in cat.checks.values()} == {"api"}
    assert not plan_for(cat, endpoints.desired(spec(name="api"), OWNER, eps)).ops


def test_another_clusters_node_is_a_conflict() -> None:
    theirs = {"Node": NODE, "Meta": endpoints.node_meta("green")}
    assert "cluster 'green'" in (endpoints.node_conflict(theirs, name=NODE, cluster=CLUSTER) or "")
    assert endpoints.node_conflict({"Node": NODE, "Meta": {}}, name=NODE, cluster=CLUSTER)
    assert endpoints.node_conflict({"Node": NODE, "Meta": endpoints.node_meta(CLUSTER)},
                                   name=NODE, cluster=CLUSTER) is None
    assert endpoints.node_conflict(None, name=NODE, cluster=CLUSTER) is None


# -- endpoints and their health --------------------------------------------------------------


@pytest.mark.parametrize(
    ("conds", "status", "output"),
    [
        ({"ready": True, "serving": True, "terminating": False}, "passing", "ready"),
        ({}, "passing", "ready"),  # absent ready means ready
        ({"ready": False, "serving": False, "terminating": False}, "critical", "not ready"),
        ({"ready": False}, "critical", "not ready"),
        ({"ready": False, "serving": True, "terminating": True}, "critical",
         "terminating (still serving: draining, no new traffic)"),
        ({"ready": False, "serving": False, "terminating": True}, "critical", "terminating"),
    ],
)
def test_health_of_conditions(conds: dict[str, Any], status: str, output: str) -> None:
    assert endpoints.health_of(conds) == (status, output)


def test_endpoints_take_each_slices_own_port_and_deduplicate() -> None:
    slices = [
        slice_([("http", 8080)], [("10.0.0.1", {"ready": True}), ("10.0.0.2", {"ready": False})]),
        # A named target port may resolve to another number in other Pods.
        slice_([("http", 9090), ("metrics", 9100)], [("10.0.0.3", {"ready": True})]),
        # The same endpoint in two slices during a move: the healthier view wins.
        slice_([("http", 8080)], [("10.0.0.2", {"ready": True})]),
        slice_([("metrics", 9100)], [("10.0.0.9", {"ready": True})]),  # no such port: skipped
    ]
    got = endpoints.endpoints(slices, "http")
    assert [(e.address, e.port, e.status) for e in got] == [
        ("10.0.0.1", 8080, "passing"), ("10.0.0.2", 8080, "passing"), ("10.0.0.3", 9090, "passing"),
    ]


def test_select_port() -> None:
    one = {"spec": {"ports": [{"port": 80, "targetPort": 8080}]}}
    two = {"spec": {"ports": [{"name": "http", "port": 80}, {"name": "grpc", "port": 9000}]}}
    assert endpoints.select_port(one, None, where="s") == ""
    assert endpoints.select_port(two, "grpc", where="s") == "grpc"
    assert endpoints.select_port(two, 80, where="s") == "http"
    with pytest.raises(InvalidSpec, match="has 2 ports"):
        endpoints.select_port(two, None, where="s")
    with pytest.raises(InvalidSpec, match="no port 8080"):
        endpoints.select_port(two, 8080, where="s")
    # No Service, no endpoints: even a port name that slices would match is refused.
    for wanted in ("http", 80, None):
        with pytest.raises(endpoints.ServiceMissing, match="Service s does not exist"):
            endpoints.select_port(None, wanted, where="s")


@pytest.mark.parametrize(
    ("statuses", "health"),
    [([], "critical"), (["passing"] * 3, "passing"), (["critical"] * 2, "critical"),
     (["passing", "critical"], "warning"), (["passing", "warning"], "warning")],
)
def test_aggregate_health(statuses: list[str], health: str) -> None:
    tally = endpoints.counts(statuses)
    assert tally.health == health
    assert tally.total == len(statuses)


def test_spec_endpoints_is_exclusive_with_a_fixed_instance() -> None:
    with pytest.raises(InvalidSpec, match=r"exclusive with spec\.address, spec\.port"):
        api.parse("shop", "web", {"endpoints": {"service": "web"}, "address": "10.0.0.1", "port": 80})
    parsed = api.parse("shop", "web", {"endpoints": {"service": "web", "port": "http"}})
    assert parsed.endpoints == api.EndpointsRef("web", "http") and parsed.port == 0
    with pytest.raises(InvalidSpec, match=r"spec\.endpoints\.service"):
        api.parse("shop", "web", {"endpoints": {"service": "Not_A_Name"}})


# -- group commit ----------------------------------------------------------------------------


class ModelCatalog:
    """The catalog model behind the client's ``catalog_txn`` (calls counted)."""

    def __init__(self, cat: Catalog) -> None:
        self.cat = cat
        self.calls: list[int] = []

    async def catalog_txn(self, ops: list[dict[str, Any]]) -> None:
        self.calls.append(len(ops))
        if not self.cat.txn(tuple(ops)):
            raise ConsulContended("guard failed")


async def test_group_commit_packs_concurrent_resources_and_isolates_a_stale_one() -> None:
    cat = Catalog(node={"Node": NODE, "Meta": endpoints.node_meta(CLUSTER), "ModifyIndex": 1})
    model = ModelCatalog(cat)
    commits = GroupCommit(model, max_ops=64)  # smaller than Consul's, to make several
    owners = [Owner(CLUSTER, "shop", f"web-{k}") for k in range(20)]
    plans = []
    for k, owner in enumerate(owners):
        eps = [endpoints.Endpoint(f"10.9.{k}.{i}", 8080, "passing", "ready") for i in range(5)]
        _, services, checks = cat.view()
        plans.append(endpoints.plan(
            endpoints.desired(api.parse("shop", owner.name, {"endpoints": {"service": "web"}}), owner, eps),
            services, checks, owner=owner, node=NODE, node_present=True, cluster=CLUSTER,
        ))
    # One resource's plan went stale: someone took one of its IDs meanwhile.
    stale = plans[7].batches[0][0]["Service"]["Service"]["ID"]
    cat.services[stale] = {"ID": stale, "Meta": {}, "ModifyIndex": 3}
    results = await asyncio.gather(*(commits.submit(p.batches[0]) for p in plans), return_exceptions=True)
    assert [k for k, r in enumerate(results) if isinstance(r, Exception)] == [7]
    assert isinstance(results[7], ConsulContended)
    # 20 resources of 10 operations each: 4 shared transactions, one rolled back, then its
    # batches alone (6 of them) — instead of 20 calls.
    assert all(n <= 64 for n in model.calls)
    assert len(model.calls) < 20
    assert cat.services[stale]["Meta"] == {}
    assert len([s for s in cat.services.values() if s["Meta"]]) == 19 * 5


class RecordingCatalog:
    """Records each transaction; fails the ones that hold ``fail_id``'s operations."""

    def __init__(self, fail_id: str | None = None) -> None:
        self.txns: list[list[dict[str, Any]]] = []
        self.fail_id = fail_id

    async def catalog_txn(self, ops: list[dict[str, Any]]) -> None:
        await asyncio.sleep(0)
        if self.fail_id is not None and any(committing._service_id(op) == self.fail_id for op in ops):
            raise ConsulContended("guard failed")
        self.txns.append(list(ops))


def _rollout_batch(k: int, per: int = 10) -> list[dict[str, Any]]:
    """One resource's rollout: per new instances (service and check), per old ones removed."""
    ops: list[dict[str, Any]] = []
    for i in range(per):
        sid = f"r{k}-new-{i}"
        ops.append({"Service": {"Verb": "cas", "Node": NODE, "Service": {"ID": sid, "ModifyIndex": 0}}})
        check = {"ServiceID": sid, "CheckID": f"{sid}:c", "ModifyIndex": 0}
        ops.append({"Check": {"Verb": "cas", "Check": check}})
    for i in range(per):
        ops.append({"Service": {"Verb": "delete-cas", "Node": NODE, "Service": {"ID": f"r{k}-old-{i}"}}})
    return ops


def test_units_keep_a_check_with_its_service() -> None:
    node = endpoints.node_op("cas", NODE, CLUSTER, index=0)
    cut = committing.units([node, *_rollout_batch(0, per=2)])
    assert [len(u) for u in cut] == [1, 2, 2, 1, 1]
    assert cut[0] == [node]


async def test_a_rollout_fills_every_transaction_without_splitting_an_instance() -> None:
    cat = RecordingCatalog()
    commits = GroupCommit(cat, max_ops=128)
    batches = [_rollout_batch(k) for k in range(17)]  # 510 operations: at least 4 transactions
    await asyncio.gather(*(commits.submit(b) for b in batches))
    assert commits.calls == len(cat.txns) == 4  # whole batches alone need 5 (4 of 30 fill 120 of 128)
    sent = [op for txn in cat.txns for op in txn]
    assert sorted(map(str, sent)) == sorted(str(op) for b in batches for op in b)
    for txn in cat.txns:
        assert len(txn) <= 128
        services = {committing._service_id(op) for op in txn if "Service" in op}
        for op in txn:
            if "Check" in op:
                assert committing._service_id(op) in services, "a check apart from its service"
    # Each resource's operations are applied in its own order, across transactions.
    for b in batches:
        positions = [sent.index(op) for op in b]
        assert positions == sorted(positions)


async def test_a_failed_part_of_a_split_batch_fails_its_submitter_only() -> None:
    batches = [_rollout_batch(k) for k in range(5)]  # 150 operations: the fifth is split
    cat = RecordingCatalog(fail_id="r4-old-9")  # in the fifth batch's second part
    commits = GroupCommit(cat, max_ops=128)
    results = await asyncio.gather(*(commits.submit(b) for b in batches), return_exceptions=True)
    assert [isinstance(r, ConsulContended) for r in results] == [False] * 4 + [True]
    applied = {committing._service_id(op) for txn in cat.txns for op in txn}
    assert {f"r{k}-new-0" for k in range(5)} <= applied  # the fifth's first part did apply
    assert "r4-old-9" not in applied
