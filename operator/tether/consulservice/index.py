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


class _Listing:
    """The last listing of the agent's services, and this cluster's owners in it, kept
    up to date by difference: a scan costs one dict comparison per entry, and Python
    work only for the entries that changed."""

    def __init__(self) -> None:
        self.services: dict[str, Mapping[str, Any]] = {}
        self.ids_by_owner: dict[planner.Owner, set[str]] = {}

    def update(self, services: Mapping[str, Mapping[str, Any]]) -> set[str]:
        """Take ``services`` as the newest listing; the IDs that were added, edited or removed."""
        old = self.services
        changed = {sid for sid, svc in services.items() if old.get(sid) != svc}
        changed.update(sid for sid in old if sid not in services)
        for sid in changed:
            self._unindex(sid, old.get(sid))
            self._index(sid, services.get(sid))
        # A copy: a caller may edit the mapping it passed (the entries are not edited).
        self.services = dict(services)
        return changed

    def drop(self, sid: str) -> None:
        """Forget ``sid`` as if never listed: a next listing that still holds it indexes it again."""
        self._unindex(sid, self.services.pop(sid, None))

    def _index(self, sid: str, svc: Mapping[str, Any] | None) -> None:
        owner = planner.owner_of(svc.get("Meta")) if svc is not None else None
        if owner is not None:
            self.ids_by_owner.setdefault(owner, set()).add(sid)

    def _unindex(self, sid: str, svc: Mapping[str, Any] | None) -> None:
        owner = planner.owner_of(svc.get("Meta")) if svc is not None else None
        if owner is not None:
            ids = self.ids_by_owner.get(owner)
            if ids is not None:
                ids.discard(sid)
                if not ids:
                    del self.ids_by_owner[owner]


