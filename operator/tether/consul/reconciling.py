"""ConsulService reconciler and the one watcher per Consul agent that finds drift.

The reconciler plugs into :mod:`tether.reconciling`: ``apply`` reads the
agent, asks the planner what to write and writes only that; ``release``
deregisters (or leaves) what the resource owns. The watcher holds two Consul
blocking queries (catalog services and check states); when either index moves
it compares the agent's state with what each resource wants and enqueues only
the resources that drifted or whose health changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tether import conditions, metrics
from tether.api import InvalidSpec, ObjectRef
from tether.api import consulservices as api
from tether.conditions import Condition
from tether.consul import planner
from tether.consul.adapter import Agent, ConsulRejected, ConsulUnavailable
from tether.reconciling import Note, Outcome, Resource

log = logging.getLogger(__name__)


@dataclass
class _Tracked:
    service_id: str
    signature: planner.ServiceSig
    health: str


def _healthy(health: str) -> Condition:
    status: conditions.Status = (
        "True" if health == "passing" else "Unknown" if health == "unknown" else "False"
    )
    return Condition(
        conditions.HEALTHY, status, health.capitalize(),
        f"Consul reports the instance's checks as {health}",
    )


class ConsulServices:
    """The ConsulService kind for the shared reconcile skeleton."""

    kind = api.KIND
    plural = api.PLURAL

    def __init__(self, agent: Agent, *, cluster: str, agent_url: str = "") -> None:
        self.agent = agent
        self.cluster = cluster
        self.agent_url = agent_url
        self._tracked: dict[ObjectRef, _Tracked] = {}
        # From the watcher's latest list of the agent's services: which IDs each
        # owner holds, so a reconcile finds registrations a resource owns under
        # an ID it no longer declares.
        self._ids_by_owner: dict[planner.Owner, set[str]] = {}

    def owner(self, ref: ObjectRef) -> planner.Owner:
        return planner.Owner(self.cluster, ref.namespace, ref.name)

    def set_snapshot(self, services: Mapping[str, Mapping[str, Any]]) -> None:
        """Index the watcher's newest list of the agent's services by owner, once per scan."""
        index: dict[planner.Owner, set[str]] = {}
        for sid, svc in services.items():
            owner = planner.owner_of(svc.get("Meta"))
            if owner is not None:
                index.setdefault(owner, set()).add(sid)
        self._ids_by_owner = index

    def _owned_ids(self, owner: planner.Owner) -> set[str]:
        return set(self._ids_by_owner.get(owner, ()))

    def _forget_id(self, owner: planner.Owner, service_id: str) -> None:
        self._ids_by_owner.get(owner, set()).discard(service_id)

    async def apply(self, res: Resource) -> Outcome:
        try:
            spec = api.parse(res.ref.namespace, res.ref.name, res.spec)
        except InvalidSpec as exc:
            self._tracked.pop(res.ref, None)
            return Outcome.failed(
                conditions.INVALID_SPEC, str(exc),
                notes=(Note("Warning", conditions.INVALID_SPEC, str(exc)),),
            )
        owner = self.owner(res.ref)
        desired = planner.registration(spec, owner)
        fields: dict[str, Any] = {"serviceID": spec.id}
        try:
            previous = {str(res.status.get("serviceID") or "")} | self._owned_ids(owner)
            previous.discard("")
            previous.discard(spec.id)
            observed = await self.agent.service(spec.id)
            checks = await self.agent.service_checks(spec.id) if observed else []
            stale = {sid: await self.agent.service(sid) for sid in sorted(previous)}
            plan = planner.plan(desired, owner, observed, checks, stale)
            if plan.conflict:
                self._tracked.pop(res.ref, None)
                return Outcome.failed(
                    conditions.CONFLICT, plan.conflict, fields={**fields, "health": "unknown"},
                    notes=(Note("Warning", conditions.CONFLICT, plan.conflict),),
                )
            notes = []
            if plan.register is not None:
                await self.agent.register(plan.register)
                if plan.created and not res.reconciled():
                    notes.append(Note("Normal", "Registered", f"Registered {spec.id!r} in Consul"))
                elif res.reconciled():
                    metrics.DRIFT_REPAIRS.labels(kind=self.kind).inc()
                    notes.append(Note(
                        "Warning", "DriftRepaired",
                        f"Consul registration {spec.id!r} was changed outside Kubernetes "
                        f"({', '.join(plan.changes)}); restored",
                    ))
                else:
                    notes.append(Note(
                        "Normal", "Updated",
                        f"Updated {spec.id!r} in Consul ({', '.join(plan.changes)})",
                    ))
                checks = await self.agent.service_checks(spec.id)
            for sid in plan.deregister:
                await self.agent.deregister(sid)
                self._forget_id(owner, sid)
                notes.append(Note("Normal", "Deregistered", f"Removed old registration {sid!r}"))
        except ConsulUnavailable as exc:
            return Outcome.failed(
                conditions.BACKEND_UNAVAILABLE, f"{exc}; retrying",
                fields={**fields, "health": "unknown"},
                notes=(Note("Warning", conditions.BACKEND_UNAVAILABLE, str(exc)),),
            )
        except ConsulRejected as exc:
            return Outcome.failed(
                conditions.BACKEND_REJECTED, str(exc), fields=fields, retry=True,
                notes=(Note("Warning", conditions.BACKEND_REJECTED, str(exc)),),
            )
        health = planner.aggregate_health([str(c.get("Status", "")) for c in checks])
        self._tracked[res.ref] = _Tracked(spec.id, planner.desired_signature(desired), health)
        fields["health"] = health
        return Outcome(
            "True", conditions.RECONCILED,
            f"Registered as {spec.id!r} with the Consul agent {self.agent_url}".rstrip(),
            fields=fields, conditions=(_healthy(health),), notes=tuple(notes),
        )

    async def release(self, res: Resource) -> Outcome:
        owner = self.owner(res.ref)
        policy = res.spec.get("deletionPolicy", "Delete")
        ids = {str(res.status.get("serviceID") or "")} | self._owned_ids(owner)
        # An invalid spec never registered anything under its own ID.
        with contextlib.suppress(InvalidSpec):
            ids.add(api.parse(res.ref.namespace, res.ref.name, res.spec).id)
        ids.discard("")
        if policy == "Orphan":
            self._tracked.pop(res.ref, None)
            return Outcome(
                "False", conditions.DELETING, "deletionPolicy Orphan: registration left in Consul",
                released=True,
                notes=(Note("Normal", "Orphaned", f"Left {sorted(ids)} in Consul (deletionPolicy Orphan)"),),
            )
        removed = []
        try:
            for sid in sorted(ids):
                svc = await self.agent.service(sid)
                if svc is not None and planner.owner_of(svc.get("Meta")) == owner:
                    await self.agent.deregister(sid)
                    self._forget_id(owner, sid)
                    removed.append(sid)
        except (ConsulUnavailable, ConsulRejected) as exc:
            reason = (
                conditions.BACKEND_UNAVAILABLE if isinstance(exc, ConsulUnavailable)
                else conditions.BACKEND_REJECTED
            )
            return Outcome.failed(
                reason, f"cannot deregister from Consul yet: {exc}; the finalizer stays until it can",
                retry=True, notes=(Note("Warning", reason, str(exc)),),
            )
        self._tracked.pop(res.ref, None)
        return Outcome(
            "False", conditions.DELETING, "deregistered", released=True,
            notes=(Note("Normal", "Deregistered", f"Deregistered {removed} from Consul"),) if removed else (),
        )

    def forget(self, ref: ObjectRef) -> None:
        self._tracked.pop(ref, None)

    def drifted(
        self, services: Mapping[str, Mapping[str, Any]], checks: Mapping[str, Mapping[str, Any]]
    ) -> list[ObjectRef]:
        """Resources whose registration differs from the agent's, or whose health moved."""
        by_service: dict[str, list[Mapping[str, Any]]] = {}
        for check in checks.values():
            by_service.setdefault(str(check.get("ServiceID", "")), []).append(check)
        out = []
        for ref, tracked in self._tracked.items():
            svc = services.get(tracked.service_id)
            svc_checks = by_service.get(tracked.service_id, [])
            if svc is None or planner.observed_signature(svc, svc_checks) != tracked.signature:
                out.append(ref)
                continue
            health = planner.aggregate_health([str(c.get("Status", "")) for c in svc_checks])
            if health != tracked.health:
                out.append(ref)
        # A registration a resource owns under an ID it no longer declares (an
        # ID move cut short by a crash, before the status named the new ID):
        # its reconcile will find it in the owner index and remove it.
        flagged = set(out)
        for sid, svc in services.items():
            owner = planner.owner_of(svc.get("Meta"))
            if owner is None or owner.cluster != self.cluster:
                continue
            ref = ObjectRef(self.plural, owner.namespace, owner.name)
            current = self._tracked.get(ref)
            if current is not None and current.service_id != sid and ref not in flagged:
                flagged.add(ref)
                out.append(ref)
        return out


