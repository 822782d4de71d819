"""Pure planning for ConsulService: spec → desired registration → actions.

Nothing here does I/O. The reconciler hands in the spec and what the Consul
agent reports; the planner answers what to write and what status to show.
Comparison is done on normalised *signatures* so that Consul's own
re-rendering (durations, null lists, header casing) never looks like drift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tether.api import consulservices as api
from tether.api import durations

Health = Literal["passing", "warning", "critical", "unknown"]
_SEVERITY: dict[str, int] = {"passing": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True)
class Owner:
    """The resource a registration belongs to, as written into its meta."""

    cluster: str
    namespace: str
    name: str

    def meta(self) -> dict[str, str]:
        return {
            api.META_EXTERNAL_SOURCE: "kubernetes",
            api.META_CLUSTER: self.cluster,
            api.META_NAMESPACE: self.namespace,
            api.META_NAME: self.name,
        }

    def describe(self) -> str:
        return f"{self.namespace}/{self.name} in cluster {self.cluster}"


def owner_of(meta: Mapping[str, Any] | None) -> Owner | None:
    """Who owns a registration according to its meta, or None if not Tether's."""
    meta = meta or {}
    if meta.get(api.META_EXTERNAL_SOURCE) != "kubernetes":
        return None
    parts = (meta.get(api.META_CLUSTER), meta.get(api.META_NAMESPACE), meta.get(api.META_NAME))
    if not all(isinstance(p, str) and p for p in parts):
        return None
    return Owner(*parts)  # type: ignore[arg-type]


def check_id(service_id: str, check_name: str) -> str:
    """Stable check IDs, so a check is updated in place rather than re-created.

    Check IDs are agent-wide, not per service, so the ID must be a one-to-one
    function of (service ID, check name): a service ID never contains ``/``
    (``api.parse`` refuses it), so everything before the first ``/`` is the
    service ID and the rest the check name. With ``:`` as the separator, id
    ``a`` with check ``y:z`` and id ``a:y`` with check ``z`` both produced
    ``a:y:z`` and two resources rewrote each other's check forever.
    """
    return f"{service_id}/{check_name}"