class AgentIndex:
    """Owner → registered IDs (from the agent) and resource → what it wants (from reconciles).

    The watcher lists the whole agent after every change (Consul's agent API has no
    listing of what changed since an index), but compares only what changed: the
    entries that differ from the previous listing, the resources whose wanted state
    was recorded since, and those flagged last time (a drifted resource stays
    flagged until a reconcile records it again, as a full comparison would). So a
    scan's Python work follows the changes, not the number of registrations; a
    property test holds it equal to the full comparison.
    """

    def __init__(self, *, cluster: str, plural: str) -> None:
        self.cluster = cluster
        self.plural = plural
        self._tracked: dict[ObjectRef, Tracked] = {}
        self._refs_by_sid: dict[str, set[ObjectRef]] = {}
        #: The last listing and its owner index, which the reconciler reads
        #: (refreshed by the watcher's scans).
        self._owners = _Listing()
        #: IDs that changed in refreshes since the last :meth:`drifted`, with the
        #: entry each had before (its owner is a resource to compare too).
        self._prior: dict[str, Mapping[str, Any] | None] = {}
        self._compared_checks: dict[str, list[Mapping[str, Any]]] = {}
        self._dirty: set[ObjectRef] = set()
        self._flagged: set[ObjectRef] = set()

    # -- written by the reconciler -----------------------------------------------
    def track(self, ref: ObjectRef, tracked: Tracked) -> None:
        self._unlink(ref)
        self._tracked[ref] = tracked
        self._refs_by_sid.setdefault(tracked.service_id, set()).add(ref)
        self._dirty.add(ref)

    def untrack(self, ref: ObjectRef) -> None:
        self._unlink(ref)
        self._tracked.pop(ref, None)
        self._dirty.discard(ref)
        self._flagged.discard(ref)

    def _unlink(self, ref: ObjectRef) -> None:
        old = self._tracked.get(ref)
        if old is not None:
            refs = self._refs_by_sid.get(old.service_id, set())
            refs.discard(ref)
            if not refs:
                self._refs_by_sid.pop(old.service_id, None)

    def is_tracked(self, ref: ObjectRef) -> bool:
        return ref in self._tracked

    def owned_ids(self, owner: planner.Owner) -> set[str]:
        return set(self._owners.ids_by_owner.get(owner, ()))

    def forget_id(self, owner: planner.Owner, service_id: str) -> None:
        if service_id in self._owners.ids_by_owner.get(owner, ()):
            self._owners.drop(service_id)

    # -- written by the watcher ----------------------------------------------------
    def refresh(self, services: Mapping[str, Mapping[str, Any]]) -> None:
        """Index the newest list of the agent's services by owner (:meth:`drifted` does it too)."""
        old = self._owners.services
        for sid in self._owners.update(services):
            self._prior.setdefault(sid, old.get(sid))

    def drifted(
        self, services: Mapping[str, Mapping[str, Any]], checks: Mapping[str, Mapping[str, Any]]
    ) -> list[ObjectRef]:
        """Resources whose registration differs from the agent's, or whose health moved."""
        by_service: dict[str, list[Mapping[str, Any]]] = {}
        for check in checks.values():
            by_service.setdefault(str(check.get("ServiceID", "")), []).append(check)
        # One listing, diffed once per scan: refreshed here (a refresh before with
        # the same listing finds nothing more), the owner index included.
        self.refresh(services)
        prior, self._prior = self._prior, {}
        old_checks = self._compared_checks
        changed = set(prior)
        changed.update(sid for sid, cs in by_service.items() if old_checks.get(sid) != cs)
        changed.update(sid for sid in old_checks if sid not in by_service)
        self._compared_checks = by_service

        candidates = self._dirty | self._flagged
        for sid in changed:
            candidates |= self._refs_by_sid.get(sid, set())
            for svc in (prior.get(sid), services.get(sid)):
                owner = planner.owner_of(svc.get("Meta")) if svc is not None else None
                if owner is not None and owner.cluster == self.cluster:
                    candidates.add(ObjectRef(self.plural, owner.namespace, owner.name))
        self._dirty = set()

        out = []
        for ref in sorted(candidates):
            tracked = self._tracked.get(ref)
            if tracked is not None and self._differs(tracked, services, by_service):
                out.append(ref)
        # A registration a resource owns under an ID it no longer declares (an
        # ID move cut short by a crash, before the status named the new ID):
        # its reconcile will find it in the owner index and remove it.
        flagged = set(out)
        for ref in sorted(candidates - flagged):
            tracked = self._tracked.get(ref)
            if tracked is None:
                continue
            owner = planner.Owner(self.cluster, ref.namespace, ref.name)
            if self._owners.ids_by_owner.get(owner, set()) - {tracked.service_id}:
                flagged.add(ref)
                out.append(ref)
        self._flagged = flagged
        return out

    @staticmethod
    def _differs(
        tracked: Tracked, services: Mapping[str, Mapping[str, Any]],
        by_service: Mapping[str, list[Mapping[str, Any]]],
    ) -> bool:
        svc = services.get(tracked.service_id)
        svc_checks = by_service.get(tracked.service_id, [])
        if svc is None or planner.observed_signature(svc, svc_checks) != tracked.signature:
            return True
        health = planner.aggregate_health([str(c.get("Status", "")) for c in svc_checks])
        return health != tracked.health

    def untracked(self) -> list[ObjectRef]:
        """This cluster's owners with registrations on the agent at the last scan that no
        reconcile tracks: resources not reconciled yet since a start, or orphans."""
        return sorted(
            ref for owner in self._owners.ids_by_owner if owner.cluster == self.cluster
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

    The comparison follows the changes, not the size of the node: the previous
    answer is kept, and only the resources touched by an entry that differs
    from it (by owner, or by the instance or check they want), the resources
    whose wanted instances were recorded since, and those that differed last
    time are compared again. A property test holds it equal to comparing every
    resource with the whole node, as this index once did.

    Written by the reconciler after each apply, read by the watchers (and the
    last part written by the catalog watcher, read by the reconciler).
    """

    def __init__(self, *, cluster: str, plural: str) -> None:
        self.cluster = cluster
        self.plural = plural
        self._wanted: dict[ObjectRef, dict[str, endpoints.Instance]] = {}
        self._service_of: dict[ObjectRef, tuple[str, str]] = {}
        self._followers: dict[tuple[str, str], set[ObjectRef]] = {}
        # Resources whose wanted instances changed since the last comparison,
        # and those that differed from the node at it.
        self._dirty: set[ObjectRef] = set()
        self._flagged: set[ObjectRef] = set()
        # The node as last compared, and what is derived from it, kept by difference.
        self._services: dict[str, Mapping[str, Any]] = {}
        self._checks: dict[str, Mapping[str, Any]] = {}
        self._owned: dict[planner.Owner, set[str]] = {}
        self._extra: dict[str, set[str]] = {}  # instance ID → checks Tether did not write on it
        self._untracked: set[planner.Owner] = set()

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
        self._set_wanted(ref, dict(wanted))

    def wanted(self, ref: ObjectRef) -> dict[str, endpoints.Instance] | None:
        return self._wanted.get(ref)

    def unwant(self, ref: ObjectRef) -> None:
        """Stop comparing ``ref`` with the node (it wrote nothing), but keep following its Service."""
        self._set_wanted(ref, None)

    def untrack(self, ref: ObjectRef) -> None:
        self._set_wanted(ref, None)
        key = self._service_of.pop(ref, None)
        if key is not None:
            followers = self._followers.get(key, set())
            followers.discard(ref)
            if not followers:
                self._followers.pop(key, None)

    def _set_wanted(self, ref: ObjectRef, wanted: dict[str, endpoints.Instance] | None) -> None:
        if wanted is None:
            self._wanted.pop(ref, None)
        else:
            self._wanted[ref] = wanted
        self._dirty.add(ref)

    def tracked(self) -> int:
        return len(self._wanted)

    def is_tracked(self, ref: ObjectRef) -> bool:
        return ref in self._wanted

    def follows(self, ref: ObjectRef) -> bool:
        """True while ``ref`` follows a Service (an endpoints-mode apply ran and no release since)."""
        return ref in self._service_of

    def holds(self, owner: planner.Owner) -> bool:
        """Whether ``owner`` had instances on the node at the watcher's last comparison."""
        return owner in self._owned

    def present(self) -> frozenset[planner.Owner]:
        """This cluster's owners with instances on the node at the watcher's last comparison."""
        return frozenset(self._owned)

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

        Also remembers which owners have instances on the node (:meth:`holds`).
        """
        new_services: dict[str, Mapping[str, Any]] = {str(s.get("ID", "")): s for s in services}
        new_checks: dict[str, Mapping[str, Any]] = {str(c.get("CheckID", "")): c for c in checks}
        old_services, old_checks = self._services, self._checks
        # Instance IDs whose entry, or one of whose checks, differs from the last answer.
        touched = {sid for sid, svc in new_services.items() if old_services.get(sid) != svc}
        touched.update(sid for sid in old_services if sid not in new_services)
        changed_checks = {cid for cid, c in new_checks.items() if old_checks.get(cid) != c}
        changed_checks.update(cid for cid in old_checks if cid not in new_checks)
        for cid in changed_checks:
            for check in (old_checks.get(cid), new_checks.get(cid)):
                if check is not None and check.get("ServiceID"):
                    touched.add(str(check.get("ServiceID")))
        self._services, self._checks = new_services, new_checks
        for cid in changed_checks:
            self._index_check(cid, old_checks.get(cid), new_checks.get(cid))

        # Who must be compared again: a resource that matched the node last time
        # owns every instance it wants, each with its check naming that instance,
        # so any change to them touches an entry of its owner; otherwise it was
        # flagged, or its wanted instances were recorded since (dirty).
        candidates = self._dirty | self._flagged
        owners_touched: set[planner.Owner] = {self._owner_of(ref) for ref in self._dirty}
        self._dirty = set()
        for sid in touched:
            old_owner = self._cluster_owner(old_services.get(sid))
            new_owner = self._cluster_owner(new_services.get(sid))
            if old_owner is not None:
                self._unown(old_owner, sid)
                owners_touched.add(old_owner)
            if new_owner is not None:
                self._owned.setdefault(new_owner, set()).add(sid)
                owners_touched.add(new_owner)
        for owner in owners_touched:
            ref = ObjectRef(self.plural, owner.namespace, owner.name)
            candidates.add(ref)
            if owner in self._owned and ref not in self._wanted:
                self._untracked.add(owner)
            else:
                self._untracked.discard(owner)

        out = sorted(ref for ref in candidates if ref in self._wanted and self._differs(ref))
        self._flagged = set(out)
        return out, sorted(self._untracked, key=lambda o: (o.namespace, o.name))

    def _owner_of(self, ref: ObjectRef) -> planner.Owner:
        return planner.Owner(self.cluster, ref.namespace, ref.name)

    def _cluster_owner(self, svc: Mapping[str, Any] | None) -> planner.Owner | None:
        owner = planner.owner_of(svc.get("Meta")) if svc is not None else None
        return owner if owner is not None and owner.cluster == self.cluster else None

    def _unown(self, owner: planner.Owner, sid: str) -> None:
        ids = self._owned.get(owner)
        if ids is not None:
            ids.discard(sid)
            if not ids:
                del self._owned[owner]

    def _index_check(self, cid: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        """Keep the checks Tether did not write by their instance (they could change its health)."""
        for check, add in ((old, False), (new, True)):
            sid = str(check.get("ServiceID") or "") if check is not None else ""
            if not sid or cid == endpoints.check_id(sid):
                continue
            if add:
                self._extra.setdefault(sid, set()).add(cid)
            else:
                extra = self._extra.get(sid)
                if extra is not None:
                    extra.discard(cid)
                    if not extra:
                        del self._extra[sid]

    def _differs(self, ref: ObjectRef) -> bool:
        wanted = self._wanted[ref]
        ids = self._owned.get(self._owner_of(ref), set())
        if ids != set(wanted) or any(iid in self._extra for iid in ids):
            return True
        return any(
            not endpoints.matches(inst, self._services.get(iid), self._checks.get(inst.check_id))
            for iid, inst in wanted.items()
        )


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
