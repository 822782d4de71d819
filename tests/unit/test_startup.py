"""Start-up: Kopf waits for the API server to serve every kind; a kind not watched is reported.

Also the families' wiring of their per-namespace watches (events → resource
keys), and the lingering-thread check at exit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import kopf
import pytest
from prometheus_client import REGISTRY

from tether import kopfing, running
from tether.api import ObjectRef
from tether.clients.kube.client import KubeError
from tether.config import wiring as config_wiring
from tether.config.sources import SourceIndex
from tether.consulservice import wiring as consulservice_wiring
from tether.families import Router
from tether.health import Health
from tether.queueing import Backoff

KINDS = {"consulservices": "ConsulService", "etcdconfigs": "EtcdConfig", "consulconfigs": "ConsulConfig"}


def _unserved(kind: str) -> float | None:
    return REGISTRY.get_sample_value("tether_kinds_unserved", {"kind": kind})


def test_a_kind_not_watched_makes_the_replica_unready_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = Health()
    health.ready, health.state = True, "ok"
    repairs: list[float] = []

    async def repair() -> None:  # discovery keeps leaving EtcdConfig out
        repairs.append(time.monotonic())

    with caplog.at_level(logging.WARNING, logger="tether"):
        served = asyncio.run(running.watch_served(
            lambda: {"consulservices", "consulconfigs"}, KINDS, health, asyncio.Event(),
            repair=repair, within=0.3, repair_every=0.1, poll=0.02,
        ))
    assert served is False
    assert 1 <= len(repairs) <= 3
    assert health.unready() == "not served by the API server: EtcdConfig"
    assert _unserved("EtcdConfig") == 1
    assert _unserved("ConsulService") == 0 and _unserved("ConsulConfig") == 0
    assert [r.levelname for r in caplog.records if "EtcdConfig not served" in r.getMessage()] == ["ERROR"]


def test_a_kind_brought_back_by_a_discovery_read_is_served() -> None:
    health = Health()
    health.ready = True
    watched = {"consulservices", "consulconfigs"}

    async def repair() -> None:
        watched.add("etcdconfigs")

    served = asyncio.run(running.watch_served(
        lambda: watched, KINDS, health, asyncio.Event(), repair=repair, within=5, repair_every=0.05,
        poll=0.01,
    ))
    assert served is True
    assert health.unready() is None
    assert all(_unserved(kind) == 0 for kind in KINDS.values())


def test_a_kind_watched_within_the_bound_is_served_without_repair() -> None:
    health = Health()
    health.ready = True
    watched = {"consulservices", "consulconfigs"}

    async def main() -> bool:
        async def late() -> None:
            await asyncio.sleep(0.1)
            watched.add("etcdconfigs")

        async def repair() -> None:
            raise AssertionError("no repair needed")

        task = asyncio.create_task(late())
        served = await running.watch_served(
            lambda: watched, KINDS, health, asyncio.Event(), repair=repair, within=5, repair_every=2,
            poll=0.02,
        )
        await task
        return served

    assert asyncio.run(main()) is True
    assert health.unready() is None


def test_a_stop_ends_the_served_check_without_a_verdict() -> None:
    health = Health()
    stop = asyncio.Event()
    stop.set()
    assert asyncio.run(running.watch_served(set, KINDS, health, stop, within=0.0)) is True
    assert health.unserved == []


def test_kopfs_resources_are_built_from_discovery_as_kopf_builds_them() -> None:
    listing = {"resources": [
        {"name": "etcdconfigs", "kind": "EtcdConfig", "singularName": "etcdconfig", "namespaced": True,
         "shortNames": ["ecfg"], "categories": ["tether"], "verbs": ["get", "list", "watch"]},
        {"name": "etcdconfigs/status", "kind": "EtcdConfig", "singularName": "", "namespaced": True},
    ]}
    (resource,) = kopfing.resources(listing)
    assert (resource.group, resource.version, resource.plural, resource.kind) == (
        "tether.dev", "v1alpha1", "etcdconfigs", "EtcdConfig")
    assert resource.subresources == frozenset({"status"}) and resource.namespaced and resource.preferred
    assert resource.shortcuts == frozenset({"ecfg"}) and "watch" in resource.verbs
    record = kopfing.insights()
    record.watched_resources.add(resource)
    # Until Kopf's namespace observer has listed the namespaces, Kopf starts no watch at all.
    assert kopfing.watched(record) == set()
    record.ready_namespaces.set()
    assert kopfing.watched(record) == {"etcdconfigs"}


class _CoreDiscovery:
    """Discovery of the core group, apiextensions and tether.dev, as the API server answers it."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def get(self, path: str, *, params: Mapping[str, str]) -> Any:
        self.paths.append(path)
        if path == "api/v1":
            return {"resources": [
                {"name": "namespaces", "kind": "Namespace", "singularName": "namespace", "namespaced": False,
                 "verbs": ["get", "list", "watch"]},
                {"name": "pods", "kind": "Pod", "singularName": "pod", "namespaced": True, "verbs": ["list"]},
            ]}
        if path == "apis/apiextensions.k8s.io/v1":
            return {"resources": [
                {"name": "customresourcedefinitions", "kind": "CustomResourceDefinition",
                 "singularName": "customresourcedefinition", "namespaced": False, "verbs": ["list", "watch"]},
            ]}
        return {"resources": [
            {"name": "etcdconfigs", "kind": "EtcdConfig", "singularName": "etcdconfig", "namespaced": True,
             "verbs": ["get", "list", "watch"]},
        ]}


