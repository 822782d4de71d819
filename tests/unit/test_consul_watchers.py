"""The Consul watchers without a server: the blocking-query rules, the agent and catalog watchers.

Each blocking query is scripted: the test decides when it answers, with
which index (or an error), and sees every index the watcher asked with.
What the agent or the node holds is plain data the test edits, so each test
checks which resources a change enqueues, and that a quiet Consul enqueues
nothing. (The KV watcher's own tests are in ``test_consul_kvwatching.py``.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tether.api import ObjectRef
from tether.api import consulservices as api
from tether.clients.consul import blocking
from tether.clients.consul.client import ConsulRejected, ConsulUnavailable
from tether.consulservice import agentwatching, catalogwatching, endpoints, planner
from tether.consulservice.agentwatching import ConsulWatcher
from tether.consulservice.catalogwatching import CatalogWatcher
from tether.consulservice.index import AgentIndex, CatalogIndex, GateIndex, Tracked
from tether.retrying import Retry

CLUSTER = "kubernetes"
NODE = "tether-kubernetes"
WEB = ObjectRef("consulservices", "team-a", "web")
API = ObjectRef("consulservices", "team-b", "api")


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.001)


async def settle() -> None:
    """Long enough for a watcher that was woken to scan (scans here are not spaced)."""
    await asyncio.sleep(0.15)


class Query:
    """One blocking query under the test's control: calls recorded, answers queued."""

    def __init__(self) -> None:
        self.calls: list[int] = []  # the index of every call
        self._answers: asyncio.Queue[int | Exception] = asyncio.Queue()

    async def ask(self, index: int) -> int:
        self.calls.append(index)
        answer = await self._answers.get()
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def answer(self, answer: int | Exception) -> None:
        """Answer the pending call and wait until the watcher asks again."""
        asked = len(self.calls)
        self._answers.put_nowait(answer)
        await wait_until(lambda: len(self.calls) > asked)


# -- the blocking-query rules ------------------------------------------------------------------


class Followed:
    """``blocking.follow`` over one scripted query, with the sleeps recorded instead of slept."""

    def __init__(self) -> None:
        self.query = Query()
        self.answers: list[blocking.Answer[str]] = []
        self.slept: list[float] = []
        self.retry = Retry("test query", base=0.5, cap=3.0, sleep=self.sleep)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    async def fetch(self, index: int, wait: str) -> tuple[int, str]:
        assert wait == "60s"
        return await self.query.ask(index), f"state at {index}"


@pytest.fixture
async def followed() -> AsyncIterator[Followed]:
    f = Followed()
    task = asyncio.create_task(
        blocking.follow(f.fetch, f.answers.append, retry=f.retry, wait="60s", sleep=f.sleep)
    )
    await wait_until(lambda: f.query.calls == [0])
    yield f
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def seen(f: Followed) -> list[tuple[int, bool, bool]]:
    return [(a.index, a.fresh, a.moved) for a in f.answers]


async def test_the_first_query_reads_then_each_blocks_on_the_last_index(followed: Followed) -> None:
    await followed.query.answer(10)
    await followed.query.answer(10)  # wait ran out, nothing changed
    await followed.query.answer(12)
    assert followed.query.calls == [0, 10, 10, 12]
    assert seen(followed) == [(10, True, True), (10, False, False), (12, False, True)]
    assert followed.slept == []


async def test_an_index_going_backwards_is_fresh_and_reads_again_from_zero(followed: Followed) -> None:
    await followed.query.answer(50)
    await followed.query.answer(7)
    assert followed.query.calls == [0, 50, 0]
    assert seen(followed)[-1] == (7, True, True)
    assert followed.slept == [0.1], "a short pause: a server that keeps going back is not a hot loop"
    await followed.query.answer(8)
    assert followed.query.calls[-1] == 8 and seen(followed)[-1] == (8, True, True)


@pytest.mark.parametrize("bogus", [0, -3])
async def test_an_index_of_zero_or_less_is_never_blocked_on(followed: Followed, bogus: int) -> None:
    await followed.query.answer(bogus)
    await followed.query.answer(bogus)
    assert followed.query.calls == [0, 1, 1], "Consul's docs: use 1"
    assert followed.slept == [1.0, 1.0], "and never ask again at once"
    await followed.query.answer(5)
    assert followed.query.calls[-1] == 5 and seen(followed)[-1] == (5, False, True)


