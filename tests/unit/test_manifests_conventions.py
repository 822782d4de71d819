"""Operating conventions in the install files (issue 14): least-privilege RBAC with
no unused verb, aggregated edit/view roles, recommended labels, an optional
monitoring component, CRDs that point users at user documents only. Read
straight from the YAML (the e2e suite renders them with kustomize too)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tether import metrics
from tether.api import ObjectRef
from tether.reconciling import Controller

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
KINDS = {"consulservices", "etcdconfigs", "consulconfigs"}
RECOMMENDED = {
    "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
    "app.kubernetes.io/component", "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by",
}


def _objects(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _installed() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    out = []
    for entry in kustomization["resources"]:
        path = MANIFESTS / entry
        if path.is_dir():
            crds = yaml.safe_load((path / "Kustomization").read_text())
            pairs = {k: v for entry in crds.get("labels", []) for k, v in entry["pairs"].items()}
            for name in crds["resources"]:
                for obj in _objects(path / name):
                    obj["metadata"]["labels"] = {**pairs, **(obj["metadata"].get("labels") or {})}
                    out.append(obj)
        else:
            out += _objects(path)
    return out


def _rules(kind: str, name: str) -> list[dict[str, Any]]:
    for obj in _installed():
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return list(obj["rules"])
    raise AssertionError(f"{kind}/{name} not installed")


def test_operator_role_drops_verbs_it_never_uses() -> None:
    rules = _rules("ClusterRole", "tether")
    main = next(r for r in rules if "consulservices" in r["resources"])
    assert set(main["resources"]) == KINDS and sorted(main["verbs"]) == ["get", "list", "patch", "watch"]
    status = next(r for r in rules if "consulservices/status" in r["resources"])
    assert sorted(status["verbs"]) == ["get", "patch"]
    events = [r for r in rules if "events" in r["resources"]]
    assert events == [{"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]}]
    policies = [r for r in rules if any(res.startswith("tetherpolicies") for res in r["resources"])]
    assert policies == [
        {"apiGroups": ["tether.dev"], "resources": ["tetherpolicies"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["tether.dev"], "resources": ["tetherpolicies/status"], "verbs": ["get", "patch"]},
    ]
    # Endpoints mode reads the followed Services and watches them and their
    # slices (a deleted Service changes no slice): read only.
    services = [r for r in rules if "services" in r["resources"]]
    assert services == [{"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]}]
    slices = [r for r in rules if "endpointslices" in r["resources"]]
    assert slices == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}
    ]
    namespaces = [r for r in rules if "namespaces" in r["resources"]]
    assert [sorted(r["verbs"]) for r in namespaces] == [["get", "list", "watch"]]
    pods = [r for r in rules if any(res.startswith("pods") for res in r["resources"])]
    assert pods == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
    ]
    lease = _rules("Role", "tether-leader-election")
    assert sorted(lease[0]["verbs"]) == ["create", "get", "update"]


def test_aggregated_edit_and_view_roles_cover_every_kind() -> None:
    objs = {o["metadata"]["name"]: o for o in _installed() if o["kind"] == "ClusterRole"}
    edit, view = objs["tether-edit"], objs["tether-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert set(edit["rules"][0]["resources"]) == KINDS and "create" in edit["rules"][0]["verbs"]
    assert set(view["rules"][0]["resources"]) == KINDS
    assert set(view["rules"][0]["verbs"]) == {"get", "list", "watch"}


_WRITES = {"create", "update", "patch", "delete", "deletecollection", "*"}


def test_aggregated_roles_never_grant_writing_a_policy() -> None:
    """A namespace editor must not be able to widen their own allowance."""
    for obj in _installed():
        if obj["kind"] not in ("ClusterRole", "Role"):
            continue
        labels = obj["metadata"].get("labels") or {}
        if not any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in labels):
            continue
        for rule in obj["rules"]:
            touches = {r for r in rule["resources"] if r.startswith("tetherpolicies") or r == "*"}
            assert not (touches and _WRITES & set(rule["verbs"])), (obj["metadata"]["name"], rule)
    for name in ("tether-view", "tether-edit"):
        role = next(o for o in _installed() if o["metadata"]["name"] == name)
        assert any("tetherpolicies" in r["resources"] for r in role["rules"]), f"{name} may read policies"


def test_every_installed_object_carries_the_recommended_labels() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    common = {k for entry in kustomization["labels"] for k in entry["pairs"]}
    for obj in _installed():
        labels = set(obj["metadata"].get("labels") or {})
        missing = RECOMMENDED - labels - common
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {sorted(missing)}"


def test_monitoring_component_has_service_monitor_and_rules() -> None:
    comp = MANIFESTS / "components" / "monitoring"
    spec = yaml.safe_load((comp / "kustomization.yaml").read_text())
    assert spec["kind"] == "Component"
    objs = [o for name in spec["resources"] for o in _objects(comp / name)]
    assert {o["kind"] for o in objs} == {"ServiceMonitor", "PrometheusRule"}
    rules = next(o for o in objs if o["kind"] == "PrometheusRule")["spec"]["groups"][0]["rules"]
    alerts = {r["alert"] for r in rules}
    assert {"TetherBackendDown", "TetherResourcesNotReady", "TetherQueueStuck"} <= alerts
    exported = {"tether_backend_up", "tether_resources_not_ready", "tether_queue_depth",
                "tether_reconciles_total", "tether_leader"}
    for rule in rules:
        for name in re.findall(r"tether_[a-z_]+", rule["expr"]):
            assert name in exported, name


def test_crd_files_do_not_point_users_at_developer_documents() -> None:
    for path in (REPO / "crds").glob("*.yaml"):
        assert "DESIGN.md" not in path.read_text(), path.name


def test_not_ready_gauge_counts_by_kind_and_reason() -> None:
    class Kind:
        kind, plural = "Thing", "things"

    ctl = Controller(Kind(), None)  # type: ignore[arg-type]
    a, b = ObjectRef("things", "ns", "a"), ObjectRef("things", "ns", "b")
    gauge = metrics.NOT_READY.labels(kind="Thing", reason="Conflict")
    ctl._count_not_ready(a, "Conflict")
    ctl._count_not_ready(b, "Conflict")
    assert gauge._value.get() == 2
    ctl._count_not_ready(a, None)
    assert gauge._value.get() == 1
    ctl._count_not_ready(b, "BackendUnavailable")
    assert gauge._value.get() == 0
    assert metrics.NOT_READY.labels(kind="Thing", reason="BackendUnavailable")._value.get() == 1


def test_policy_admission_component_binds_one_cel_policy_per_kind() -> None:
    """No webhook: ValidatingAdmissionPolicies only, each bound (Deny) to team namespaces."""
    comp = MANIFESTS / "components" / "policy-admission"
    spec = yaml.safe_load((comp / "kustomization.yaml").read_text())
    assert spec["kind"] == "Component"
    objs = [o for name in spec["resources"] for o in _objects(comp / name)]
    assert {o["kind"] for o in objs} == {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    policies = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ValidatingAdmissionPolicy"}
    bindings = [o for o in objs if o["kind"] == "ValidatingAdmissionPolicyBinding"]
    covered = {r for p in policies.values() for rule in p["spec"]["matchConstraints"]["resourceRules"]
               for r in rule["resources"]}
    assert covered == KINDS
    assert {b["spec"]["policyName"] for b in bindings} == set(policies)
    for binding in bindings:
        assert binding["spec"]["validationActions"] == ["Deny"]
        selector = binding["spec"]["matchResources"]["namespaceSelector"]
        assert selector == {"matchExpressions": [{"key": "tether.dev/team", "operator": "Exists"}]}
    for policy in policies.values():
        assert policy["spec"]["failurePolicy"] == "Fail"
        for validation in policy["spec"]["validations"]:
            assert validation.get("message") or validation.get("messageExpression")
    configs = [p for name, p in policies.items() if name.endswith("configs")]
    assert all(any("adopt" in v["expression"] for v in p["spec"]["validations"]) for p in configs)
