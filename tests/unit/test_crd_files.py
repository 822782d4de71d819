"""The CRD and sample files, checked without a server.

What the API server validates is proven in ``tests/e2e/test_crd_schema.py``; these
tests hold the parts of the contract a server would not complain about: names, short
names, categories, printer columns, defaults, and a description on every field so
that ``kubectl explain`` documents the whole API.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether.api import configs, consulservices, policies

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
SAMPLES = REPO / "manifests" / "samples"

Schema = dict[str, Any]

# kind -> (file, plural, short name, spec fields, status fields, printer columns)
EXPECTED: dict[str, tuple[str, str, str, set[str], set[str], list[str]]] = {
    "ConsulService": (
        "consulservices.tether.dev.yaml",
        "consulservices",
        "csvc",
        {"name", "id", "address", "port", "tags", "meta", "checks", "endpoints", "deletionPolicy"},
        {"observedGeneration", "conditions", "serviceID", "health", "instances"},
        ["Service", "Address", "Port", "Ready", "Health", "Age"],
    ),
    "EtcdConfig": (
        "etcdconfigs.tether.dev.yaml",
        "etcdconfigs",
        "ecfg",
        {"prefix", "data", "from", "prune", "adopt", "deletionPolicy"},
        {"observedGeneration", "conditions", "keys", "revision"},
        ["Prefix", "Keys", "Ready", "Age"],
    ),
    "ConsulConfig": (
        "consulconfigs.tether.dev.yaml",
        "consulconfigs",
        "ccfg",
        {"prefix", "data", "from", "prune", "adopt", "deletionPolicy"},
        {"observedGeneration", "conditions", "keys", "modifyIndex"},
        ["Prefix", "Keys", "Ready", "Age"],
    ),
    "TetherPolicy": (
        "tetherpolicies.tether.dev.yaml",
        "tetherpolicies",
        "tpol",
        {"namespaceSelector", "consulServiceNames", "etcdPrefixes", "consulKVPrefixes", "allowAdopt"},
        {"observedGeneration", "conditions", "namespaces", "forbidden"},
        ["Namespaces", "Forbidden", "Age"],
    ),
}
# The kinds users create in their namespaces; TetherPolicy is cluster-scoped.
NAMESPACED = {"ConsulService", "EtcdConfig", "ConsulConfig"}
# The config kinds share one spec; they differ in the shape of a key.
CONFIG_KINDS = {"EtcdConfig": configs.ETCD, "ConsulConfig": configs.CONSUL}
KINDS = sorted(EXPECTED)


def _load(path: Path) -> Any:
    with path.open(encoding="utf-8") as stream:
        return yaml.safe_load(stream)


def _crd(kind: str) -> dict[str, Any]:
    crd = _load(CRDS / EXPECTED[kind][0])
    assert isinstance(crd, dict)
    return crd


def _version(kind: str) -> dict[str, Any]:
    versions = _crd(kind)["spec"]["versions"]
    assert len(versions) == 1
    version = versions[0]
    assert isinstance(version, dict)
    return version


def _schema(kind: str) -> Schema:
    schema = _version(kind)["schema"]["openAPIV3Schema"]
    assert isinstance(schema, dict)
    return schema


def _walk(schema: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    """Every schema node below ``schema`` (not itself), with its field path."""
    for name, child in schema.get("properties", {}).items():
        yield f"{path}.{name}", child
        yield from _walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield f"{path}[]", schema["items"]
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield f"{path}{{}}", schema["additionalProperties"]
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def _nodes(kind: str) -> list[tuple[str, Schema]]:
    return [(path, node) for path, node in _walk(_schema(kind), "") if path != ".metadata"]


@pytest.mark.parametrize("kind", KINDS)
def test_names_scope_and_version(kind: str) -> None:
    file, plural, short, *_ = EXPECTED[kind]
    crd = _crd(kind)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{plural}.tether.dev" == file.removesuffix(".yaml")
    spec = crd["spec"]
    assert spec["group"] == "tether.dev"
    assert spec["scope"] == ("Namespaced" if kind in NAMESPACED else "Cluster")
    names = spec["names"]
    assert names["kind"] == kind
    assert names["plural"] == plural
    assert names["singular"] == kind.lower()
    assert names["shortNames"] == [short]
    assert names["categories"] == ["tether"]
    version = _version(kind)
    assert version["name"] == "v1alpha1"
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_has_a_description(kind: str) -> None:
    schema = _schema(kind)
    assert schema.get("description", "").strip()
    missing = [path for path, node in _nodes(kind) if not str(node.get("description", "")).strip()]
    assert missing == [], f"fields without a description: {missing}"


@pytest.mark.parametrize("kind", KINDS)
def test_every_node_has_a_type(kind: str) -> None:
    # A port name or number is the one place without a type: Kubernetes' int-or-string.
    untyped = [
        path for path, node in _nodes(kind)
        if "type" not in node and not node.get("x-kubernetes-int-or-string")
    ]
    assert untyped == []


@pytest.mark.parametrize("kind", KINDS)
def test_contract_fields_are_declared(kind: str) -> None:
    _, _, _, spec_fields, status_fields, _ = EXPECTED[kind]
    props = _schema(kind)["properties"]
    assert set(props["spec"]["properties"]) == spec_fields
    assert set(props["status"]["properties"]) == status_fields
    assert "spec" in _schema(kind)["required"]


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns(kind: str) -> None:
    *_, expected = EXPECTED[kind]
    columns = _version(kind)["additionalPrinterColumns"]
    default_columns = [c["name"] for c in columns if c.get("priority", 0) == 0]
    assert default_columns == expected
    for column in columns:
        assert column["type"] in {"string", "integer", "number", "boolean", "date"}
        if column["name"] != "Age":
            assert column.get("description"), column["name"]
        _assert_json_path_exists(kind, column["jsonPath"])
    ready = next(c for c in columns if c["name"] == "Ready")
    # A policy's Ready (its patterns are valid) is a wide column; the resources' is a default one.
    assert ready.get("priority", 0) == (0 if kind in NAMESPACED else 1)
    assert ready["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'


def _assert_json_path_exists(kind: str, json_path: str) -> None:
    if json_path == ".metadata.creationTimestamp":
        return
    node = _schema(kind)
    # A filter such as [?(@.type=="Ready")] selects list items: drop it, keep "[]".
    plain = re.sub(r"\[\?\(.*?\)\]", "[]", json_path)
    for part in plain.lstrip(".").split("."):
        name = part.split("[", 1)[0]
        node = node["properties"][name]
        if "[" in part:
            node = node["items"]


@pytest.mark.parametrize("kind", KINDS)
def test_status_conditions_have_the_standard_shape(kind: str) -> None:
    conditions = _schema(kind)["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert "type" in item["required"]


def test_defaults() -> None:
    consul = _schema("ConsulService")["properties"]["spec"]["properties"]
    assert consul["deletionPolicy"]["default"] == "Delete"
    nodes = list(consul.items())
    for kind in CONFIG_KINDS:
        config = _schema(kind)["properties"]["spec"]["properties"]
        assert config["deletionPolicy"]["default"] == "Delete", kind
        assert config["prune"]["default"] is True, kind
        assert config["adopt"]["default"] is False, kind
        for ref in ("configMapRef", "secretRef"):
            optional = config["from"]["items"]["properties"][ref]["properties"]["optional"]
            assert optional["default"] is False, (kind, ref)
        nodes += [(f"{kind}.{name}", node) for name, node in config.items()]
    policy = _schema("TetherPolicy")["properties"]["spec"]["properties"]
    assert policy["allowAdopt"]["default"] is False
    nodes += [(f"TetherPolicy.{name}", node) for name, node in policy.items()]
    for name, node in nodes:
        if "default" in node:
            assert "Default:" in node["description"], name


def test_required_fields() -> None:
    # port is required unless endpoints is set: a CEL rule, as a schema's required cannot say it.
    rules = [r["rule"] for r in _schema("ConsulService")["x-kubernetes-validations"]]
    assert "has(self.spec.endpoints) || has(self.spec.port)" in rules
    endpoints = _schema("ConsulService")["properties"]["spec"]["properties"]["endpoints"]
    assert endpoints["required"] == ["service"]
    for kind in CONFIG_KINDS:
        assert _schema(kind)["properties"]["spec"]["required"] == ["prefix"], kind
    port = _schema("ConsulService")["properties"]["spec"]["properties"]["port"]
    assert (port["minimum"], port["maximum"]) == (1, 65535)
    assert _schema("TetherPolicy")["properties"]["spec"]["required"] == ["namespaceSelector"]


def test_policy_schema_and_operator_agree_on_patterns() -> None:
    """What the schema lets through the operator accepts too (the operator is the guard
    for the rest: selector terms the schema cannot check)."""
    spec = _schema("TetherPolicy")["properties"]["spec"]["properties"]
    names = spec["consulServiceNames"]["items"]["pattern"]
    etcd, kv = spec["etcdPrefixes"]["items"]["pattern"], spec["consulKVPrefixes"]["items"]["pattern"]
    for name in ("payments", "team-a-*", "*"):
        assert re.search(names, name)
        assert policies.parse("p", {"namespaceSelector": {}, "consulServiceNames": [name]}).valid
    assert not re.search(names, "pay ments") and not re.search(names, "a/b")
    assert re.search(etcd, "/payments") and not re.search(etcd, "payments")
    assert re.search(kv, "shop/payments") and not re.search(kv, "/shop")
    ops = spec["namespaceSelector"]["properties"]["matchExpressions"]["items"]["properties"]["operator"]
    assert ops["enum"] == ["In", "NotIn", "Exists", "DoesNotExist"]


def _without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_without_descriptions(v) for v in node]
    return node


def test_config_kinds_share_one_spec_apart_from_the_prefix() -> None:
    """One engine, one spec: only the shape of ``prefix`` tells the two kinds apart."""
    etcd, consul = (
        _without_descriptions(_schema(kind)["properties"]["spec"]["properties"]) for kind in CONFIG_KINDS
    )
    etcd_prefix, consul_prefix = etcd.pop("prefix"), consul.pop("prefix")
    assert etcd == consul
    assert re.search(etcd_prefix["pattern"], "/app/config")
    assert not re.search(etcd_prefix["pattern"], "app/config")
    assert re.search(consul_prefix["pattern"], "shop/payments")
    assert not re.search(consul_prefix["pattern"], "/shop/payments")


@pytest.mark.parametrize("kind", sorted(CONFIG_KINDS))
def test_config_kinds_match_their_flavor(kind: str) -> None:
    """The operator's flavor and the CRD name the same kind, plural and status field."""
    flavor = CONFIG_KINDS[kind]
    plural = EXPECTED[kind][1]
    assert (flavor.kind, flavor.plural) == (kind, plural)
    status = _schema(kind)["properties"]["status"]["properties"]
    assert status[flavor.revision_field]["type"] == "integer"
    columns = {c["jsonPath"] for c in _version(kind)["additionalPrinterColumns"]}
    assert f".status.{flavor.revision_field}" in columns


