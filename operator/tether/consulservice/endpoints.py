"""Pure planning for ConsulService endpoints mode: endpoints and Consul's catalog → txn ops.

Nothing here does I/O. The reconciler hands in the Service, its
EndpointSlices and what Consul's catalog holds on the synthetic node; this
module answers which ``/v1/txn`` operations make the catalog match, in
batches within Consul's operation limit, and what status to show.

Every write is guarded by Consul's check-and-set (``cas``/``delete-cas`` on
``ModifyIndex``; index 0 means "only if absent"): an instance that changed
or appeared between the read and the write makes Consul roll the whole
transaction back instead of overwriting someone else's entry. And the
planner only ever emits an operation on an entry whose meta names this
resource as its owner, or on an ID where nothing exists yet.

(Over 500 lines on purpose: desired instances, the catalog diff, batching and
the status are one pure function of endpoints and catalog, tested as one.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tether.api import InvalidSpec
from tether.api import consulservices as api
from tether.consulservice import gates
from tether.consulservice.planner import Owner, owner_of

#: Consul's limit of operations in one ``/v1/txn``: ``maxTxnOps = 128`` in
#: agent/txn_endpoint.go of the pinned Consul 1.16.3 (older releases had 64);
#: a 413 above it.
MAX_TXN_OPS = 128

#: Node meta Tether sets on its synthetic node, so that an operator never
#: adopts another cluster's node (or an agent's) under the same name.
NODE_META_CLUSTER = api.META_CLUSTER
NODE_ADDRESS = "127.0.0.1"
CHECK_NAME = "Kubernetes endpoint conditions"

Status = Literal["passing", "warning", "critical"]
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


# -- the endpoints ---------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Endpoint:
    """One endpoint address with the selected port, and what its conditions mean for Consul."""

    address: str
    port: int
    status: Status
    output: str
    #: The gated Pod behind it (readiness gate ``tether.dev/consul-passing``), else "".
    pod: str = field(default="", compare=False)


def health_of(conditions: Mapping[str, Any] | None) -> tuple[Status, str]:
    """An endpoint's conditions as a Consul check status and output.

    ``ready`` → passing. Anything else → critical, including ``serving`` while
    ``terminating``: the Pod has been told to stop, and Kubernetes' own
    proxies send it no new connection while any ready endpoint exists. Consul
    has no "fallback only" state, and ``warning`` instances are still handed
    out by Consul DNS (``only_passing`` is off by default) and most
    consumers, so ``warning`` would keep sending new traffic to a Pod that is
    shutting down. The output still tells draining from broken.

    Per the EndpointSlice API, an absent ``ready`` or ``serving`` means true
    and an absent ``terminating`` means false.
    """
    conditions = conditions or {}
    ready = conditions.get("ready") is not False
    serving = conditions.get("serving") is not False
    terminating = conditions.get("terminating") is True
    if ready:
        return "passing", "ready"
    if terminating and serving:
        return "critical", "terminating (still serving: draining, no new traffic)"
    if terminating:
        return "critical", "terminating"
    return "critical", "not ready"


_RANK: dict[str, int] = {"passing": 0, "warning": 1, "critical": 2}


def select_port(service: Mapping[str, Any] | None, wanted: str | int | None, *, where: str) -> str:
    """The name of the Service port ``spec.endpoints.port`` selects ("" when unnamed).

    EndpointSlices name their ports after the Service's ports and carry the
    *target* port number, which may differ from Pod to Pod: the name is what
    ties a Service port to the slices.
    """
    if service is None:
        # No Service, no endpoints: slices that still carry its name (a custom
        # controller's, or ones not yet garbage collected) do not count.
        raise ServiceMissing(f"Service {where} does not exist")
    ports = ((service.get("spec") or {}).get("ports")) or []
    if wanted is None:
        if len(ports) != 1:
            raise InvalidSpec(
                f"spec.endpoints.port: required, Service {where} has {len(ports)} ports "
                f"({', '.join(_port_text(p) for p in ports) or 'none'}); name one"
            )
        return str(ports[0].get("name") or "")
    for port in ports:
        if (isinstance(wanted, str) and port.get("name") == wanted) or (
            isinstance(wanted, int) and port.get("port") == wanted
        ):
            return str(port.get("name") or "")
    raise InvalidSpec(
        f"spec.endpoints.port: Service {where} has no port {wanted!r} "
        f"(it has {', '.join(_port_text(p) for p in ports) or 'none'})"
    )


class ServiceMissing(LookupError):
    """The Service is absent: it has no endpoints, whatever slices carry its name."""


def _port_text(port: Mapping[str, Any]) -> str:
    name = port.get("name")
    return f"{name} ({port.get('port')})" if name else str(port.get("port"))


def endpoints(
    slices: Iterable[Mapping[str, Any]], port_name: str, gated: Mapping[str, gates.Pod] | None = None,
) -> list[Endpoint]:
    """Every endpoint address with the selected port across ``slices``, de-duplicated.

    The same endpoint may sit in two slices while the EndpointSlice controller
    moves it; the healthiest view wins (it is the newer one in a move).

    ``gated``: the namespace's Pods that list the readiness gate, by name. An
    endpoint whose ``targetRef`` is one of them (same UID) takes its status
    from the Pod's ``ContainersReady``, since the gate holds ``ready`` false
    until Consul passes it: ``ready`` would never let the instance pass.
    """
    gated = gated or {}
    best: dict[tuple[str, int], Endpoint] = {}
    for item in slices:
        number = _slice_port(item, port_name)
        if number is None:
            continue
        for ep in item.get("endpoints") or []:
            pod = _gated_pod(ep.get("targetRef"), gated)
            if pod is not None:
                status, output = gates.endpoint_health(pod, ep.get("conditions"))
            else:
                status, output = health_of(ep.get("conditions"))
            for address in ep.get("addresses") or []:
                if not isinstance(address, str) or not address:
                    continue
                candidate = Endpoint(address, number, status, output, pod.name if pod else "")
                key = (address, number)
                old = best.get(key)
                if old is None or (_RANK[status], output) < (_RANK[old.status], old.output):
                    best[key] = candidate
    return sorted(best.values())


def _gated_pod(ref: Any, gated: Mapping[str, gates.Pod]) -> gates.Pod | None:
    if not gated or not isinstance(ref, Mapping) or ref.get("kind") != "Pod":
        return None
    pod = gated.get(str(ref.get("name") or ""))
    # A namesake (a StatefulSet's Pod recreated) is another Pod: the UID must match when given.
    if pod is None or (ref.get("uid") and pod.uid and ref.get("uid") != pod.uid):
        return None
    return pod


def _slice_port(item: Mapping[str, Any], port_name: str) -> int | None:
    for port in item.get("ports") or []:
        number = port.get("port")
        if (port.get("name") or "") == port_name and isinstance(number, int) and 1 <= number <= 65535:
            return number
    return None


# -- the desired catalog ---------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One service instance on the synthetic node, with its one check, as Tether wants it."""

    id: str
    service: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: tuple[tuple[str, str], ...]
    status: Status
    output: str

    @property
    def check_id(self) -> str:
        return check_id(self.id)


