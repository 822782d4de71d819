"""What the ConsulService kind and its watcher share: who owns which registration,
and what each resource wants.

The watcher refreshes the owner index from every scan of the agent's
services and asks which resources drifted; the reconciler records what it
registered and reads the index to find registrations a resource owns under
an ID it no longer declares (an ID move cut short by a crash). Neither writes
into the other: both are given this one object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tether.api import ObjectRef
from tether.consul import planner


@dataclass(frozen=True)
class Tracked:
    """What a reconciled resource registered, and the health it last reported."""

    service_id: str
    signature: planner.ServiceSig
    health: str


class AgentIndex:
    """Owner → registered IDs (from the agent) and resource → what it wants (from reconciles)."""

    def __init__(self, *, cluster: str, plural: str) -> None:
        self.cluster = cluster
        self.plural = plural
        self._tracked: dict[ObjectRef, Tracked] = {}
        self._ids_by_owner: dict[planner.Owner, set[str]] = {}

    # -- written by the reconciler -----------------------------------------------
    def track(self, ref: ObjectRef, tracked: Tracked) -> None:
        self._tracked[ref] = tracked

    def untrack(self, ref: ObjectRef) -> None:
        self._tracked.pop(ref, None)

    def owned_ids(self, owner: planner.Owner) -> set[str]:
        return set(self._ids_by_owner.get(owner, ()))

    def forget_id(self, owner: planner.Owner, service_id: str) -> None:
        self._ids_by_owner.get(owner, set()).discard(service_id)

    # -- written by the watcher ----------------------------------------------------
    def refresh(self, services: Mapping[str, Mapping[str, Any]]) -> None:
        """Index the newest list of the agent's services by owner, once per scan."""
        index: dict[planner.Owner, set[str]] = {}
        for sid, svc in services.items():
            owner = planner.owner_of(svc.get("Meta"))
            if owner is not None:
                index.setdefault(owner, set()).add(sid)
        self._ids_by_owner = index

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
