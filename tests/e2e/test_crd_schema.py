"""The API server, not the operator, rejects malformed ConsulService and EtcdConfig specs.

These tests install the CRDs from ``crds/`` into the dev stack's kube-apiserver and
send resources with ``kubectl apply --dry-run=server``: the request goes through
decoding, defaulting, OpenAPI and CEL validation exactly as a real create would, and
nothing is stored, so the operator (if running) never sees these objects. A
namespace of the module's own holds the requests and is deleted afterwards.

Every invalid case asserts that the error names the offending field, because that is
what a person needs to fix the manifest.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tether_dev.harness.kube import delete_namespace, kubectl, resource
from tether_dev.harness.waiting import wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
SAMPLES = REPO / "manifests" / "samples"
CRD_NAMES = ("consulservices.tether.dev", "etcdconfigs.tether.dev", "tetherpolicies.tether.dev")

Env = dict[str, str]
Manifest = dict[str, Any]


def _consul_service(spec: dict[str, Any] | None, name: str = "bad") -> Manifest:
    return resource("ConsulService", name, spec)


def _etcd_config(spec: dict[str, Any] | None) -> Manifest:
    return resource("EtcdConfig", "bad", spec)


def _policy(spec: dict[str, Any] | None) -> Manifest:
    return resource("TetherPolicy", "bad", spec)


def _http_check(**extra: Any) -> dict[str, Any]:
    return {"name": "http", "http": "http://10.0.0.1:8080/healthz", "interval": "10s", **extra}


def _tcp_check(**extra: Any) -> dict[str, Any]:
    return {"name": "tcp", "tcp": "10.0.0.1:5432", "interval": "10s", **extra}


# (test id, manifest, field path that must appear in the error)
INVALID: list[tuple[str, Manifest, str]] = [
    # --- ConsulService -------------------------------------------------------
    ("port-zero", _consul_service({"port": 0}), "spec.port"),
    ("port-65536", _consul_service({"port": 65536}), "spec.port"),
    ("port-string", _consul_service({"port": "80"}), "spec.port"),
    ("port-missing", _consul_service({"address": "10.0.0.1"}), "spec.port"),
    ("spec-missing", _consul_service(None), "spec"),
    ("unknown-field", _consul_service({"port": 80, "portt": 81}), "spec.portt"),
    (
        "unknown-deletion-policy",
        _consul_service({"port": 80, "deletionPolicy": "Keep"}),
        "spec.deletionPolicy",
    ),
    ("name-bad-characters", _consul_service({"port": 80, "name": "web_api"}), "spec.name"),
    (
        "name-defaulted-from-dotted-metadata",
        _consul_service({"port": 80}, name="web.v2"),
        "spec.name",
    ),
    ("id-bad-characters", _consul_service({"port": 80, "id": "web/1"}), "spec.id"),
    ("address-not-a-host", _consul_service({"port": 80, "address": "web 1!"}), "spec.address"),
    ("duplicate-tags", _consul_service({"port": 80, "tags": ["a", "b", "a"]}), "spec.tags[2]"),
    ("meta-value-not-string", _consul_service({"port": 80, "meta": {"n": 1}}), "spec.meta.n"),
    (
        "meta-value-too-long",
        _consul_service({"port": 80, "meta": {"n": "x" * 513}}),
        "spec.meta.n",
    ),
    (
        "meta-key-reserved-by-consul",
        _consul_service({"port": 80, "meta": {"consul-version": "1"}}),
        "spec.meta",
    ),
    (
        "meta-key-external-source",
        _consul_service({"port": 80, "meta": {"external-source": "helm"}}),
        "spec.meta",
    ),
    (
        "meta-key-reserved-by-tether",
        _consul_service({"port": 80, "meta": {"tether-owner": "me"}}),
        "spec.meta",
    ),
    (
        "meta-key-bad-characters",
        _consul_service({"port": 80, "meta": {"app.version": "1"}}),
        "spec.meta",
    ),
    (
        "meta-key-too-long",
        _consul_service({"port": 80, "meta": {"k" * 129: "v"}}),
        "spec.meta",
    ),
    (
        "meta-too-many-entries",
        _consul_service({"port": 80, "meta": {f"k{i}": "v" for i in range(61)}}),
        "spec.meta",
    ),
    (
        "check-two-types",
        _consul_service({"port": 80, "checks": [_http_check(tcp="10.0.0.1:80")]}),
        "spec.checks[0]",
    ),
    (
        "check-no-type",
        _consul_service({"port": 80, "checks": [{"name": "x", "interval": "10s"}]}),
        "spec.checks[0]",
    ),
    (
        "check-missing-name",
        _consul_service({"port": 80, "checks": [{"tcp": "10.0.0.1:80", "interval": "5s"}]}),
        "spec.checks[0].name",
    ),
    (
        "check-duplicate-names",
        _consul_service({"port": 80, "checks": [_tcp_check(), _http_check(name="tcp")]}),
        "spec.checks[1]",
    ),
    (
        "check-bad-interval",
        _consul_service({"port": 80, "checks": [_http_check(interval="10 seconds")]}),
        "spec.checks[0].interval",
    ),
    (
        "check-bad-ttl",
        _consul_service({"port": 80, "checks": [{"name": "t", "ttl": "-5s"}]}),
        "spec.checks[0].ttl",
    ),
    (
        "check-http-without-interval",
        _consul_service({"port": 80, "checks": [{"name": "h", "http": "http://10.0.0.1/healthz"}]}),
        "spec.checks[0]",
    ),
    (
        "check-ttl-with-interval",
        _consul_service({"port": 80, "checks": [{"name": "t", "ttl": "30s", "interval": "5s"}]}),
        "spec.checks[0]",
    ),
    (
        "check-method-on-tcp",
        _consul_service({"port": 80, "checks": [_tcp_check(method="GET")]}),
        "spec.checks[0]",
    ),
    (
        "check-header-on-grpc",
        _consul_service(
            {
                "port": 80,
                "checks": [{"name": "g", "grpc": "10.0.0.1:9090", "interval": "5s", "header": {"A": ["b"]}}],
            }
        ),
        "spec.checks[0]",
    ),
    (
        "check-header-bad-name",
        _consul_service({"port": 80, "checks": [_http_check(header={"X Probe": ["1"]})]}),
        "spec.checks[0].header",
    ),
    (
        "check-unknown-method",
        _consul_service({"port": 80, "checks": [_http_check(method="FETCH")]}),
        "spec.checks[0].method",
    ),
    (
        "check-tcp-without-port",
        _consul_service({"port": 80, "checks": [_tcp_check(tcp="db.internal")]}),
        "spec.checks[0].tcp",
    ),
    # --- EtcdConfig ----------------------------------------------------------
    ("spec-missing-etcd", _etcd_config(None), "spec"),
    ("prefix-missing", _etcd_config({"data": {"a": "1"}}), "spec.prefix"),
    ("prefix-empty", _etcd_config({"prefix": ""}), "spec.prefix"),
    ("prefix-relative", _etcd_config({"prefix": "config/web"}), "spec.prefix"),
    ("prefix-dot-dot", _etcd_config({"prefix": "/config/../web"}), "spec.prefix"),
    ("prefix-empty-segment", _etcd_config({"prefix": "/config//web"}), "spec.prefix"),
    ("data-key-dot-dot", _etcd_config({"prefix": "/c", "data": {"a/../b": "1"}}), "spec.data"),
    ("data-key-dot", _etcd_config({"prefix": "/c", "data": {".": "1"}}), "spec.data"),
    ("data-key-leading-slash", _etcd_config({"prefix": "/c", "data": {"/a": "1"}}), "spec.data"),
    ("data-key-empty-segment", _etcd_config({"prefix": "/c", "data": {"a//b": "1"}}), "spec.data"),
    ("data-key-trailing-slash", _etcd_config({"prefix": "/c", "data": {"a/": "1"}}), "spec.data"),
    ("data-key-empty", _etcd_config({"prefix": "/c", "data": {"": "1"}}), "spec.data"),
    ("data-value-not-string", _etcd_config({"prefix": "/c", "data": {"a": 1}}), "spec.data.a"),
    (
        "from-both-refs",
        _etcd_config({"prefix": "/c", "from": [{"configMapRef": {"name": "a"}, "secretRef": {"name": "b"}}]}),
        "spec.from[0]",
    ),
    ("from-no-ref", _etcd_config({"prefix": "/c", "from": [{}]}), "spec.from[0]"),
    (
        "from-ref-without-name",
        _etcd_config({"prefix": "/c", "from": [{"configMapRef": {"optional": True}}]}),
        "spec.from[0].configMapRef.name",
    ),
    ("prune-not-bool", _etcd_config({"prefix": "/c", "prune": "yes"}), "spec.prune"),
    (
        "unknown-deletion-policy-etcd",
        _etcd_config({"prefix": "/c", "deletionPolicy": "Retain"}),
        "spec.deletionPolicy",
    ),
    # --- TetherPolicy --------------------------------------------------------
    ("policy-selector-missing", _policy({"consulServiceNames": ["a"]}), "spec.namespaceSelector"),
    (
        "policy-name-pattern",
        _policy({"namespaceSelector": {}, "consulServiceNames": ["pay ments"]}),
        "spec.consulServiceNames[0]",
    ),
    (
        "policy-etcd-prefix-relative",
        _policy({"namespaceSelector": {}, "etcdPrefixes": ["payments"]}),
        "spec.etcdPrefixes[0]",
    ),
    (
        "policy-etcd-prefix-dot-dot",
        _policy({"namespaceSelector": {}, "etcdPrefixes": ["/a/../b"]}),
        "spec.etcdPrefixes[0]",
    ),
    (
        "policy-kv-prefix-rooted",
        _policy({"namespaceSelector": {}, "consulKVPrefixes": ["/shop"]}),
        "spec.consulKVPrefixes[0]",
    ),
    (
        "policy-selector-operator",
        _policy({"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Has"}]}}),
        "spec.namespaceSelector.matchExpressions[0].operator",
    ),
]


def _established(env: Env) -> bool:
    result = kubectl(
        env,
        "get",
        "crd",
        *CRD_NAMES,
        "-o",
        'jsonpath={range .items[*]}{.status.conditions[?(@.type=="Established")].status}{"\\n"}{end}',
        check=False,
    )
    return result.returncode == 0 and result.stdout.split() == ["True"] * len(CRD_NAMES)


def _install_crds(env: Env) -> None:
    # Both ways a user installs them must work. The kustomization is named
    # `Kustomization` (a name kustomize reads) so that `kubectl apply -f crds/`,
    # which only sends *.yaml/*.yml/*.json files, does not trip over it.
    kubectl(env, "apply", "-f", str(CRDS))
    kubectl(env, "apply", "-k", str(CRDS))
    wait_for(_established_in(env), timeout=60, interval=0.5, message="CRDs to be Established")


def _established_in(env: Env) -> Callable[[], bool]:
    return lambda: _established(env)


@pytest.fixture(scope="module")
def crds(dev_env: Env) -> Env:
    """The dev stack's environment, with the CRDs of this working tree installed."""
    _install_crds(dev_env)
    return dev_env


