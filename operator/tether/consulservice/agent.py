"""The ConsulService kind for the shared reconcile skeleton.

Fixed-instance mode lives here: ``apply`` reads the agent, asks the planner
what to write and writes only that; ``release`` deregisters (or leaves) what
the resource owns, as the planner decides. What the watcher needs to know is
recorded in the shared :class:`~tether.consulservice.index.AgentIndex`; drift
detection itself lives in :mod:`tether.consulservice.agentwatching`.

A spec with ``endpoints`` is handed to endpoints mode
(:mod:`tether.consulservice.catalog`): one kind, one Kopf handler, one
queue, two ways of reaching Consul.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from tether import conditions, metrics
from tether.api import InvalidSpec, ObjectRef
from tether.api import consulservices as api
from tether.api.policies import Claims
from tether.clients.consul.client import Agent, ConsulError, ConsulRejected
from tether.conditions import Condition
from tether.consulservice import planner, topology
from tether.consulservice.catalog import CatalogServices
from tether.consulservice.index import AgentIndex, Tracked
from tether.reconciling import Note, Outcome, Resource


def _healthy(health: str) -> Condition:
    status: conditions.Status = (
        "True" if health == "passing" else "Unknown" if health == "unknown" else "False"
    )
    return Condition(
        conditions.HEALTHY, status, health.capitalize(),
        f"Consul reports the instance's checks as {health}",
    )


# Whenever a reconcile cannot tell the instance's health, ``status.health`` says
# unknown and ``Healthy`` says Unknown with it: a Healthy=True left over from
# before a Conflict or an outage would contradict the status beside it.
_UNKNOWN_HEALTH = (_healthy("unknown"),)
# How often the agent behind CONSUL_HTTP_ADDR is identified while it stays the same one.
NODE_SAMPLE_SECONDS = 1.0
_UNKNOWN: dict[str, Any] = {"health": "unknown"}


class ConsulServices:
    """ConsulService: one registration on the agent, its health on the resource."""

    kind = api.KIND
    plural = api.PLURAL

    def __init__(
        self, agent: Agent, index: AgentIndex, *, cluster: str, agent_url: str = "",
        endpoints: CatalogServices | None = None,
    ) -> None:
        self.agent = agent
        self.index = index
        self.cluster = cluster
        self.agent_url = agent_url
        self.endpoints = endpoints
        self.nodes = topology.NodeTracker(agent_url or "(the configured address)")
        self._node_sampled = -NODE_SAMPLE_SECONDS
        self._node_problem: str | None = None

    async def _one_agent(self) -> None:
        """Raise BackendRejected when the address turns out to reach several agents.

        The node name comes from ``/v1/agent/self`` (the agent's whole
        configuration: the heaviest read of an apply), so it is sampled at most
        once per ``NODE_SAMPLE_SECONDS`` while all is well: a load-balanced
        address still shows within a few seconds (the tracker needs two
        changes in its window), and is then checked on every apply.
        """
        now = time.monotonic()
        if self._node_problem is None and now - self._node_sampled < NODE_SAMPLE_SECONDS:
            return
        self._node_sampled = now
        self._node_problem = self.nodes.seen(await self.agent.node_name(), now)
        if self._node_problem:
            raise ConsulRejected(self._node_problem)

    def owner(self, ref: ObjectRef) -> planner.Owner:
        return planner.Owner(self.cluster, ref.namespace, ref.name)

    async def apply(self, res: Resource) -> Outcome:
        try:
            spec = api.parse(res.ref.namespace, res.ref.name, res.spec)
        except InvalidSpec as exc:
            self.index.untrack(res.ref)
            if self.endpoints is not None:
                self.endpoints.forget(res.ref)
            return Outcome.from_error(exc, doing="register", fields=_UNKNOWN, conditions=_UNKNOWN_HEALTH)
        owner = self.owner(res.ref)
        if spec.endpoints is not None and self.endpoints is not None:
            # Switched from a fixed instance: its agent registration goes first.
            self.index.untrack(res.ref)
            if "instances" not in res.status or self.index.owned_ids(owner):
                try:
                    await self._deregister_owned(owner, {str(res.status.get("serviceID") or "")})
                except ConsulError as exc:
                    return Outcome.from_error(exc, doing="remove the fixed-instance registration")
            return await self.endpoints.apply(res, spec)
        if self.endpoints is not None:
            # Switched from endpoints mode: the catalog watcher finds the
            # instances no endpoints-mode resource wants any more, and sweeps them.
            self.endpoints.forget(res.ref)
        desired = planner.registration(spec, owner)
        fields: dict[str, Any] = {"serviceID": spec.id}
        unknown = {**fields, "health": "unknown"}
        try:
            await self._one_agent()
            previous = {str(res.status.get("serviceID") or "")} | self.index.owned_ids(owner)
            previous -= {"", spec.id}
            observed = await self.agent.service(spec.id)
            checks = await self.agent.service_checks(spec.id) if observed else []
            stale = {sid: await self.agent.service(sid) for sid in sorted(previous)}
            # Check IDs are agent-wide: one of ours may already be another service's.
            same_ids = await self.agent.checks_with_ids([str(c["CheckID"]) for c in desired["Checks"]])
            plan = planner.plan(desired, owner, observed, checks, stale, other_checks=same_ids)
            if plan.conflict:
                self.index.untrack(res.ref)
                return Outcome.failed(
                    conditions.CONFLICT, plan.conflict, fields=unknown, conditions=_UNKNOWN_HEALTH
                )
            notes = []
            if plan.register is not None:
                await self.agent.register(plan.register)
                notes.append(self._registered_note(res, spec.id, plan))
                checks = await self.agent.service_checks(spec.id)
                await self._one_agent()  # still the agent that was read and written?
            for sid in plan.deregister:
                await self.agent.deregister(sid)
                self.index.forget_id(owner, sid)
                notes.append(Note("Normal", "Deregistered", f"Removed old registration {sid!r}"))
        except ConsulError as exc:
            return Outcome.from_error(
                exc, doing=f"register {spec.id!r} in Consul", fields=unknown, conditions=_UNKNOWN_HEALTH
            )
        health = planner.aggregate_health([str(c.get("Status", "")) for c in checks])
        self.index.track(res.ref, Tracked(spec.id, planner.desired_signature(desired), health))
        fields["health"] = health
        return Outcome(
            "True", conditions.RECONCILED,
            f"Registered as {spec.id!r} with the Consul agent {self.agent_url}".rstrip(),
            fields=fields, conditions=(_healthy(health),), notes=tuple(notes),
        )

    def _registered_note(self, res: Resource, service_id: str, plan: planner.Plan) -> Note:
        if plan.created and not res.reconciled():
            return Note("Normal", "Registered", f"Registered {service_id!r} in Consul")
        if res.reconciled():
            metrics.DRIFT_REPAIRS.labels(kind=self.kind).inc()
            return Note(
                "Warning", "DriftRepaired",
                f"Consul registration {service_id!r} was changed outside Kubernetes "
                f"({', '.join(plan.changes)}); restored",
            )
        return Note("Normal", "Updated", f"Updated {service_id!r} in Consul ({', '.join(plan.changes)})")

    async def _deregister_owned(self, owner: planner.Owner, candidates: set[str]) -> None:
        ids = (candidates | self.index.owned_ids(owner)) - {""}
        observed = {sid: await self.agent.service(sid) for sid in sorted(ids)}
        for sid in planner.release(owner, observed):
            await self.agent.deregister(sid)
            self.index.forget_id(owner, sid)

    async def release(self, res: Resource) -> Outcome:
        owner = self.owner(res.ref)
        if self.endpoints is not None and res.spec.get("endpoints") is not None:
            orphan = res.spec.get("deletionPolicy", "Delete") == "Orphan"
            return await self.endpoints.release(res, orphan=orphan)
        ids = {str(res.status.get("serviceID") or "")} | self.index.owned_ids(owner)
        # An invalid spec never registered anything under its own ID.
        with contextlib.suppress(InvalidSpec):
            ids.add(api.parse(res.ref.namespace, res.ref.name, res.spec).id)
        ids.discard("")
        orphan = res.spec.get("deletionPolicy", "Delete") == "Orphan"
        try:
            await self._one_agent()
            observed = {sid: await self.agent.service(sid) for sid in sorted(ids)}
            removed = planner.release(owner, observed)
            for sid in removed:
                if orphan:
                    # Released, not left claimed: without the ownership meta no
                    # later resource of this namespace/name can find it and remove it.
                    svc = observed[sid] or {}
                    await self.agent.register(planner.released(svc), replace_checks=False)
                else:
                    await self.agent.deregister(sid)
                self.index.forget_id(owner, sid)
        except ConsulError as exc:
            failed = Outcome.from_error(exc, doing="deregister from Consul")
            return Outcome.failed(failed.reason, f"{failed.message}; the finalizer stays until it can")
        self.index.untrack(res.ref)
        if orphan:
            message = f"released {list(removed)} in Consul (deletionPolicy Orphan: left, no longer owned)"
            notes = (Note("Normal", "Orphaned", message),) if removed else ()
            return Outcome("False", conditions.DELETING, message, released=True, notes=notes)
        done = Note("Normal", "Deregistered", f"Deregistered {list(removed)} from Consul")
        notes = (done,) if removed else ()
        return Outcome("False", conditions.DELETING, "deregistered", released=True, notes=notes)

    def forget(self, ref: ObjectRef) -> None:
        self.index.untrack(ref)
        if self.endpoints is not None:
            self.endpoints.forget(ref)

    # -- TetherPolicy (the skeleton checks claims before apply) -----------------

    def claims(self, res: Resource) -> Claims | None:
        """The Consul service name: what clients resolve, in both modes.

        The service ID is not a claim: a registration under an ID is owned by
        its resource's cluster/namespace/name meta, so another namespace's
        custom ``spec.id`` gets Conflict, never that registration; and a
        squatted ID under an allowed name only ever serves that name.
        """
        try:
            spec = api.parse(res.ref.namespace, res.ref.name, res.spec)
        except InvalidSpec:
            return None
        return Claims("service", spec.name)

    async def withdraw(self, res: Resource, message: str) -> Outcome:
        """Forbidden: the namespace must stop receiving the service's traffic, so
        every instance this resource owns goes (agent registrations and catalog
        instances alike, whatever the mode), regardless of ``deletionPolicy``."""
        owner = self.owner(res.ref)
        self.index.untrack(res.ref)
        ids = {str(res.status.get("serviceID") or "")}
        with contextlib.suppress(InvalidSpec):
            ids.add(api.parse(res.ref.namespace, res.ref.name, res.spec).id)
        try:
            await self._deregister_owned(owner, ids)
            if self.endpoints is not None:
                await self.endpoints.withdraw(res)
        except ConsulError as exc:
            failed = Outcome.from_error(exc, doing="remove its instances from Consul")
            return Outcome.failed(
                conditions.FORBIDDEN, f"{message}; {failed.message}", fields=_UNKNOWN,
                conditions=_UNKNOWN_HEALTH, retry=True,
            )
        return Outcome.failed(
            conditions.FORBIDDEN, f"{message}; its Consul instances are removed", fields=_UNKNOWN,
            conditions=_UNKNOWN_HEALTH, retry=False,
        )
