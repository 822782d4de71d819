"""The optional kustomize components of ``manifests/components/`` compose with the base.

``tests/manifests/components/`` is an overlay of the base with every component; it is
rendered with ``kubectl kustomize`` (the dev stack's build, else one on PATH: skipped,
saying why, only where none exists), and what each component adds is checked against
the base it has to fit (the operator Pod's labels and port names).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "tests" / "manifests" / "components"

Manifest = dict[str, Any]


def _kubectl() -> str | None:
    bin_dir = os.environ.get("TETHER_BIN_DIR")
    if bin_dir and (Path(bin_dir) / "kubectl").is_file():
        return str(Path(bin_dir) / "kubectl")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tether" / "bin"
    built = sorted(cache.glob("*/kubectl"))
    if built:
        return str(built[-1])
    return shutil.which("kubectl")


@pytest.fixture(scope="module")
def rendered() -> list[Manifest]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("no kubectl (neither the dev stack's build nor one on PATH) to run kustomize")
    out = subprocess.run(
        [kubectl, "kustomize", str(OVERLAY)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _one(objects: list[Manifest], kind: str, name: str) -> Manifest:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod(objects: list[Manifest]) -> Manifest:
    template: Manifest = _one(objects, "Deployment", "tether")["spec"]["template"]
    return template


def test_network_policy_fits_the_operator_pods(rendered: list[Manifest]) -> None:
    policy = _one(rendered, "NetworkPolicy", "tether")
    pod = _pod(rendered)
    assert policy["metadata"]["namespace"] == "tether-system"
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items(), "the policy must select the operator"
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]

    # Ingress only to the ports the container names metrics and health, and every rule
    # names its ports (a rule without ports would open everything).
    container_ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    ingress = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert sorted(ingress) == ["health", "metrics"]
    assert set(ingress) <= container_ports

    egress = policy["spec"]["egress"]
    assert all(rule.get("ports") for rule in egress), egress
    allowed = {(p["port"], p["protocol"]) for rule in egress for p in rule["ports"]}
    assert allowed == {
        (443, "TCP"), (6443, "TCP"),  # the API server
        (8500, "TCP"), (8501, "TCP"),  # Consul
        (2379, "TCP"),  # etcd
        (53, "UDP"), (53, "TCP"),  # DNS
    }


def test_components_leave_the_base_objects_alone(rendered: list[Manifest]) -> None:
    """Every object of the base renders the same with the components as without them."""
    kubectl = _kubectl()
    assert kubectl is not None
    out = subprocess.run(
        [kubectl, "kustomize", str(REPO / "manifests")], check=True, capture_output=True, text=True,
        timeout=60,
    ).stdout
    base = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}
    with_components = {(o["kind"], o["metadata"]["name"]): o for o in rendered}
    for key, obj in base.items():
        if key == ("Deployment", "tether"):
            # The one base object a component patches: exactly these additions.
            obj = _with_backend_credentials(_with_metrics_auth(obj))
        assert with_components.get(key) == obj, f"{key} changed by a component"
    assert ("NetworkPolicy", "tether") not in base, "the NetworkPolicy is opt-in"
    assert ("ClusterRole", "tether-metrics-reader") not in base, "metrics-auth is opt-in"
    assert "--metrics-secure" not in str(base[("Deployment", "tether")]), "metrics-auth is opt-in"


# ------------------------------------------------------------------ metrics-auth

METRICS_CERT_DIR = "/etc/tether/metrics-cert"


def _with_metrics_auth(deployment: Manifest) -> Manifest:
    """The base Deployment as the metrics-auth component must leave it: flags, a mount, a volume."""
    patched: Manifest = copy.deepcopy(deployment)
    pod = patched["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    container["args"] += ["--metrics-secure", f"--metrics-cert-dir={METRICS_CERT_DIR}"]
    container["volumeMounts"].append(
        {"name": "metrics-cert", "mountPath": METRICS_CERT_DIR, "readOnly": True})
    pod["volumes"].append(
        {"name": "metrics-cert", "secret": {"secretName": "tether-metrics-cert", "defaultMode": 0o440}})
    return patched


CREDENTIALS_ENV = {
    "CONSUL_HTTP_TOKEN_FILE": "/etc/tether/credentials/consul-token",
    "ETCD_PASSWORD_FILE": "/etc/tether/credentials/etcd-password",
    "ETCD_CACERT": "/etc/tether/client-cert/ca.crt",
    "ETCD_CERT": "/etc/tether/client-cert/tls.crt",
    "ETCD_KEY": "/etc/tether/client-cert/tls.key",
}


def _with_backend_credentials(deployment: Manifest) -> Manifest:
    """The base Deployment as backend-credentials must leave it: variables, two mounts, two volumes."""
    patched: Manifest = copy.deepcopy(deployment)
    pod = patched["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    container["env"] += [{"name": k, "value": v} for k, v in CREDENTIALS_ENV.items()]
    for name, path, secret in (
        ("backend-credentials", "/etc/tether/credentials", "tether-backend-credentials"),
        ("client-cert", "/etc/tether/client-cert", "tether-client-cert"),
    ):
        container["volumeMounts"].append({"name": name, "mountPath": path, "readOnly": True})
        pod["volumes"].append({"name": name, "secret": {"secretName": secret, "defaultMode": 0o440}})
    return patched


def test_backend_credentials_files_lie_in_whole_secret_mounts(rendered: list[Manifest]) -> None:
    """Each *_FILE and certificate variable points into a Secret mounted as a directory:
    a subPath mount would never see the kubelet's updates, and rotation would need a restart."""
    (container,) = _pod(rendered)["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for name, path in CREDENTIALS_ENV.items():
        assert env[name] == path
        mount = mounts[path.rsplit("/", 1)[0]]
        assert "subPath" not in mount and mount["readOnly"] is True
    assert "CONSUL_HTTP_TOKEN" not in env and "ETCD_PASSWORD" not in env


def test_metrics_auth_flags_are_the_operators(rendered: list[Manifest]) -> None:
    from tether import cli

    (container,) = _pod(rendered)["spec"]["containers"]
    args = cli._parser({}).parse_args(["run", *container["args"]])
    assert args.metrics_secure is True
    assert str(args.metrics_cert_dir) == METRICS_CERT_DIR
    assert args.metrics_port == 8080


def test_metrics_auth_roles(rendered: list[Manifest]) -> None:
    reader = _one(rendered, "ClusterRole", "tether-metrics-reader")
    assert reader["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    auth = _one(rendered, "ClusterRole", "tether-metrics-auth")
    granted = {(g, r, v) for rule in auth["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("authentication.k8s.io", "tokenreviews", "create"),
                       ("authorization.k8s.io", "subjectaccessreviews", "create")}
    binding = _one(rendered, "ClusterRoleBinding", "tether-metrics-auth")
    assert binding["roleRef"]["name"] == "tether-metrics-auth"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": _pod(rendered)["spec"]["serviceAccountName"],
         "namespace": "tether-system"}]


def test_service_monitor_scrapes_https_with_a_token(rendered: list[Manifest]) -> None:
    monitor = _one(rendered, "ServiceMonitor", "tether")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["bearerTokenFile"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    service = _one(rendered, "Service", "tether-metrics")
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    tls = endpoint["tlsConfig"]
    assert tls["serverName"] == f"tether-metrics.{service['metadata']['namespace']}.svc"
    assert tls["ca"]["secret"]["name"] == "tether-metrics-cert"
    # The example Certificate writes that Secret, for that name.
    path = REPO / "manifests" / "components" / "metrics-auth" / "certificate.yaml"
    (certificate,) = [d for d in yaml.safe_load_all(path.read_text()) if d["kind"] == "Certificate"]
    assert certificate["spec"]["secretName"] == "tether-metrics-cert"
    assert tls["serverName"] in certificate["spec"]["dnsNames"]


# ------------------------------------------------------------------ the Grafana dashboard


def _exported_series() -> set[str]:
    """Every series name /metrics can show for the metrics tether.metrics defines."""
    from prometheus_client.metrics import MetricWrapperBase

    from tether import metrics

    names: set[str] = set()
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                        "gauge": [""], "summary": ["_sum", "_count", ""]}[family.type]
            names.update(family.name + suffix for suffix in suffixes)
    return names


def _dashboard(rendered: list[Manifest]) -> dict[str, Any]:
    config_map = _one(rendered, "ConfigMap", "tether-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "tether-system"
    (text,) = config_map["data"].values()
    dashboard: dict[str, Any] = json.loads(text)
    return dashboard


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found.extend(t["expr"] for t in inner.get("targets", []))
    return found


def test_exported_series_are_what_prometheus_client_names() -> None:
    exported = _exported_series()
    assert {"tether_reconciles_total", "tether_reconcile_duration_seconds_bucket",
            "tether_leader"} <= exported
    assert "tether_reconciles" not in exported and "tether_reconcile_duration_seconds" not in exported


def test_every_dashboard_query_uses_an_exported_metric(rendered: list[Manifest]) -> None:
    dashboard = _dashboard(rendered)
    expressions = _expressions(dashboard)
    assert len(expressions) >= 10, "the dashboard has lost its panels"
    exported = _exported_series()
    used: set[str] = set()
    for expr in expressions:
        names = set(re.findall(r"\btether_[a-z0-9_]+\b", expr))
        assert names, f"a query on no tether_ metric: {expr}"
        unknown = names - exported
        assert not unknown, f"{expr!r} uses {sorted(unknown)}, which /metrics does not export"
        used |= names
    # The headline series are all on the dashboard.
    assert {"tether_leader", "tether_backend_up", "tether_reconciles_total",
            "tether_reconcile_duration_seconds_bucket", "tether_resources_not_ready"} <= used


def test_alerts_use_exported_metrics(rendered: list[Manifest]) -> None:
    rule = _one(rendered, "PrometheusRule", "tether")
    exported = _exported_series()
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            names = set(re.findall(r"\btether_[a-z0-9_]+\b", alert["expr"]))
            assert names and names <= exported, (alert["alert"], names - exported)


# ------------------------------------------------------------------ deadman


def test_deadman_runs_the_operators_image_with_least_privilege(rendered: list[Manifest]) -> None:
    from tether import cli

    deployment = _one(rendered, "Deployment", "tether-deadman")
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    operator_pod = _pod(rendered)["spec"]
    assert pod["serviceAccountName"] == "tether-deadman" != operator_pod["serviceAccountName"]
    assert pod["securityContext"] == operator_pod["securityContext"]
    (container,) = pod["containers"]
    (operator_container,) = operator_pod["containers"]
    assert container["image"] == operator_container["image"]
    assert container["securityContext"] == operator_container["securityContext"]
    assert container["command"] == ["tether", "deadman"]
    args = cli._parser({}).parse_args(["deadman", *container["args"]])
    # Worst case from the last renewal to "not passing": Lease 15 s + margin + one interval.
    assert 15 + args.margin + args.interval <= 30
    assert container["livenessProbe"]["httpGet"]["port"] == "health"
    assert container["resources"]["limits"] and container["resources"]["requests"]
    # Not the operator's Consul token, nor the etcd client key.
    assert [e.get("secretRef", {}).get("name") for e in container["envFrom"] if "secretRef" in e] == [
        "tether-deadman-credentials"]
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert all(i["key"].startswith("consul-") for i in tls["secret"]["items"])
    # Its Pods are not the operator's: neither its PDB nor its NetworkPolicy selects them.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        selector = _one(rendered, kind, "tether")["spec"].get("selector") or _one(
            rendered, kind, "tether")["spec"]["podSelector"]
        assert not all(labels.get(k) == v for k, v in selector["matchLabels"].items()), kind


def test_deadman_may_only_get_the_one_lease(rendered: list[Manifest]) -> None:
    role = _one(rendered, "Role", "tether-deadman")
    assert role["rules"] == [{
        "apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
        "resourceNames": ["tether-leader"], "verbs": ["get"],
    }]
    binding = _one(rendered, "RoleBinding", "tether-deadman")
    assert binding["roleRef"]["name"] == "tether-deadman"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tether-deadman", "namespace": "tether-system"}]
    # Nothing else names its ServiceAccount.
    for obj in rendered:
        binding_kinds = ("RoleBinding", "ClusterRoleBinding")
        if obj["kind"] in binding_kinds and obj["metadata"]["name"] != "tether-deadman":
            assert all(s.get("name") != "tether-deadman" for s in obj.get("subjects") or [])
