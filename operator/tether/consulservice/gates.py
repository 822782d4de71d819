"""The readiness gate ``tether.dev/consul-passing``: pure decisions, no I/O.

A Pod that lists this gate in ``spec.readinessGates`` is not Ready until its
condition of that type is ``True``, so its endpoint's ``ready`` says nothing
about the containers while the gate holds it false. For such a Pod, endpoints
mode registers the instance from the Pod's ``ContainersReady`` condition
instead (:func:`endpoint_health`), and sets the gate's condition from what
Consul reports for the Pod's instances (:func:`decide`):

* ``True`` (reason ``ConsulPassing``) only when every instance of the Pod is
  passing in Consul *and* is meant to pass: a check the reconcile is about to
  turn critical is never read as a reason to open the gate;
* ``False`` (reason ``ConsulNotPassing``) otherwise, with what Consul says;
* nothing at all when the condition already says it: an idle cluster gets no
  Pod writes. ``lastTransitionTime`` moves only when the status flips.

The slim :class:`Pod` is all that is kept of a watched Pod (a full Pod is
kilobytes; a namespace may hold thousands).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

GATE = "tether.dev/consul-passing"
CONTAINERS_READY = "ContainersReady"
PASSING = "ConsulPassing"
NOT_PASSING = "ConsulNotPassing"

Status = Literal["passing", "warning", "critical"]
CondStatus = Literal["True", "False"]


@dataclass(frozen=True)
class Condition:
    """The gate's condition on a Pod, as read or as wanted."""

    status: str
    reason: str = ""
    message: str = ""
    last_transition: str = ""


@dataclass(frozen=True)
class Pod:
    """What endpoints mode keeps of a gated Pod."""

    name: str
    uid: str
    containers_ready: bool
    condition: Condition | None  # the gate's condition, absent until Tether first sets it


def is_gated(pod: Mapping[str, Any]) -> bool:
    gates = ((pod.get("spec") or {}).get("readinessGates")) or []
    return any(isinstance(g, Mapping) and g.get("conditionType") == GATE for g in gates)


def slim(pod: Mapping[str, Any]) -> Pod | None:
    """The slim view of a Pod that lists the gate; None for any other Pod (not kept)."""
    if not is_gated(pod):
        return None
    meta = pod.get("metadata") or {}
    conds = {
        str(c.get("type")): c for c in ((pod.get("status") or {}).get("conditions") or [])
        if isinstance(c, Mapping)
    }
    ready = conds.get(CONTAINERS_READY)
    gate = conds.get(GATE)
    return Pod(
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        containers_ready=ready is not None and ready.get("status") == "True",
        condition=None if gate is None else Condition(
            str(gate.get("status") or ""), str(gate.get("reason") or ""), str(gate.get("message") or ""),
            str(gate.get("lastTransitionTime") or ""),
        ),
    )


def endpoint_health(pod: Pod, conditions: Mapping[str, Any] | None) -> tuple[Status, str]:
    """A gated Pod's endpoint as a Consul check status: its containers' readiness, not ``ready``.

    ``terminating`` still wins (the Pod has been told to stop: no new traffic),
    as for any endpoint; only the gate-held ``ready`` is replaced.
    """
    terminating = (conditions or {}).get("terminating") is True
    if terminating:
        return "critical", "terminating"
    if pod.containers_ready:
        return "passing", f"containers ready (readiness gate {GATE})"
    return "critical", f"containers not ready (readiness gate {GATE})"


@dataclass(frozen=True)
class Patch:
    """The condition to write on Pod ``name`` (``uid`` guards against a namesake)."""

    name: str
    uid: str
    condition: Condition

    def body(self) -> dict[str, Any]:
        """A strategic-merge patch of ``pods/status``: conditions merge by ``type``,
        so the kubelet's conditions are never touched; the ``uid`` is immutable, so
        a Pod recreated under the same name refuses the patch instead of taking it."""
        c = self.condition
        return {
            "metadata": {"uid": self.uid},
            "status": {"conditions": [{
                "type": GATE, "status": c.status, "reason": c.reason, "message": c.message,
                "lastTransitionTime": c.last_transition,
            }]},
        }


def wanted(pod_instances: Mapping[str, Status], consul: Mapping[str, str | None]) -> Condition:
    """The gate's condition for a Pod whose instances (ID → the status Tether wants) Consul
    shows as ``consul`` (ID → the instance's aggregate status, None when not registered).

    Status and reason only, the time is the caller's: see :func:`decide`.
    """
    if not pod_instances:
        return Condition("False", NOT_PASSING, "no instance in Consul's catalog")
    lagging = []
    for iid in sorted(pod_instances):
        seen = consul.get(iid)
        if pod_instances[iid] != "passing":
            why = f"registered {pod_instances[iid]}: containers not ready, or Pod terminating"
            return Condition("False", NOT_PASSING, f"instance {iid} is {why}")
        if seen != "passing":
            lagging.append(f"{iid} is {seen or 'not registered yet'}")
    if lagging:
        return Condition("False", NOT_PASSING, "Consul reports instance " + "; ".join(lagging))
    ids = ", ".join(sorted(pod_instances))
    return Condition("True", PASSING, f"Consul reports instance {ids} passing")


def decide(pod: Pod, want: Condition, *, now: str) -> Patch | None:
    """The patch that makes the Pod's gate say ``want``, or None when it says it already.

    Equal status and reason mean no write (a message alone changing, say from
    "not registered yet" to "critical", is not worth a Pod write per reconcile).
    """
    have = pod.condition
    if have is not None and (have.status, have.reason) == (want.status, want.reason):
        return None
    flipped = have is None or have.status != want.status
    when = now if flipped or not have or not have.last_transition else have.last_transition
    return Patch(pod.name, pod.uid, Condition(want.status, want.reason, want.message, when))


def instance_statuses(checks: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Service ID → Consul's aggregate of its checks (the worst one), from a node's checks.

    Node-level checks are left out on purpose, although Consul counts them: the one
    that matters is the dead-man switch's ``tether:alive``, and counting it would
    close every gate while a new leader takes over after the switch tripped (until it
    writes the check passing again), taking the Pods out of their Kubernetes Services
    too: an outage of in-cluster traffic to guard against a few seconds of an open
    gate on instances Consul already withholds.
    """
    rank = {"passing": 0, "warning": 1, "critical": 2}
    out: dict[str, str] = {}
    for check in checks:
        sid = str(check.get("ServiceID") or "")
        if not sid:
            continue
        status = str(check.get("Status") or "")
        status = status if status in rank else "critical"  # maintenance and the like
        old = out.get(sid)
        if old is None or rank[status] > rank[old]:
            out[sid] = status
    return out