def check_id(instance_id: str) -> str:
    return f"{instance_id}:endpoint"


def instance_id(prefix: str, address: str, port: int) -> str:
    """Stable per endpoint: the same address and port keep their ID across reconciles and restarts."""
    return f"{prefix}-{address}-{port}"


def desired(spec: api.ConsulServiceSpec, owner: Owner, eps: Iterable[Endpoint]) -> dict[str, Instance]:
    """The instances a resource wants, by ID."""
    meta = tuple(sorted({**dict(spec.meta), **owner.meta()}.items()))
    out = {}
    for ep in eps:
        iid = instance_id(spec.id, ep.address, ep.port)
        out[iid] = Instance(iid, spec.name, ep.address, ep.port, spec.tags, meta, ep.status, ep.output)
    return out


def node_meta(cluster: str) -> dict[str, str]:
    return {api.META_EXTERNAL_SOURCE: "kubernetes", NODE_META_CLUSTER: cluster}


def node_conflict(node: Mapping[str, Any] | None, *, name: str, cluster: str) -> str | None:
    """Why the node named ``name`` is not this cluster's synthetic node, or None if it is (or absent)."""
    if node is None:
        return None
    meta = node.get("Meta") or {}
    if meta.get(api.META_EXTERNAL_SOURCE) == "kubernetes" and meta.get(NODE_META_CLUSTER) == cluster:
        return None
    other = meta.get(NODE_META_CLUSTER)
    who = f"Tether of cluster {other!r}" if other else "something outside Tether (a Consul agent?)"
    return (
        f"Consul node {name!r} belongs to {who}; Tether will not register instances on it. "
        "Set TETHER_CONSUL_NODE (or TETHER_CLUSTER_NAME) so that each cluster has its own node"
    )