async def test_a_rescan_fills_what_kopfs_observers_wait_for_when_its_first_scan_missed_it() -> None:
    from kopf._cogs.structs.references import CRDS, NAMESPACES

    record = kopfing.insights()
    http = _CoreDiscovery()
    waiting = asyncio.create_task(record.backbone.wait_for(NAMESPACES))  # as Kopf's namespace observer
    await asyncio.sleep(0)
    assert not waiting.done()
    await kopfing.rescan(http, record, kopf.OperatorRegistry())  # type: ignore[arg-type]
    namespaces = await asyncio.wait_for(waiting, 1)
    assert (namespaces.group, namespaces.version, namespaces.plural) == ("", "v1", "namespaces")
    assert CRDS in record.backbone
    assert http.paths == ["api/v1", "apis/apiextensions.k8s.io/v1", "apis/tether.dev/v1alpha1"]
    # Filled once: a later rescan reads Tether's group only.
    await kopfing.rescan(http, record, kopf.OperatorRegistry())  # type: ignore[arg-type]
    assert http.paths[3:] == ["apis/tether.dev/v1alpha1"]


class _Discovery:
    """The API server's discovery for tether.dev/v1alpha1, answering from a script."""

    def __init__(self, answers: list[Exception | list[str]]) -> None:
        self.answers = answers
        self.calls = 0

    async def get(self, path: str, *, params: Mapping[str, str]) -> Any:
        assert path == "apis/tether.dev/v1alpha1"
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if isinstance(answer, Exception):
            raise answer
        return {"kind": "APIResourceList", "resources": [{"name": p} for p in answer]}


def _fast() -> Backoff[str]:
    return Backoff(base=0.01, cap=0.02, rng=random.Random(1))


def test_kopf_waits_until_discovery_serves_every_kind(caplog: pytest.LogCaptureFixture) -> None:
    down = KubeError("GET apis/tether.dev/v1alpha1: ClientConnectorError: connection refused")
    discovery = _Discovery([down, down, KubeError("503 Service Unavailable", 503),
                            ["consulservices"], ["consulservices", "etcdconfigs", "consulconfigs"]])
    health = Health()
    with caplog.at_level(logging.INFO, logger="tether"):
        ok = asyncio.run(running.wait_for_api(discovery, KINDS, asyncio.Event(), health,  # type: ignore[arg-type]
                                              backoff=_fast()))
    assert ok is True
    assert discovery.calls == 5
    assert health.state == "waiting for the API server"
    assert health.unready() == "waiting for the API server"
    messages = [r.getMessage() for r in caplog.records]
    # Once when the wait starts, once when it ends: not a line per attempt.
    assert len([m for m in messages if m.startswith("waiting for the API server")]) == 1
    assert len([m for m in messages if "serves every kind" in m]) == 1


def test_no_wait_and_no_log_when_the_api_server_answers() -> None:
    discovery = _Discovery([list(KINDS)])
    health = Health()
    assert asyncio.run(running.wait_for_api(discovery, KINDS, asyncio.Event(), health)) is True  # type: ignore[arg-type]
    assert discovery.calls == 1
    assert health.state == "starting"


def test_a_stop_ends_the_wait_for_the_api_server() -> None:
    discovery = _Discovery([KubeError("connection refused")])

    async def main() -> bool:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.1, stop.set)
        return await running.wait_for_api(discovery, KINDS, stop, Health(),  # type: ignore[arg-type]
                                          backoff=Backoff(base=10, cap=10))

    started = time.monotonic()
    assert asyncio.run(main()) is False
    assert time.monotonic() - started < 2  # not the 5-10 s backoff
    assert discovery.calls == 1


