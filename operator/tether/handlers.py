"""Event wiring only: watch events go into the controllers' caches and queues.

Tether uses Kopf for what it is best at with its own kinds (watch streams with
reconnection, namespace selection, probes, lifecycle) and keeps reconciling in
its own level-triggered controllers. Event handlers have no per-handler
progress annotations, so Kopf itself never writes to the resources.

The objects around the resources (ConfigMaps, Secrets, EndpointSlices) are
watched per namespace and metadata only (:mod:`tether.clients.kube.watching`); here
their events are mapped to the resources that depend on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import kopf

from tether.api import GROUP, VERSION, ObjectRef
from tether.clients.kube.http import KubeHttp
from tether.clients.kube.watching import NamespaceWatches
from tether.reconciling import Controller


class Dependents(Protocol):
    def dependents(self, kind: Any, namespace: str, name: str) -> list[ObjectRef]: ...

    def dependents_in(self, kind: Any, namespace: str) -> list[ObjectRef]: ...


class Followers(Protocol):
    def followers(self, namespace: str, service: str) -> list[ObjectRef]: ...

    def followers_in(self, namespace: str) -> list[ObjectRef]: ...


SERVICE_NAME_LABEL = "kubernetes.io/service-name"
Enqueue = Callable[[ObjectRef], None]


def register(registry: kopf.OperatorRegistry, *, controllers: Sequence[Controller]) -> None:
    """Attach Tether's handlers to ``registry``: one per kind."""
    for controller in controllers:
        kopf.on.event(GROUP, VERSION, controller.reconciler.plural, registry=registry)(_feeder(controller))


def source_watches(
    http: KubeHttp, sources: Sequence[tuple[Dependents, Enqueue]],
) -> tuple[NamespaceWatches, NamespaceWatches]:
    """The ConfigMap and Secret watches, waking the resources whose ``spec.from`` names the object."""

    def for_kind(kind: str, plural: str) -> NamespaceWatches:
        def changed(namespace: str, meta: Mapping[str, Any]) -> None:
            for index, enqueue in sources:
                for ref in index.dependents(kind, namespace, meta.get("name", "")):
                    enqueue(ref)

        def resync(namespace: str) -> None:
            for index, enqueue in sources:
                for ref in index.dependents_in(kind, namespace):
                    enqueue(ref)

        return NamespaceWatches(
            http, what=plural, path=f"api/v1/namespaces/{{namespace}}/{plural}", changed=changed,
            wanted=lambda ns: any(index.dependents_in(kind, ns) for index, _ in sources), resync=resync,
        )

    return for_kind("configMap", "configmaps"), for_kind("secret", "secrets")


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


def _feeder(controller: Controller) -> Any:
    def resource_event(event: kopf.RawEvent, **_: Any) -> None:
        controller.observe(event.get("type"), event["object"])

    resource_event.__name__ = f"{controller.reconciler.plural}_event"
    return resource_event
