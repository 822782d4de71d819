"""ConsulService endpoints mode: a Service's endpoints as instances in Consul's catalog.

One of the kind's two modes (:class:`~tether.consulservice.reconciling.Mode`):
the dispatcher hands a resource here when its spec has ``endpoints``.
``apply`` reads the Service and its EndpointSlices, reads the synthetic
node's entries of that service, asks the pure planner
(:mod:`tether.consulservice.endpoints`) for guarded transactions and writes only
those; ``release`` removes (or orphans) the resource's instances and the
node once nothing is left on it; ``collect`` removes the instances of an
owner the catalog watcher found and the controller's cache does not hold,
once Kubernetes confirms no endpoints-mode resource wants them. What the
watchers need is recorded in the shared
:class:`~tether.consulservice.index.CatalogIndex`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

from tether import conditions, reconciling
from tether.api import InvalidSpec, ObjectRef
from tether.api import consulservices as api
from tether.clients.consul.client import Catalog, ConsulContended, ConsulError
from tether.clients.kube.client import KubeError
from tether.conditions import Condition
from tether.consulservice import endpoints, gates, nodecheck
from tether.consulservice.committing import Batch, GroupCommit
from tether.consulservice.gating import Decisions, Gating
from tether.consulservice.index import CatalogIndex
from tether.consulservice.planner import Owner
from tether.reconciling import Note, Outcome, Resource

log = logging.getLogger(__name__)

# A guarded transaction that lost a race is re-planned from a fresh read at
# once a few times (another resource creating the node at the same moment),
# before the skeleton's backoff takes over: the skeleton's bound, as for
# every kind.
_ATTEMPTS = reconciling.STALE_ATTEMPTS


class Cluster(Protocol):
    """The Kubernetes reads endpoints mode needs."""

    async def read_service(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]: ...

    async def get(self, ref: ObjectRef) -> dict[str, Any] | None: ...


class NodeGate:
    """Instance writes share the node; creating or removing the node itself is exclusive.

    Removing the node removes everything on it, so it must never overlap
    another resource's read-plan-write on the same node in this process.
    """

    def __init__(self) -> None:
        self._readers = 0
        self._idle = asyncio.Condition()
        self._writer = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._writer:  # wait out a node removal in progress
            self._readers += 1
        try:
            yield
        finally:
            async with self._idle:
                self._readers -= 1
                self._idle.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._writer:
            async with self._idle:
                await self._idle.wait_for(lambda: self._readers == 0)
            yield


def _healthy(counts: endpoints.Counts, note: str = "") -> Condition:
    status: conditions.Status = "True" if counts.passing else "False"
    message = f"{counts.passing} of {counts.total} instances passing in Consul"
    if counts.warning or counts.critical:
        message += f" ({counts.critical} critical, {counts.warning} warning)"
    return Condition(conditions.HEALTHY, status, counts.health.capitalize(), message + note)


# As in fixed-instance mode: when a reconcile cannot tell the instances' health,
# status.health is unknown and Healthy says Unknown with it, rather than a
# Healthy=True left from before the outage contradicting it.
_UNKNOWN_HEALTH = (
    Condition(conditions.HEALTHY, "Unknown", "Unknown", "Consul's view of the instances is not known"),
)


class CatalogServices:
    """Endpoints mode of ConsulService, on the synthetic node ``node``."""

    name = "endpoints"
    holding = "the instances in Consul's catalog"

    def __init__(
        self, catalog: Catalog, cluster_api: Cluster, index: CatalogIndex, *, cluster: str, node: str,
        max_txn_ops: int = endpoints.MAX_TXN_OPS, gating: Gating | None = None,
    ) -> None:
        self.catalog = catalog
        self.kube = cluster_api
        self.index = index
        self.cluster = cluster
        self.node = node
        self.max_txn_ops = max_txn_ops
        self.gate = NodeGate()
        # Writes of concurrent reconciles share transactions (a rollout touches many at once).
        self.commits = GroupCommit(catalog, max_ops=max_txn_ops)
        # The readiness gate tether.dev/consul-passing (None: off, Pods are never read).
        self.gating = gating

    def owner(self, ref: ObjectRef) -> Owner:
        return Owner(self.cluster, ref.namespace, ref.name)

    async def _endpoints(self, res: Resource, spec: api.ConsulServiceSpec) -> list[endpoints.Endpoint] | None:
        """The Service's endpoints with the selected port; None when the Service does not exist.

        A missing Service means no instances, whatever EndpointSlices still
        carry its name (a custom controller's, or ones not yet garbage
        collected): its slices are not even read.
        """
        assert spec.endpoints is not None
        ns, svc_name = res.ref.namespace, spec.endpoints.service
        service = await self.kube.read_service(ns, svc_name)
        try:
            port_name = endpoints.select_port(service, spec.endpoints.port, where=f"{ns}/{svc_name}")
        except endpoints.ServiceMissing:
            return None
        slices = await self.kube.list_endpoint_slices(ns, svc_name)
        return endpoints.endpoints(slices, port_name, await self._gated(ns))

    async def _observe(
        self, name: str, owner: Owner
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]]]:
        # Filtered by Consul: a resource reads its own slice of the node, not
        # all of it (the node of 1000 endpoints is ~1 MB of JSON per read).
        _, node, services = await self.catalog.node_services(
            self.node, where=endpoints.services_filter(name, owner)
        )
        _, checks = await self.catalog.node_checks(
            self.node, where=endpoints.checks_filter(name, services, owner)
        )
        return node, services, checks

    def holds(self, res: Resource) -> bool:
        """Whether the catalog may hold instances of ``res`` (cheap: no Consul call).

        True once endpoints mode wrote a status for it, while this process
        follows it, or when the catalog watcher last saw instances it owns on
        the node (written before a crash, or by another replica).
        """
        return (
            "instances" in res.status
            or self.index.follows(res.ref)
            or self.index.holds(self.owner(res.ref))
        )

    async def apply(self, res: Resource, spec: api.ConsulServiceSpec) -> Outcome:
        if spec.endpoints is None:
            raise ValueError("endpoints mode needs spec.endpoints")
        owner = self.owner(res.ref)
        self.index.follow(res.ref, spec.endpoints.service)
        fields: dict[str, Any] = {"serviceID": spec.id}
        unknown = {**fields, "health": "unknown"}
        try:
            eps = await self._endpoints(res, spec)
        except InvalidSpec as exc:
            return Outcome.from_error(
                exc, doing="follow the Service", fields=unknown, conditions=_UNKNOWN_HEALTH
            )
        except KubeError as exc:
            return Outcome.from_error(
                exc, doing=f"read Service {spec.endpoints.service!r}", fields=unknown,
                conditions=_UNKNOWN_HEALTH,
            )
        want = endpoints.desired(spec, owner, eps or ())
        before = self.index.wanted(res.ref)
        plan = endpoints.CatalogPlan()
        decisions: Decisions | None = None
        try:
            for attempt in range(_ATTEMPTS):
                async with self.gate.shared():
                    node, services, checks = await self._observe(spec.name, owner)
                    conflict = endpoints.node_conflict(node, name=self.node, cluster=self.cluster)
                    if conflict:
                        self.index.unwant(res.ref)
                        return Outcome.failed(
                            conditions.CONFLICT, conflict, fields=unknown, conditions=_UNKNOWN_HEALTH
                        )
                    plan = endpoints.plan(
                        want, services, checks, owner=owner, node=self.node,
                        node_present=node is not None, cluster=self.cluster, max_ops=self.max_txn_ops,
                    )
                    # Recorded before writing: the watcher sees our transaction
                    # within milliseconds and must compare it with the new wish,
                    # not flag our own write as drift. A failed write shows as a
                    # difference, which is true, and is retried either way.
                    self.index.track(res.ref, _without(want, plan.conflicts))
                    # The gate reads the catalog as observed, before this write.
                    decisions = await self._decide_gates(
                        res, spec, eps or [], _without(want, plan.conflicts), checks
                    )
                    if await self._committed(plan.batches, attempt):
                        break
                    log.debug("%s: catalog changed under a guarded write; re-planning", res.ref)
        except ConsulError as exc:
            return Outcome.from_error(
                exc, doing=f"register the instances of {spec.name!r}", fields=unknown,
                conditions=_UNKNOWN_HEALTH,
            )
        gate_failures = await self.gating.apply(decisions) if self.gating and decisions else []
        written = _without(want, plan.conflicts)
        tally = endpoints.counts(inst.status for inst in written.values())
        fields.update({"health": tally.health, "instances": tally.as_status()})
        missing = (
            f"Service {res.ref.namespace}/{spec.endpoints.service} not found: no instances are "
            "registered until it exists" if eps is None else ""
        )
        healthy = _healthy(tally, f"; {missing}" if missing else "")
        notes: list[Note] = []
        if plan.ops and before is not None and before == want and res.reconciled():
            # Nothing in Kubernetes changed, yet Consul needed writes: drift.
            notes.append(reconciling.drift_repaired(
                api.KIND,
                f"Consul's catalog differed from the endpoints of {spec.endpoints.service!r} "
                f"({_summary(plan.changes)}); restored",
            ))
        if missing:
            # As a missing non-optional ConfigMap of the config kinds: InvalidSpec,
            # not retried, as the Service watch wakes the resource when it appears.
            failed = Outcome.failed(conditions.INVALID_SPEC, missing, fields=fields, conditions=(healthy,))
            return dataclasses.replace(failed, notes=tuple(notes))
        if plan.conflicts:
            return _with_gate_failures(gate_failures, Outcome.failed(
                conditions.CONFLICT,
                f"Consul instance IDs {list(plan.conflicts)[:5]} on node {self.node!r} are held by "
                "another owner; Tether will not change or remove them. The other instances are "
                "registered",
                fields=fields, conditions=(healthy,),
            ))
        return _with_gate_failures(gate_failures, Outcome(
            "True", conditions.RECONCILED,
            f"{tally.total} endpoints of Service {spec.endpoints.service!r} registered as "
            f"{spec.name!r} on Consul node {self.node!r}",
            fields=fields, conditions=(healthy,), notes=tuple(notes),
        ))

    async def release(self, res: Resource, spec: api.ConsulServiceSpec | None, *, orphan: bool) -> Outcome:
        """Remove the resource's instances (or drop their ownership), then an empty node.

        Raises ConsulError when Consul could not do it.
        """
        removed = await self._remove(self.owner(res.ref), orphan=orphan, node_too=True)
        self.index.untrack(res.ref)
        self._forget_gates(res.ref)
        if orphan:
            return Outcome.release_done(
                "deletionPolicy Orphan: instances left in Consul", backend="Consul's catalog",
                note=Note("Normal", "Orphaned", f"Left {removed} instances in Consul's catalog "
                          "(deletionPolicy Orphan)") if removed else None,
            )
        return Outcome.release_done(
            "deregistered", backend="Consul's catalog",
            note=Note("Normal", "Deregistered", f"Removed {removed} instances from Consul's catalog")
            if removed else None,
        )

    async def _remove(self, owner: Owner, *, orphan: bool, node_too: bool) -> int:
        """Remove (``orphan``: release) what ``owner`` has on the node; how many instances.

        ``node_too``: then the node as well, once nothing is left on it.
        """
        _, _, services = await self.catalog.node_services(self.node, where=endpoints.owner_filter(owner))
        if not services:
            # Nothing of it (a resource that left endpoints mode long ago reads
            # this on each of its applies): no exclusive hold on the node.
            return 0
        async with self.gate.exclusive():
            for attempt in range(_ATTEMPTS):
                if attempt:
                    _, _, services = await self.catalog.node_services(
                        self.node, where=endpoints.owner_filter(owner)
                    )
                # Its own instances only (their checks go with them).
                plan = endpoints.release(
                    services, [], owner=owner, node=self.node, orphan=orphan, max_ops=self.max_txn_ops,
                )
                if await self._committed(plan.batches, attempt):
                    break
            if node_too:
                await self._remove_empty_node()
        return plan.removed

    async def _remove_empty_node(self) -> None:
        """Remove the synthetic node once nothing at all is on it (called under the exclusive gate)."""
        _, node, services = await self.catalog.node_services(self.node)
        if node is None or services:
            return
        if endpoints.node_conflict(node, name=self.node, cluster=self.cluster):
            return
        _, checks = await self.catalog.node_checks(self.node)
        if nodecheck.others(checks, self.cluster):
            # A node-level check someone added: not ours to remove. Our own
            # dead-man check (tether:alive) goes with the node.
            return
        op = endpoints.node_op("delete-cas", self.node, self.cluster, index=int(node.get("ModifyIndex") or 0))
        with contextlib.suppress(ConsulContended):
            await self.catalog.catalog_txn([op])

    async def collect(self, ref: ObjectRef) -> None:
        """Remove the instances of ``ref``, which the controller's cache does not hold, if no
        endpoints-mode resource wants them.

        The catalog watcher found them (an owner with instances on the node
        and no tracked resource) and enqueued the owner; Kubernetes decides:
        only when the owning ConsulService is gone, or no longer in endpoints
        mode, are they removed. A resource not reconciled yet after a restart
        is neither.
        """
        if self.index.is_tracked(ref):
            return
        body = await self.kube.get(ref)
        exists = body is not None
        if exists and (body or {}).get("spec", {}).get("endpoints") is not None:
            return
        owner = self.owner(ref)
        log.info("removing catalog instances of %s, which no ConsulService in endpoints mode wants",
                 owner.describe())
        await self._remove(owner, orphan=False, node_too=not exists)

    def forget(self, ref: ObjectRef) -> None:
        self.index.untrack(ref)
        self._forget_gates(ref)

    async def withdraw(self, res: Resource) -> None:
        """Remove every catalog instance the resource owns (TetherPolicy refused it).

        As :meth:`release` without orphaning and without the node's removal;
        raises the Consul error when it cannot. Reads only when nothing is left.
        """
        owner = self.owner(res.ref)
        self.index.untrack(res.ref)
        self._forget_gates(res.ref)
        async with self.gate.shared():
            for attempt in range(_ATTEMPTS):
                _, _, services = await self.catalog.node_services(
                    self.node, where=endpoints.owner_filter(owner)
                )
                plan = endpoints.release(
                    services, [], owner=owner, node=self.node, orphan=False, max_ops=self.max_txn_ops
                )
                if await self._committed(plan.batches, attempt):
                    return

    async def _committed(self, batches: Iterable[Batch], attempt: int) -> bool:
        """Submit one plan's guarded ``batches``: True once all are committed, False when a
        guard failed (the catalog changed since it was read: read and plan again). On the
        last of the ``_ATTEMPTS`` (``attempt`` counts from 0) the ConsulContended is raised."""
        try:
            for ops in batches:
                await self.commits.submit(ops)
        except ConsulContended:
            if attempt == _ATTEMPTS - 1:
                raise
            return False
        return True

    # -- the readiness gate tether.dev/consul-passing (decisions: gates.py; Pod I/O: gating.py)

    async def _gated(self, namespace: str) -> dict[str, gates.Pod]:
        """The namespace's Pods that list the readiness gate (none when the gate is off)."""
        return await self.gating.gated(namespace) if self.gating else {}

    async def _decide_gates(
        self, res: Resource, spec: api.ConsulServiceSpec, eps: list[endpoints.Endpoint],
        want: dict[str, endpoints.Instance], checks: list[dict[str, Any]],
    ) -> Decisions | None:
        if self.gating is None:
            return None
        return await self.gating.decide(res.ref, spec.id, eps, want, checks)

    def _forget_gates(self, ref: ObjectRef) -> None:
        if self.gating is not None:
            self.gating.forget(ref)


def _with_gate_failures(failures: list[str], outcome: Outcome) -> Outcome:
    """The outcome, retried with a Warning when a gated Pod's condition could not be set."""
    if not failures:
        return outcome
    note = Note(
        "Warning", "ReadinessGateNotSet",
        f"could not set the readiness gate {gates.GATE} of {len(failures)} Pods: {'; '.join(failures[:3])}",
    )
    return dataclasses.replace(outcome, notes=(*outcome.notes, note), retry=True)


def _without(want: dict[str, endpoints.Instance], ids: tuple[str, ...]) -> dict[str, endpoints.Instance]:
    return {iid: inst for iid, inst in want.items() if iid not in ids}


def _summary(changes: tuple[str, ...]) -> str:
    shown = ", ".join(changes[:5])
    return shown + (f" and {len(changes) - 5} more" if len(changes) > 5 else "")

