"""RBAC proven: the operator runs with only the ServiceAccount token that manifests/ grants.

`kubectl apply -k manifests/` installs everything on the dev stack (its pods never
run there: there are no nodes). The test then asks the API server for a token of the
operator's ServiceAccount (TokenRequest), runs the operator as a process with a
kubeconfig that holds only that token, and shows both kinds reconcile — including a
ConfigMap and a Secret read, events, and the leader Lease. A second ServiceAccount
with one permission removed shows that a missing permission is reported on the
resource, not swallowed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether_dev.harness import devstack
from tether_dev.harness.kube import (
    apply,
    condition,
    delete_namespace,
    events,
    kubectl,
    resource,
    wait_condition,
)
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

NAMESPACE = "tether-system"


@pytest.fixture(scope="module")
def installed(dev_env: dict[str, str]) -> Iterator[dict[str, str]]:
    kubectl(dev_env, "apply", "-k", str(devstack.REPO / "manifests"))
    yield dev_env
    delete_namespace(dev_env, NAMESPACE)


def token_kubeconfig(env: dict[str, str], service_account: str, path: Path) -> Path:
    """A kubeconfig with the cluster of ``env`` and a fresh token of ``service_account``."""
    admin = yaml.safe_load(Path(env["KUBECONFIG"]).read_text())
    cluster = admin["clusters"][0]["cluster"]
    token = kubectl(env, "create", "token", service_account, "-n", NAMESPACE, "--duration=1h").stdout.strip()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "sa",
        "clusters": [{"name": "dev", "cluster": cluster}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "dev", "user": service_account}}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def workload(env: dict[str, str], ns: str, prefix: str) -> None:
    kubectl(env, "create", "configmap", "app-config", "-n", ns, "--from-literal=mode=blue")
    kubectl(env, "create", "secret", "generic", "app-secret", "-n", ns, "--from-literal=password=hunter2")
    apply(env, ns, resource("ConsulService", "web", {"port": 80}))
    sources = [{"configMapRef": {"name": "app-config"}}, {"secretRef": {"name": "app-secret"}}]
    apply(env, ns, resource("EtcdConfig", "cfg", {"prefix": prefix, "from": sources}))


def run_as(env: dict[str, str], kubeconfig: Path, ns: str, log: Path, *extra: str) -> OperatorProcess:
    return OperatorProcess(
        {**env, "KUBECONFIG": str(kubeconfig)},
        log,
        args=("-n", ns, *extra),
        extra_env={
            "POD_NAME": f"rbac-{uuid.uuid4().hex[:4]}",
            "POD_NAMESPACE": NAMESPACE,
            "TETHER_LEASE_NAME": f"rbac-{uuid.uuid4().hex[:6]}",
        },
        verbose=True,
    ).start()


def cleanup(env: dict[str, str], ns: str, log: Path) -> None:
    """Release finalizers with an admin operator, then remove the namespace."""
    op = OperatorProcess(env, log, args=("-n", ns), verbose=True).start()
    try:
        kubectl(env, "delete", "consulservices,etcdconfigs", "--all", "-n", ns, "--timeout=60s")
    finally:
        op.stop()
    delete_namespace(env, ns)


def test_operator_works_with_only_its_service_account(installed: dict[str, str], tmp_path: Path) -> None:
    env = installed
    ns = f"x-rbac-{uuid.uuid4().hex[:6]}"
    kubectl(env, "create", "namespace", ns)
    kubeconfig = token_kubeconfig(env, "tether", tmp_path / "kubeconfig")
    # The token really is the ServiceAccount's, and it is not an admin.
    who = kubectl({**env, "KUBECONFIG": str(kubeconfig)}, "auth", "whoami", "-o", "json")
    assert (
        json.loads(who.stdout)["status"]["userInfo"]["username"]
        == f"system:serviceaccount:{NAMESPACE}:tether"
    )
    # (Not Pods: the readiness gate reads them.)
    denied = kubectl({**env, "KUBECONFIG": str(kubeconfig)}, "get", "deployments", "-n", ns, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    op = run_as(env, kubeconfig, ns, tmp_path / "op.log", "--leader-elect")
    try:
        workload(env, ns, f"/rbac/{uuid.uuid4().hex[:8]}")
        wait_condition(env, ns, "consulservice", "web", op=op)
        obj = wait_condition(env, ns, "etcdconfig", "cfg", op=op)
        assert obj["status"]["keys"] == 2
        # A routine creation posts no event; a change does, and the role allows it.
        apply(env, ns, resource("ConsulService", "web", {"port": 81}))
        wait_for(lambda: "Updated" in {e["reason"] for e in events(env, ns, "web")},
                 timeout=20, interval=0.3, message="an Updated event under the install's RBAC")
        assert op.metrics().get("tether_leader") == 1.0
        kubectl(env, "delete", "consulservice", "web", "-n", ns, "--timeout=30s")
    finally:
        op.stop()
    cleanup(env, ns, tmp_path / "cleanup.log")


def test_a_missing_permission_is_reported(installed: dict[str, str], tmp_path: Path) -> None:
    env = installed
    ns = f"x-rbac-{uuid.uuid4().hex[:6]}"
    kubectl(env, "create", "namespace", ns)
    # The operator's ClusterRole minus "secrets", bound to another ServiceAccount.
    role: dict[str, Any] = json.loads(kubectl(env, "get", "clusterrole", "tether", "-o", "json").stdout)
    rules = []
    for rule in role["rules"]:
        if "secrets" in rule.get("resources", []):
            rule = {**rule, "resources": [r for r in rule["resources"] if r != "secrets"]}
        rules.append(rule)
    name = f"tether-limited-{uuid.uuid4().hex[:4]}"
    objects = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": NAMESPACE}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}],
        },
    ]
    kubectl(env, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    kubeconfig = token_kubeconfig(env, name, tmp_path / "kubeconfig")
    op = run_as(env, kubeconfig, ns, tmp_path / "op.log")
    try:
        workload(env, ns, f"/rbac/{uuid.uuid4().hex[:8]}")
        wait_condition(env, ns, "consulservice", "web", op=op)  # unaffected
        obj = wait_condition(env, ns, "etcdconfig", "cfg", status="False", reason="BackendRejected", op=op)
        message = condition(obj)["message"]
        assert "403" in message and "secrets" in message and name in message, message
        wait_for(
            lambda: any("403" in (e.get("message") or "") for e in events(env, ns, "cfg")),
            timeout=10,
            interval=0.3,
            message="a warning event about the missing permission",
        )
        assert "hunter2" not in message
    finally:
        op.stop()
        kubectl(env, "delete", "clusterrolebinding,clusterrole", name, check=False)
        kubectl(env, "delete", "serviceaccount", name, "-n", NAMESPACE, check=False)
    cleanup(env, ns, tmp_path / "cleanup.log")
