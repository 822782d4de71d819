"""TetherPolicy end to end: two teams on one cluster, one Consul, one etcd.

Policies are cluster-wide and reserve what they allow against every other
namespace, so each test uses names, prefixes and namespace labels of its own
(a random suffix) and deletes its policies afterwards: other tests on the same
dev stack never see a policy that concerns them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether_dev.harness.consul import Consul
from tether_dev.harness.etcd import Etcd
from tether_dev.harness.kube import (
    apply,
    condition,
    delete_namespace,
    get,
    kubectl,
    resource,
    wait_condition,
)
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

Env = dict[str, str]
LABEL = "e2e.tether.dev/team"


def _apply_policy(env: Env, name: str, spec: dict[str, Any]) -> None:
    obj = resource("TetherPolicy", name, spec)
    kubectl(env, "apply", "-f", "-", input=yaml.safe_dump(obj))


def _policy(env: Env, name: str) -> dict[str, Any]:
    done = kubectl(env, "get", "tetherpolicy", name, "-o", "json")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture
def policies(dev_env: Env) -> Iterator[Callable[[str, dict[str, Any]], str]]:
    """``put(name, spec)`` applies a TetherPolicy (name made unique); all deleted afterwards."""
    suffix = uuid.uuid4().hex[:6]
    made: set[str] = set()

    def put(name: str, spec: dict[str, Any]) -> str:
        full = f"{name}-{suffix}"
        _apply_policy(dev_env, full, spec)
        made.add(full)
        return full

    yield put
    for name in sorted(made):
        kubectl(dev_env, "delete", "tetherpolicy", name, "--ignore-not-found", check=False)


@pytest.fixture
def team_b(dev_env: Env, operator: OperatorProcess) -> Iterator[str]:
    """A second namespace the shared operator serves ("t-…"), removed afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl(dev_env, "create", "namespace", name)
    yield name
    kinds = "consulservices,etcdconfigs"
    kubectl(dev_env, "delete", kinds, "--all", "-n", name, "--timeout=60s", check=False)
    delete_namespace(dev_env, name)


def _label(env: Env, namespace: str, team: str) -> None:
    kubectl(env, "label", "namespace", namespace, f"{LABEL}={team}", "--overwrite")


def _instances(env: Env, service: str) -> list[dict[str, Any]]:
    """What Consul hands to clients of ``service`` (the health endpoint: what DNS serves)."""
    result: list[dict[str, Any]] = Consul.from_env(env).call("GET", f"/v1/health/service/{service}") or []
    return result


def _addresses(env: Env, service: str) -> set[str]:
    return {str(e["Service"]["Address"]) for e in _instances(env, service)}


def test_a_team_cannot_register_another_teams_service_name(
    dev_env: Env, operator: OperatorProcess, namespace: str, team_b: str,
    policies: Callable[[str, dict[str, Any]], str],
) -> None:
    tag = uuid.uuid4().hex[:6]
    service = f"payments-{tag}"
    _label(dev_env, namespace, f"a-{tag}")
    _label(dev_env, team_b, f"b-{tag}")
    pol_a = policies("team-a", {
        "namespaceSelector": {"matchLabels": {LABEL: f"a-{tag}"}}, "consulServiceNames": [service],
    })
    apply(dev_env, namespace, resource("ConsulService", "payments", {
        "name": service, "address": "10.0.0.1", "port": 8080,
    }))
    wait_condition(dev_env, namespace, "consulservice", "payments", op=operator)
    # team-b, selected by no policy and with the default allow, tries the same name.
    apply(dev_env, team_b, resource("ConsulService", "payments", {
        "name": service, "address": "6.6.6.6", "port": 8080,
    }))
    obj = wait_condition(
        dev_env, team_b, "consulservice", "payments", status="False", reason="Forbidden", op=operator
    )
    message = condition(obj)["message"]
    assert service in message and pol_a in message, message
    assert _addresses(dev_env, service) == {"10.0.0.1"}, "the victim's instance alone, untouched"
    # The policy says what it does.
    wait_for(
        lambda: (_policy(dev_env, pol_a).get("status") or {}).get("forbidden") == 1,
        timeout=15, message="the policy to count one refused resource",
    )
    status = _policy(dev_env, pol_a)["status"]
    assert status["namespaces"] == 1
    assert condition({"status": status})["status"] == "True"


