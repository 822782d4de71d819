"""The ConsulService family wires itself: its reconciler, Controller, watchers and watches.

One kind with two modes, dispatched by
:class:`~tether.consulservice.reconciling.ConsulServices`: fixed instances on the
Consul agent (:class:`~tether.consulservice.agent.AgentServices`) and endpoints
mode in Consul's catalog (:class:`~tether.consulservice.catalog.CatalogServices`). Two backend watchers
(the agent's services, the synthetic node's catalog) and per-namespace watches
(the followed Services, their EndpointSlices, and their namespaces' Pods for the
readiness gate) wake its resources; the keeper of the synthetic node's dead-man
check (``tether:alive``) runs with the watchers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from tether.api import ObjectRef
from tether.clients.kube.client import KubeClient
from tether.clients.kube.http import KubeHttp
from tether.clients.kube.watching import NamespaceWatches
from tether.consulservice.agent import AgentServices
from tether.consulservice.agentwatching import ConsulWatcher
from tether.consulservice.alivekeeping import AliveKeeper
from tether.consulservice.catalog import CatalogServices
from tether.consulservice.catalogwatching import CatalogWatcher
from tether.consulservice.gating import ClusterPods, Gating, pod_cache
from tether.consulservice.index import AgentIndex, CatalogIndex, GateIndex
from tether.consulservice.reconciling import ConsulServices
from tether.families import Enqueue, Family, Provided, Router

PLURAL = "consulservices"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class Followers(Protocol):
    def followers(self, namespace: str, service: str) -> list[ObjectRef]: ...

    def followers_in(self, namespace: str) -> list[ObjectRef]: ...


def setup(provided: Provided) -> Family:
    """The ConsulService kind, ready for the process to run."""
    settings, consul_client = provided.settings, provided.consul
    cluster = settings.cluster
    route = Router()
    agent_index = AgentIndex(cluster=cluster, plural=PLURAL)
    catalog_index = CatalogIndex(cluster=cluster, plural=PLURAL)
    slices = slice_watches(provided.kube.http, catalog_index, route.enqueue)
    services_watched = service_watches(provided.kube.http, catalog_index, route.enqueue)
    reads = ClusterReads(provided.kube, slices, services_watched)
    # The readiness gate tether.dev/consul-passing: Pods of namespaces with followed Services.
    gate_index = GateIndex()
    pods = pod_cache(provided.kube.http, catalog_index, gate_index, route.enqueue)
    catalog_services = CatalogServices(
        consul_client, reads, catalog_index, cluster=cluster, node=settings.consul_node,
        max_txn_ops=settings.consul_max_txn_ops, gating=Gating(ClusterPods(provided.kube, pods), gate_index),
    )
    services = ConsulServices(
        AgentServices(consul_client, agent_index, cluster=cluster, agent_url=settings.consul.url),
        catalog_services,
        reads,
    )
    controller = route.add(provided.controller(services))

    def backlogged() -> bool:
        # As many reconciles at once as there are workers: a start or a rollout,
        # whose writes keep moving Consul's indexes. Not a few: a drift repaired
        # while others were found then waited for the spacing — with "anything
        # queued" as the rule, at 5000 registrations, repair p50 1.6 s instead
        # of 0.35 s; with "4 at once", under 100 drifts in 30 s at 10 000
        # registrations (each scan slower than the drifts' pace), p50 3.3 s and
        # p99 9.5 s instead of 0.7 and 1.4 s.
        return controller.queue.depth() >= settings.workers

    # The dead-man switch's leader side: tether:alive passing while this replica leads.
    alive = AliveKeeper(consul_client, node=settings.consul_node, cluster=cluster)
    watchers = {
        "consul-watch": ConsulWatcher(
            consul_client, agent_index, controller.enqueue, controller.enqueue_orphan,
            busy=backlogged,
        ).run,
        "consul-catalog-watch": CatalogWatcher(
            consul_client, catalog_index, settings.consul_node, controller.enqueue, controller.enqueue_orphan,
            gates=gate_index,
            alive_drift=alive.nudge,
            busy=backlogged,
        ).run,
        "consul-alive-check": alive.run,
    }
    return Family(controllers=(controller,), watchers=watchers, watches=(slices, services_watched, pods))


def slice_watches(http: KubeHttp, followers: Followers, enqueue: Enqueue) -> NamespaceWatches:
    """The EndpointSlice watch: only slices of a Service some ConsulService follows enqueue anything."""

    def changed(namespace: str, meta: Mapping[str, Any]) -> None:
        service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if service:
            for ref in followers.followers(namespace, service):
                enqueue(ref)

    def resync(namespace: str) -> None:
        for ref in followers.followers_in(namespace):
            enqueue(ref)

    return NamespaceWatches(
        http, what="endpointslices", path="apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
        changed=changed, wanted=lambda ns: bool(followers.followers_in(ns)), resync=resync,
        label_selector=SERVICE_NAME_LABEL,
    )


def service_watches(http: KubeHttp, followers: Followers, enqueue: Enqueue) -> NamespaceWatches:
    """The Service watch: a followed Service created, changed or deleted wakes its followers.

    Slices alone are not enough: a Service deleted while its slices stay (a
    custom controller's, or before garbage collection) changes no slice, yet
    means no instances; and a Service created after its follower must wake it.
    """

    def changed(namespace: str, meta: Mapping[str, Any]) -> None:
        for ref in followers.followers(namespace, str(meta.get("name") or "")):
            enqueue(ref)

    def resync(namespace: str) -> None:
        for ref in followers.followers_in(namespace):
            enqueue(ref)

    return NamespaceWatches(
        http, what="services", path="api/v1/namespaces/{namespace}/services",
        changed=changed, wanted=lambda ns: bool(followers.followers_in(ns)), resync=resync,
    )


class ClusterReads:
    """Endpoints mode's Kubernetes reads (the ``Cluster`` protocol), each behind its namespace's watch."""

    def __init__(self, kube: KubeClient, slices: NamespaceWatches, services: NamespaceWatches) -> None:
        self.kube = kube
        self.slices = slices
        self.services = services

    async def read_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        # Watched before it is read: a Service created or deleted after this
        # read always arrives as an event.
        await self.services.ensure(namespace)
        return await self.kube.read_service(namespace, name)

    async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
        await self.slices.ensure(namespace)
        return await self.kube.list_endpoint_slices(namespace, service)

    async def get(self, ref: ObjectRef) -> dict[str, Any] | None:
        return await self.kube.get(ref)
