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
from tether.consulservice import endpoints, planner


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

    def is_tracked(self, ref: ObjectRef) -> bool:
        return ref in self._tracked

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

    def untracked(self) -> list[ObjectRef]:
        """This cluster's owners with registrations on the agent at the last scan that no
        reconcile tracks: resources not reconciled yet since a start, or orphans."""
        return sorted(
            ref for owner in self._ids_by_owner if owner.cluster == self.cluster
            if (ref := ObjectRef(self.plural, owner.namespace, owner.name)) not in self._tracked
        )


class CatalogIndex:
    """What endpoints mode shares between its reconciler and its two watchers.

    * Service → resources: the EndpointSlice watch asks which ConsulServices
      follow a Service, so that a slice of a Service nobody names enqueues
      nothing;
    * resource → the instances it wants: the catalog watcher compares them
      with the synthetic node after every change to it, and enqueues only
      the resources whose instances differ;
    * the owners with instances on the node at the watcher's last
      comparison: a resource switched back to a fixed instance reads the
      catalog only when it may have instances there.

    Written by the reconciler after each apply, read by the watchers (and the
    last part written by the catalog watcher, read by the reconciler).
    """

    def __init__(self, *, cluster: str, plural: str) -> None:
        self.cluster = cluster
        self.plural = plural
        self._wanted: dict[ObjectRef, dict[str, endpoints.Instance]] = {}
        self._service_of: dict[ObjectRef, tuple[str, str]] = {}
        self._followers: dict[tuple[str, str], set[ObjectRef]] = {}
        self._present: frozenset[planner.Owner] = frozenset()

    # -- written by the reconciler -----------------------------------------------
    def follow(self, ref: ObjectRef, service: str) -> None:
        """``ref`` follows Service ``service`` in its namespace (known before the first write)."""
        key = (ref.namespace, service)
        old = self._service_of.get(ref)
        if old == key:
            return
        if old is not None:
            self._followers.get(old, set()).discard(ref)
        self._service_of[ref] = key
        self._followers.setdefault(key, set()).add(ref)

    def track(self, ref: ObjectRef, wanted: Mapping[str, endpoints.Instance]) -> None:
        self._wanted[ref] = dict(wanted)

    def wanted(self, ref: ObjectRef) -> dict[str, endpoints.Instance] | None:
        return self._wanted.get(ref)

    def unwant(self, ref: ObjectRef) -> None:
        """Stop comparing ``ref`` with the node (it wrote nothing), but keep following its Service."""
        self._wanted.pop(ref, None)

    def untrack(self, ref: ObjectRef) -> None:
        self._wanted.pop(ref, None)
        key = self._service_of.pop(ref, None)
        if key is not None:
            followers = self._followers.get(key, set())
            followers.discard(ref)
            if not followers:
                self._followers.pop(key, None)

    def tracked(self) -> int:
        return len(self._wanted)

    def is_tracked(self, ref: ObjectRef) -> bool:
        return ref in self._wanted

    def follows(self, ref: ObjectRef) -> bool:
        """True while ``ref`` follows a Service (an endpoints-mode apply ran and no release since)."""
        return ref in self._service_of

    def present(self) -> frozenset[planner.Owner]:
        """This cluster's owners with instances on the node at the watcher's last comparison."""
        return self._present

    # -- read by the EndpointSlice watch -----------------------------------------
    def followers(self, namespace: str, service: str) -> list[ObjectRef]:
        return sorted(self._followers.get((namespace, service), ()))

    def followers_in(self, namespace: str) -> list[ObjectRef]:
        """Resources following any Service of ``namespace`` (the watch's scope)."""
        return sorted(ref for ref, (ns, _) in self._service_of.items() if ns == namespace)

    # -- read by the catalog watcher ---------------------------------------------
    def drifted(
        self, services: list[dict[str, Any]], checks: list[dict[str, Any]]
    ) -> tuple[list[ObjectRef], list[planner.Owner]]:
        """Resources whose instances differ from the node's, and this cluster's
        owners with instances on the node that no tracked resource accounts for.

        Also remembers which owners have instances on the node (:meth:`present`).
        """
        by_id = {str(s.get("ID", "")): s for s in services}
        check_by_id = {str(c.get("CheckID", "")): c for c in checks}
        owned = endpoints.owned_by(services, self.cluster)
        self._present = frozenset(owned)
        # Instances with a check Tether did not write (it could change their health).
        extra = {
            str(c.get("ServiceID")) for c in checks
            if c.get("ServiceID") and c.get("CheckID") != endpoints.check_id(str(c.get("ServiceID")))
        }
        out: list[ObjectRef] = []
        for ref, wanted in self._wanted.items():
            owner = planner.Owner(self.cluster, ref.namespace, ref.name)
            ids = set(owned.get(owner, ()))
            if ids != set(wanted) or ids & extra or any(
                not endpoints.matches(inst, by_id.get(iid), check_by_id.get(inst.check_id))
                for iid, inst in wanted.items()
            ):
                out.append(ref)
        untracked = [
            owner for owner in owned
            if ObjectRef(self.plural, owner.namespace, owner.name) not in self._wanted
        ]
        return out, untracked


class GateIndex:
    """What the readiness gate shares between endpoints mode's reconciler and its watchers.

    * gated Pod → the resources whose instances it backs: the Pod cache
      enqueues only those when the Pod's ``ContainersReady`` or gate changes
      (its EndpointSlice does not change: the gate holds ``ready`` false);
    * resource → the Consul status its last gate decisions were based on, per
      instance: the catalog watcher enqueues the resource as soon as the node's
      checks say otherwise (an instance Tether just wrote now passing), so the
      gate follows Consul's view, never Tether's own write.

    Written by the reconciler (before its write, so that no move of the node
    after it can be missed), read by the watchers.
    """

    def __init__(self) -> None:
        self._seen: dict[ObjectRef, dict[str, str | None]] = {}
        self._pods: dict[ObjectRef, frozenset[tuple[str, str]]] = {}
        self._refs: dict[tuple[str, str], set[ObjectRef]] = {}

    def record(self, ref: ObjectRef, pods: set[str], seen: Mapping[str, str | None]) -> None:
        """``ref``'s gated Pods now, and the Consul status of each of their instances it read."""
        keys = frozenset((ref.namespace, pod) for pod in pods)
        old = self._pods.get(ref, frozenset())
        for key in old - keys:
            refs = self._refs.get(key, set())
            refs.discard(ref)
            if not refs:
                self._refs.pop(key, None)
        for key in keys - old:
            self._refs.setdefault(key, set()).add(ref)
        if keys:
            self._pods[ref] = keys
            self._seen[ref] = dict(seen)
        else:
            self._pods.pop(ref, None)
            self._seen.pop(ref, None)

    def forget(self, ref: ObjectRef) -> None:
        self.record(ref, set(), {})

    # -- read by the Pod cache ---------------------------------------------------
    def backed_by(self, namespace: str, pod: str) -> list[ObjectRef]:
        return sorted(self._refs.get((namespace, pod), ()))

    # -- read by the catalog watcher ---------------------------------------------
    def moved(self, statuses: Mapping[str, str]) -> list[ObjectRef]:
        """Resources with a gated instance whose status on the node (Service ID → aggregate)
        differs from the one their last gate decision read."""
        return sorted(
            ref for ref, seen in self._seen.items()
            if any(statuses.get(iid) != status for iid, status in seen.items())
        )
