"""Endpoints mode on kind: real Pods, a real readiness probe, the real EndpointSlice controller.

The dev-stack suite writes EndpointSlices itself (it has no controller-manager
or kubelet); here the kubelet runs the probe, the EndpointSlice controller
writes the slices, and Tether (a Deployment from ``manifests/``) follows them
into Consul's catalog. The workload is Python's http.server in the operator
image, the one image every cluster of this suite has (nothing can be pulled on
a machine without a registry). Its readiness probe is an HTTP GET of a file the
test creates and removes with ``kubectl exec``, so a Pod's readiness flips on
the test's command while the Pod itself keeps running.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kind_support import (
    CLUSTER_MARKER,
    OPERATOR_IMAGE,
    Consul,
    KindCluster,
    Manifest,
    wait_for,
)

pytestmark = pytest.mark.kind

#: The synthetic node: TETHER_CONSUL_NODE's default for the overlay's cluster name.
NODE = f"tether-{CLUSTER_MARKER}"
APP = "probed"
TARGET_PORT = 8080
#: The readiness probe asks for this file; the server serves its directory.
READY_FILE = "/www/ready"
#: Generous bounds: the kubelet probes every second and the EndpointSlice
#: controller batches its writes (up to a second), then Tether needs under a
#: second; the machine is shared, and this test asserts no wall time.
FLIP_TIMEOUT = 60.0
POD_TIMEOUT = 150.0

# Creates the ready file, then serves its directory: a Pod starts ready.
SERVER = (
    "import pathlib, runpy, sys; "
    f"pathlib.Path('{READY_FILE}').touch(); "
    f"sys.argv = ['http.server', '{TARGET_PORT}', '--directory', '/www']; "
    "runpy.run_module('http.server', run_name='__main__', alter_sys=True)"
)


def _workload(namespace: str, replicas: int) -> list[Manifest]:
    labels = {"app": APP}
    return [
        {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": APP, "namespace": namespace},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532,
                                            "seccompProfile": {"type": "RuntimeDefault"}},
                        "volumes": [{"name": "www", "emptyDir": {}}],
                        "containers": [{
                            "name": "http",
                            "image": OPERATOR_IMAGE,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["python", "-c", SERVER],
                            "ports": [{"name": "http", "containerPort": TARGET_PORT}],
                            "volumeMounts": [{"name": "www", "mountPath": "/www"}],
                            # One failed probe is enough: the flip shows within seconds.
                            "readinessProbe": {
                                "httpGet": {"path": "/ready", "port": TARGET_PORT},
                                "periodSeconds": 1, "failureThreshold": 1,
                                "successThreshold": 1, "timeoutSeconds": 1,
                            },
                            "securityContext": {"allowPrivilegeEscalation": False,
                                                "capabilities": {"drop": ["ALL"]}},
                        }],
                    },
                },
            },
        },
        {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": APP, "namespace": namespace},
            # Two ports, so spec.endpoints.port must pick one by name; the
            # instances carry the Pods' target port, not the Service's.
            "spec": {"selector": labels, "ports": [
                {"name": "http", "port": 80, "targetPort": TARGET_PORT},
                {"name": "other", "port": 81, "targetPort": 9999},
            ]},
        },
    ]


def _consul_service(namespace: str) -> Manifest:
    return {
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "ConsulService",
        "metadata": {"name": APP, "namespace": namespace},
        "spec": {"endpoints": {"service": APP, "port": "http"}, "tags": ["kind"]},
    }


def _pods(kind_cluster: KindCluster, namespace: str) -> dict[str, dict[str, Any]]:
    """The Deployment's Pods that are not being deleted, by name."""
    pods = kind_cluster.get_json("pods", "-n", namespace, "-l", f"app={APP}")
    return {
        p["metadata"]["name"]: p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")
    }


def _pod_ready(pod: dict[str, Any]) -> bool:
    conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return conditions.get("Ready") == "True"


def _instances(consul: Consul, namespace: str) -> dict[str, tuple[int, str]]:
    """address → (port, check status) of this test's instances on the synthetic node."""
    out = {}
    for svc, status in consul.node_instances(NODE).values():
        meta = svc.get("Meta") or {}
        if (meta.get("tether-namespace"), meta.get("tether-name")) == (namespace, APP):
            out[str(svc["Address"])] = (int(svc["Port"]), status)
    return out


def _expect(consul: Consul, namespace: str, want: dict[str, tuple[int, str]], what: str) -> float:
    """Wait until the catalog holds exactly ``want``; seconds it took (printed, not asserted)."""
    started = time.monotonic()
    try:
        wait_for(lambda: _instances(consul, namespace) == want, timeout=FLIP_TIMEOUT,
                 interval=0.25, message=f"{what}: Consul's instances to be {want}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nactual: {_instances(consul, namespace)}") from None
    took = time.monotonic() - started
    print(f"\n{what}: catalog matched {len(want)} instance(s) after {took:.1f}s")
    return took


