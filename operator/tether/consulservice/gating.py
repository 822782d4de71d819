"""Endpoints mode's side of the readiness gate ``tether.dev/consul-passing``: Pod reads and patches.

:class:`Gating` gives the planner the namespace's gated Pods (from a Pod
cache: list and watch, slim views only) and, around a reconcile's catalog
write, decides with :mod:`tether.consulservice.gates` which gate conditions
to set, and patches those Pods' ``status``. Decisions read Consul's catalog
as the reconcile observed it (never what the reconcile is about to write),
and the statuses they read are recorded in the shared
:class:`~tether.consulservice.index.GateIndex` before the write, so the
catalog watcher enqueues the resource once Consul shows something else
(typically: the instance just registered now passing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from tether.api import ObjectRef
from tether.clients.kube.caching import NamespaceCaches
from tether.clients.kube.client import KubeClient, KubeError, KubeNotFound
from tether.clients.kube.http import KubeHttp
from tether.consulservice import endpoints, gates
from tether.consulservice.index import GateIndex

log = logging.getLogger(__name__)


class Followers(Protocol):
    def followers_in(self, namespace: str) -> list[ObjectRef]: ...


class Pods(Protocol):
    """The Pod reads and writes the gate needs."""

    async def gated(self, namespace: str) -> dict[str, gates.Pod]: ...

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None: ...


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Decisions:
    """One reconcile's gate decisions: made before its catalog write, applied after it."""

    def __init__(self, ref: ObjectRef, patches: list[gates.Patch]) -> None:
        self.ref = ref
        self.patches = patches


class Gating:
    """Reads gated Pods for the planner; sets their gate from Consul's view."""

    def __init__(self, pods: Pods, index: GateIndex, *, now: Callable[[], str] = _now) -> None:
        self.pods = pods
        self.index = index
        self.now = now

    async def gated(self, namespace: str) -> dict[str, gates.Pod]:
        return await self.pods.gated(namespace)

    async def decide(
        self, ref: ObjectRef, prefix: str, eps: Sequence[endpoints.Endpoint],
        want: Mapping[str, endpoints.Instance], checks: Sequence[Mapping[str, Any]],
    ) -> Decisions:
        """The patches for ``ref``'s gated Pods, given the checks the reconcile read (before its write).

        ``want``: the instances it is about to write (its conflicts left out:
        an ID another owner holds is not this Pod's instance). Records what
        was read in the index, for the catalog watcher.
        """
        by_pod: dict[str, dict[str, gates.Status]] = {}
        for ep in eps:
            if ep.pod:
                iid = endpoints.instance_id(prefix, ep.address, ep.port)
                inst = want.get(iid)
                by_pod.setdefault(ep.pod, {})
                if inst is not None:
                    by_pod[ep.pod][iid] = inst.status
        statuses = gates.instance_statuses(checks)
        seen = {iid: statuses.get(iid) for ids in by_pod.values() for iid in ids}
        self.index.record(ref, set(by_pod), seen)
        if not by_pod:
            return Decisions(ref, [])
        current = await self.pods.gated(ref.namespace)
        patches = []
        now = self.now()
        for name, ids in sorted(by_pod.items()):
            pod = current.get(name)
            if pod is None:
                continue  # gone, or no longer gated, since the endpoints were read
            patch = gates.decide(pod, gates.wanted(ids, seen), now=now)
            if patch is not None:
                patches.append(patch)
        return Decisions(ref, patches)

    async def apply(self, decisions: Decisions) -> list[str]:
        """Write the patches; the failures, as messages (a Pod gone meanwhile is not one)."""
        failures = []
        for patch in decisions.patches:
            try:
                await self.pods.patch_status(decisions.ref.namespace, patch.name, patch.body())
            except KubeNotFound:
                continue
            except KubeError as exc:
                failures.append(f"Pod {patch.name}: {exc}")
                continue
            log.info(
                "%s: readiness gate %s of Pod %s set to %s (%s)", decisions.ref, gates.GATE, patch.name,
                patch.condition.status, patch.condition.message,
            )
        return failures

    def forget(self, ref: ObjectRef) -> None:
        self.index.forget(ref)


def pod_cache(
    http: KubeHttp, followers: Followers, index: GateIndex, enqueue: Callable[[ObjectRef], None],
) -> NamespaceCaches[gates.Pod]:
    """The Pods of namespaces with followed Services, keeping only gated ones (slim).

    A gated Pod's change enqueues the resources its instances back (from the
    index). A gated Pod no reconcile has tied to a resource yet (the cache
    saw it after the reconcile that read its endpoint) enqueues every
    follower of its namespace: otherwise its endpoint, read as ungated, would
    wait for an unrelated change. Ungated Pods are not kept, so their changes
    enqueue nothing.
    """

    def changed(namespace: str, name: str) -> None:
        for ref in index.backed_by(namespace, name) or followers.followers_in(namespace):
            enqueue(ref)

    return NamespaceCaches(
        http, what="pods", path="api/v1/namespaces/{namespace}/pods", slim=gates.slim, changed=changed,
        wanted=lambda ns: bool(followers.followers_in(ns)),
    )


class ClusterPods:
    """:class:`Pods` over the Pod cache and the API server."""

    def __init__(self, kube: KubeClient, cache: NamespaceCaches[gates.Pod]) -> None:
        self.kube = kube
        self.cache = cache

    async def gated(self, namespace: str) -> dict[str, gates.Pod]:
        return await self.cache.items(namespace)

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await self.kube.patch_pod_status(namespace, name, patch)