@pytest.mark.parametrize("kind", KINDS)
def test_validation_rules_have_messages(kind: str) -> None:
    nodes = [("", _schema(kind)), *_nodes(kind)]
    for path, node in nodes:
        for rule in node.get("x-kubernetes-validations", []):
            assert rule.get("message") or rule.get("messageExpression"), (path, rule["rule"])


@pytest.mark.parametrize("kind", KINDS)
def test_patterns_compile(kind: str) -> None:
    for path, node in _nodes(kind):
        if "pattern" in node:
            try:
                re.compile(node["pattern"])
            except re.error as exc:
                pytest.fail(f"{path}: {exc}")


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("10s", True),
        ("1m30s", True),
        ("1.5h", True),
        ("250ms", True),
        ("100µs", True),
        ("10", False),
        ("-5s", False),
        ("10 seconds", False),
        ("", False),
    ],
)
def test_duration_pattern(value: str, ok: bool) -> None:
    check = _schema("ConsulService")["properties"]["spec"]["properties"]["checks"]["items"]
    for field in ("interval", "timeout", "ttl", "deregisterCriticalServiceAfter"):
        assert bool(re.fullmatch(check["properties"][field]["pattern"], value)) is ok


@pytest.mark.parametrize("kind", KINDS)
def test_lists_and_maps_are_bounded(kind: str) -> None:
    # Bounds keep the CEL cost estimate within the API server's budget and keep
    # one resource from growing without limit.
    for path, node in _nodes(kind):
        if path.startswith(".status"):
            continue
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, path


