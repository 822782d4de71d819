"""Kubernetes I/O: status and finalizer patches, events, ConfigMap/Secret/Service/EndpointSlice reads.

The official ``kubernetes`` client is synchronous, so every call runs in a
worker thread; Kopf's event loop never blocks on it. Every write is counted
(metrics, benchmarks and the idle tests rely on the count).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import kubernetes.client as k8s
import kubernetes.config as k8s_config
from kubernetes.client.exceptions import ApiException

from tether import metrics
from tether.api import GROUP, VERSION, ObjectRef

log = logging.getLogger(__name__)
T = TypeVar("T")

# Kubernetes' own recorder aggregates repeated events; Tether simply does not
# repeat an identical event for the same object within this window.
_EVENT_DEDUP_SECONDS = 600.0
_EVENT_DEDUP_SIZE = 10_000


class KubeError(Exception):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0 if none)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Involved:
    """The object an event is about."""

    kind: str
    ref: ObjectRef
    uid: str


def load_config() -> None:
    """KUBECONFIG (or ~/.kube/config) when present, else the in-cluster account."""
    try:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    except (k8s_config.ConfigException, FileNotFoundError, TypeError):
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]


def preload() -> None:
    """Import the client's API classes now (they load lazily, and slowly)."""
    for api in (k8s.CoreV1Api, k8s.CustomObjectsApi, k8s.CoordinationV1Api):
        api.__name__  # noqa: B018 - touching the attribute triggers the lazy import


