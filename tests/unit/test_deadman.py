"""The dead-man switch: the deadman's judgement of the Lease, the node check's plans, and
both writers against the in-memory catalog (:mod:`catalogmodels`, real ``/v1/txn`` bodies
with Consul's check-and-set guards)."""

from __future__ import annotations

from typing import Any

import pytest
from catalogmodels import NODE, CatalogModel, FakeCatalog
from test_consulservice_catalog import ENDPOINTS_SPEC, Rig, resource

from tether.clients.consul.client import ConsulUnavailable
from tether.clients.kube.http import KubeNotFound, KubeUnavailable
from tether.consulservice import endpoints, nodecheck
from tether.consulservice.alivekeeping import AliveKeeper
from tether.consulservice.catalogwatching import CatalogWatcher
from tether.consulservice.index import CatalogIndex
from tether.deadman import DeadMan, Judge, LeaseView

CLUSTER = "kubernetes"


def lease(holder: str = "tether-0", renew: str = "2026-01-01T00:00:00.000000Z", duration: int = 15,
          transitions: int = 0) -> dict[str, Any]:
    return {"spec": {
        "holderIdentity": holder, "renewTime": renew, "acquireTime": "2026-01-01T00:00:00.000000Z",
        "leaseDurationSeconds": duration, "leaseTransitions": transitions,
    }}


def view(**kwargs: Any) -> LeaseView:
    return LeaseView.from_body(lease(**kwargs))


# -- the judgement (pure) ----------------------------------------------------------------


def test_a_lease_is_read_into_the_parts_that_move() -> None:
    got = LeaseView.from_body(lease(holder="a", renew="r", duration=15, transitions=3))
    assert (got.holder, got.renew_time, got.duration, got.transitions) == ("a", "r", 15.0, 3)
    released = LeaseView.from_body({"spec": {"leaseDurationSeconds": 1}})
    assert (released.holder, released.duration) == ("", 1.0)
    assert LeaseView.from_body({}).duration is None


def test_a_lease_unchanged_for_its_duration_plus_the_margin_is_dead() -> None:
    judge = Judge(margin=5)
    assert not judge.observe(view(), 100.0).dead
    assert not judge.observe(view(), 120.0).dead  # exactly 15 + 5: not yet
    verdict = judge.observe(view(), 120.5)
    assert verdict.dead and verdict.allowed == 20.0 and verdict.silent_for == pytest.approx(20.5)
    assert "tether-0" in verdict.describe()


def test_each_renewal_starts_the_count_again() -> None:
    judge = Judge(margin=5)
    judge.observe(view(renew="t0"), 0.0)
    for step in range(1, 30):
        # Renewed every 2 s for a minute: never dead, whatever the elapsed total.
        assert not judge.observe(view(renew=f"t{step}"), step * 2.0).dead
    assert not judge.observe(view(renew="t29"), 58.0 + 20.0).dead
    assert judge.observe(view(renew="t29"), 58.0 + 20.1).dead


def test_the_margin_and_the_leases_own_duration_decide() -> None:
    assert not Judge(margin=10).observe(view(duration=15), 0.0).dead
    judge = Judge(margin=10)
    judge.observe(view(duration=15), 0.0)
    assert not judge.observe(view(duration=15), 24.9).dead
    assert judge.observe(view(duration=15), 25.1).dead
    short = Judge(margin=0)
    short.observe(view(duration=3), 0.0)
    assert short.observe(view(duration=3), 3.1).dead


def test_a_released_lease_is_dead_once_no_standby_took_it_within_the_margin() -> None:
    judge = Judge(margin=5)
    judge.observe(view(), 0.0)
    released = LeaseView.from_body({"spec": {"holderIdentity": None, "leaseDurationSeconds": 1,
                                             "renewTime": "t1"}})
    judge.observe(released, 1.0)
    assert not judge.observe(released, 6.9).dead  # 1 s + 5 s margin after the release
    assert judge.observe(released, 7.1).dead
    # A standby taking it is a change: alive again.
    assert not judge.observe(view(holder="tether-1", renew="t8", transitions=1), 8.0).dead


def test_an_absent_lease_is_judged_with_the_default_duration() -> None:
    judge = Judge(margin=5, default_duration=15)
    judge.observe(None, 0.0)
    assert not judge.observe(None, 20.0).dead
    assert judge.observe(None, 20.1).dead


def test_silence_is_measured_on_the_deadmans_clock_not_by_renew_time() -> None:
    # A renewTime an hour old (or a skewed clock) at the first look: the count starts now.
    judge = Judge(margin=5)
    assert not judge.observe(view(renew="2020-01-01T00:00:00.000000Z"), 1000.0).dead
    assert not judge.observe(view(renew="2020-01-01T00:00:00.000000Z"), 1019.0).dead
    assert judge.observe(view(renew="2020-01-01T00:00:00.000000Z"), 1021.0).dead