class _Controller:
    def __init__(self, plural: str) -> None:
        self.reconciler = type("R", (), {"plural": plural, "kind": plural})()
        self.woken: list[ObjectRef] = []

    def enqueue(self, ref: ObjectRef) -> None:
        self.woken.append(ref)


def test_one_configmap_watch_wakes_the_dependents_of_both_config_kinds() -> None:
    etcd_sources, kv_sources = SourceIndex(), SourceIndex()
    e = ObjectRef("etcdconfigs", "shop", "e")
    k = ObjectRef("consulconfigs", "shop", "k")
    etcd_sources.set(e, [("configMap", "shop", "settings")])
    kv_sources.set(k, [("configMap", "shop", "settings"), ("secret", "shop", "creds")])
    route = Router()
    etcd_ctl, kv_ctl = _Controller("etcdconfigs"), _Controller("consulconfigs")
    route.add(etcd_ctl), route.add(kv_ctl)  # type: ignore[arg-type]
    config_maps, secrets = config_wiring.source_watches(None, (etcd_sources, kv_sources), route.enqueue)  # type: ignore[arg-type]
    config_maps.changed("shop", {"name": "settings"})
    config_maps.changed("shop", {"name": "unrelated"})
    assert etcd_ctl.woken == [e] and kv_ctl.woken == [k]
    secrets.changed("shop", {"name": "creds"})
    assert etcd_ctl.woken == [e] and kv_ctl.woken == [k, k]
    assert config_maps.wanted("shop") and not config_maps.wanted("other")
    assert secrets.wanted("shop") and not secrets.wanted("other")
    config_maps.resync("shop")
    assert etcd_ctl.woken == [e, e] and kv_ctl.woken == [k, k, k]


class _Followers:
    def followers(self, namespace: str, service: str) -> list[ObjectRef]:
        return [ObjectRef("consulservices", namespace, "web")] if service == "web" else []

    def followers_in(self, namespace: str) -> list[ObjectRef]:
        return [ObjectRef("consulservices", namespace, "web")] if namespace == "shop" else []


def test_a_slice_wakes_the_consulservices_following_its_service() -> None:
    woken: list[ObjectRef] = []
    slices = consulservice_wiring.slice_watches(None, _Followers(), woken.append)  # type: ignore[arg-type]
    slices.changed("shop", {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}})
    slices.changed("shop", {"name": "db-abc", "labels": {"kubernetes.io/service-name": "db"}})
    slices.changed("shop", {"name": "unlabelled"})
    assert woken == [ObjectRef("consulservices", "shop", "web")]
    assert slices.wanted("shop") and not slices.wanted("other")
    assert slices.label_selector == "kubernetes.io/service-name"


def test_a_followed_service_wakes_its_consulservices() -> None:
    woken: list[ObjectRef] = []
    services = consulservice_wiring.service_watches(None, _Followers(), woken.append)  # type: ignore[arg-type]
    services.changed("shop", {"name": "web"})
    services.changed("shop", {"name": "db"})
    assert woken == [ObjectRef("consulservices", "shop", "web")]
    assert services.wanted("shop") and not services.wanted("other")
    assert services.path == "api/v1/namespaces/{namespace}/services" and services.label_selector == ""
    services.resync("shop")
    assert woken == [ObjectRef("consulservices", "shop", "web")] * 2


async def test_a_service_is_read_only_once_its_namespace_is_watched() -> None:
    """A Service created after the read must arrive as an event: the watch comes first."""
    calls: list[str] = []

    class Watches:
        def __init__(self, what: str) -> None:
            self.what = what

        async def ensure(self, namespace: str) -> None:
            calls.append(f"ensure {self.what} {namespace}")

    class Kube:
        async def read_service(self, namespace: str, name: str) -> None:
            calls.append(f"read service {namespace}/{name}")

        async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
            calls.append(f"list slices {namespace}/{service}")
            return []

    reads = consulservice_wiring.ClusterReads(Kube(), Watches("slices"), Watches("services"))  # type: ignore[arg-type]
    await reads.read_service("shop", "web")
    await reads.list_endpoint_slices("shop", "web")
    assert calls == [
        "ensure services shop", "read service shop/web", "ensure slices shop", "list slices shop/web",
    ]


