"""Kubernetes I/O: status and finalizer patches, events, ConfigMap/Secret/Service/EndpointSlice reads,
the readiness gate's Pod status patches.

Every call goes through :class:`tether.clients.kube.http.KubeHttp` (asyncio, a deadline
per request), so every failure is one of its :class:`KubeError` subclasses, which
the skeleton tells apart by type; the official client only loads the configuration. Every write
is counted (metrics, benchmarks and the idle tests rely on the count).
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kubernetes.client as k8s
import kubernetes.config as k8s_config

from tether import metrics
from tether.api import GROUP, VERSION, ObjectRef
from tether.clients.kube.http import (
    KubeConflict,
    KubeError,
    KubeGone,
    KubeHttp,
    KubeNotFound,
    KubeRejected,
    KubeUnavailable,
)

__all__ = [
    "Involved", "KubeClient", "KubeConflict", "KubeError", "KubeGone", "KubeNotFound", "KubeRejected",
    "KubeUnavailable", "load_config",
]

log = logging.getLogger(__name__)

# Kubernetes' own recorder aggregates repeated events; Tether simply does not
# repeat an identical event for the same object within this window.
_EVENT_DEDUP_SECONDS = 600.0
_EVENT_DEDUP_SIZE = 10_000
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


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
    """Import the client's API classes the Lease elector uses now (they load lazily, and slowly)."""
    k8s.CoordinationV1Api.__name__  # noqa: B018 - touching the attribute triggers the lazy import


def _custom_path(ref: ObjectRef, sub: str = "") -> str:
    path = f"apis/{GROUP}/{VERSION}/namespaces/{ref.namespace}/{ref.plural}/{ref.name}"
    return f"{path}/{sub}" if sub else path


def _core_path(namespace: str, plural: str, name: str = "") -> str:
    path = f"api/v1/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


# events.k8s.io/v1 Events: the API server refuses a create without eventTime,
# reportingController (a qualified name), reportingInstance and action (at most 128
# characters each) and a note over 1 KiB; the deprecated core fields (source, counts,
# first/last timestamps) must be left unset.
EVENTS_API = "events.k8s.io/v1"
REPORTING_CONTROLLER = "tether.dev/operator"
_EVENT_NOTE_BYTES = 1024
_EVENT_FIELD_CHARS = 128


def _events_path(namespace: str) -> str:
    return f"apis/{EVENTS_API}/namespaces/{namespace}/events"


def _truncate_utf8(text: str, limit: int) -> str:
    """At most ``limit`` bytes of UTF-8, never cutting a character in half."""
    return text.encode()[:limit].decode(errors="ignore")


def _event_body(
    involved: Involved, *, type_: str, reason: str, note: str, action: str, instance: str,
    name: str, now: datetime,
) -> dict[str, Any]:
    return {
        "apiVersion": EVENTS_API,
        "kind": "Event",
        "metadata": {"name": name, "namespace": involved.ref.namespace},
        # MicroTime: RFC 3339 with microseconds.
        "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": instance[:_EVENT_FIELD_CHARS],
        "action": action[:_EVENT_FIELD_CHARS],
        "reason": reason[:_EVENT_FIELD_CHARS],
        "regarding": {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": involved.kind, "name": involved.ref.name,
            "namespace": involved.ref.namespace, "uid": involved.uid,
        },
        "type": type_,
        "note": _truncate_utf8(note, _EVENT_NOTE_BYTES),
    }


