"""ConsulService against an ACL-enabled Consul: a scoped token works, a wrong one is reported."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether_dev import stack
from tether_dev.harness.consul import Consul
from tether_dev.harness.kube import apply, condition, kubectl, resource, wait_condition
from tether_dev.harness.operator import OperatorProcess

MANAGEMENT = str(uuid.uuid4())
KIND = "consulservice"


@pytest.fixture(scope="module")
def acl_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    directory: Path = tmp_path_factory.mktemp("acl-consul")
    component = stack.start_consul(directory, acl_initial_token=MANAGEMENT, name="consul-acl")
    try:
        yield {"CONSUL_HTTP_ADDR": component.url}
    finally:
        stack.stop(component)


def scoped_token(env: dict[str, str]) -> str:
    """A token that may write only services named acl-*, and read what the watches need."""
    rules = "\n".join(
        [
            'service_prefix "acl-" { policy = "write" }',
            'service_prefix "" { policy = "read" }',
            'node_prefix "" { policy = "read" }',
        ]
    )
    policy = Consul.from_env(env).call(
        "PUT",
        "/v1/acl/policy",
        {"Name": f"tether-{uuid.uuid4().hex[:6]}", "Rules": rules},
        token=MANAGEMENT,
    )
    body = {"Policies": [{"ID": policy["ID"]}]}
    token = Consul.from_env(env).call("PUT", "/v1/acl/token", body, token=MANAGEMENT)
    return str(token["SecretID"])


def csvc(resource_name: str, **spec: object) -> dict[str, object]:
    # Not `name`: that is a spec field (the Consul service name).
    return resource("ConsulService", resource_name, spec)


def test_scoped_token_works_and_wrong_token_is_reported(
    dev_env: dict[str, str], acl_consul: dict[str, str], tmp_path: Path
) -> None:
    # Namespaces outside the shared operator's "t-*" so only this test's operators act.
    ns = f"x-acl-{uuid.uuid4().hex[:6]}"
    kubectl(dev_env, "create", "namespace", ns)
    env = {**dev_env, **acl_consul}
    token = scoped_token(env)
    op = OperatorProcess(
        env, tmp_path / "op.log", args=("-n", ns), extra_env={"CONSUL_HTTP_TOKEN": token}, verbose=True
    ).start()
    try:
        apply(env, ns, csvc("allowed", name="acl-web", id="acl-web-1", port=80))
        wait_condition(env, ns, KIND, "allowed", op=op)
        svc = Consul.from_env(env).call("GET", "/v1/agent/service/acl-web-1", token=MANAGEMENT)
        assert svc is not None and svc["Meta"]["tether-name"] == "allowed"
        # Outside the token's scope: refused by Consul, reported as such.
        apply(env, ns, csvc("denied", name="other", id="other-1", port=80))
        obj = wait_condition(env, ns, KIND, "denied", status="False", reason="BackendRejected", op=op)
        assert "CONSUL_HTTP_TOKEN" in condition(obj)["message"]
    finally:
        op.stop()
    # A token Consul does not know: every call is refused, and the status says why.
    bad = OperatorProcess(
        env,
        tmp_path / "bad.log",
        args=("-n", ns),
        extra_env={"CONSUL_HTTP_TOKEN": str(uuid.uuid4())},
        verbose=True,
    ).start()
    try:
        apply(env, ns, csvc("wrong", name="acl-wrong", id="acl-wrong-1", port=80))
        obj = wait_condition(env, ns, KIND, "wrong", status="False", reason="BackendRejected", op=bad)
        message = condition(obj)["message"]
        assert "ACL not found" in message or "Permission denied" in message, message
        assert Consul.from_env(env).call("GET", "/v1/agent/service/acl-wrong-1", token=MANAGEMENT) is None
    finally:
        bad.stop()
    # Clean up with a working operator, so the finalizers are released.
    good = OperatorProcess(
        env, tmp_path / "good.log", args=("-n", ns), extra_env={"CONSUL_HTTP_TOKEN": MANAGEMENT}, verbose=True
    ).start()
    try:
        kubectl(env, "delete", "consulservices", "--all", "-n", ns, "--timeout=60s")
        assert Consul.from_env(env).call("GET", "/v1/agent/service/acl-web-1", token=MANAGEMENT) is None
    finally:
        good.stop()
