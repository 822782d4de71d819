"""Kopf wiring only: watch events go into the controllers' caches and queues.

Tether uses Kopf for what it is best at (watch streams with reconnection,
namespace selection, probes, lifecycle) and keeps reconciling in its own
level-triggered controllers. Event handlers have no per-handler progress
annotations, so Kopf itself never writes to the resources.
"""

from __future__ import annotations

from typing import Any, Protocol

import kopf

from tether.api import GROUP, VERSION, ObjectRef
from tether.reconciling import Controller


class Dependents(Protocol):
    def dependents(self, kind: Any, namespace: str, name: str) -> list[ObjectRef]: ...


def register(
    registry: kopf.OperatorRegistry, *, consul: Controller, etcd: Controller, etcd_sources: Dependents
) -> None:
    """Attach Tether's handlers to ``registry``."""

    @kopf.on.event(GROUP, VERSION, "consulservices", registry=registry)
    def consul_service_event(event: kopf.RawEvent, **_: Any) -> None:
        consul.observe(event.get("type"), event["object"])

    @kopf.on.event(GROUP, VERSION, "etcdconfigs", registry=registry)
    def etcd_config_event(event: kopf.RawEvent, **_: Any) -> None:
        etcd.observe(event.get("type"), event["object"])

    def source_changed(kind: str, event: kopf.RawEvent) -> None:
        meta = event["object"].get("metadata") or {}
        for ref in etcd_sources.dependents(kind, meta.get("namespace", ""), meta.get("name", "")):
            etcd.enqueue(ref)

    @kopf.on.event("", "v1", "configmaps", registry=registry)
    def config_map_event(event: kopf.RawEvent, **_: Any) -> None:
        source_changed("configMap", event)

    @kopf.on.event("", "v1", "secrets", registry=registry)
    def secret_event(event: kopf.RawEvent, **_: Any) -> None:
        source_changed("secret", event)