# -- observed vs desired ---------------------------------------------------------------------


def _sig_of_service(svc: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        str(svc.get("Service", "")),
        str(svc.get("Address") or ""),
        int(svc.get("Port") or 0),
        tuple(svc.get("Tags") or ()),
        tuple(sorted((svc.get("Meta") or {}).items())),
    )


def _sig_of_check(check: Mapping[str, Any]) -> tuple[Any, ...]:
    # ServiceName too: after a rename, a check Consul still files under the old name is rewritten.
    return (
        str(check.get("Name", "")),
        str(check.get("Status", "")),
        str(check.get("Output") or ""),
        str(check.get("ServiceID") or ""),
        str(check.get("ServiceName") or ""),
    )


def service_body(inst: Instance) -> dict[str, Any]:
    return {
        "ID": inst.id,
        "Service": inst.service,
        "Address": inst.address,
        "Port": inst.port,
        "Tags": list(inst.tags),
        "Meta": dict(inst.meta),
    }


def check_body(node: str, inst: Instance) -> dict[str, Any]:
    return {
        "Node": node,
        "CheckID": inst.check_id,
        "Name": CHECK_NAME,
        "Status": inst.status,
        "Output": inst.output,
        "ServiceID": inst.id,
        "ServiceName": inst.service,
    }


def matches(inst: Instance, svc: Mapping[str, Any] | None, check: Mapping[str, Any] | None) -> bool:
    """True when the catalog's entry and check are what ``inst`` wants."""
    if svc is None or check is None:
        return False
    return _sig_of_service(svc) == _sig_of_service(service_body(inst)) and _sig_of_check(
        check
    ) == _sig_of_check(check_body("", inst))


@dataclass(frozen=True)
class CatalogPlan:
    """What to write for one resource, and what could not be written."""

    batches: tuple[tuple[dict[str, Any], ...], ...] = ()
    conflicts: tuple[str, ...] = ()  # instance IDs held by someone else
    added: int = 0
    updated: int = 0
    removed: int = 0
    changes: tuple[str, ...] = field(default=())  # short descriptions, for events

    @property
    def ops(self) -> int:
        return sum(len(b) for b in self.batches)


