"""Kopf event registration only: watch events go into the controllers' caches and queues.

Tether uses Kopf for what it is best at with its own kinds (watch streams with
reconnection, namespace selection, probes, lifecycle) and keeps reconciling in
its own level-triggered controllers. Event handlers have no per-handler
progress annotations, so Kopf itself never writes to the resources.

The handlers are coroutines: Kopf runs a plain function in a thread pool of
its own that nothing shuts down, and its idle threads outlived every stop.
The objects around the resources (ConfigMaps, Secrets, EndpointSlices) are
each family's business (its ``wiring.setup``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import kopf

from tether.api import GROUP, VERSION
from tether.reconciling import Controller


def register(registry: kopf.OperatorRegistry, *, controllers: Sequence[Controller]) -> None:
    """Attach Tether's handlers to ``registry``: one per kind."""
    for controller in controllers:
        kopf.on.event(GROUP, VERSION, controller.reconciler.plural, registry=registry)(_feeder(controller))


def _feeder(controller: Controller) -> Any:
    async def resource_event(event: kopf.RawEvent, **_: Any) -> None:
        controller.observe(event.get("type"), event["object"])

    resource_event.__name__ = f"{controller.reconciler.plural}_event"
    return resource_event