def test_a_judge_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        Judge(margin=-1)
    with pytest.raises(ValueError):
        Judge(default_duration=0)


# -- the node check's plans (pure) -------------------------------------------------------

OUR_NODE = {"Node": NODE, "Meta": endpoints.node_meta(CLUSTER), "ModifyIndex": 3}


def alive(status: str, *, index: int = 7, notes: str | None = None) -> dict[str, Any]:
    check = nodecheck.body(NODE, CLUSTER, status, "x", index=index)
    if notes is not None:
        check["Notes"] = notes
    return check


def test_restore_creates_the_check_only_if_absent_and_guards_on_its_index() -> None:
    plan = nodecheck.restore(OUR_NODE, [], node=NODE, cluster=CLUSTER)
    ((op,),) = [plan.ops]
    assert op["Check"]["Verb"] == "cas" and op["Check"]["Check"]["ModifyIndex"] == 0
    assert op["Check"]["Check"]["Status"] == "passing" and op["Check"]["Check"]["ServiceID"] == ""
    assert op["Check"]["Check"]["Notes"].startswith(f"tether-cluster={CLUSTER};")
    again = nodecheck.restore(OUR_NODE, [alive("critical", index=9)], node=NODE, cluster=CLUSTER)
    assert [o["Check"]["Check"]["ModifyIndex"] for o in again.ops] == [9]
    assert nodecheck.restore(OUR_NODE, [alive("passing")], node=NODE, cluster=CLUSTER).ops == ()


def test_expire_writes_critical_once_and_creates_a_missing_check() -> None:
    plan = nodecheck.expire(OUR_NODE, [alive("passing", index=11)], node=NODE, cluster=CLUSTER, output="gone")
    ((op,),) = [plan.ops]
    assert op["Check"]["Check"]["Status"] == "critical" and op["Check"]["Check"]["ModifyIndex"] == 11
    assert op["Check"]["Check"]["Output"] == "gone"
    assert nodecheck.expire(OUR_NODE, [alive("critical")], node=NODE, cluster=CLUSTER, output="").ops == ()
    created = nodecheck.expire(OUR_NODE, [], node=NODE, cluster=CLUSTER, output="")
    assert [o["Check"]["Check"]["ModifyIndex"] for o in created.ops] == [0]


def test_neither_writer_touches_what_is_not_this_clusters() -> None:
    foreign = alive("passing", notes="tether-cluster=other; not ours")
    for plan in (
        nodecheck.restore(OUR_NODE, [foreign], node=NODE, cluster=CLUSTER),
        nodecheck.expire(OUR_NODE, [foreign], node=NODE, cluster=CLUSTER, output=""),
    ):
        assert plan.ops == () and "left alone" in plan.conflict
    agent_node = {"Node": NODE, "Meta": {}}
    for plan in (
        nodecheck.restore(agent_node, [], node=NODE, cluster=CLUSTER),
        nodecheck.expire(agent_node, [], node=NODE, cluster=CLUSTER, output=""),
    ):
        assert plan.ops == () and plan.conflict
    # No node: no instances, nothing to write.
    assert nodecheck.expire(None, [], node=NODE, cluster=CLUSTER, output="").ops == ()


def test_drift_is_an_absent_or_not_passing_check_of_ours() -> None:
    assert nodecheck.drifted([], CLUSTER)
    assert nodecheck.drifted([alive("critical")], CLUSTER)
    assert not nodecheck.drifted([alive("passing")], CLUSTER)
    assert not nodecheck.drifted([alive("critical", notes="tether-cluster=other; x")], CLUSTER)
    # A service's check of the same ID is not the node check.
    assert nodecheck.drifted([{**alive("passing"), "ServiceID": "web-1"}], CLUSTER)


def test_the_watcher_nudges_the_keeper_on_drift_only() -> None:
    nudges: list[int] = []
    watcher = CatalogWatcher(
        FakeCatalog(CatalogModel()), CatalogIndex(cluster=CLUSTER, plural="consulservices"), NODE,
        lambda ref: None, lambda ref: None, alive_drift=lambda: nudges.append(1),
    )
    watcher._checks = []
    watcher._check_alive()
    assert nudges == []  # no node: nothing to keep
    watcher._node_present = True
    watcher._checks = [alive("passing")]
    watcher._check_alive()
    assert nudges == []
    watcher._checks = [alive("critical")]
    watcher._check_alive()
    assert nudges == [1]