def foreign_checks(
    desired: Mapping[str, Any], checks: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """Checks on the agent under one of ``desired``'s check IDs that belong elsewhere.

    Registering a check ID that exists moves that check onto the registering
    service: a foreign service's check would be taken over (its critical
    state hidden, and deleted with ours). Such a check is a conflict.
    """
    wanted = {str(c["CheckID"]) for c in desired.get("Checks") or []}
    return [
        c for c in checks
        if str(c.get("CheckID", "")) in wanted and str(c.get("ServiceID", "")) != desired["ID"]
    ]


def registration(spec: api.ConsulServiceSpec, owner: Owner) -> dict[str, Any]:
    """The body for ``PUT /v1/agent/service/register`` (Consul's field names)."""
    body: dict[str, Any] = {
        "ID": spec.id,
        "Name": spec.name,
        "Address": spec.address,
        "Port": spec.port,
        "Tags": list(spec.tags),
        "Meta": {**dict(spec.meta), **owner.meta()},
        "Checks": [_check_body(spec.id, c) for c in spec.checks],
    }
    return body


def _check_body(service_id: str, check: api.Check) -> dict[str, Any]:
    body: dict[str, Any] = {"CheckID": check_id(service_id, check.name), "Name": check.name}
    if check.kind == "http":
        body["HTTP"] = check.target
        if check.method:
            body["Method"] = check.method
        if check.header:
            body["Header"] = {k: list(v) for k, v in check.header}
        body["TLSSkipVerify"] = check.tls_skip_verify
    elif check.kind == "tcp":
        body["TCP"] = check.target
    elif check.kind == "grpc":
        body["GRPC"] = check.target
        # Without GRPCUseTLS Consul probes in plaintext and ignores TLSSkipVerify.
        body["GRPCUseTLS"] = check.grpc_use_tls
        body["TLSSkipVerify"] = check.tls_skip_verify
    else:
        body["TTL"] = durations.render(check.ttl_ns or 0)
    if check.interval_ns is not None:
        body["Interval"] = durations.render(check.interval_ns)
    if check.timeout_ns is not None:
        body["Timeout"] = durations.render(check.timeout_ns)
    if check.deregister_after_ns is not None:
        body["DeregisterCriticalServiceAfter"] = durations.render(check.deregister_after_ns)
    return body


# -- signatures: what "matches" means --------------------------------------
#
# Consul's agent and health APIs return a check's Name, Type, Interval and
# Timeout, but an empty ``Definition``: the target URL, headers, method and TTL
# are never shown (headers may hold credentials). Drift is therefore detected
# on what Consul shows; the rest is rewritten whenever anything is re-registered.

@dataclass(frozen=True)
class CheckSig:
    """The parts of a check Tether controls and Consul shows, normalised."""

    name: str
    kind: str
    interval_ns: int = 0
    timeout_ns: int = 0


@dataclass(frozen=True)
class ServiceSig:
    """The parts of a registration Tether controls, normalised for comparison."""

    id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: tuple[tuple[str, str], ...]
    checks: tuple[tuple[str, CheckSig], ...] = field(default=())


def _kind_of(check: Mapping[str, Any]) -> str:
    for key, name in (("HTTP", "http"), ("TCP", "tcp"), ("GRPC", "grpc"), ("TTL", "ttl")):
        if check.get(key):
            return name
    return ""


def desired_signature(body: Mapping[str, Any]) -> ServiceSig:
    """Signature of a registration body built by :func:`registration`."""
    checks = [
        (str(c["CheckID"]), CheckSig(
            name=str(c["Name"]), kind=_kind_of(c),
            interval_ns=_ns(c.get("Interval")), timeout_ns=_ns(c.get("Timeout")),
        ))
        for c in body.get("Checks") or []
    ]
    return ServiceSig(
        id=body["ID"],
        name=body["Name"],
        address=body.get("Address") or "",
        port=int(body.get("Port") or 0),
        tags=tuple(body.get("Tags") or ()),
        meta=tuple(sorted((body.get("Meta") or {}).items())),
        checks=tuple(sorted(checks)),
    )


def observed_signature(
    service: Mapping[str, Any], checks: Sequence[Mapping[str, Any]]
) -> ServiceSig:
    """Signature of what the agent reports: ``/v1/agent/service/:id`` plus its checks."""
    sigs = [
        (str(c.get("CheckID", "")), CheckSig(
            name=str(c.get("Name", "")), kind=str(c.get("Type", "")),
            interval_ns=_ns(c.get("Interval")), timeout_ns=_ns(c.get("Timeout")),
        ))
        for c in checks
    ]
    return ServiceSig(
        id=str(service.get("ID", "")),
        name=str(service.get("Service", "")),
        address=service.get("Address") or "",
        port=int(service.get("Port") or 0),
        tags=tuple(service.get("Tags") or ()),
        meta=tuple(sorted((service.get("Meta") or {}).items())),
        checks=tuple(sorted(sigs)),
    )


def _ns(value: Any) -> int:
    """A duration as Consul renders it: Go text ("10s") or integer nanoseconds."""
    if value in (None, "", 0):
        return 0
    if isinstance(value, int | float):
        return int(value)
    return durations.parse_ns(str(value), field="consul")


def differences(desired: ServiceSig, observed: ServiceSig) -> list[str]:
    """Human-readable differences (field names only: never values of meta or headers)."""
    out = []
    for attr in ("name", "address", "port"):
        if getattr(desired, attr) != getattr(observed, attr):
            out.append(f"{attr} {getattr(observed, attr)!r} → {getattr(desired, attr)!r}")
    if set(desired.tags) != set(observed.tags) or len(desired.tags) != len(observed.tags):
        out.append("tags")
    if desired.meta != observed.meta:
        out.append("meta")
    want, have = dict(desired.checks), dict(observed.checks)
    for cid in sorted(want.keys() - have.keys()):
        out.append(f"check {want[cid].name!r} missing")
    for cid in sorted(have.keys() - want.keys()):
        out.append(f"unexpected check {cid!r}")
    for cid in sorted(want.keys() & have.keys()):
        if want[cid] != have[cid]:
            out.append(f"check {want[cid].name!r} differs")
    return out


# -- health ------------------------------------------------------------------

def aggregate_health(statuses: Sequence[str]) -> Health:
    """Consul's aggregate: the worst check wins; no checks means passing."""
    worst = 0
    for status in statuses:
        if status not in _SEVERITY:
            return "unknown"
        worst = max(worst, _SEVERITY[status])
    levels: tuple[Health, ...] = ("passing", "warning", "critical")
    return levels[worst]


# -- the plan ------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What to do for one ConsulService."""

    register: dict[str, Any] | None = None  # body to PUT, or None when in place
    deregister: tuple[str, ...] = ()  # stale IDs this resource owns (moves)
    conflict: str | None = None  # message; nothing is written
    changes: tuple[str, ...] = ()  # what differed (for events)
    created: bool = False


def plan(
    desired: dict[str, Any],
    owner: Owner,
    observed_service: Mapping[str, Any] | None,
    observed_checks: Sequence[Mapping[str, Any]],
    stale: Mapping[str, Mapping[str, Any] | None],
    *,
    other_checks: Sequence[Mapping[str, Any]] = (),
) -> Plan:
    """Decide the writes for one resource.

    ``stale`` maps other service IDs this resource may have registered before
    (a previous ``spec.id``) to what the agent holds there now (None: absent).
    ``other_checks`` are agent checks under the desired check IDs, whatever
    service they belong to (see :func:`foreign_checks`).
    """
    deregister = tuple(
        sorted(sid for sid, svc in stale.items() if svc is not None and owner_of(svc.get("Meta")) == owner)
    )
    taken = foreign_checks(desired, other_checks)
    if taken:
        first = taken[0]
        holder = str(first.get("ServiceID") or "") or "the agent's node (no service)"
        return Plan(
            conflict=(
                f"Consul check ID {first.get('CheckID')!r} already belongs to {holder!r}; "
                "Tether will not take over a check it does not own. Remove that check from "
                "Consul, or rename the check in spec.checks."
            ),
        )
    if observed_service is not None:
        current = owner_of(observed_service.get("Meta"))
        if current != owner:
            who = current.describe() if current else "something outside Tether"
            return Plan(
                conflict=(
                    f"Consul service ID {desired['ID']!r} is already registered by {who}; "
                    "Tether will not change or remove it. Remove it from Consul, or set spec.id "
                    "to another ID."
                ),
            )
        diff = differences(desired_signature(desired), observed_signature(observed_service, observed_checks))
        if not diff:
            return Plan(deregister=deregister)
        return Plan(register=desired, deregister=deregister, changes=tuple(diff))
    return Plan(register=desired, deregister=deregister, changes=("not registered",), created=True)


def release(owner: Owner, observed: Mapping[str, Mapping[str, Any] | None]) -> tuple[str, ...]:
    """The service IDs to let go of when the resource is deleted.

    ``observed`` maps every ID the resource may have registered (its status,
    its spec, the owner index) to what the agent holds there now. Exactly the
    registrations whose meta names this owner go (deregistered with
    ``Delete``, released with ``Orphan``); a foreign one under the same ID is
    never touched.
    """
    return tuple(
        sorted(sid for sid, svc in observed.items() if svc is not None and owner_of(svc.get("Meta")) == owner)
    )


def released(service: Mapping[str, Any]) -> dict[str, Any]:
    """The body that re-registers ``service`` (as the agent shows it) without Tether's claim.

    What ``deletionPolicy: Orphan`` means in Consul: the registration stays,
    but its meta no longer names an owner, exactly as etcd's claims are
    dropped. Keeping the ownership meta would let a later resource of the
    same namespace/name find it through the owner index and deregister it.
    The body carries no ``Checks`` and is sent without
    ``replace-existing-checks``: the agent keeps the running checks as they
    are (their definitions are not readable back, so they cannot be resent).
    ``external-source`` stays: it says where the registration came from, not
    who owns it.
    """
    meta = {
        k: v for k, v in (service.get("Meta") or {}).items()
        if k not in (api.META_CLUSTER, api.META_NAMESPACE, api.META_NAME)
    }
    body: dict[str, Any] = {
        "ID": service.get("ID"),
        "Name": service.get("Service"),
        "Address": service.get("Address") or "",
        "Port": int(service.get("Port") or 0),
        "Tags": list(service.get("Tags") or ()),
        "Meta": meta,
    }
    for key in ("Weights", "EnableTagOverride"):
        if service.get(key) is not None:
            body[key] = service[key]
    return body