async def test_errors_back_off_and_the_next_answer_is_fresh(followed: Followed) -> None:
    await followed.query.answer(40)
    await followed.query.answer(ConsulUnavailable("agent unreachable"))
    await followed.query.answer(ConsulRejected("ACL not found"))
    assert followed.query.calls == [0, 40, 0, 0]
    assert len(followed.slept) == 2 and 0.25 <= followed.slept[0] <= 0.5 <= followed.slept[1] <= 1.0
    assert followed.retry.failures == 2
    await followed.query.answer(41)
    assert followed.retry.failures == 0
    assert seen(followed)[-1] == (41, True, True), "Consul may have come back empty"


@pytest.mark.parametrize("wait", ["", "0s", "11m", "soon"])
async def test_a_wait_consul_would_not_honour_is_refused(wait: str) -> None:
    async def fetch(index: int, wait: str) -> tuple[int, None]:
        raise AssertionError("never asked")

    with pytest.raises(ValueError, match="wait"):
        await blocking.follow(fetch, lambda answer: None, retry=Retry("q", base=1.0, cap=1.0), wait=wait)


def test_wait_seconds() -> None:
    assert blocking.wait_seconds("300s") == 300.0
    assert blocking.wait_seconds("10m") == 600.0


# -- the agent watcher (fixed instances) -----------------------------------------------------


def agent_view(body: dict[str, Any]) -> dict[str, Any]:
    """The agent's rendering of a registration without checks."""
    return {
        "ID": body["ID"], "Service": body["Name"], "Address": body["Address"], "Port": body["Port"],
        "Tags": list(body["Tags"]) or None, "Meta": dict(body["Meta"]),
        "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False,
    }


class ScriptedAgent:
    """The agent: two scripted blocking queries, and services and checks the test edits."""

    def __init__(self) -> None:
        self.services_query = Query()
        self.health_query = Query()
        self.state: dict[str, dict[str, Any]] = {}
        self.check_state: dict[str, dict[str, Any]] = {}
        self.scans = 0

    async def wait_services(self, index: int, wait: str) -> int:
        return await self.services_query.ask(index)

    async def wait_health(self, index: int, wait: str) -> int:
        return await self.health_query.ask(index)

    async def services(self) -> dict[str, dict[str, Any]]:
        self.scans += 1
        return {k: dict(v) for k, v in self.state.items()}

    async def checks(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.check_state.items()}


class AgentRig:
    def __init__(self) -> None:
        self.agent = ScriptedAgent()
        self.index = AgentIndex(cluster=CLUSTER, plural="consulservices")
        self.enqueued: list[ObjectRef] = []
        self.orphans: list[ObjectRef] = []
        for ref, address in ((WEB, "10.0.0.5"), (API, "10.0.0.6")):
            spec = api.parse(ref.namespace, ref.name, {"address": address, "port": 8080})
            body = planner.registration(spec, planner.Owner(CLUSTER, ref.namespace, ref.name))
            self.agent.state[body["ID"]] = agent_view(body)
            self.index.track(ref, Tracked(body["ID"], planner.desired_signature(body), "passing"))
        self.watcher = ConsulWatcher(
            self.agent, self.index, self.enqueued.append, self.orphans.append,  # type: ignore[arg-type]
            wait="60s", min_scan_interval=0.0,
        )

    async def scanned(self, scans: int) -> None:
        await wait_until(lambda: self.agent.scans >= scans)
        await settle()


@pytest.fixture
async def agent_rig(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AgentRig]:
    monkeypatch.setattr(agentwatching, "_BACKOFF", (0.001, 0.001))
    rig = AgentRig()
    task = asyncio.create_task(rig.watcher.run())
    queries = (rig.agent.services_query, rig.agent.health_query)
    await wait_until(lambda: all(q.calls == [0] for q in queries))
    # The first answers: one scan, everything as the resources want it.
    await rig.agent.services_query.answer(10)
    await rig.agent.health_query.answer(20)
    await rig.scanned(1)
    assert rig.enqueued == []
    yield rig
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_agent_a_change_enqueues_exactly_the_drifted_resource(agent_rig: AgentRig) -> None:
    rig = agent_rig
    scans = rig.agent.scans
    rig.agent.state["team-b-api"]["Port"] = 9999  # edited outside Kubernetes
    await rig.agent.services_query.answer(11)
    await rig.scanned(scans + 1)
    assert rig.enqueued == [API]


async def test_agent_nothing_changed_enqueues_nothing(agent_rig: AgentRig) -> None:
    rig = agent_rig
    scans = rig.agent.scans
    await rig.agent.services_query.answer(10)  # the wait ran out
    await rig.agent.health_query.answer(20)
    await settle()
    assert rig.agent.scans == scans, "no move, no scan"
    await rig.agent.services_query.answer(12)  # someone else's service changed
    await rig.scanned(scans + 1)
    assert rig.enqueued == []
    assert rig.agent.services_query.calls[-1] == 12 and rig.agent.health_query.calls[-1] == 20