@pytest.fixture(scope="module")
def namespace(crds: Env) -> Iterator[str]:
    """A namespace for dry-run requests (admission needs it to exist); removed after."""
    name = f"tether-crd-schema-{uuid.uuid4().hex[:8]}"
    kubectl(crds, "create", "namespace", name)
    try:
        yield name
    finally:
        # Nothing was stored in it (every request is a dry run), so it is empty.
        delete_namespace(crds, name)


def _dry_run(env: Env, namespace: str, manifest: Manifest) -> subprocess.CompletedProcess[str]:
    """Create ``manifest`` with --dry-run=server: fully validated, never stored."""
    return kubectl(
        env,
        "create",
        "--dry-run=server",
        "-n",
        namespace,
        "-o",
        "json",
        "-f",
        "-",
        input=json.dumps(manifest),
        check=False,
    )


def test_crds_apply_and_become_established(dev_env: Env) -> None:
    for name in CRD_NAMES:
        kubectl(dev_env, "apply", "-f", str(CRDS / f"{name}.yaml"))
    _install_crds(dev_env)


def test_short_names_and_category(crds: Env) -> None:
    result = kubectl(crds, "api-resources", "--api-group=tether.dev", "-o", "wide")
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:] if line}
    assert "csvc" in rows["consulservices"]
    assert "ecfg" in rows["etcdconfigs"]
    assert "tpol" in rows["tetherpolicies"]
    assert "false" in rows["tetherpolicies"], "TetherPolicy is cluster-scoped"
    assert all(row[-1] == "tether" for row in rows.values()), result.stdout
    # The category makes `kubectl get tether` list both kinds.
    kubectl(crds, "get", "tether", "-A")