# -- the writers against the catalog -----------------------------------------------------


class Lease:
    """Scripted Lease reads: the body to return, or an error to raise; ``on_read`` runs first."""

    def __init__(self) -> None:
        self.body: dict[str, Any] | None = lease()
        self.error: Exception | None = None
        self.reads = 0
        self.on_read: Any = None

    async def read(self) -> Any:
        self.reads += 1
        if self.on_read is not None:
            self.on_read(self.reads)
        if self.error is not None:
            raise self.error
        if self.body is None:
            raise KubeNotFound("lease not found", 404)
        return self.body


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def node_with_instances(count: int = 3) -> CatalogModel:
    """Our node with ``count`` passing instances and a passing tether:alive."""
    model = CatalogModel()
    ops: list[dict[str, Any]] = [endpoints.node_op("cas", NODE, CLUSTER, index=0)]
    for i in range(count):
        inst = endpoints.Instance(f"web-{i}", "web", f"10.0.0.{i}", 80, (), (), "passing", "ready")
        ops.append({"Service": {"Verb": "cas", "Node": NODE,
                                "Service": {**endpoints.service_body(inst), "ModifyIndex": 0}}})
        check = {**endpoints.check_body(NODE, inst), "ModifyIndex": 0}
        ops.append({"Check": {"Verb": "cas", "Check": check}})
    ops += nodecheck.restore({"Node": NODE, "Meta": endpoints.node_meta(CLUSTER)}, [], node=NODE,
                             cluster=CLUSTER).ops
    assert model.txn(ops)
    return model


def passing(model: CatalogModel) -> list[str]:
    """The instances ``/v1/health/service/web?passing`` would return: all their checks and the
    node's passing."""
    checks = model.checks.get(NODE, {}).values()
    node_ok = all(c["Status"] == "passing" for c in checks if not c.get("ServiceID"))
    return sorted(
        sid for sid in model.services.get(NODE, {})
        if node_ok and all(c["Status"] == "passing" for c in checks if c.get("ServiceID") == sid)
    )


def rig(model: CatalogModel) -> tuple[DeadMan, Lease, Clock]:
    lease_reads, clock = Lease(), Clock()
    deadman = DeadMan(
        read_lease=lease_reads.read, catalog=FakeCatalog(model), node=NODE, cluster=CLUSTER,
        lease="tether-system/tether-leader", judge=Judge(margin=5), clock=clock,
    )
    return deadman, lease_reads, clock


async def ticks(deadman: DeadMan, clock: Clock, until: float, step: float = 2.0) -> None:
    while clock.now < until:
        clock.now += step
        await deadman.tick()


async def test_a_silent_lease_takes_every_instance_out_with_one_write() -> None:
    model = node_with_instances(3)
    deadman, _, clock = rig(model)
    await deadman.tick()
    await ticks(deadman, clock, 20.0)
    assert deadman.writes == 0 and len(passing(model)) == 3
    txns = model.txns
    await ticks(deadman, clock, 60.0)  # dead from 20 s on, and for long after
    assert deadman.writes == 1 and model.txns == txns + 1
    assert passing(model) == []
    check = model.checks[NODE][nodecheck.CHECK_ID]
    assert check["Status"] == "critical" and "tether-system/tether-leader" in check["Output"]
    # The instances' own checks are untouched: a leader's one write restores them.
    assert all(c["Status"] == "passing" for c in model.checks[NODE].values() if c.get("ServiceID"))


async def test_a_leader_that_comes_back_restores_with_one_write_and_the_deadman_stays_quiet() -> None:
    model = node_with_instances(3)
    deadman, lease_reads, clock = rig(model)
    await ticks(deadman, clock, 30.0)
    assert passing(model) == []
    lease_reads.body = lease(holder="tether-1", renew="later", transitions=1)
    await ticks(deadman, clock, 32.0)
    txns = model.txns
    keeper = AliveKeeper(FakeCatalog(model), node=NODE, cluster=CLUSTER)
    assert await keeper.once() is True
    assert model.txns == txns + 1 and len(passing(model)) == 3
    assert await keeper.once() is False  # nothing more to write
    await ticks(deadman, clock, 45.0)  # the renewals stopped again only 13 s ago
    assert deadman.writes == 1 and len(passing(model)) == 3