def test_an_etcd_prefix_of_another_team_is_refused_above_and_below(
    dev_env: Env, operator: OperatorProcess, namespace: str, team_b: str,
    policies: Callable[[str, dict[str, Any]], str],
) -> None:
    tag = uuid.uuid4().hex[:6]
    base = f"/e2e-policy/{tag}"
    _label(dev_env, namespace, f"a-{tag}")
    policies("team-a", {
        "namespaceSelector": {"matchLabels": {LABEL: f"a-{tag}"}}, "etcdPrefixes": [f"{base}/a"],
    })
    apply(dev_env, team_b, resource("EtcdConfig", "under", {"prefix": f"{base}/a/x", "data": {"k": "x"}}))
    apply(dev_env, team_b, resource("EtcdConfig", "above", {"prefix": base, "data": {"a/k": "stolen"}}))
    apply(dev_env, team_b, resource("EtcdConfig", "beside", {"prefix": f"{base}/ab", "data": {"k": "mine"}}))
    for name in ("under", "above"):
        wait_condition(dev_env, team_b, "etcdconfig", name, status="False", reason="Forbidden", op=operator)
    wait_condition(dev_env, team_b, "etcdconfig", "beside", op=operator)
    assert Etcd.from_env(dev_env).keys(f"{base}/a/") == {}, "nothing written under the reserved prefix"
    assert Etcd.from_env(dev_env).keys(f"{base}/ab/") == {f"{base}/ab/k": "mine"}


def test_a_policy_edit_withdraws_and_restores(
    dev_env: Env, operator: OperatorProcess, namespace: str, policies: Callable[[str, dict[str, Any]], str],
) -> None:
    tag = uuid.uuid4().hex[:6]
    service, prefix = f"orders-{tag}", f"/e2e-policy/{tag}"
    _label(dev_env, namespace, f"a-{tag}")
    allowing = {
        "namespaceSelector": {"matchLabels": {LABEL: f"a-{tag}"}},
        "consulServiceNames": [service], "etcdPrefixes": [prefix],
    }
    pol = policies("team-a", allowing)
    apply(dev_env, namespace, resource("ConsulService", "orders", {
        "name": service, "address": "10.0.0.2", "port": 80,
    }))
    apply(dev_env, namespace, resource("EtcdConfig", "cfg", {"prefix": prefix, "data": {"k": "v"}}))
    wait_condition(dev_env, namespace, "consulservice", "orders", op=operator)
    wait_condition(dev_env, namespace, "etcdconfig", "cfg", op=operator)
    assert _addresses(dev_env, service) == {"10.0.0.2"}

    # The namespace stays selected (restricted) but loses both.
    started = time.monotonic()
    _apply_policy(dev_env, pol, {
        **allowing, "consulServiceNames": [f"other-{tag}"], "etcdPrefixes": [f"/elsewhere-{tag}"],
    })
    for kind, name in (("consulservice", "orders"), ("etcdconfig", "cfg")):
        wait_condition(
            dev_env, namespace, kind, name, status="False", reason="Forbidden", timeout=10, op=operator
        )
    wait_for(lambda: not _instances(dev_env, service), timeout=5, message="the instance withdrawn")
    assert time.monotonic() - started < 15, "enforced within 10 s (plus kubectl's own time)"
    etcd = Etcd.from_env(dev_env)
    assert etcd.keys(prefix + "/") == {f"{prefix}/k": "v"}, "a policy change never deletes config"
    # Tampering is not repaired while forbidden.
    etcd.put(f"{prefix}/k", "tampered")
    time.sleep(3)
    assert etcd.get(f"{prefix}/k") == "tampered"

    # Allowed again: registered again, and the key restored.
    _apply_policy(dev_env, pol, allowing)
    wait_condition(dev_env, namespace, "consulservice", "orders", timeout=15, op=operator)
    wait_condition(dev_env, namespace, "etcdconfig", "cfg", timeout=15, op=operator)
    wait_for(lambda: _addresses(dev_env, service) == {"10.0.0.2"}, timeout=10, message="the instance back")
    assert etcd.get(f"{prefix}/k") == "v"