@pytest.mark.parametrize(
    "path",
    sorted(p for p in SAMPLES.glob("*.yaml") if p.name != "kustomization.yaml"),
    ids=lambda p: p.stem,
)
def test_sample_is_accepted(crds: Env, namespace: str, path: Path) -> None:
    result = kubectl(crds, "apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode == 0, result.stderr


def test_samples_kustomization_is_accepted(crds: Env, namespace: str) -> None:
    kubectl(crds, "apply", "--dry-run=server", "-n", namespace, "-k", str(SAMPLES))


def test_defaults_are_applied(crds: Env, namespace: str) -> None:
    result = _dry_run(crds, namespace, _etcd_config({"prefix": "/c", "from": [{"secretRef": {"name": "s"}}]}))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["spec"] == {
        "prefix": "/c",
        "from": [{"secretRef": {"name": "s", "optional": False}}],
        "prune": True,
        "adopt": False,
        "deletionPolicy": "Delete",
    }

    result = _dry_run(crds, namespace, _consul_service({"port": 80}, name="web"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["spec"] == {"port": 80, "deletionPolicy": "Delete"}


@pytest.mark.parametrize(
    ("manifest", "field"),
    [pytest.param(manifest, field, id=case_id) for case_id, manifest, field in INVALID],
)
def test_invalid_resource_is_rejected(crds: Env, namespace: str, manifest: Manifest, field: str) -> None:
    result = _dry_run(crds, namespace, copy.deepcopy(manifest))
    assert result.returncode != 0, f"accepted, but should have been rejected:\n{result.stdout}"
    # The field path must be named as a path, e.g. "spec.port: Invalid value" or
    # 'unknown field "spec.portt"', not merely occur inside a longer path.
    named = re.compile(rf'(^|[\s"*]){re.escape(field)}[:"]', re.MULTILINE)
    assert named.search(result.stderr), f"error does not name {field}:\n{result.stderr}"


@pytest.mark.parametrize(
    ("field", "phrase"),
    [
        ("consulservices.spec.checks", "exactly one of http, tcp, grpc or ttl"),
        ("consulservices.spec.checks.interval", "Go duration"),
        ("consulservices.spec.meta", "reserved"),
        ("consulservices.status.health", "passing"),
        ("etcdconfigs.spec.prefix", "Must start with '/'"),
        ("etcdconfigs.spec.prune", "Default: true"),
        ("tetherpolicies.spec.etcdPrefixes", "/payments allows /payments and /payments/db"),
        ("tetherpolicies.spec.namespaceSelector", "selects every namespace"),
    ],
)
def test_explain_teaches_the_api(crds: Env, field: str, phrase: str) -> None:
    # The API server publishes a new CRD's OpenAPI a moment after it is Established,
    # so the first attempts may not know the field yet.
    seen: list[str] = []

    def explains() -> bool:
        result = kubectl(crds, "explain", field, check=False)
        seen[:] = [result.stdout + result.stderr]
        return result.returncode == 0 and phrase in " ".join(result.stdout.split())

    try:
        wait_for(explains, timeout=30, interval=1, message=f"`kubectl explain {field}`")
    except Exception:
        print(f"last output of `kubectl explain {field}`:\n{seen[0] if seen else ''}")
        raise


def _names(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return sorted(item["metadata"]["name"] for item in json.loads(result.stdout)["items"])


def test_selectable_fields_filter_on_the_server(crds: Env) -> None:
    """``--field-selector`` on spec.endpoints.service and spec.prefix (selectableFields).

    The objects are stored for real, in a namespace no operator serves (the suites'
    operator serves t-* namespaces), so nothing adds a finalizer and deleting them is
    immediate.
    """
    kubectl(crds, "wait", "--for=condition=Established", "--timeout=60s",
            *(f"crd/{p}.tether.dev" for p in ("consulservices", "etcdconfigs", "consulconfigs")))
    ns = f"tether-crd-fields-{uuid.uuid4().hex[:8]}"
    kubectl(crds, "create", "namespace", ns)
    objects = [
        _consul_service({"endpoints": {"service": "web"}}, name="web-a"),
        _consul_service({"endpoints": {"service": "web", "port": 80}}, name="web-b"),
        _consul_service({"endpoints": {"service": "api"}}, name="api"),
        _consul_service({"port": 80}, name="fixed"),
        resource("EtcdConfig", "cfg-a", {"prefix": "/apps/a", "data": {"k": "v"}}),
        resource("EtcdConfig", "cfg-b", {"prefix": "/apps/b", "data": {"k": "v"}}),
        resource("ConsulConfig", "kv-a", {"prefix": "apps/a", "data": {"k": "v"}}),
        resource("ConsulConfig", "kv-b", {"prefix": "apps/b", "data": {"k": "v"}}),
    ]
    try:
        for obj in objects:
            kubectl(crds, "create", "-n", ns, "-f", "-", input=json.dumps(obj))

        def select(plural: str, selector: str) -> list[str]:
            # The API server publishes a new CRD's selectable fields with its
            # OpenAPI, a moment after it is Established.
            seen: list[list[str]] = []

            def answered() -> bool:
                result = kubectl(crds, "get", plural, "-n", ns, "--field-selector", selector,
                                 "-o", "json", check=False)
                if result.returncode != 0:
                    seen[:] = [[result.stderr]]
                    return False
                seen[:] = [_names(result)]
                return True

            wait_for(answered, timeout=30, interval=0.5, message=f"{plural} by {selector}: {seen}")
            return seen[0]

        assert select("consulservices", "spec.endpoints.service=web") == ["web-a", "web-b"]
        assert select("consulservices", "spec.endpoints.service=api") == ["api"]
        assert select("consulservices", "spec.endpoints.service!=web") == ["api", "fixed"]
        assert select("etcdconfigs", "spec.prefix=/apps/a") == ["cfg-a"]
        assert select("consulconfigs", "spec.prefix=apps/b") == ["kv-b"]
        # A field that is not selectable is refused, not ignored.
        refused = kubectl(crds, "get", "etcdconfigs", "-n", ns, "--field-selector", "spec.prune=true",
                          check=False)
        assert refused.returncode != 0 and "field label not supported" in refused.stderr, refused.stderr
    finally:
        kubectl(crds, "delete", "consulservices,etcdconfigs,consulconfigs", "--all", "-n", ns,
                "--timeout=60s", check=False)
        delete_namespace(crds, ns)