class KubeClient:
    """Thin async facade over the official client."""

    def __init__(self, *, threads: int = 16, component: str = "tether", instance: str = "") -> None:
        configuration = k8s.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = threads
        self._api = k8s.ApiClient(configuration)
        self._custom = k8s.CustomObjectsApi(self._api)
        self._core = k8s.CoreV1Api(self._api)
        self._discovery = k8s.DiscoveryV1Api(self._api)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")
        self._component = component
        # The replica that posted an event (the Pod's name), as Kubernetes'
        # own recorders fill reportingInstance.
        self._instance = instance or component
        self._recent_events: OrderedDict[tuple[str, str, str, str], float] = OrderedDict()

    async def _call(self, fn: Callable[[], T], *, what: str) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn)
        except ApiException as exc:
            raise KubeError(f"{what}: {exc.status} {exc.reason}: {_api_message(exc)}", exc.status) from None
        except Exception as exc:  # urllib3 connection errors and friends
            raise KubeError(f"{what}: {exc}") from exc

    async def get(self, ref: ObjectRef) -> dict[str, Any] | None:
        """The custom resource as the API server holds it now, or None if absent."""
        body: Any = await self._read_or_none(
            lambda: self._custom.get_namespaced_custom_object(
                GROUP, VERSION, ref.namespace, ref.plural, ref.name
            ),
            what=f"read {ref}",
        )
        return None if body is None else dict(body)

    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> dict[str, Any]:
        metrics.WRITES.labels(system="kubernetes").inc()
        body: Any = await self._call(
            lambda: self._custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, ref.namespace, ref.plural, ref.name, {"status": status}
            ),
            what=f"patch status of {ref}",
        )
        return dict(body)

    async def set_finalizers(
        self, ref: ObjectRef, finalizers: list[str], *, resource_version: str
    ) -> dict[str, Any]:
        # resourceVersion in a merge patch makes it conditional: another
        # controller's finalizer added meanwhile is never dropped (409 instead).
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        metrics.WRITES.labels(system="kubernetes").inc()
        body: Any = await self._call(
            lambda: self._custom.patch_namespaced_custom_object(
                GROUP, VERSION, ref.namespace, ref.plural, ref.name, patch
            ),
            what=f"update finalizers of {ref}",
        )
        return dict(body)

    async def event(self, involved: Involved, *, type_: str, reason: str, message: str) -> None:
        """Record an event on the object; identical repeats within 10 minutes are dropped."""
        key = (str(involved.ref), involved.uid, reason, message)
        now = time.monotonic()
        seen = self._recent_events.get(key)
        if seen is not None and now - seen < _EVENT_DEDUP_SECONDS:
            return
        self._recent_events[key] = now
        self._recent_events.move_to_end(key)
        while len(self._recent_events) > _EVENT_DEDUP_SIZE:
            self._recent_events.popitem(last=False)
        stamp = datetime.now(UTC)
        body = k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(
                name=f"{involved.ref.name}.{uuid.uuid4().hex[:16]}",
                namespace=involved.ref.namespace,
            ),
            involved_object=k8s.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind=involved.kind,
                name=involved.ref.name,
                namespace=involved.ref.namespace,
                uid=involved.uid,
            ),
            type=type_,
            reason=reason,
            message=message[:1024],
            first_timestamp=stamp,
            last_timestamp=stamp,
            count=1,
            source=k8s.V1EventSource(component=self._component),
            reporting_component=self._component,
            reporting_instance=self._instance,
        )
        metrics.WRITES.labels(system="kubernetes").inc()
        try:
            await self._call(
                lambda: self._core.create_namespaced_event(involved.ref.namespace, body),
                what=f"event on {involved.ref}",
            )
        except KubeError as exc:
            # An event is best effort: losing one must never fail a reconcile.
            log.warning("could not record event %s on %s: %s", reason, involved.ref, exc)

    async def _read_or_none(self, fn: Callable[[], T], *, what: str) -> T | None:
        try:
            return await self._call(fn, what=what)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def read_config_map(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """All keys of a ConfigMap (``data`` and ``binaryData``), or None if absent."""
        cm = await self._read_or_none(
            lambda: self._core.read_namespaced_config_map(name, namespace),
            what=f"read ConfigMap {namespace}/{name}",
        )
        if cm is None:
            return None
        out = {k: base64.b64decode(v) for k, v in (cm.binary_data or {}).items()}
        out.update({k: v.encode() for k, v in (cm.data or {}).items()})
        return out

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """All keys of a Secret, decoded, or None if absent."""
        secret = await self._read_or_none(
            lambda: self._core.read_namespaced_secret(name, namespace),
            what=f"read Secret {namespace}/{name}",
        )
        if secret is None:
            return None
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    async def read_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Service as the API serves it (camelCase JSON), or None if absent."""
        svc = await self._read_or_none(
            lambda: self._core.read_namespaced_service(name, namespace),
            what=f"read Service {namespace}/{name}",
        )
        return None if svc is None else dict(self._api.sanitize_for_serialization(svc))  # type: ignore[no-untyped-call]

    async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
        """Every EndpointSlice of Service ``service`` (label ``kubernetes.io/service-name``)."""
        # Label values are DNS labels (the API model validated the name), so no quoting is needed.
        listing = await self._call(
            lambda: self._discovery.list_namespaced_endpoint_slice(
                namespace, label_selector=f"kubernetes.io/service-name={service}"
            ),
            what=f"list EndpointSlices of Service {namespace}/{service}",
        )
        return [
            dict(self._api.sanitize_for_serialization(item))  # type: ignore[no-untyped-call]
            for item in listing.items or []
        ]

    async def get_custom(self, ref: ObjectRef) -> dict[str, Any] | None:
        """One of Tether's resources, or None if it does not exist."""
        body: Any = await self._read_or_none(
            lambda: self._custom.get_namespaced_custom_object(
                GROUP, VERSION, ref.namespace, ref.plural, ref.name
            ),
            what=f"read {ref}",
        )
        return None if body is None else dict(body)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._api.close()  # type: ignore[no-untyped-call]


def _api_message(exc: ApiException) -> str:
    import json

    try:
        return str(json.loads(exc.body or "{}").get("message", exc.body))
    except ValueError:
        return str(exc.body)