def plan(
    want: Mapping[str, Instance],
    services: Sequence[Mapping[str, Any]],
    checks: Sequence[Mapping[str, Any]],
    *,
    owner: Owner,
    node: str,
    node_present: bool,
    cluster: str,
    max_ops: int = MAX_TXN_OPS,
) -> CatalogPlan:
    """The guarded operations that make the catalog hold exactly ``want`` for ``owner``.

    ``services`` and ``checks`` are what the catalog holds on ``node`` (at
    least every entry of the service names involved). Entries whose meta
    names another owner are never written; a wanted ID held by one is a
    conflict, reported and skipped, while the resource's other instances are
    still written.
    """
    by_id = {str(s.get("ID", "")): s for s in services}
    checks_by_service: dict[str, list[Mapping[str, Any]]] = {}
    for check in checks:
        checks_by_service.setdefault(str(check.get("ServiceID") or ""), []).append(check)

    units: list[list[dict[str, Any]]] = []
    removals: list[list[dict[str, Any]]] = []
    conflicts: list[str] = []
    added = updated = removed = 0
    changes: list[str] = []
    for iid in sorted(want):
        inst = want[iid]
        svc = by_id.get(iid)
        if svc is not None and owner_of(svc.get("Meta")) != owner:
            conflicts.append(iid)
            continue
        unit: list[dict[str, Any]] = []
        own_checks = checks_by_service.get(iid, []) if svc is not None else []
        ours = next((c for c in own_checks if c.get("CheckID") == inst.check_id), None)
        if svc is None:
            unit.append(_service_op("cas", node, service_body(inst), 0))
            added += 1
            changes.append(f"+{inst.address}:{inst.port}")
        elif _sig_of_service(svc) != _sig_of_service(service_body(inst)):
            unit.append(_service_op("cas", node, service_body(inst), _index(svc)))
        if ours is None or _sig_of_check(ours) != _sig_of_check(check_body(node, inst)):
            unit.append(_check_op("cas", check_body(node, inst), 0 if ours is None else _index(ours)))
        # A check someone added to an instance Tether owns would change its health: drift.
        for extra in own_checks:
            if extra.get("CheckID") != inst.check_id:
                unit.append(_check_op("delete-cas", _check_ref(node, extra), _index(extra)))
        if unit:
            units.append(unit)
            if svc is not None:
                updated += 1
                changes.append(f"~{inst.address}:{inst.port}")
    for iid, svc in sorted(by_id.items()):
        if iid in want or owner_of(svc.get("Meta")) != owner:
            continue
        # Deleting the service deletes its checks with it.
        removals.append([_service_op("delete-cas", node, _service_ref(svc), _index(svc))])
        removed += 1
        changes.append(f"-{svc.get('Address')}:{svc.get('Port')}")
    head: list[dict[str, Any]] = []
    if (units or removals) and not node_present:
        head.append(node_op("cas", node, cluster, index=0))
    # New and changed instances before removals: in a rollout the new Pods are
    # in Consul before the old ones leave it.
    return CatalogPlan(
        batches=batch([*units, *removals], max_ops=max_ops, head=head),
        conflicts=tuple(conflicts),
        added=added,
        updated=updated,
        removed=removed,
        changes=tuple(changes),
    )


def release(
    services: Sequence[Mapping[str, Any]],
    checks: Sequence[Mapping[str, Any]],
    *,
    owner: Owner,
    node: str,
    orphan: bool,
    max_ops: int = MAX_TXN_OPS,
) -> CatalogPlan:
    """Operations for a deleted resource: remove its instances, or (``Orphan``) drop their ownership.

    An orphaned instance keeps its ``external-source`` (it did come from
    Kubernetes) but loses the ``tether-*`` keys, so that no Tether claims it
    any more; its check is left as it was.
    """
    units: list[list[dict[str, Any]]] = []
    for svc in sorted(services, key=lambda s: str(s.get("ID", ""))):
        if owner_of(svc.get("Meta")) != owner:
            continue
        iid = str(svc.get("ID", ""))
        if orphan:
            body = {
                "ID": iid, "Service": svc.get("Service"), "Address": svc.get("Address") or "",
                "Port": int(svc.get("Port") or 0), "Tags": list(svc.get("Tags") or ()),
                "Meta": {
                    k: v for k, v in (svc.get("Meta") or {}).items()
                    if k not in (api.META_CLUSTER, api.META_NAMESPACE, api.META_NAME)
                },
            }
            units.append([_service_op("cas", node, body, _index(svc))])
        else:
            units.append([_service_op("delete-cas", node, _service_ref(svc), _index(svc))])
    return CatalogPlan(batches=batch(units, max_ops=max_ops), removed=len(units))


def node_op(verb: str, node: str, cluster: str, *, index: int) -> dict[str, Any]:
    body: dict[str, Any] = {"Node": node, "Address": NODE_ADDRESS, "Meta": node_meta(cluster)}
    if verb in ("cas", "delete-cas"):
        body["ModifyIndex"] = index
    return {"Node": {"Verb": verb, "Node": body}}


def _service_op(verb: str, node: str, body: Mapping[str, Any], index: int) -> dict[str, Any]:
    return {"Service": {"Verb": verb, "Node": node, "Service": {**body, "ModifyIndex": index}}}


def _check_op(verb: str, body: Mapping[str, Any], index: int) -> dict[str, Any]:
    return {"Check": {"Verb": verb, "Check": {**body, "ModifyIndex": index}}}