# -- endpoints mode: the Services and EndpointSlices are written here, as the
# EndpointSlice controller would (the dev stack runs no kube-controller-manager).

NODE = "tether-kubernetes"  # the synthetic catalog node of the shared operator (cluster "kubernetes")


def _service_with_slice(env: Env, namespace: str, name: str, addresses: list[str]) -> None:
    """A Service ``name`` with port ``http`` (80 → 8080) and one slice of ready endpoints."""
    apply(env, namespace, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
    apply(env, namespace, {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-a", "labels": {
            "kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "e2e.tether.dev",
        }},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": True, "serving": True, "terminating": False}}
            for a in addresses
        ],
    })


def _catalog_instances(env: Env, namespace: str, name: str) -> set[str]:
    """Addresses of the synthetic node's catalog instances owned by ``namespace/name``."""
    got = Consul.from_env(env).call("GET", f"/v1/catalog/node-services/{NODE}") or {}
    return {
        str(s["Address"]) for s in got.get("Services") or []
        if ((s.get("Meta") or {}).get("tether-namespace"), (s.get("Meta") or {}).get("tether-name"))
        == (namespace, name)
    }


def test_endpoints_mode_cannot_register_another_teams_service_name(
    dev_env: Env, operator: OperatorProcess, namespace: str, team_b: str,
    policies: Callable[[str, dict[str, Any]], str],
) -> None:
    tag = uuid.uuid4().hex[:6]
    service = f"payments-{tag}"
    _label(dev_env, namespace, f"a-{tag}")
    _label(dev_env, team_b, f"b-{tag}")
    pol_a = policies("team-a", {
        "namespaceSelector": {"matchLabels": {LABEL: f"a-{tag}"}}, "consulServiceNames": [service],
    })
    # team-a's own instances, in endpoints mode on the shared synthetic node.
    _service_with_slice(dev_env, namespace, "payments", ["10.2.0.1", "10.2.0.2"])
    apply(dev_env, namespace, resource("ConsulService", "payments", {
        "name": service, "endpoints": {"service": "payments", "port": "http"},
    }))
    wait_condition(dev_env, namespace, "consulservice", "payments", op=operator)
    wait_for(lambda: _addresses(dev_env, service) == {"10.2.0.1", "10.2.0.2"}, timeout=10,
             message="team-a's instances in the catalog")
    victim = Consul.from_env(dev_env).call("GET", f"/v1/catalog/service/{service}")
    # team-b (selected by no policy, default allow) points the same name at its own endpoints.
    _service_with_slice(dev_env, team_b, "payments", ["6.6.6.6"])
    apply(dev_env, team_b, resource("ConsulService", "payments", {
        "name": service, "endpoints": {"service": "payments", "port": "http"},
    }))
    obj = wait_condition(
        dev_env, team_b, "consulservice", "payments", status="False", reason="Forbidden", op=operator
    )
    message = condition(obj)["message"]
    assert service in message and pol_a in message, message
    # A change of the slice would reach Consul within 1 s if it were allowed: give it 3.
    _service_with_slice(dev_env, team_b, "payments", ["6.6.6.6", "6.6.6.7"])
    time.sleep(3)
    assert _catalog_instances(dev_env, team_b, "payments") == set(), "nothing of team-b's in the catalog"
    assert _addresses(dev_env, service) == {"10.2.0.1", "10.2.0.2"}
    after = Consul.from_env(dev_env).call("GET", f"/v1/catalog/service/{service}")
    untouched = ("ID", "ServiceID", "ServiceAddress", "ServicePort", "ServiceMeta", "ModifyIndex")
    assert [{k: e[k] for k in untouched} for e in after] == [{k: e[k] for k in untouched} for e in victim], (
        "the victim's catalog entries not rewritten"
    )