async def test_agent_an_outage_logs_once_and_its_end_once(
    agent_rig: AgentRig, caplog: pytest.LogCaptureFixture
) -> None:
    rig = agent_rig
    caplog.set_level(logging.DEBUG, logger="tether.consulservice.agentwatching")
    for _ in range(4):
        await rig.agent.services_query.answer(ConsulUnavailable("Consul agent is unreachable"))
    assert rig.agent.services_query.calls[-4:] == [0, 0, 0, 0]
    scans = rig.agent.scans
    rig.agent.state.clear()  # the agent came back empty
    await rig.agent.services_query.answer(3)
    await rig.scanned(scans + 1)
    assert sorted(rig.enqueued) == [WEB, API]
    levels = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert [level for level, _ in levels] == ["WARNING", "INFO"]
    assert "Consul services watch failed: Consul agent is unreachable" in levels[0][1]
    assert "Consul services watch recovered after 4 failures" in levels[1][1]


def _plant_registration(rig: AgentRig, ref: ObjectRef, *, cluster: str = CLUSTER) -> None:
    fields = {"address": "10.0.0.9", "port": 8080, "id": f"{cluster}-{ref.name}"}
    spec = api.parse(ref.namespace, ref.name, fields)
    body = planner.registration(spec, planner.Owner(cluster, ref.namespace, ref.name))
    rig.agent.state[body["ID"]] = agent_view(body)


async def test_agent_an_untracked_registration_goes_to_the_collector_once_per_interval(
    agent_rig: AgentRig,
) -> None:
    rig = agent_rig
    rig.watcher.grace = 0.0
    gone = ObjectRef("consulservices", "team-a", "gone")
    _plant_registration(rig, gone)  # landed after its resource's release
    _plant_registration(rig, ObjectRef("consulservices", "team-a", "theirs"), cluster="other")
    scans = rig.agent.scans
    await rig.agent.services_query.answer(11)
    await rig.scanned(scans + 1)
    assert rig.orphans == [gone], "only this cluster's untracked owner"
    assert rig.enqueued == []
    await rig.agent.services_query.answer(12)  # another change within the interval
    await rig.scanned(scans + 2)
    assert rig.orphans == [gone], "asked at most once per interval"


async def test_agent_an_owner_is_handed_over_only_once_untracked_for_the_grace(
    agent_rig: AgentRig,
) -> None:
    # After a start every resource is untracked until its first reconcile: the
    # watcher must not ask Kubernetes about each of them.
    rig = agent_rig
    rig.watcher.grace = 0.3
    late = ObjectRef("consulservices", "team-a", "late")
    gone = ObjectRef("consulservices", "team-a", "gone")
    _plant_registration(rig, late)
    _plant_registration(rig, gone)
    scans = rig.agent.scans
    await rig.agent.services_query.answer(11)
    await rig.scanned(scans + 1)
    assert rig.orphans == []
    # ``late`` is reconciled within the grace; ``gone`` never is.
    spec = api.parse("team-a", "late", {"address": "10.0.0.9", "port": 8080, "id": f"{CLUSTER}-late"})
    body = planner.registration(spec, planner.Owner(CLUSTER, "team-a", "late"))
    rig.index.track(late, Tracked(body["ID"], planner.desired_signature(body), "passing"))
    await wait_until(lambda: rig.orphans != [])  # the revisit, with the agent quiet
    assert rig.orphans == [gone]


async def test_agent_an_orphan_still_there_is_asked_again_after_the_interval(
    agent_rig: AgentRig,
) -> None:
    rig = agent_rig
    rig.watcher.sweep_interval = 0.05
    rig.watcher.grace = 0.0
    gone = ObjectRef("consulservices", "team-a", "gone")
    _plant_registration(rig, gone)
    await rig.agent.services_query.answer(11)
    # No further change on the agent: the watcher comes back by itself.
    await wait_until(lambda: len(rig.orphans) >= 2)
    assert set(rig.orphans) == {gone}
    del rig.agent.state[f"{CLUSTER}-gone"]  # collected
    count = len(rig.orphans)
    await rig.agent.services_query.answer(13)
    scans = rig.agent.scans
    await rig.scanned(scans + 1)
    await asyncio.sleep(0.3)  # six intervals
    assert len(rig.orphans) == count, "nothing left to collect, nothing handed over"
    assert rig.index.untracked() == []