class ConsulWatcher:
    """One pair of blocking queries per agent; enqueues drifted resources."""

    def __init__(
        self, agent: Agent, services: ConsulServices, enqueue: Callable[[ObjectRef], None],
        *, wait: str = "60s", min_scan_interval: float = 0.25,
    ) -> None:
        self.agent = agent
        self.services = services
        self.enqueue = enqueue
        self.wait = wait
        self.min_scan_interval = min_scan_interval
        self._changed = asyncio.Event()

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._poll(self.agent.wait_services, "services")),
            asyncio.create_task(self._poll(self.agent.wait_health, "health")),
            asyncio.create_task(self._scanner()),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll(self, wait: Callable[[int, str], Any], what: str) -> None:
        index = 0
        failures = 0
        while True:
            try:
                new = await wait(index, self.wait)
                failures = 0
            except (ConsulUnavailable, ConsulRejected) as exc:
                failures += 1
                # Short cap: drift after an agent restart must be repaired in
                # well under 10 s, and this is one poll per agent, not per object.
                delay = min(3.0, 0.25 * 2**failures) * random.uniform(0.5, 1.0)
                if failures == 1:
                    log.warning("Consul %s watch failed: %s", what, exc)
                index = 0
                await asyncio.sleep(delay)
                continue
            # Any move, including backwards (an agent that restarted empty),
            # means the agent's state may differ from what resources want.
            if new != index:
                self._changed.set()
            index = max(new, 0)

    async def _scanner(self) -> None:
        loop = asyncio.get_running_loop()
        last_scan = -self.min_scan_interval
        while True:
            await self._changed.wait()
            # Every registration, ours included, moves the index; listing and
            # comparing everything costs O(resources), so scans are at least
            # min_scan_interval apart (a lone change is scanned at once). Changes
            # during the pause coalesce into the next scan.
            await asyncio.sleep(max(0.0, last_scan + self.min_scan_interval - loop.time()))
            last_scan = loop.time()
            self._changed.clear()
            try:
                services = await self.agent.services()
                checks = await self.agent.checks()
            except (ConsulUnavailable, ConsulRejected) as exc:
                log.debug("Consul scan failed: %s", exc)
                await asyncio.sleep(1.0)
                self._changed.set()
                continue
            self.services.set_snapshot(services)
            for ref in self.services.drifted(services, checks):
                self.enqueue(ref)
