"""The installation path: ``manifests/``, the kind test manifests, the image recipe.

Docker, and so kind, cannot run on every machine that runs this suite; the manifests
are still checked here as far as a real control plane allows:

- offline: ``kubectl kustomize`` renders them, and their structure is what the design
  promises (least-privilege RBAC without wildcards, the pod security settings, the
  names the operator relies on);
- against the dev stack (``e2e``): ``kubectl apply --dry-run=server`` sends every
  object through the real kube-apiserver (schema, defaulting, admission including Pod
  Security), and ``kubectl auth can-i`` shows what the ServiceAccount may and may not
  do once the RBAC objects exist.

The dev stack has no kube-controller-manager, so a deleted namespace would stay
``Terminating`` forever; the fixtures here delete what they created and finalize the
namespaces they created (``helpers.delete_namespace``), so the fixed namespace
``tether-system`` is really gone afterwards and later tests can install it. What
existed before a test is left as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether_dev.harness.kube import delete_namespace, kubectl

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
KIND_DIR = REPO / "scripts" / "kind"
OVERLAY = KIND_DIR / "overlay"
NAMESPACE = "tether-system"
SERVICE_ACCOUNT = f"system:serviceaccount:{NAMESPACE}:tether"
OPERATOR_LABELS = {"app.kubernetes.io/name": "tether", "app.kubernetes.io/component": "operator"}

Env = dict[str, str]
Manifest = dict[str, Any]


# ------------------------------------------------------------------ rendering


def _kubectl_path() -> str | None:
    bin_dir = os.environ.get("TETHER_BIN_DIR")
    if bin_dir and (Path(bin_dir) / "kubectl").is_file():
        return str(Path(bin_dir) / "kubectl")
    return shutil.which("kubectl")


@pytest.fixture(scope="module")
def render_env(request: pytest.FixtureRequest) -> Env:
    """An environment with a kubectl for client-side rendering.

    Any kubectl on PATH (or in TETHER_BIN_DIR) will do; without one, the dev stack's
    environment provides it, which starts the stack.
    """
    found = _kubectl_path()
    if found is not None:
        return {**os.environ, "PATH": f"{Path(found).parent}{os.pathsep}{os.environ['PATH']}"}
    env: Env = request.getfixturevalue("dev_env")
    return env


def _render(env: Env, directory: Path) -> list[Manifest]:
    out = kubectl(env, "kustomize", str(directory)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _load(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(objects: list[Manifest], kind: str, name: str) -> Manifest:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def rendered(render_env: Env) -> list[Manifest]:
    return _render(render_env, MANIFESTS)


@pytest.fixture(scope="module")
def deployment(rendered: list[Manifest]) -> Manifest:
    return _one(rendered, "Deployment", "tether")


@pytest.fixture(scope="module")
def container(deployment: Manifest) -> Manifest:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["tether"]
    return dict(containers[0])


def test_kustomize_installs_everything(rendered: list[Manifest]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered)
    assert kinds == sorted([
        ("Namespace", NAMESPACE),
        ("CustomResourceDefinition", "consulservices.tether.dev"),
        ("CustomResourceDefinition", "etcdconfigs.tether.dev"),
        ("CustomResourceDefinition", "consulconfigs.tether.dev"),
        ("CustomResourceDefinition", "tetherpolicies.tether.dev"),
        ("ServiceAccount", "tether"),
        ("ClusterRole", "tether"),
        ("ClusterRole", "tether-edit"),
        ("ClusterRole", "tether-view"),
        ("ClusterRoleBinding", "tether"),
        ("Role", "tether-leader-election"),
        ("RoleBinding", "tether-leader-election"),
        ("ConfigMap", "tether-config"),
        ("Deployment", "tether"),
        ("Service", "tether-metrics"),
        ("PodDisruptionBudget", "tether"),
    ])
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for obj in rendered:
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tether"
    # The kustomization really lists ../crds (not copies of the CRDs).
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert "../crds" in kustomization["resources"]


def _all_rbac_rules(objects: list[Manifest]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{o['kind']}/{o['metadata']['name']}", rule)
        for o in objects
        if o["kind"] in ("ClusterRole", "Role")
        for rule in o.get("rules", [])
    ]


def test_rbac_has_no_wildcards(rendered: list[Manifest]) -> None:
    for where, rule in _all_rbac_rules(rendered):
        for key in ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs"):
            values = rule.get(key, [])
            assert all("*" not in v for v in values), f"{where}: wildcard in {key}: {rule}"


def _rule_for(rules: list[dict[str, Any]], resource: str) -> dict[str, Any]:
    matching = [r for r in rules if resource in r["resources"]]
    assert len(matching) == 1, f"expected exactly one rule for {resource}: {matching}"
    return matching[0]


def test_cluster_role_is_least_privilege(rendered: list[Manifest]) -> None:
    rules = _one(rendered, "ClusterRole", "tether")["rules"]
    kinds = ("consulservices", "etcdconfigs", "consulconfigs")

    main = _rule_for(rules, "consulservices")
    assert main["apiGroups"] == ["tether.dev"]
    assert sorted(main["resources"]) == sorted(kinds)
    assert sorted(main["verbs"]) == ["get", "list", "patch", "watch"]

    # Subresources in rules of their own, not mixed with anything else.
    status = _rule_for(rules, "consulservices/status")
    assert sorted(status["resources"]) == sorted(f"{k}/status" for k in kinds)
    assert sorted(status["verbs"]) == ["get", "patch"]
    finalizers = _rule_for(rules, "consulservices/finalizers")
    assert sorted(finalizers["resources"]) == sorted(f"{k}/finalizers" for k in kinds)
    assert finalizers["verbs"] == ["update"]

    # Inputs are read only; events are only created (events.k8s.io/v1).
    inputs = _rule_for(rules, "secrets")
    assert inputs["apiGroups"] == [""]
    assert sorted(inputs["verbs"]) == ["get", "list", "watch"]
    events = [r for r in rules if "events" in r["resources"]]
    assert len(events) == 1, events
    assert events[0]["apiGroups"] == ["events.k8s.io"] and events[0]["verbs"] == ["create"], events
    assert sorted(_rule_for(rules, "namespaces")["verbs"]) == ["get", "list", "watch"]
    # TetherPolicies: read, and only their status written.
    policies = _rule_for(rules, "tetherpolicies")
    assert policies["apiGroups"] == ["tether.dev"] and sorted(policies["verbs"]) == ["get", "list", "watch"]
    assert sorted(_rule_for(rules, "tetherpolicies/status")["verbs"]) == ["get", "patch"]
    crds = _rule_for(rules, "customresourcedefinitions")
    assert crds["apiGroups"] == ["apiextensions.k8s.io"]
    assert sorted(crds["verbs"]) == ["get", "list", "watch"]

    # No verb that creates or deletes user objects, and leases are not cluster-wide.
    for rule in rules:
        assert "delete" not in rule["verbs"] and "deletecollection" not in rule["verbs"], rule
        assert "leases" not in rule["resources"], rule

    binding = _one(rendered, "ClusterRoleBinding", "tether")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tether"
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tether", "namespace": NAMESPACE}
    ]


def test_leases_only_in_the_operator_namespace(rendered: list[Manifest]) -> None:
    role = _one(rendered, "Role", "tether-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "create", "update"],
    }]
    binding = _one(rendered, "RoleBinding", "tether-leader-election")
    assert binding["roleRef"]["name"] == "tether-leader-election"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tether", "namespace": NAMESPACE}
    ]


def test_deployment_security_context(deployment: Manifest, container: Manifest) -> None:
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 65532
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in ctx or ctx["privileged"] is False
    resources = container["resources"]
    for section in ("requests", "limits"):
        assert set(resources[section]) == {"cpu", "memory"}, resources


def _flag(args: list[str], name: str) -> str:
    for arg in args:
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def test_deployment_runs_the_operator_as_designed(
    deployment: Manifest, container: Manifest
) -> None:
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"] == OPERATOR_LABELS
    assert pod["serviceAccountName"] == "tether"
    assert container["image"] == "ghcr.io/tether-dev/tether:0.1.0"
    assert container["command"] == ["tether", "run"]
    args = container["args"]
    assert "--leader-elect" in args and "--all-namespaces" in args
    assert _flag(args, "--log-format") == "json"

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "metrics": int(_flag(args, "--metrics-port")),
        "health": int(_flag(args, "--health-port")),
    }
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    # Readiness has its own endpoint (issue 14): not ready while starting or stopping.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}

    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert container["envFrom"] == [
        {"configMapRef": {"name": "tether-config"}},
        {"secretRef": {"name": "tether-credentials", "optional": True}},
    ]

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["tmp"]["mountPath"] == "/tmp" and "emptyDir" in volumes["tmp"]
    assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/tether/tls", "readOnly": True}
    assert volumes["tls"]["secret"]["secretName"] == "tether-tls"
    assert volumes["tls"]["secret"]["optional"] is True

    spread = pod["topologySpreadConstraints"]
    assert any(c["topologyKey"] == "kubernetes.io/hostname" for c in spread)
    assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in spread)


def test_config_map_has_in_cluster_defaults(rendered: list[Manifest]) -> None:
    data = _one(rendered, "ConfigMap", "tether-config")["data"]
    assert data == {
        "CONSUL_HTTP_ADDR": "http://consul-server.consul.svc:8500",
        "ETCD_ENDPOINTS": "http://etcd.etcd.svc:2379",
        "TETHER_CLUSTER_NAME": "kubernetes",
    }


def test_service_and_budget_select_the_operator(
    rendered: list[Manifest], deployment: Manifest
) -> None:
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _one(rendered, "Service", "tether-metrics")
    assert service["spec"]["selector"] == OPERATOR_LABELS
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    budget = _one(rendered, "PodDisruptionBudget", "tether")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == OPERATOR_LABELS
    for selector in (service["spec"]["selector"], budget["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()


def test_kind_overlay_changes_only_image_and_endpoints(render_env: Env) -> None:
    objects = _render(render_env, OVERLAY)
    pod = _one(objects, "Deployment", "tether")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "tether:e2e"
    assert pod["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    data = _one(objects, "ConfigMap", "tether-config")["data"]
    assert data["CONSUL_HTTP_ADDR"] == "http://consul-server.consul.svc.cluster.local:8500"
    assert data["ETCD_ENDPOINTS"] == "http://etcd.etcd.svc.cluster.local:2379"
    # The test backends are where the overlay points.
    services = {
        (o["metadata"]["namespace"], o["metadata"]["name"]): o["spec"]["ports"][0]["port"]
        for path in sorted(KIND_DIR.glob("*.yaml"))
        for o in _load(path)
        if o["kind"] == "Service"
    }
    assert services == {("consul", "consul-server"): 8500, ("etcd", "etcd"): 2379}
    # The script loads the image under the tag the overlay names.
    script = (REPO / "scripts" / "e2e-kind.sh").read_text()
    assert 'IMAGE="tether:e2e"' in script


# ------------------------------------------------------------- image and kind


def test_kind_config_pins_a_1_35_node_image() -> None:
    config = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster"
    images = [node["image"] for node in config["nodes"]]
    assert [n["role"] for n in config["nodes"]].count("control-plane") == 1
    for image in images:
        assert re.fullmatch(r"kindest/node:v1\.35\.\d+@sha256:[0-9a-f]{64}", image), image


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", dockerfile)
    lines = [line.strip() for line in joined.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_is_pinned_multistage_and_non_root() -> None:
    steps = _instructions((REPO / "Dockerfile").read_text())
    base = next(arg for op, arg in steps if op == "ARG" and arg.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?",
                        base), base
    froms = [arg for op, arg in steps if op == "FROM"]
    assert len(froms) == 2 and all(f.startswith("${PYTHON_IMAGE}") for f in froms), froms
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    copies = [arg for op, arg in final if op == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"], copies
    # Nothing is installed into the runtime stage: no compiler, no package manager run.
    runs = " ".join(arg for op, arg in final if op == "RUN")
    assert "apt-get" not in runs and "pip" not in runs, runs
    assert ("USER", "65532:65532") in final
    assert ("ENTRYPOINT", '["tether", "run"]') in final
    cmd = json.loads(next(arg for op, arg in final if op == "CMD"))
    assert cmd == ["-A", "--metrics-port", "8080", "--health-port", "8081",
                   "--log-format", "json", "--leader-elect"]


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".tether", "tests", "benchmarks"} <= ignored
    # ... but never what the build copies.
    assert not {"pyproject.toml", "README.md", "operator"} & ignored


def test_e2e_kind_script_is_valid_bash() -> None:
    script = REPO / "scripts" / "e2e-kind.sh"
    assert os.access(script, os.X_OK), "scripts/e2e-kind.sh must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        # -x follows the scripts it sources (scripts/kind/lib.sh), from the repository root.
        done = subprocess.run(
            ["shellcheck", "-x", str(script)], capture_output=True, text=True, cwd=script.parents[1]
        )
        assert done.returncode == 0, done.stdout


# ---------------------------------------------------------- against the stack


def _exists(env: Env, *args: str) -> bool:
    return kubectl(env, "get", *args, "--ignore-not-found", "-o", "name").stdout.strip() != ""


def _namespaces_in(objects: list[Manifest]) -> list[Manifest]:
    return [o for o in objects if o["kind"] == "Namespace"]


@pytest.fixture
def namespaces_for(dev_env: Env) -> Iterator[list[str]]:
    """Create the Namespace objects a test's manifests contain; remove only those created.

    Server-side dry run of a namespaced object needs its namespace to exist (the
    NamespaceLifecycle admission plugin checks it), so each Namespace is applied for
    real first. Append names to the yielded list to have them cleaned up.
    """
    created: list[str] = []
    yield created
    for name in created:
        delete_namespace(dev_env, name)


def _create_namespaces(env: Env, objects: list[Manifest], created: list[str]) -> None:
    for namespace in _namespaces_in(objects):
        name = namespace["metadata"]["name"]
        if not _exists(env, "namespace", name):
            kubectl(env, "apply", "-f", "-", input=json.dumps(namespace))
            created.append(name)


def _assert_dry_run(result: subprocess.CompletedProcess[str], what: str) -> None:
    assert result.returncode == 0, f"{what}: server dry run failed:\n{result.stderr}"
    # Pod Security admission warns about workloads whose pods it would reject.
    assert "would violate PodSecurity" not in result.stderr, result.stderr


@pytest.mark.e2e
def test_manifests_pass_server_dry_run(dev_env: Env, namespaces_for: list[str]) -> None:
    objects = _render(dev_env, MANIFESTS)
    _create_namespaces(dev_env, objects, namespaces_for)
    result = kubectl(dev_env, "apply", "-k", str(MANIFESTS), "--dry-run=server", check=False)
    _assert_dry_run(result, "kubectl apply -k manifests/")
    # Every object went through the server, not only the first few.
    lines = result.stdout.splitlines()
    for obj in objects:
        kind, name = obj["kind"].lower(), obj["metadata"]["name"]
        assert any(
            line.split("/", 1)[0].split(".", 1)[0] == kind and f"/{name} " in line
            for line in lines
        ), f"{kind}/{name} missing from:\n{result.stdout}"


@pytest.mark.e2e
def test_kind_overlay_passes_server_dry_run(dev_env: Env, namespaces_for: list[str]) -> None:
    _create_namespaces(dev_env, _render(dev_env, OVERLAY), namespaces_for)
    result = kubectl(dev_env, "apply", "-k", str(OVERLAY), "--dry-run=server", check=False)
    _assert_dry_run(result, "kubectl apply -k scripts/kind/overlay")


@pytest.mark.e2e
@pytest.mark.parametrize(
    "path", sorted(KIND_DIR.glob("*.yaml")), ids=lambda p: p.name
)
def test_kind_backend_manifest_passes_server_dry_run(
    dev_env: Env, namespaces_for: list[str], path: Path
) -> None:
    _create_namespaces(dev_env, _load(path), namespaces_for)
    result = kubectl(dev_env, "apply", "-f", str(path), "--dry-run=server", check=False)
    _assert_dry_run(result, f"kubectl apply -f {path.relative_to(REPO)}")


_RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@pytest.fixture
def rbac_installed(dev_env: Env, namespaces_for: list[str]) -> Iterator[None]:
    """The RBAC objects of manifests/, applied for real; what this created is removed."""
    objects = _render(dev_env, MANIFESTS)
    _create_namespaces(dev_env, objects, namespaces_for)
    rbac = [o for o in objects if o["kind"] in _RBAC_KINDS]
    created: list[Manifest] = []
    for obj in rbac:
        ns = obj["metadata"].get("namespace")
        where = ["-n", ns] if ns else []
        if not _exists(dev_env, obj["kind"], obj["metadata"]["name"], *where):
            created.append(obj)
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac})
    kubectl(dev_env, "apply", "-f", "-", input=body)
    try:
        yield
    finally:
        for obj in reversed(created):
            ns = obj["metadata"].get("namespace")
            kubectl(dev_env, "delete", obj["kind"], obj["metadata"]["name"],
                    *(["-n", ns] if ns else []), "--ignore-not-found", check=False)


# (verb, resource, namespace or None for cluster-wide / cluster-scoped, allowed)
_PERMISSIONS = [
    ("watch", "consulservices.tether.dev", "", True),
    ("list", "etcdconfigs.tether.dev", "", True),
    ("patch", "consulservices.tether.dev", "default", True),
    ("patch", "etcdconfigs.tether.dev/status", "default", True),
    ("list", "consulconfigs.tether.dev", "", True),
    ("patch", "consulconfigs.tether.dev/status", "default", True),
    ("update", "consulservices.tether.dev/finalizers", "default", True),
    ("create", "events.events.k8s.io", "default", True),
    ("create", "events", "default", False),
    ("patch", "events.events.k8s.io", "default", False),
    ("update", "consulservices.tether.dev", "default", False),
    ("watch", "secrets", "", True),
    ("watch", "configmaps", "", True),
    ("watch", "services", "", True),
    ("watch", "endpointslices.discovery.k8s.io", "", True),
    ("update", "services", "default", False),
    ("list", "namespaces", None, True),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", None, True),
    # The readiness gate: Pods read and watched, their status patched, nothing else.
    ("watch", "pods", "", True),
    ("patch", "pods/status", "default", True),
    ("update", "leases.coordination.k8s.io", NAMESPACE, True),
    ("create", "leases.coordination.k8s.io", NAMESPACE, True),
    # What it must not do:
    ("create", "consulservices.tether.dev", "default", False),
    ("delete", "etcdconfigs.tether.dev", "default", False),
    ("create", "consulconfigs.tether.dev", "default", False),
    ("update", "secrets", "default", False),
    ("create", "configmaps", "default", False),
    ("create", "leases.coordination.k8s.io", "kube-system", False),
    ("update", "leases.coordination.k8s.io", "kube-node-lease", False),
    ("create", "pods", "default", False),
    ("patch", "pods", "default", False),
    ("update", "pods/status", "default", False),
    ("delete", "pods", "default", False),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", None, False),
]


@pytest.mark.e2e
@pytest.mark.usefixtures("rbac_installed")
def test_service_account_may_do_exactly_what_the_operator_needs(dev_env: Env) -> None:
    wrong = []
    for verb, resource, namespace, allowed in _PERMISSIONS:
        scope = [] if namespace is None else (["-A"] if namespace == "" else ["-n", namespace])
        # "kind/finalizers" would be read as the object named "finalizers": ask for
        # the subresource itself.
        kind, _, sub = resource.partition("/")
        extra = [f"--subresource={sub}"] if sub else []
        done = kubectl(dev_env, "auth", "can-i", verb, kind, *extra, *scope,
                       f"--as={SERVICE_ACCOUNT}", check=False)
        answer = done.stdout.strip()
        if answer != ("yes" if allowed else "no"):
            wrong.append(f"can-i {verb} {resource} {' '.join(scope)}: {answer} {done.stderr}")
    assert not wrong, "\n".join(wrong)