def test_a_policy_edit_withdraws_and_restores_endpoints_mode(
    dev_env: Env, operator: OperatorProcess, namespace: str, policies: Callable[[str, dict[str, Any]], str],
) -> None:
    tag = uuid.uuid4().hex[:6]
    service = f"catalog-{tag}"
    _label(dev_env, namespace, f"a-{tag}")
    allowing = {"namespaceSelector": {"matchLabels": {LABEL: f"a-{tag}"}}, "consulServiceNames": [service]}
    pol = policies("team-a", allowing)
    _service_with_slice(dev_env, namespace, "web", ["10.3.0.1", "10.3.0.2"])
    apply(dev_env, namespace, resource("ConsulService", "web", {
        "name": service, "endpoints": {"service": "web", "port": 80},
    }))
    wait_condition(dev_env, namespace, "consulservice", "web", op=operator)
    wait_for(lambda: _catalog_instances(dev_env, namespace, "web") == {"10.3.0.1", "10.3.0.2"},
             timeout=10, message="the catalog instances")

    started = time.monotonic()
    _apply_policy(dev_env, pol, {**allowing, "consulServiceNames": [f"other-{tag}"]})
    wait_condition(dev_env, namespace, "consulservice", "web", status="False", reason="Forbidden",
                   timeout=10, op=operator)
    wait_for(lambda: not _catalog_instances(dev_env, namespace, "web"), timeout=10,
             message="the catalog instances withdrawn")
    took = time.monotonic() - started
    print(f"endpoints-mode instances withdrawn {took:.2f}s after the policy edit")
    assert took < 15, "withdrawn within 10 s (plus kubectl's own time)"
    assert not _instances(dev_env, service), "Consul hands out nothing for the service"

    _apply_policy(dev_env, pol, allowing)
    wait_condition(dev_env, namespace, "consulservice", "web", timeout=15, op=operator)
    wait_for(lambda: _catalog_instances(dev_env, namespace, "web") == {"10.3.0.1", "10.3.0.2"},
             timeout=10, message="the catalog instances back")


def test_an_invalid_policy_says_so_and_affects_nothing_else(
    dev_env: Env, operator: OperatorProcess, policies: Callable[[str, dict[str, Any]], str],
) -> None:
    tag = uuid.uuid4().hex[:6]
    name = policies("broken", {
        "namespaceSelector": {"matchExpressions": [{"key": LABEL, "operator": "In", "values": []}]},
        "consulServiceNames": [f"never-{tag}"],
    })

    def reported() -> dict[str, Any]:
        status = _policy(dev_env, name).get("status") or {}
        return condition({"status": status}) if condition({"status": status}).get("status") == "False" else {}

    ready = wait_for(reported, timeout=15, message="the policy's Ready=False")
    assert ready["reason"] == "InvalidSpec" and "values" in ready["message"]
    assert _policy(dev_env, name)["status"]["namespaces"] == 0


def test_default_deny(dev_env: Env, tmp_path: Path, policies: Callable[[str, dict[str, Any]], str]) -> None:
    """TETHER_POLICY_DEFAULT=deny: a namespace no policy selects gets nothing until one does."""
    tag = uuid.uuid4().hex[:6]
    ns = f"pd-{tag}"  # served by this test's own operator only
    kubectl(dev_env, "create", "namespace", ns)
    op = OperatorProcess(
        dev_env, tmp_path / "operator.log", args=("-n", ns), extra_env={"TETHER_POLICY_DEFAULT": "deny"},
        verbose=True,
    ).start(timeout=60)
    prefix = f"/e2e-policy/{tag}"
    try:
        apply(dev_env, ns, resource("EtcdConfig", "cfg", {"prefix": prefix, "data": {"k": "v"}}))
        obj = wait_condition(dev_env, ns, "etcdconfig", "cfg", status="False", reason="Forbidden", op=op)
        assert "TETHER_POLICY_DEFAULT" in condition(obj)["message"]
        assert Etcd.from_env(dev_env).keys(prefix + "/") == {}
        _label(dev_env, ns, f"d-{tag}")
        policies("team-d", {
            "namespaceSelector": {"matchLabels": {LABEL: f"d-{tag}"}}, "etcdPrefixes": [prefix],
        })
        wait_condition(dev_env, ns, "etcdconfig", "cfg", timeout=15, op=op)
        assert Etcd.from_env(dev_env).keys(prefix + "/") == {f"{prefix}/k": "v"}
    finally:
        kubectl(dev_env, "delete", "etcdconfigs", "--all", "-n", ns, "--timeout=60s", check=False)
        op.stop(grace=20)
        delete_namespace(dev_env, ns)
        assert get(dev_env, ns, "etcdconfig", "cfg") is None


