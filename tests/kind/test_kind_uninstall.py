"""Uninstall on kind, last of the suite (pytest runs the files in name order).

What a user does to remove Tether: delete the resources first (the operator, still
running, removes what they made in Consul and etcd and lets their finalizers go),
then ``kubectl delete`` of what they applied (``-k`` of the overlay, or ``-f`` of the
release's install.yaml when ``scripts/e2e-kind.sh`` installed from it). Afterwards nothing of Tether is left
in the cluster: no CRDs, no namespace, no cluster-wide RBAC, no Lease, no webhook.
``scripts/e2e-kind.sh`` installs again on a rerun against a kept cluster.
"""

from __future__ import annotations

import json

import pytest
from kind_support import (
    INSTALL_FILE,
    OPERATOR_NAMESPACE,
    OVERLAY,
    Consul,
    Etcd,
    KindCluster,
    wait_for,
)

pytestmark = pytest.mark.kind

PART_OF = "app.kubernetes.io/part-of=tether"


def test_uninstall_leaves_nothing(
    kind_cluster: KindCluster, consul: Consul, etcd: Etcd, namespace: str
) -> None:
    prefix = f"/tether-e2e/{namespace}/bye"
    kind_cluster.apply(
        {"apiVersion": "tether.dev/v1alpha1", "kind": "ConsulService",
         "metadata": {"name": "bye", "namespace": namespace},
         "spec": {"address": "10.0.0.30", "port": 80}},
        {"apiVersion": "tether.dev/v1alpha1", "kind": "EtcdConfig",
         "metadata": {"name": "bye", "namespace": namespace},
         "spec": {"prefix": prefix, "data": {"k": "v"}}},
    )
    kind_cluster.wait_ready("consulservice", "bye", namespace)
    kind_cluster.wait_ready("etcdconfig", "bye", namespace)
    assert consul.service(f"{namespace}-bye") is not None
    assert etcd.range(prefix + "/")

    # 1. The resources, everywhere, while the operator runs: cleaned from the backends.
    kind_cluster.kubectl("delete", "consulservices,etcdconfigs", "--all", "--all-namespaces",
                         "--timeout=120s", timeout=150)
    assert consul.service(f"{namespace}-bye") is None
    assert etcd.range(prefix + "/") == {}
    # Nothing any test made is left in Consul or etcd either.
    left_in_consul = [sid for sid, svc in consul.services().items()
                      if svc.get("Meta", {}).get("external-source") == "kubernetes"]
    assert left_in_consul == [], left_in_consul
    assert etcd.range("/tether-e2e/") == {}

    # 2. Tether itself, as it was applied.
    applied = ["-f", str(INSTALL_FILE)] if INSTALL_FILE else ["-k", str(OVERLAY)]
    kind_cluster.kubectl("delete", *applied, "--timeout=180s", timeout=200)

    def leftovers() -> list[str]:
        found: list[str] = []
        crds = kind_cluster.get_json("crd")["items"]
        found += [f"crd/{c['metadata']['name']}" for c in crds
                  if c["spec"]["group"] == "tether.dev"]
        namespaces = kind_cluster.kubectl("get", "namespace", OPERATOR_NAMESPACE,
                                          "--ignore-not-found", "-o", "name").stdout.split()
        found += namespaces
        for kinds in ("clusterroles,clusterrolebindings",
                      "all,configmaps,secrets,serviceaccounts,roles,rolebindings,leases,"
                      "poddisruptionbudgets"):
            listed = kind_cluster.kubectl("get", kinds, "-A", "-l", PART_OF, "-o", "json")
            found += [f"{i['kind']}/{i['metadata']['name']}"
                      for i in json.loads(listed.stdout)["items"]]
        hooks = kind_cluster.kubectl(
            "get", "validatingwebhookconfigurations,mutatingwebhookconfigurations", "-o", "json"
        )
        found += [i["metadata"]["name"] for i in json.loads(hooks.stdout)["items"]
                  if "tether" in i["metadata"]["name"]]
        return found

    last: list[str] = []

    def gone() -> bool:
        last[:] = leftovers()
        return not last

    try:
        wait_for(gone, timeout=120, interval=2,
                 message="nothing of Tether left after `kubectl delete -k`")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still there: {last}") from None
