"""The readiness gate ``tether.dev/consul-passing`` end to end, on the dev stack.

The dev stack has no kubelet and no EndpointSlice controller: the test creates
the Pods and writes their status itself (``pods/status``, as the kubelet would:
``ContainersReady``, and ``Ready`` held false by the gate), and writes the
EndpointSlice with each endpoint's ``targetRef``. Tether then registers the
gated Pod's instance from ``ContainersReady`` and sets the Pod's gate
condition from what Consul reports. Waits are bounded.
"""

from __future__ import annotations

import json
from typing import Any

from test_consulservice_endpoints import KIND, csvc, node_checks, service, until

from tether_dev.harness.kube import apply, get, kubectl, wait_condition
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

GATE = "tether.dev/consul-passing"


def pod(name: str, *, gated: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
    if gated:
        spec["readinessGates"] = [{"conditionType": GATE}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def kubelet(env: dict[str, str], namespace: str, name: str, *, containers_ready: bool, ip: str) -> None:
    """What the kubelet would report: containers' readiness; Ready false (the gate holds it)."""
    flag = "True" if containers_ready else "False"
    patch = {"status": {"phase": "Running", "podIP": ip, "conditions": [
        {"type": "ContainersReady", "status": flag},
        {"type": "Ready", "status": "False"},
    ]}}
    kubectl(env, "patch", "pod", name, "-n", namespace, "--subresource=status", "--type=strategic",
            "-p", json.dumps(patch))


def gated_slice(name: str, svc: str, namespace: str, pods: list[tuple[str, str, str]]) -> dict[str, Any]:
    """An EndpointSlice whose endpoints are not ready (gate held), with targetRefs to (address, pod, uid)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/service-name": svc, "endpointslice.kubernetes.io/managed-by": "e2e.tether.dev",
        }},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [address], "conditions": {"ready": False, "serving": False, "terminating": False},
             "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod_name, "uid": uid}}
            for address, pod_name, uid in pods
        ],
    }


def gate(env: dict[str, str], namespace: str, name: str) -> dict[str, Any] | None:
    obj = get(env, namespace, "pod", name) or {}
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == GATE), None)


def wait_gate(
    env: dict[str, str], namespace: str, name: str, status: str, op: OperatorProcess
) -> dict[str, Any]:
    try:
        wait_for(lambda: (gate(env, namespace, name) or {}).get("status") == status, timeout=30, interval=0.1,
                 message=f"Pod {name}'s {GATE} to be {status}")
    except AssertionError as exc:
        found = gate(env, namespace, name)
        raise AssertionError(f"{exc}\ngate: {found}\n--- operator log:\n{op.log_tail()}") from None
    found = gate(env, namespace, name)
    assert found is not None
    return found


def test_the_gate_opens_when_consul_passes_and_closes_when_the_containers_fail(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    env = dev_env
    apply(env, namespace, service("gw", [("http", 80, 8080)]))
    apply(env, namespace, pod("gw-0", gated=True))
    apply(env, namespace, pod("gw-1", gated=False))
    uids = {n: (get(env, namespace, "pod", n) or {})["metadata"]["uid"] for n in ("gw-0", "gw-1")}
    kubelet(env, namespace, "gw-0", containers_ready=True, ip="10.5.0.1")
    kubelet(env, namespace, "gw-1", containers_ready=True, ip="10.5.0.2")
    apply(env, namespace, gated_slice(
        "gw-a", "gw", namespace, [("10.5.0.1", "gw-0", uids["gw-0"]), ("10.5.0.2", "gw-1", uids["gw-1"])]
    ))
    apply(env, namespace, csvc("gw", endpoints={"service": "gw"}))
    wait_condition(env, namespace, KIND, "gw", op=operator)

    # The gated Pod is registered from ContainersReady although its endpoint is
    # not ready; the ungated one follows its endpoint (not ready: critical).
    until(env, namespace, "gw", {"10.5.0.1": (8080, "passing"), "10.5.0.2": (8080, "critical")}, op=operator)
    opened = wait_gate(env, namespace, "gw-0", "True", operator)
    assert opened["reason"] == "ConsulPassing" and opened["lastTransitionTime"]
    # Consul agrees at the moment the gate says so.
    assert node_checks(env)[f"{namespace}-gw-10.5.0.1-8080:endpoint"]["Status"] == "passing"
    assert gate(env, namespace, "gw-1") is None  # no gate listed: never touched

    # The containers stop being ready: the instance turns critical, the gate closes.
    kubelet(env, namespace, "gw-0", containers_ready=False, ip="10.5.0.1")
    until(env, namespace, "gw", {"10.5.0.1": (8080, "critical"), "10.5.0.2": (8080, "critical")}, op=operator)
    closed = wait_gate(env, namespace, "gw-0", "False", operator)
    assert closed["reason"] == "ConsulNotPassing" and closed["message"]

    # And back: passing in Consul first, then the gate.
    kubelet(env, namespace, "gw-0", containers_ready=True, ip="10.5.0.1")
    until(env, namespace, "gw", {"10.5.0.1": (8080, "passing"), "10.5.0.2": (8080, "critical")}, op=operator)
    wait_gate(env, namespace, "gw-0", "True", operator)
    assert gate(env, namespace, "gw-1") is None