# -- RBAC: who may write a policy ---------------------------------------------------------------

AGGREGATED_ROLES = Path(__file__).resolve().parents[2] / "manifests" / "aggregated_roles.yaml"


def _aggregate(env: Env, role: str, copy: str) -> None:
    """ClusterRole ``copy``: what the aggregation controller makes of built-in ``role``.

    The dev stack runs no kube-controller-manager, so the built-in ``edit`` and
    ``view`` keep their aggregation rule but never receive the rules of the roles
    their selectors pick. This does the controller's work into a copy: the union
    of the rules of every ClusterRole the ``aggregationRule`` selects (Tether's
    ``tether-edit``/``tether-view`` among them, by their labels).
    """
    built_in = json.loads(kubectl(env, "get", "clusterrole", role, "-o", "json").stdout)
    rules: list[dict[str, Any]] = []
    for selector in built_in["aggregationRule"]["clusterRoleSelectors"]:
        labels = ",".join(f"{k}={v}" for k, v in selector["matchLabels"].items())
        picked = json.loads(kubectl(env, "get", "clusterroles", "-l", labels, "-o", "json").stdout)
        rules += [r for item in picked["items"] for r in item.get("rules") or [] if r not in rules]
    obj = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
           "metadata": {"name": copy}, "rules": rules}
    kubectl(env, "apply", "-f", "-", input=json.dumps(obj))


def _binding(kind: str, name: str, role: str, user: str, namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name} | ({"namespace": namespace} if namespace else {})
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }


def test_edit_users_cannot_write_policies_and_view_users_can_read_them(
    dev_env: Env, operator: OperatorProcess, namespace: str, policies: Callable[[str, dict[str, Any]], str],
) -> None:
    """Users made by impersonation (``kubectl --as``): the admin kubeconfig may impersonate.

    Three users: one bound to ``edit`` in ``namespace`` (the usual team member),
    one bound to ``edit`` cluster-wide (so a 403 on the cluster-scoped kind comes
    from the role's rules, not merely from the binding's scope), one bound to
    ``view`` cluster-wide (a policy is cluster-scoped: only a ClusterRoleBinding
    can let anyone read it).
    """
    tag = uuid.uuid4().hex[:6]
    kubectl(dev_env, "apply", "-f", str(AGGREGATED_ROLES))
    edit, view = f"e2e-edit-{tag}", f"e2e-view-{tag}"
    ns_editor, cluster_editor, viewer = f"ns-editor-{tag}", f"cluster-editor-{tag}", f"viewer-{tag}"
    _aggregate(dev_env, "edit", edit)
    _aggregate(dev_env, "view", view)
    bindings = [
        _binding("RoleBinding", ns_editor, edit, ns_editor, namespace),
        _binding("ClusterRoleBinding", cluster_editor, edit, cluster_editor),
        _binding("ClusterRoleBinding", viewer, view, viewer),
    ]
    listed_bindings = {"apiVersion": "v1", "kind": "List", "items": bindings}
    kubectl(dev_env, "apply", "-f", "-", input=json.dumps(listed_bindings))
    existing = policies("existing", {"namespaceSelector": {"matchLabels": {LABEL: f"nobody-{tag}"}}})
    mine = resource("TetherPolicy", f"mine-{tag}", {"namespaceSelector": {}, "consulServiceNames": ["*"]})
    mine_yaml = yaml.safe_dump(mine)

    def as_user(user: str, *args: str, **kw: Any) -> Any:
        return kubectl(dev_env, "--as", user, *args, check=False, **kw)

    def forbidden(done: Any, verb: str) -> None:
        assert done.returncode != 0, done.stdout
        assert "(Forbidden)" in done.stderr and f'cannot {verb} resource "tetherpolicies"' in done.stderr, (
            done.stderr
        )

    try:
        # The aggregated roles really carry Tether's rules: without them nothing below could pass.
        created = as_user(ns_editor, "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(
            resource("ConsulService", "web", {"address": "10.0.0.9", "port": 80})))
        assert created.returncode == 0, created.stderr
        wait_condition(dev_env, namespace, "consulservice", "web", op=operator)
        assert as_user(viewer, "get", "consulservice", "web", "-n", namespace).returncode == 0

        for editor in (ns_editor, cluster_editor):
            forbidden(as_user(editor, "create", "-f", "-", input=mine_yaml), "create")
            # kubectl's patch and label read the object first (and fail on get): ask the authorizer.
            can_patch = as_user(editor, "auth", "can-i", "patch", "tetherpolicies.tether.dev")
            assert can_patch.stdout.strip() == "no", can_patch
            current = _policy(dev_env, existing)
            current["spec"]["consulServiceNames"] = ["*"]
            forbidden(as_user(editor, "replace", "-f", "-", input=json.dumps(current)), "update")
            forbidden(as_user(editor, "delete", "tetherpolicy", existing), "delete")

        # An editor may read them (cluster-scoped: through a ClusterRoleBinding only),
        # to see why a resource of theirs is Forbidden.
        read = as_user(cluster_editor, "get", "tetherpolicy", existing, "-o", "name")
        assert read.returncode == 0 and existing in read.stdout, read
        listed = as_user(viewer, "get", "tetherpolicies", "-o", "name")
        assert listed.returncode == 0 and f"tetherpolicy.tether.dev/{existing}" in listed.stdout, listed
        got = as_user(viewer, "get", "tetherpolicy", existing, "-o", "json")
        assert got.returncode == 0 and json.loads(got.stdout)["metadata"]["name"] == existing
        forbidden(as_user(viewer, "create", "-f", "-", input=mine_yaml), "create")
        forbidden(as_user(viewer, "delete", "tetherpolicy", existing), "delete")
        assert _policy(dev_env, existing)["spec"].get("consulServiceNames") is None, "the policy unchanged"
    finally:
        gone = "--ignore-not-found"
        kubectl(dev_env, "delete", "tetherpolicy", f"mine-{tag}", gone, check=False)
        kubectl(dev_env, "delete", "rolebinding", ns_editor, "-n", namespace, gone, check=False)
        kubectl(dev_env, "delete", "clusterrolebinding", cluster_editor, viewer, gone, check=False)
        kubectl(dev_env, "delete", "clusterrole", edit, view, gone, check=False)