async def test_agent_an_index_going_backwards_rescans_and_reads_again(agent_rig: AgentRig) -> None:
    rig = agent_rig
    scans = rig.agent.scans
    del rig.agent.state["team-a-web"]  # an agent restored from an old snapshot
    await rig.agent.services_query.answer(4)
    await rig.scanned(scans + 1)
    assert rig.enqueued == [WEB]
    assert rig.agent.services_query.calls[-1] == 0
    await rig.agent.services_query.answer(5)
    assert rig.agent.services_query.calls[-1] == 5


# -- the catalog watcher (endpoints mode) ----------------------------------------------------


class ScriptedCatalog:
    """The synthetic node: two scripted blocking queries over entries the test edits."""

    def __init__(self) -> None:
        self.services_query = Query()
        self.checks_query = Query()
        self.services: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []

    async def node_services(
        self, node: str, *, where: str | None = None, index: int = 0, wait: str = ""
    ) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]]]:
        assert node == NODE and wait == "60s"
        new = await self.services_query.ask(index)
        return new, {"Node": NODE}, [dict(s) for s in self.services]

    async def node_checks(
        self, node: str, *, where: str | None = None, index: int = 0, wait: str = ""
    ) -> tuple[int, list[dict[str, Any]]]:
        new = await self.checks_query.ask(index)
        return new, [dict(c) for c in self.checks]


class CatalogRig:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.catalog = ScriptedCatalog()
        self.index = CatalogIndex(cluster=CLUSTER, plural="consulservices")
        self.enqueued: list[ObjectRef] = []
        self.swept: list[planner.Owner] = []
        self.compares = 0
        for ref, address in ((WEB, "10.1.0.5"), (API, "10.1.0.6")):
            spec = api.parse(ref.namespace, ref.name, {"endpoints": {"service": ref.name}})
            owner = planner.Owner(CLUSTER, ref.namespace, ref.name)
            wanted = endpoints.desired(spec, owner, [endpoints.Endpoint(address, 8080, "passing", "ready")])
            self.index.track(ref, wanted)
            for inst in wanted.values():
                self.catalog.services.append({**endpoints.service_body(inst), "ModifyIndex": 5})
                self.catalog.checks.append({**endpoints.check_body(NODE, inst), "ModifyIndex": 5})
        drifted = self.index.drifted

        def counting(
            services: list[dict[str, Any]], checks: list[dict[str, Any]]
        ) -> tuple[list[ObjectRef], list[planner.Owner]]:
            self.compares += 1
            return drifted(services, checks)

        monkeypatch.setattr(self.index, "drifted", counting)
        self.watcher = CatalogWatcher(
            self.catalog, self.index, NODE, self.enqueued.append, self.sweep,  # type: ignore[arg-type]
            # The watcher's own settle time: both answers of one change are in.
            wait="60s", min_scan_interval=0.0, settle=0.05,
        )

    async def sweep(self, owner: planner.Owner) -> None:
        self.swept.append(owner)

    async def compared(self, compares: int) -> None:
        await wait_until(lambda: self.compares >= compares)
        await settle()


