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