class KubeClient:
    """Tether's calls to the API server, over one asyncio session."""

    def __init__(
        self, http: KubeHttp | None = None, *, component: str = "tether", instance: str = ""
    ) -> None:
        self.http = http or KubeHttp()
        self._component = component
        # The replica that posted an event (the Pod's name), as Kubernetes'
        # own recorders fill reportingInstance.
        self._instance = instance or component
        self._recent_events: OrderedDict[tuple[str, str, str, str], float] = OrderedDict()

    async def get(self, ref: ObjectRef) -> dict[str, Any] | None:
        """The custom resource as the API server holds it now, or None if absent."""
        return await self._read_or_none(_custom_path(ref), what=f"read {ref}")

    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> dict[str, Any]:
        metrics.WRITES.labels(system="kubernetes").inc()
        body = await self.http.request(
            "PATCH", _custom_path(ref, "status"), body={"status": status}, content_type=MERGE_PATCH,
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
        body = await self.http.request(
            "PATCH", _custom_path(ref), body=patch, content_type=MERGE_PATCH,
            what=f"update finalizers of {ref}",
        )
        return dict(body)

    async def event(
        self, involved: Involved, *, type_: str, reason: str, message: str, action: str = "Reconcile"
    ) -> None:
        """Record an event on the object; identical repeats within 10 minutes are dropped.

        Posted through ``events.k8s.io/v1``, the API Kubernetes' own controllers use:
        ``kubectl get events`` (core v1) shows it all the same, with ``regarding`` as
        ``involvedObject`` and ``note`` as ``message``. Repeats are dropped rather than
        folded into an event series, so an event is only ever created, never patched.
        """
        key = (str(involved.ref), involved.uid, reason, message)
        now = time.monotonic()
        seen = self._recent_events.get(key)
        if seen is not None and now - seen < _EVENT_DEDUP_SECONDS:
            return
        self._recent_events[key] = now
        self._recent_events.move_to_end(key)
        while len(self._recent_events) > _EVENT_DEDUP_SIZE:
            self._recent_events.popitem(last=False)
        body = _event_body(
            involved, type_=type_, reason=reason, note=message, action=action,
            instance=self._instance, name=f"{involved.ref.name}.{uuid.uuid4().hex[:16]}",
            now=datetime.now(UTC),
        )
        metrics.WRITES.labels(system="kubernetes").inc()
        try:
            await self.http.request(
                "POST", _events_path(involved.ref.namespace), body=body, what=f"event on {involved.ref}",
            )
        except KubeError as exc:
            # An event is best effort: losing one must never fail a reconcile.
            log.warning("could not record event %s on %s: %s", reason, involved.ref, exc)

    async def _read_or_none(
        self, path: str, *, what: str, params: dict[str, str] | None = None
    ) -> dict[str, Any] | None:
        try:
            body = await self.http.request("GET", path, params=params, what=what)
        except KubeNotFound:
            return None
        return dict(body)

    async def read_config_map(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """All keys of a ConfigMap (``data`` and ``binaryData``), or None if absent."""
        cm = await self._read_or_none(
            _core_path(namespace, "configmaps", name), what=f"read ConfigMap {namespace}/{name}"
        )
        if cm is None:
            return None
        out = {k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()}
        out.update({k: v.encode() for k, v in (cm.get("data") or {}).items()})
        return out

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """All keys of a Secret, decoded, or None if absent."""
        secret = await self._read_or_none(
            _core_path(namespace, "secrets", name), what=f"read Secret {namespace}/{name}"
        )
        if secret is None:
            return None
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    async def read_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Service as the API serves it (camelCase JSON), or None if absent."""
        return await self._read_or_none(
            _core_path(namespace, "services", name), what=f"read Service {namespace}/{name}"
        )

    async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
        """Every EndpointSlice of Service ``service`` (label ``kubernetes.io/service-name``)."""
        listing = await self.http.request(
            "GET", f"apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
            # A label value is a DNS label (the API model validated the name): no quoting needed.
            params={"labelSelector": f"kubernetes.io/service-name={service}"},
            what=f"list EndpointSlices of Service {namespace}/{service}",
        )
        return [dict(item) for item in (listing or {}).get("items") or []]

    async def patch_pod_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """A strategic-merge patch of a Pod's ``status`` subresource (its conditions merge by type)."""
        metrics.WRITES.labels(system="kubernetes").inc()
        await self.http.request(
            "PATCH", _core_path(namespace, "pods", name) + "/status", body=patch,
            content_type=STRATEGIC_MERGE_PATCH, what=f"patch status of Pod {namespace}/{name}",
        )

    async def close(self) -> None:
        await self.http.close()