def test_crds_kustomization_lists_every_file() -> None:
    kustomization = _load(CRDS / "Kustomization")
    assert sorted(kustomization["resources"]) == sorted(e[0] for e in EXPECTED.values())


def _samples() -> list[Path]:
    return sorted(p for p in SAMPLES.glob("*.yaml") if p.name != "kustomization.yaml")


def test_samples_kustomization_lists_every_sample() -> None:
    kustomization = _load(SAMPLES / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == [p.name for p in _samples()]


def test_samples_cover_the_interesting_cases() -> None:
    docs = [_load(p) for p in _samples()]
    services = [d["spec"] for d in docs if d["kind"] == "ConsulService"]
    specs = [d["spec"] for d in docs if d["kind"] == "EtcdConfig"]
    check_types = {"http", "tcp", "grpc", "ttl"}
    check_kinds = {k for s in services for c in s.get("checks", []) for k in c if k in check_types}
    assert {"http", "tcp", "ttl"} <= check_kinds
    assert any(set(s) == {"port"} for s in services), "a minimal ConsulService"
    assert any("data" in c for c in specs)
    refs = {k for c in specs for item in c.get("from", []) for k in item}
    assert refs == {"configMapRef", "secretRef"}
    kinds = {d["kind"] for d in docs}
    assert set(EXPECTED) <= kinds, f"a sample of every kind: {set(EXPECTED) - kinds} missing"


@pytest.mark.parametrize("path", _samples(), ids=lambda p: p.stem)
def test_sample_is_namespace_free_and_valid_for_the_operator(path: Path) -> None:
    doc = _load(path)
    # No namespace: `kubectl apply -n <ns>` decides where samples land.
    assert "namespace" not in doc["metadata"]
    if doc["kind"] == "ConsulService":
        consulservices.parse("default", doc["metadata"]["name"], doc["spec"])
    elif doc["kind"] in CONFIG_KINDS:
        configs.parse(doc["spec"], CONFIG_KINDS[doc["kind"]])
    elif doc["kind"] == "TetherPolicy":
        parsed = policies.parse(doc["metadata"]["name"], doc["spec"])
        assert parsed.valid, parsed.problems
        # `make run` applies the samples to a namespace without labels: a sample
        # policy must neither select it nor reserve what the other samples use.
        assert not parsed.selects({})
    else:
        assert doc["kind"] in {"ConfigMap", "Secret"}


def test_samples_reference_sources_in_the_same_directory() -> None:
    docs = [_load(p) for p in _samples()]
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in docs:
        if doc["kind"] not in CONFIG_KINDS:
            continue
        for item in doc["spec"].get("from", []):
            for ref, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                if ref in item and not item[ref].get("optional", False):
                    assert (kind, item[ref]["name"]) in present


def test_sample_policies_leave_the_other_samples_allowed() -> None:
    """`make run` applies every sample to one unlabelled namespace: all must stay allowed."""
    docs = [_load(p) for p in _samples()]
    rules = [policies.parse(d["metadata"]["name"], d["spec"]) for d in docs if d["kind"] == "TetherPolicy"]
    assert rules, "a sample TetherPolicy"
    for doc in docs:
        if doc["kind"] == "ConsulService":
            name = consulservices.parse("default", doc["metadata"]["name"], doc["spec"]).name
            claims = policies.Claims("service", name)
        elif doc["kind"] in CONFIG_KINDS:
            subject: policies.Subject = "etcd" if doc["kind"] == "EtcdConfig" else "consulkv"
            claims = policies.Claims(subject, doc["spec"]["prefix"], bool(doc["spec"].get("adopt")))
        else:
            continue
        decision = policies.decide(rules, "default", {}, claims, default="allow")
        assert decision.allowed, (doc["metadata"]["name"], decision.message)