@pytest.fixture
async def catalog_rig(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[CatalogRig]:
    monkeypatch.setattr(catalogwatching, "_BACKOFF", (0.001, 0.001))
    rig = CatalogRig(monkeypatch)
    task = asyncio.create_task(rig.watcher.run())
    queries = (rig.catalog.services_query, rig.catalog.checks_query)
    await wait_until(lambda: all(q.calls == [0] for q in queries))
    await rig.catalog.services_query.answer(10)
    await rig.catalog.checks_query.answer(10)
    await rig.compared(1)
    assert rig.enqueued == [] and rig.swept == []
    yield rig
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_catalog_a_change_enqueues_exactly_the_drifted_resource(catalog_rig: CatalogRig) -> None:
    rig = catalog_rig
    compares = rig.compares
    web_check = next(c for c in rig.catalog.checks if c["ServiceID"].startswith("team-a-web"))
    web_check["Status"] = "critical"  # someone wrote the check
    await rig.catalog.checks_query.answer(11)
    await rig.compared(compares + 1)
    assert rig.enqueued == [WEB]


async def test_catalog_nothing_changed_enqueues_nothing(catalog_rig: CatalogRig) -> None:
    rig = catalog_rig
    compares = rig.compares
    await rig.catalog.services_query.answer(10)
    await rig.catalog.checks_query.answer(10)
    await settle()
    assert rig.compares == compares, "no move, no comparison"
    await rig.catalog.services_query.answer(11)  # a write that changed nothing Tether wants
    await rig.compared(compares + 1)
    assert rig.enqueued == [] and rig.swept == []


async def test_catalog_an_outage_logs_once_and_its_end_once(
    catalog_rig: CatalogRig, caplog: pytest.LogCaptureFixture
) -> None:
    rig = catalog_rig
    caplog.set_level(logging.DEBUG, logger="tether.consulservice.catalogwatching")
    for _ in range(3):
        await rig.catalog.checks_query.answer(ConsulUnavailable("Consul agent is unreachable"))
    compares = rig.compares
    rig.catalog.services, rig.catalog.checks = [], []  # Consul came back empty
    await rig.catalog.services_query.answer(2)
    await rig.catalog.checks_query.answer(2)
    await rig.compared(compares + 1)
    assert sorted(set(rig.enqueued)) == [WEB, API]
    levels = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert [level for level, _ in levels] == ["WARNING", "INFO"]
    assert f"Consul checks watch on node {NODE!r} failed: Consul agent is unreachable" in levels[0][1]
    assert "recovered after 3 failures" in levels[1][1]


async def test_catalog_an_index_going_backwards_compares_and_reads_again(catalog_rig: CatalogRig) -> None:
    rig = catalog_rig
    compares = rig.compares
    rig.catalog.services = [s for s in rig.catalog.services if not s["ID"].startswith("team-b-api")]
    await rig.catalog.services_query.answer(3)  # a Consul restored from an old snapshot
    await rig.compared(compares + 1)
    assert rig.enqueued == [API]
    assert rig.catalog.services_query.calls[-1] == 0
    await rig.catalog.services_query.answer(4)
    assert rig.catalog.services_query.calls[-1] == 4


async def test_catalog_a_gated_instance_that_moved_wakes_its_resource(catalog_rig: CatalogRig) -> None:
    """The readiness gate follows Consul: an instance now passing that the last gate
    decision read otherwise enqueues its resource, even though nothing drifted."""
    rig = catalog_rig
    gates = GateIndex()
    rig.watcher.gates = gates
    web_iid = next(str(s["ID"]) for s in rig.catalog.services if str(s["ID"]).startswith("team-a-web"))
    api_iid = next(str(s["ID"]) for s in rig.catalog.services if str(s["ID"]).startswith("team-b-api"))
    gates.record(WEB, {"web-0"}, {web_iid: None})  # read before its registration
    gates.record(API, {"api-0"}, {api_iid: "passing"})  # already settled
    compares = rig.compares
    await rig.catalog.checks_query.answer(11)
    await rig.compared(compares + 1)
    assert rig.enqueued == [WEB]


@pytest.mark.parametrize("busy", [False, True])
async def test_agent_scans_are_spaced_by_their_cost_only_while_reconciles_are_queued(
    agent_rig: AgentRig, busy: bool
) -> None:
    rig = agent_rig
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    listing = rig.agent.services

    async def slow_listing() -> Any:
        starts.append(loop.time())
        await asyncio.sleep(0.02)  # a scan that costs 20 ms
        return await listing()

    rig.agent.services = slow_listing  # type: ignore[method-assign]
    rig.watcher.busy = lambda: busy
    rig.watcher.busy_spacing = 25.0
    scans = rig.agent.scans
    for n, index in enumerate((11, 12, 13), start=1):
        await rig.agent.services_query.answer(index)
        await rig.scanned(scans + n)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # The test itself waits about 0.17 s between two changes; busy, the watcher
    # waits for 25 times the previous scan's cost (about 0.5 s) since it began.
    if busy:
        assert len(gaps) == 2 and all(gap >= 0.5 for gap in gaps), gaps
    else:
        assert len(gaps) == 2 and all(gap < 0.35 for gap in gaps), gaps


@pytest.mark.parametrize("busy", [False, True])
async def test_catalog_queries_wait_in_proportion_to_the_node_only_while_reconciles_are_queued(
    catalog_rig: CatalogRig, busy: bool
) -> None:
    rig = catalog_rig
    rig.watcher.busy = lambda: busy
    # Two entries on the node: 10 000 * 20 us * 2 = 0.4 s between queries while busy.
    rig.watcher.busy_spacing = 10_000.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    await rig.catalog.services_query.answer(11)  # returns once the watcher asks again
    waited = loop.time() - started
    assert (waited >= 0.35) if busy else (waited < 0.2), waited
    assert rig.catalog.services_query.calls[-1] == 11  # nothing missed: asked from the new index
