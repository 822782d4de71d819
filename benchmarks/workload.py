"""The benchmark's resources, and the exact backend writes and status they imply.

Both the operator phase and the floors use these builders, so that they create
the same objects and the floors make *the same* writes the operator would:
the Consul registration body comes from Tether's own pure planner, and the
etcd transaction from Tether's own etcd planner (data keys, ownership claims
and the owner index, each guarded), run against an empty store. The protocol
floor also adds Tether's finalizer (:func:`finalizer_patch`) and patches the
status the operator itself would build (:func:`operator_status`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tether import conditions
from tether.api import FINALIZER
from tether.api import configs as configs_api
from tether.api import consulservices as csvc_api
from tether.clients.etcd.values import Compare, Delete, Put
from tether.config import planner as config_planner
from tether.config.stores import etcd as etcd_store
from tether.consulservice import planner as consul_planner
from tether.reconciling import Outcome, build_status

NAMESPACE = "bench"
CLUSTER = "kubernetes"  # TETHER_CLUSTER_NAME's default; the operator runs with it
OWNERSHIP_PREFIX = "/tether/"
KEYS_PER_CONFIG = 5

CSVC = "consulservices"
ECFG = "etcdconfigs"


@dataclass(frozen=True)
class Item:
    """One resource of the workload."""

    plural: str
    name: str
    index: int

    @property
    def key(self) -> tuple[str, str]:
        return self.plural, self.name


def items(n: int) -> Iterator[Item]:
    """N ConsulServices and N EtcdConfigs, interleaved so both kinds start together."""
    for i in range(n):
        yield Item(CSVC, f"svc-{i:05d}", i)
        yield Item(ECFG, f"cfg-{i:05d}", i)


def service_id(name: str, namespace: str = NAMESPACE) -> str:
    """The contract's default Consul service ID."""
    return f"{namespace}-{name}"


def port_of(index: int) -> int:
    return 20000 + index


def consul_spec(index: int) -> dict[str, Any]:
    return {
        "address": f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}",
        "port": port_of(index),
        "tags": ["bench", f"shard-{index % 8}"],
        "meta": {"team": "bench", "index": str(index)},
    }


def prefix_of(name: str) -> str:
    return f"/bench/{name}"


def etcd_data(index: int, generation: int = 1) -> dict[str, str]:
    return {f"key-{k}": f"value-{index}-{k}-g{generation}" for k in range(KEYS_PER_CONFIG)}


def etcd_spec(name: str, index: int) -> dict[str, Any]:
    return {"prefix": prefix_of(name), "data": etcd_data(index)}


def manifest(item: Item) -> dict[str, Any]:
    if item.plural == CSVC:
        kind, spec = "ConsulService", consul_spec(item.index)
    else:
        kind, spec = "EtcdConfig", etcd_spec(item.name, item.index)
    return {
        "apiVersion": "tether.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": item.name, "namespace": NAMESPACE, "labels": {"tether.dev/bench": "1"}},
        "spec": spec,
    }


# ------------------------------------------------------------------ what the floor writes


def registration(item: Item) -> dict[str, Any]:
    """The body Tether PUTs to /v1/agent/service/register for this ConsulService."""
    spec = csvc_api.parse(NAMESPACE, item.name, consul_spec(item.index))
    owner = consul_planner.Owner(CLUSTER, NAMESPACE, item.name)
    return consul_planner.registration(spec, owner)


def transaction(item: Item) -> tuple[list[Compare], list[Put | Delete]]:
    """Tether's transaction for a new EtcdConfig over an empty store (one step)."""
    layout = config_planner.Layout(OWNERSHIP_PREFIX, rooted=True)
    spec = etcd_spec(item.name, item.index)
    desired = {
        f"{spec['prefix']}/{key}": value.encode() for key, value in spec["data"].items()
    }
    owner = config_planner.owner_id(CLUSTER, NAMESPACE, item.name)
    plan = config_planner.plan(
        owner=owner, layout=layout, desired=desired, data={}, claims={}, index=None,
        prune=True, adopt=False, kind="EtcdConfig",
    )
    (step,) = config_planner.steps(
        plan, max_ops=etcd_store.DEFAULT_MAX_TXN_OPS, max_bytes=etcd_store.MAX_TXN_BYTES
    )
    return etcd_store.transaction(step, index_key=plan.index_key, index_revision=0)


def ready_status(item: Item, generation: int, timestamp: str, extra: dict[str, Any]) -> dict[str, Any]:
    """A status like the operator's once Ready (what the floor patches)."""
    conditions = [{
        "type": "Ready", "status": "True", "reason": "Reconciled", "message": "benchmark floor",
        "lastTransitionTime": timestamp, "observedGeneration": generation,
    }]
    if item.plural == CSVC:
        conditions.insert(0, {
            "type": "Healthy", "status": "True", "reason": "Passing",
            "message": "Consul reports the instance's checks as passing",
            "lastTransitionTime": timestamp, "observedGeneration": generation,
        })
    return {"observedGeneration": generation, "conditions": conditions, **extra}


# ------------------------------------------------------------------ what the protocol floor adds


def finalizer_patch(body: dict[str, Any]) -> dict[str, Any]:
    """The operator's finalizer merge patch for a just-created object.

    Conditional on the resourceVersion, as the operator sends it
    (``KubeClient.set_finalizers``), so the API server pays the same check.
    """
    meta = body["metadata"]
    return {"metadata": {
        "finalizers": [*(meta.get("finalizers") or []), FINALIZER],
        "resourceVersion": meta["resourceVersion"],
    }}


def operator_status(
    item: Item, generation: int, timestamp: str, *, consul_url: str, revision: int = 0,
) -> dict[str, Any]:
    """The status Tether patches on a resource's first successful reconcile.

    Built by the operator's own ``build_status`` from an outcome shaped like
    the one its fixed-instance apply (Ready + Healthy, ``serviceID``,
    ``health``) or its etcd apply (Ready, ``keys``, ``revision``) returns, so
    the bytes the API server validates and stores are the operator's.
    """
    if item.plural == CSVC:
        sid = service_id(item.name)
        outcome = Outcome(
            "True", conditions.RECONCILED,
            f"Registered as {sid!r} with the Consul agent {consul_url}".rstrip(),
            fields={"serviceID": sid, "health": "passing"},
            conditions=(conditions.Condition(
                conditions.HEALTHY, "True", "Passing", "Consul reports the instance's checks as passing",
            ),),
        )
    else:
        spec = etcd_spec(item.name, item.index)
        outcome = Outcome(
            "True", conditions.RECONCILED,
            f"{KEYS_PER_CONFIG} keys under {spec['prefix']} in etcd",
            fields={"keys": KEYS_PER_CONFIG, configs_api.ETCD.revision_field: revision},
        )
    return build_status({}, outcome, generation=generation, timestamp=timestamp)