ADMISSION = Path(__file__).resolve().parents[2] / "manifests" / "components" / "policy-admission"


def test_the_admission_component_rejects_at_apply(dev_env: Env) -> None:
    """The optional CEL component: a name outside the team convention, or adopt, never gets stored."""
    tag = uuid.uuid4().hex[:6]
    ns, team = f"adm-{tag}", f"team{tag}"
    objects = str(ADMISSION / "validating_admission_policies.yaml")
    kubectl(dev_env, "create", "namespace", ns)
    kubectl(dev_env, "label", "namespace", ns, f"tether.dev/team={team}")
    kubectl(dev_env, "apply", "-f", objects)

    def dry_run(obj: dict[str, Any]) -> Any:
        obj["metadata"]["namespace"] = ns
        manifest = yaml.safe_dump(obj)
        return kubectl(dev_env, "create", "--dry-run=server", "-f", "-", input=manifest, check=False)

    try:
        hijack = resource("ConsulService", "p", {"name": "payments", "address": "6.6.6.6", "port": 80})
        # The API server compiles a new admission policy a moment after it is created.
        refused = wait_for(lambda: (r := dry_run(hijack)).returncode != 0 and r, timeout=30,
                           message="the admission policy to take effect")
        assert "payments" in refused.stderr and "not allowed" in refused.stderr, refused.stderr
        own = resource("ConsulService", "p", {"name": f"{team}-api", "address": "10.0.0.1", "port": 80})
        assert dry_run(own).returncode == 0
        adopt = resource("EtcdConfig", "c", {"prefix": f"/{team}/x", "adopt": True})
        assert "adopt" in dry_run(adopt).stderr
        assert dry_run(resource("EtcdConfig", "c", {"prefix": f"/{team}/x"})).returncode == 0
        assert "not allowed" in dry_run(resource("ConsulConfig", "c", {"prefix": "other"})).stderr
    finally:
        kubectl(dev_env, "delete", "-f", objects, "--ignore-not-found", check=False)
        delete_namespace(dev_env, ns)