async def test_a_leader_writing_between_the_deadmans_read_and_write_wins() -> None:
    """The race: the deadman read the check, then the leader wrote passing; the guard holds."""
    model = node_with_instances(2)
    deadman, lease_reads, clock = rig(model)
    await ticks(deadman, clock, 20.0)
    # The check goes critical by someone else's hand first, so the leader has something to restore.
    check = model.checks[NODE][nodecheck.CHECK_ID]
    assert model.txn([{"Check": {"Verb": "cas", "Check": {**check, "Status": "warning"}}}])
    keeper = AliveKeeper(FakeCatalog(model), node=NODE, cluster=CLUSTER)
    reads_before = lease_reads.reads

    def leader_writes_on_the_second_read(read: int) -> None:
        # The second Lease read of the tick comes after the deadman's check read; the
        # leader's write lands here while the deadman still sees the old Lease (a slow
        # API server cache), the worst case for the guard.
        if read == reads_before + 2:
            assert model.txn(list(nodecheck.restore(
                model.nodes[NODE], list(model.checks[NODE].values()), node=NODE, cluster=CLUSTER).ops))

    lease_reads.on_read = leader_writes_on_the_second_read
    clock.now = 40.0  # long dead
    await deadman.tick()
    assert lease_reads.reads == reads_before + 2
    assert deadman.writes == 0
    assert model.checks[NODE][nodecheck.CHECK_ID]["Status"] == "passing"
    assert await keeper.once() is False
    assert len(passing(model)) == 2


async def test_a_lease_renewed_between_the_two_reads_stops_the_write() -> None:
    model = node_with_instances(1)
    deadman, lease_reads, clock = rig(model)
    await ticks(deadman, clock, 20.0)
    reads_before = lease_reads.reads

    def renewed(read: int) -> None:
        if read == reads_before + 2:
            lease_reads.body = lease(holder="tether-1", renew="now", transitions=1)

    lease_reads.on_read = renewed
    clock.now = 40.0  # long dead
    await deadman.tick()
    assert lease_reads.reads == reads_before + 2
    assert deadman.writes == 0 and len(passing(model)) == 1


async def test_an_unreadable_lease_is_never_taken_for_a_dead_leader() -> None:
    model = node_with_instances(2)
    deadman, lease_reads, clock = rig(model)
    await deadman.tick()
    lease_reads.error = KubeUnavailable("API server unreachable")
    await ticks(deadman, clock, 120.0)
    assert deadman.writes == 0 and len(passing(model)) == 2


async def test_an_absent_lease_counts_as_no_leader() -> None:
    model = node_with_instances(2)
    deadman, lease_reads, clock = rig(model)
    lease_reads.body = None
    await deadman.tick()
    await ticks(deadman, clock, 30.0)
    assert deadman.writes == 1 and passing(model) == []


async def test_a_consul_outage_delays_the_write_and_does_not_repeat_it() -> None:
    model = node_with_instances(2)
    deadman, _, clock = rig(model)
    catalog = deadman.catalog
    assert isinstance(catalog, FakeCatalog)
    await ticks(deadman, clock, 20.0)
    catalog.failure = ConsulUnavailable("agent down")
    await ticks(deadman, clock, 30.0)
    assert deadman.writes == 0
    catalog.failure = None
    await ticks(deadman, clock, 50.0)
    assert deadman.writes == 1 and passing(model) == []


async def test_no_node_no_write() -> None:
    deadman, lease_reads, clock = rig(CatalogModel())
    lease_reads.body = None
    await ticks(deadman, clock, 60.0)
    assert deadman.writes == 0


async def test_the_check_goes_with_the_node_when_the_last_resource_leaves() -> None:
    rig_ = Rig()
    rig_.kube.ready = {"10.0.0.1": True}
    await rig_.services.apply(resource(ENDPOINTS_SPEC))
    keeper = AliveKeeper(FakeCatalog(rig_.model), node=NODE, cluster=CLUSTER)
    assert await keeper.once() is True
    assert rig_.model.checks[NODE][nodecheck.CHECK_ID]["Status"] == "passing"
    out = await rig_.services.release(resource(ENDPOINTS_SPEC, {"instances": {}}, deleting=True))
    assert out.released
    assert NODE not in rig_.model.nodes
    # The keeper on an absent node writes nothing (it does not create the node).
    assert await keeper.once() is False and NODE not in rig_.model.nodes


async def test_a_foreign_node_check_still_keeps_the_node() -> None:
    rig_ = Rig()
    rig_.kube.ready = {"10.0.0.1": True}
    await rig_.services.apply(resource(ENDPOINTS_SPEC))
    assert rig_.model.txn([{"Check": {"Verb": "cas", "Check": {
        "Node": NODE, "CheckID": "someone:else", "Name": "x", "Status": "passing", "ModifyIndex": 0}}}])
    await rig_.services.release(resource(ENDPOINTS_SPEC, {"instances": {}}, deleting=True))
    assert NODE in rig_.model.nodes