def _settled_pods(kind_cluster: KindCluster, namespace: str, count: int) -> dict[str, str]:
    """Wait for exactly ``count`` live Pods, all Ready, and no terminating one; name → Pod IP."""
    def settled() -> dict[str, str] | None:
        pods = kind_cluster.get_json("pods", "-n", namespace, "-l", f"app={APP}")["items"]
        if len(pods) != count or not all(_pod_ready(p) and p["status"].get("podIP") for p in pods):
            return None
        if any(p["metadata"].get("deletionTimestamp") for p in pods):
            return None
        return {p["metadata"]["name"]: p["status"]["podIP"] for p in pods}

    found: dict[str, str] = wait_for(settled, timeout=POD_TIMEOUT, interval=1,
                                     message=f"{count} ready Pods of {APP}, none terminating")
    return found


def _set_ready(kind_cluster: KindCluster, namespace: str, pod: str, ready: bool) -> None:
    action = f"pathlib.Path('{READY_FILE}').touch()" if ready else \
        f"pathlib.Path('{READY_FILE}').unlink()"
    kind_cluster.kubectl("exec", "-n", namespace, pod, "-c", "http", "--",
                         "python", "-c", f"import pathlib; {action}", timeout=60)


def _status(kind_cluster: KindCluster, namespace: str) -> dict[str, Any]:
    obj = kind_cluster.get_json("consulservice", APP, "-n", namespace)
    return dict(obj.get("status") or {})


def test_endpoints_follow_real_pods_and_readiness(
    kind_cluster: KindCluster, consul: Consul, namespace: str
) -> None:
    kind_cluster.apply(*_workload(namespace, replicas=2))
    pods = _settled_pods(kind_cluster, namespace, 2)
    kind_cluster.apply(_consul_service(namespace))
    kind_cluster.wait_ready("consulservice", APP, namespace)

    # Every Pod IP an instance with the Pods' target port, passing.
    _expect(consul, namespace, {ip: (TARGET_PORT, "passing") for ip in pods.values()}, "2 Pods")
    sid_prefix = f"{namespace}-{APP}"
    for sid, (svc, _) in consul.node_instances(NODE).items():
        if (svc.get("Meta") or {}).get("tether-namespace") != namespace:
            continue
        assert sid == f"{sid_prefix}-{svc['Address']}-{TARGET_PORT}", sid
        assert (svc["Service"], svc["Tags"]) == (APP, ["kind"]), svc
        assert svc["Meta"]["tether-cluster"] == CLUSTER_MARKER, svc["Meta"]
    wait_for(lambda: _status(kind_cluster, namespace).get("instances")
             == {"total": 2, "passing": 2, "warning": 0, "critical": 0},
             timeout=30, message="status.instances: 2 passing")

    # One Pod's probe starts failing: the kubelet marks it unready, the
    # EndpointSlice controller says ready=false, and its Consul check goes
    # critical while the other stays passing and the instance stays registered.
    flipped, other = sorted(pods)
    _set_ready(kind_cluster, namespace, flipped, False)
    _expect(consul, namespace, {pods[flipped]: (TARGET_PORT, "critical"),
                                pods[other]: (TARGET_PORT, "passing")}, "probe failing")
    wait_for(lambda: _status(kind_cluster, namespace).get("health") == "warning",
             timeout=30, message="status.health warning (one of two passes)")
    # And back.
    _set_ready(kind_cluster, namespace, flipped, True)
    _expect(consul, namespace, {ip: (TARGET_PORT, "passing") for ip in pods.values()},
            "probe passing again")
    wait_for(lambda: _status(kind_cluster, namespace).get("health") == "passing",
             timeout=30, message="status.health passing again")

    # Scale up: the new Pods appear; scale down: the removed ones go.
    kind_cluster.kubectl("scale", f"deployment/{APP}", "-n", namespace, "--replicas=4")
    pods = _settled_pods(kind_cluster, namespace, 4)
    _expect(consul, namespace, {ip: (TARGET_PORT, "passing") for ip in pods.values()},
            "scaled to 4")
    kind_cluster.kubectl("scale", f"deployment/{APP}", "-n", namespace, "--replicas=1")
    pods = _settled_pods(kind_cluster, namespace, 1)
    _expect(consul, namespace, {ip: (TARGET_PORT, "passing") for ip in pods.values()},
            "scaled to 1")

    # A rollout replaces the Pod: the old IP goes, the new one comes.
    before = dict(pods)
    kind_cluster.kubectl("rollout", "restart", f"deployment/{APP}", "-n", namespace)
    kind_cluster.kubectl("rollout", "status", f"deployment/{APP}", "-n", namespace,
                         "--timeout=120s", timeout=150)
    pods = _settled_pods(kind_cluster, namespace, 1)
    assert not set(pods) & set(before), f"the Pod was not replaced: {before} -> {pods}"
    _expect(consul, namespace, {ip: (TARGET_PORT, "passing") for ip in pods.values()},
            "after the rollout")
    print(f"rollout: {sorted(before.values())} -> {sorted(pods.values())}")
    wait_for(lambda: _status(kind_cluster, namespace).get("instances", {}).get("total") == 1,
             timeout=30, message="status.instances.total 1")

    # Deleting the ConsulService removes its instances (the Pods stay).
    kind_cluster.kubectl("delete", "consulservice", APP, "-n", namespace, "--timeout=60s",
                         timeout=90)
    _expect(consul, namespace, {}, "ConsulService deleted")
    assert _settled_pods(kind_cluster, namespace, 1) == pods
