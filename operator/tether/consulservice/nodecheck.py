"""The synthetic node's dead-man check ``tether:alive``: pure planning of its one write.

Consul's catalog has no TTL: an instance Tether registered stays as it was
written for as long as nobody writes again, so a dead Tether would leave every
instance on the synthetic node passing for ever. One **node-level** check (a
catalog check without ``ServiceID``) fixes that with O(1) writes: Consul counts
a node's checks in the health of every service instance on that node, so one
check turned ``critical`` takes every instance out of ``?passing`` answers and
DNS at once, and turned ``passing`` again gives each instance back its own
check's status.

Two writers, both guarded by check-and-set on the check's ``ModifyIndex``:

* the **leader** (:func:`restore`): ``passing`` when it starts serving, and
  again whenever the catalog watcher sees the check anything else;
* ``tether deadman`` (:func:`expire`): ``critical`` once no replica has
  renewed the leader Lease for its duration plus a margin.

Ownership: the check's ``Notes`` start with ``tether-cluster=<cluster>;`` and
it lives on a node whose meta names the same cluster. A check of that ID that
another cluster or tool wrote is never changed (a conflict, reported).

Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tether.consulservice import endpoints

CHECK_ID = "tether:alive"
CHECK_NAME = "Tether alive"
PASSING_OUTPUT = "a Tether replica holds the leader Lease and keeps these instances in sync"


def notes(cluster: str) -> str:
    """The ``Notes`` that mark the check as this cluster's Tether's (ownership)."""
    return (
        f"tether-cluster={cluster}; passing while a Tether replica leads, set critical by "
        "`tether deadman` while none does (instances on this node are then not passing)"
    )


def _owned(check: Mapping[str, Any], cluster: str) -> bool:
    return str(check.get("Notes") or "").startswith(f"tether-cluster={cluster};")


def _ours_as_written(check: Mapping[str, Any], cluster: str) -> bool:
    return check.get("Name") == CHECK_NAME and check.get("Notes") == notes(cluster)


def find(checks: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The node-level check ``tether:alive`` among a node's checks, or None."""
    for check in checks:
        if check.get("CheckID") == CHECK_ID and not check.get("ServiceID"):
            return check
    return None


def body(node: str, cluster: str, status: str, output: str, *, index: int) -> dict[str, Any]:
    """The check as Tether writes it; ``index`` is the check-and-set guard (0: only if absent)."""
    return {
        "Node": node,
        "CheckID": CHECK_ID,
        "Name": CHECK_NAME,
        "Status": status,
        "Notes": notes(cluster),
        "Output": output,
        "ServiceID": "",
        "ModifyIndex": index,
    }


@dataclass(frozen=True)
class Plan:
    """At most one guarded operation, and why (for the log)."""

    ops: tuple[dict[str, Any], ...] = ()
    reason: str = ""
    conflict: str = ""


def _plan(
    node_entry: Mapping[str, Any] | None, checks: Sequence[Mapping[str, Any]], *, node: str, cluster: str,
    status: str, output: str,
) -> Plan:
    if node_entry is None:
        # No node, no instances: nothing can be passing, nothing to guard.
        return Plan(reason=f"node {node!r} does not exist")
    conflict = endpoints.node_conflict(node_entry, name=node, cluster=cluster)
    if conflict:
        return Plan(conflict=conflict)
    check = find(checks)
    if check is None:
        return Plan(
            ops=({"Check": {"Verb": "cas", "Check": body(node, cluster, status, output, index=0)}},),
            reason=f"check {CHECK_ID!r} absent",
        )
    if not _owned(check, cluster):
        return Plan(conflict=(
            f"check {CHECK_ID!r} on node {node!r} was not written by Tether of cluster {cluster!r} "
            f"(Notes {str(check.get('Notes') or '')[:80]!r}); left alone"
        ))
    if check.get("Status") == status and _ours_as_written(check, cluster):
        return Plan(reason=f"check {CHECK_ID!r} already {status}")
    index = int(check.get("ModifyIndex") or 0)
    return Plan(
        ops=({"Check": {"Verb": "cas", "Check": body(node, cluster, status, output, index=index)}},),
        reason=f"check {CHECK_ID!r} was {check.get('Status')!r}",
    )


def restore(
    node_entry: Mapping[str, Any] | None, checks: Sequence[Mapping[str, Any]], *, node: str, cluster: str,
) -> Plan:
    """What the leader writes so that ``tether:alive`` is passing (nothing when it is)."""
    return _plan(node_entry, checks, node=node, cluster=cluster, status="passing", output=PASSING_OUTPUT)


def expire(
    node_entry: Mapping[str, Any] | None, checks: Sequence[Mapping[str, Any]], *, node: str, cluster: str,
    output: str,
) -> Plan:
    """What ``tether deadman`` writes so that ``tether:alive`` is critical (nothing when it is).

    An absent check is created critical: instances written by a Tether that
    never wrote the check (an older release) must stop passing too.
    """
    return _plan(node_entry, checks, node=node, cluster=cluster, status="critical", output=output)


def drifted(checks: Sequence[Mapping[str, Any]], cluster: str) -> bool:
    """For the catalog watcher: whether the leader should look at the check again.

    True when the node's checks lack it or hold this cluster's check in any
    state but passing. A foreign check of that ID is not drift (the leader
    would refuse it anyway). The leader re-reads before it writes, so a false
    alarm costs two reads, never a write.
    """
    check = find(checks)
    if check is None:
        return True
    passing = check.get("Status") == "passing" and _ours_as_written(check, cluster)
    return _owned(check, cluster) and not passing


def others(checks: Sequence[Mapping[str, Any]], cluster: str) -> list[Mapping[str, Any]]:
    """The node's checks except this cluster's ``tether:alive`` (which goes with the node)."""
    return [c for c in checks if not (c is find(checks) and _owned(c, cluster))]
