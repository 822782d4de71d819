"""Kopf wiring only: watch events go into the controllers' caches and queues.

Tether uses Kopf for what it is best at (watch streams with reconnection,
namespace selection, probes, lifecycle) and keeps reconciling in its own
level-triggered controllers. Event handlers have no per-handler progress
annotations, so Kopf itself never writes to the resources.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import kopf

from tether.api import GROUP, VERSION, ObjectRef
from tether.reconciling import Controller


class Dependents(Protocol):
    def dependents(self, kind: Any, namespace: str, name: str) -> list[ObjectRef]: ...


class Followers(Protocol):
    def followers(self, namespace: str, service: str) -> list[ObjectRef]: ...


SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def register(
    registry: kopf.OperatorRegistry, *, controllers: Sequence[Controller],
    sources: Sequence[tuple[Dependents, Controller]],
    endpoints: tuple[Followers, Controller] | None = None,
) -> None:
    """Attach Tether's handlers to ``registry``: one per kind, one per source kind."""
    for controller in controllers:
        kopf.on.event(GROUP, VERSION, controller.reconciler.plural, registry=registry)(_feeder(controller))

    def source_changed(kind: str, event: kopf.RawEvent) -> None:
        meta = event["object"].get("metadata") or {}
        for index, controller in sources:
            for ref in index.dependents(kind, meta.get("namespace", ""), meta.get("name", "")):
                controller.enqueue(ref)

    @kopf.on.event("", "v1", "configmaps", registry=registry)
    def config_map_event(event: kopf.RawEvent, **_: Any) -> None:
        source_changed("configMap", event)

    @kopf.on.event("", "v1", "secrets", registry=registry)
    def secret_event(event: kopf.RawEvent, **_: Any) -> None:
        source_changed("secret", event)

    if endpoints is not None:
        followers, controller = endpoints

        # Only slices of a Service some ConsulService follows enqueue anything.
        @kopf.on.event("discovery.k8s.io", "v1", "endpointslices", registry=registry)
        def endpoint_slice_event(event: kopf.RawEvent, **_: Any) -> None:
            meta = event["object"].get("metadata") or {}
            service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
            if service:
                for ref in followers.followers(meta.get("namespace", ""), service):
                    controller.enqueue(ref)


def _feeder(controller: Controller) -> Any:
    def resource_event(event: kopf.RawEvent, **_: Any) -> None:
        controller.observe(event.get("type"), event["object"])

    resource_event.__name__ = f"{controller.reconciler.plural}_event"
    return resource_event