def test_a_key_of_a_kind_without_controller_is_dropped() -> None:
    route = Router()
    ctl = _Controller("etcdconfigs")
    route.add(ctl)  # type: ignore[arg-type]
    route.enqueue(ObjectRef("consulconfigs", "ns", "x"))
    route.enqueue(ObjectRef("etcdconfigs", "ns", "y"))
    assert ctl.woken == [ObjectRef("etcdconfigs", "ns", "y")]


def test_threads_that_are_finishing_do_not_count_as_lingering(monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[tuple[str, int]] = []
    monkeypatch.setattr(running, "_hard_exit", lambda reason, code=0: exits.append((reason, code)))
    finishing = threading.Thread(target=time.sleep, args=(0.1,), name="finishing")
    finishing.start()
    running._exit_if_threads_linger(0, join=2.0)
    assert exits == []
    stuck = threading.Event()
    hung = threading.Thread(target=stuck.wait, args=(5,), name="hung-call")
    hung.start()
    try:
        running._exit_if_threads_linger(1, join=0.1)
    finally:
        stuck.set()
        hung.join()
    assert len(exits) == 1
    reason, code = exits[0]
    assert "1 worker threads still alive" in reason and "hung-call" in reason and code == 1


async def test_kopf_ignores_the_listing_its_namespace_watch_starts_with() -> None:
    """The premise of :func:`kopfing.add_missed_namespaces`, pinned against the Kopf in use:
    a namespace that reaches Kopf only in its watch's (re)listing is never added."""
    from kopf._core.reactor.observation import process_discovered_namespace_event

    record = kopfing.insights()
    listed = {"type": None, "object": {"metadata": {"name": "t-late"}}}
    await process_discovered_namespace_event(raw_event=listed, namespaces=["t-*"], insights=record)  # type: ignore[arg-type]
    assert record.namespaces == set()


async def test_namespaces_kopf_missed_are_handed_to_it() -> None:
    record = kopfing.insights()
    present = {"t-known", "t-missed", "other", "t-another"}
    # Before Kopf's first listing nothing is touched: that listing may still add them.
    assert await kopfing.add_missed_namespaces(record, ["t-*"], present) == []
    record.namespaces.add("t-known")  # type: ignore[arg-type]
    record.ready_namespaces.set()

    async def revised() -> None:
        async with record.revised:
            await record.revised.wait()  # as Kopf's orchestrator, which then starts the watches

    waiter = asyncio.create_task(revised())
    await asyncio.sleep(0)
    assert await kopfing.add_missed_namespaces(record, ["t-*"], present) == ["t-another", "t-missed"]
    await asyncio.wait_for(waiter, 1)
    assert record.namespaces == {"t-known", "t-missed", "t-another"}
    # Nothing more to hand over; a cluster-wide operator (no patterns) never needs it.
    assert await kopfing.add_missed_namespaces(record, ["t-*"], present) == []
    assert await kopfing.add_missed_namespaces(record, [], {"new"}) == []


def test_exit_now_flushes_output_and_logs_then_ends_with_the_code() -> None:
    """The stop skips the interpreter's teardown, but nothing printed or logged is lost."""
    script = (
        "import logging, sys\n"
        "from tether import running\n"
        "logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
        "print('printed, block-buffered into a pipe')\n"
        "logging.getLogger('t').info('logged')\n"
        "running.exit_now(3)\n"
        "print('never')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout == "printed, block-buffered into a pipe\n"
    assert "logged" in done.stderr


def test_the_empty_diff_base_holds_only_while_every_handler_is_an_event_handler() -> None:
    """Kopf's essence is skipped (EventsOnlyDiffBase), which is right only while Tether
    registers no on-create/update/delete handler, daemon or timer: a later one would
    see no changes. Private registry names, read in a test only."""
    from types import SimpleNamespace

    from kopf._cogs.structs.references import Resource

    from tether import handlers

    storage = kopfing.EventsOnlyDiffBase()
    body = kopf.Body({"metadata": {"name": "a"}, "spec": {"x": 1}})
    assert storage.build(body=body) == {} and storage.fetch(body=body) is None

    registry = kopf.OperatorRegistry()
    plurals = ("consulservices", "etcdconfigs", "consulconfigs")
    controllers = [SimpleNamespace(reconciler=SimpleNamespace(plural=p)) for p in plurals]
    handlers.register(registry, controllers=controllers)  # type: ignore[arg-type]
    for plural in plurals:
        resource = Resource("tether.dev", "v1alpha1", plural)
        assert registry._watching.has_handlers(resource=resource)
        assert not registry._changing.has_handlers(resource=resource)
        assert not registry._spawning.has_handlers(resource=resource)
