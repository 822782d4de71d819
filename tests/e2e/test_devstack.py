"""The dev stack itself: it comes up, answers, heals, enforces RBAC and goes away cleanly."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether_dev import processes, stack
from tether_dev.harness.devstack import state_dir, tether
from tether_dev.harness.kube import delete_namespace, kubectl
from tether_dev.harness.waiting import wait_for


def status() -> dict[str, Any]:
    report = json.loads(tether("dev", "--dir", str(state_dir()), "status", "--json").stdout)
    components: dict[str, Any] = report["components"]
    return components


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_up_brings_every_component_up(dev_env: dict[str, str]) -> None:
    components = status()
    assert set(components) == {"kube-etcd", "kube-apiserver", "etcd", "consul"}
    for name, component in components.items():
        assert component["running"], f"{name}: {component}"
        assert component["ready"], f"{name}: {component}"
        assert isinstance(component["pid"], int), f"{name}: {component}"
        assert component["url"].startswith(("http://127.0.0.1:", "https://127.0.0.1:")), name

    # The env file points at those very components, and at the stack's kubectl.
    assert Path(dev_env["KUBECONFIG"]).is_absolute()
    assert dev_env["CONSUL_HTTP_ADDR"] == components["consul"]["url"]
    assert dev_env["ETCD_ENDPOINTS"] == components["etcd"]["url"]
    kubectl_path = shutil.which("kubectl", path=dev_env["PATH"])
    assert kubectl_path == str(state_dir() / "bin" / "kubectl")

    assert kubectl(dev_env, "get", "--raw", "/readyz").stdout == "ok"
    assert http("GET", f"{dev_env['CONSUL_HTTP_ADDR']}/v1/status/leader")  # non-empty
    assert http("GET", f"{dev_env['ETCD_ENDPOINTS']}/health")["health"] == "true"
    # The CRDs are installed (when crds/ has them) and served.
    crds = list((stack.crds_dir()).glob("*.tether.dev.yaml"))
    if crds:
        names = kubectl(dev_env, "get", "crd", "-o", "name").stdout.split()
        for crd in crds:
            assert f"customresourcedefinition.apiextensions.k8s.io/{crd.stem}" in names


def test_rbac_is_on_and_service_account_tokens_work(
    dev_env: dict[str, str], tmp_path: Path
) -> None:
    namespace = f"devstack-rbac-{uuid.uuid4().hex[:8]}"
    kubectl(dev_env, "create", "namespace", namespace)
    try:
        kubectl(dev_env, "create", "serviceaccount", "nobody", "-n", namespace)
        token = kubectl(
            dev_env, "create", "token", "nobody", "-n", namespace, "--duration=10m"
        ).stdout.strip()

        # A kubeconfig with only that token (the admin one also carries a client
        # certificate, which would authenticate first).
        admin = yaml.safe_load(Path(dev_env["KUBECONFIG"]).read_text())
        cluster = admin["clusters"][0]["cluster"]
        token_config = tmp_path / "token.kubeconfig"
        token_config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "dev", "cluster": cluster}],
                    "users": [{"name": "nobody", "user": {"token": token}}],
                    "contexts": [{"name": "dev", "context": {"cluster": "dev", "user": "nobody"}}],
                    "current-context": "dev",
                }
            )
        )
        as_nobody = {**dev_env, "KUBECONFIG": str(token_config)}

        whoami = kubectl(as_nobody, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
        assert whoami.stdout == f"system:serviceaccount:{namespace}:nobody"
        can_i = kubectl(as_nobody, "auth", "can-i", "list", "secrets", "-n", namespace, check=False)
        assert can_i.stdout.strip() == "no"
        denied = kubectl(as_nobody, "get", "secrets", "-n", namespace, check=False)
        assert denied.returncode != 0
        assert "forbidden" in denied.stderr.lower()
        # The admin certificate (group system:masters) may do anything.
        assert kubectl(dev_env, "auth", "can-i", "list", "secrets", "-A").stdout.strip() == "yes"
    finally:
        kubectl(dev_env, "delete", "serviceaccount", "nobody", "-n", namespace, check=False)
        delete_namespace(dev_env, namespace)


def test_up_restarts_only_what_is_down_and_etcd_keeps_its_data(dev_env: dict[str, str]) -> None:
    etcd = dev_env["ETCD_ENDPOINTS"]
    key, value = f"/tether-e2e/devstack/{uuid.uuid4().hex}", "survives a restart"
    http("POST", f"{etcd}/v3/kv/put", {"key": b64(key), "value": b64(value)})
    before = status()

    os.kill(before["etcd"]["pid"], signal.SIGKILL)
    wait_for(lambda: not status()["etcd"]["running"], timeout=10, message="etcd to be down")

    tether("dev", "--dir", str(state_dir()), "up")
    after = status()
    try:
        assert after["etcd"]["running"]
        assert after["etcd"]["pid"] != before["etcd"]["pid"]
        # Same ports, so every client's configuration stays valid.
        assert after["etcd"]["url"] == before["etcd"]["url"] == etcd
        assert after["etcd"]["ports"] == before["etcd"]["ports"]
        for name in ("kube-etcd", "kube-apiserver", "consul"):
            assert after[name]["pid"] == before[name]["pid"], f"{name} was restarted"

        found = http("POST", f"{etcd}/v3/kv/range", {"key": b64(key)})
        assert [base64.b64decode(kv["value"]).decode() for kv in found.get("kvs", [])] == [value]
    finally:
        http("POST", f"{etcd}/v3/kv/deleterange", {"key": b64(key)})


def test_down_stops_everything_and_removes_the_state(tmp_path: Path) -> None:
    # A stack of its own: the session's shared stack must stay up.
    directory = tmp_path / "dev"
    dev = stack.DevStack(directory)
    dev.up()
    started = dev.components()
    assert all(component.running for component in started.values())

    dev.down()

    assert not directory.exists()
    for name, component in started.items():
        assert not processes.is_running(component.pid, component.argv), name
    # Nothing else that names the directory survives either.
    assert processes.find(lambda argv: any(str(directory) in arg for arg in argv)) == []
    assert dev.status()["components"]["etcd"] == {
        "pid": None,
        "running": False,
        "ready": False,
        "url": "",
        "log": str(directory / "etcd.log"),
        "ports": {},
    }


def test_a_separate_consul_with_acls_denies_by_default(tmp_path: Path) -> None:
    token = str(uuid.uuid4())
    consul = stack.start_consul(tmp_path, acl_initial_token=token)
    try:
        assert consul.running
        with pytest.raises(urllib.error.HTTPError) as denied:
            http("GET", f"{consul.url}/v1/acl/tokens")
        assert denied.value.code == 403
        tokens = http("GET", f"{consul.url}/v1/acl/tokens", headers={"X-Consul-Token": token})
        assert any(entry["SecretID"] == token for entry in tokens)
    finally:
        stack.stop(consul)
    assert not consul.running