def _service_ref(svc: Mapping[str, Any]) -> dict[str, Any]:
    # Consul validates a service op's body even to delete it: the name is required.
    return {"ID": str(svc.get("ID", "")), "Service": str(svc.get("Service", ""))}


def _check_ref(node: str, check: Mapping[str, Any]) -> dict[str, Any]:
    return {"Node": node, "CheckID": check.get("CheckID"), "ServiceID": check.get("ServiceID") or ""}


def _index(entry: Mapping[str, Any]) -> int:
    return int(entry.get("ModifyIndex") or 0)


def batch(
    units: Sequence[Sequence[dict[str, Any]]], *, max_ops: int = MAX_TXN_OPS,
    head: Sequence[dict[str, Any]] = (),
) -> tuple[tuple[dict[str, Any], ...], ...]:
    """Pack units into transactions of at most ``max_ops`` operations, in order.

    A unit (one instance's service and check operations) is never split:
    were the check written in a later transaction than its service, a crash
    in between would leave an instance without a check, and Consul counts
    such an instance as passing. ``head`` (the node) opens the first batch.
    """
    out: list[tuple[dict[str, Any], ...]] = []
    current: list[dict[str, Any]] = list(head)
    for unit in units:
        if len(unit) > max_ops:
            raise ValueError(f"one instance needs {len(unit)} operations, more than {max_ops}")
        if current and len(current) + len(unit) > max_ops:
            out.append(tuple(current))
            current = []
        current.extend(unit)
    if current:
        out.append(tuple(current))
    return tuple(out)


# -- status ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    total: int = 0
    passing: int = 0
    warning: int = 0
    critical: int = 0

    def as_status(self) -> dict[str, int]:
        return {
            "total": self.total, "passing": self.passing, "warning": self.warning,
            "critical": self.critical,
        }

    @property
    def health(self) -> Literal["passing", "warning", "critical"]:
        """passing when all pass, critical when none does (or there are none), warning otherwise."""
        if self.total and self.passing == self.total:
            return "passing"
        if self.passing == 0:
            return "critical"
        return "warning"


def counts(statuses: Iterable[str]) -> Counts:
    tally = {"passing": 0, "warning": 0, "critical": 0}
    total = 0
    for status in statuses:
        total += 1
        # Anything Consul reports that is neither (maintenance) counts as critical.
        tally[status if status in tally else "critical"] += 1
    return Counts(total, tally["passing"], tally["warning"], tally["critical"])


def services_filter(name: str, owner: Owner) -> str:
    """A Consul filter for what one resource's plan needs from the node.

    Every instance of its service name (another owner's included: an ID it
    holds must be seen to be left alone) and every instance it owns under any
    name (left behind by a change of ``spec.name`` or ``spec.id``). An entry
    of another name on an ID this resource would use stays unseen, and the
    check-and-set guard refuses to overwrite it.
    """
    return f"Service == {_quoted(name)} or ({owner_filter(owner)})"


def checks_filter(name: str, services: Iterable[Mapping[str, Any]] = (), owner: Owner | None = None) -> str:
    """The checks of service ``name``, and of the other names ``owner``'s instances in
    ``services`` still carry.

    A change of ``spec.name`` keeps the instance IDs (they come from
    ``spec.id``), so those instances are updated in place, and their checks,
    still filed under the old name until then, must be seen: planned as absent,
    they would be written "only if absent" and Consul would roll back every
    attempt.
    """
    names = {name} | {
        str(s.get("Service", "")) for s in services if owner is not None and owner_of(s.get("Meta")) == owner
    }
    return " or ".join(f"ServiceName == {_quoted(n)}" for n in sorted(names))


def owner_filter(owner: Owner) -> str:
    return (
        f"Meta[{_quoted(api.META_CLUSTER)}] == {_quoted(owner.cluster)} and "
        f"Meta[{_quoted(api.META_NAMESPACE)}] == {_quoted(owner.namespace)} and "
        f"Meta[{_quoted(api.META_NAME)}] == {_quoted(owner.name)}"
    )


def _quoted(text: str) -> str:
    # Names, namespaces and cluster names are DNS-like; escape anyway.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

