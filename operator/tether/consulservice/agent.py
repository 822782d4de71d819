"""ConsulService fixed-instance mode: one registration on the Consul agent.

One of the kind's two modes (:class:`~tether.consulservice.reconciling.Mode`),
chosen by :class:`~tether.consulservice.reconciling.ConsulServices`, which
parses the spec. ``apply`` reads the agent, asks the planner what to write
and writes only that; ``release`` deregisters (or leaves) what the resource
owns, as the planner decides. What the watcher needs to know is recorded in
the shared :class:`~tether.consulservice.index.AgentIndex`; drift detection
itself lives in :mod:`tether.consulservice.agentwatching`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tether import conditions, reconciling
from tether.api import ObjectRef
from tether.api import consulservices as api
from tether.clients.consul.client import Agent, ConsulError, ConsulRejected
from tether.conditions import Condition
from tether.consulservice import planner, topology
from tether.consulservice.index import AgentIndex, Tracked
from tether.reconciling import Note, Outcome, Resource

log = logging.getLogger(__name__)


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
UNKNOWN_HEALTH = (_healthy("unknown"),)
# How often the agent behind CONSUL_HTTP_ADDR is identified while it stays the same one.
NODE_SAMPLE_SECONDS = 1.0


class AgentServices:
    """Fixed-instance mode: one registration on the agent, its health on the resource."""

    name = "fixed-instance"
    holding = "the registration on the Consul agent"

    def __init__(self, agent: Agent, index: AgentIndex, *, cluster: str, agent_url: str = "") -> None:
        self.agent = agent
        self.index = index
        self.cluster = cluster
        self.agent_url = agent_url
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

    def holds(self, res: Resource) -> bool:
        """Whether the agent may hold a registration of ``res`` (cheap: no Consul call).

        A status without ``instances`` was never written by endpoints mode:
        the resource may have been a fixed instance until now. After that, the
        owner index (refreshed by the agent watcher) tells.
        """
        return "instances" not in res.status or bool(self.index.owned_ids(self.owner(res.ref)))

    async def apply(self, res: Resource, spec: api.ConsulServiceSpec) -> Outcome:
        owner = self.owner(res.ref)
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
                    conditions.CONFLICT, plan.conflict, fields=unknown, conditions=UNKNOWN_HEALTH
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
                exc, doing=f"register {spec.id!r} in Consul", fields=unknown, conditions=UNKNOWN_HEALTH
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
            return reconciling.drift_repaired(
                api.KIND,
                f"Consul registration {service_id!r} was changed outside Kubernetes "
                f"({', '.join(plan.changes)}); restored",
            )
        return Note("Normal", "Updated", f"Updated {service_id!r} in Consul ({', '.join(plan.changes)})")

    async def release(self, res: Resource, spec: api.ConsulServiceSpec | None, *, orphan: bool) -> Outcome:
        """Deregister (``orphan``: release) every registration ``res`` owns; raises ConsulError."""
        owner = self.owner(res.ref)
        ids = {str(res.status.get("serviceID") or "")} | self.index.owned_ids(owner)
        # An invalid spec never registered anything under its own ID.
        if spec is not None:
            ids.add(spec.id)
        ids.discard("")
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
        self.index.untrack(res.ref)
        if orphan:
            message = f"released {list(removed)} in Consul (deletionPolicy Orphan: left, no longer owned)"
            note = Note("Normal", "Orphaned", message)
        else:
            message = "deregistered"
            note = Note("Normal", "Deregistered", f"Deregistered {list(removed)} from Consul")
        return Outcome.release_done(message, backend="Consul", note=note if removed else None)

    def may_hold_orphan(self, ref: ObjectRef) -> bool:
        """Whether the agent held registrations of ``ref`` at the watcher's last scan while
        no reconcile tracks it (cheap: no Consul call)."""
        return not self.index.is_tracked(ref) and bool(self.index.owned_ids(self.owner(ref)))

    async def collect(self, ref: ObjectRef) -> int:
        """Deregister what ``ref`` owns on the agent; the caller knows ``ref`` is gone.

        The agent watcher found registrations of an owner no reconcile tracks: a
        registration whose outcome was unknown (Consul paused past the client's
        deadline) can land after the resource's release found nothing to remove.
        Only registrations still carrying this owner's meta go. Raises ConsulError.
        """
        owner = self.owner(ref)
        ids = self.index.owned_ids(owner)
        if not ids:
            return 0
        await self._one_agent()
        observed = {sid: await self.agent.service(sid) for sid in sorted(ids)}
        removed = planner.release(owner, observed)
        if removed:
            log.info("deregistering %s from the Consul agent: %s no longer exists",
                     sorted(removed), owner.describe())
        for sid in removed:
            await self.agent.deregister(sid)
        for sid in ids:
            self.index.forget_id(owner, sid)
        return len(removed)

    def forget(self, ref: ObjectRef) -> None:
        self.index.untrack(ref)
