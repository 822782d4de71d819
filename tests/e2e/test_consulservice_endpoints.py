"""ConsulService endpoints mode end to end: a Service's EndpointSlices as instances in Consul's catalog.

The dev stack runs no kube-controller-manager, so these tests write the
Services and EndpointSlices themselves, as the EndpointSlice controller
would (label ``kubernetes.io/service-name``, ports named after the Service's,
each endpoint's ``ready``/``serving``/``terminating`` conditions).
Waits are bounded and generous: the machine is shared, and no test asserts
wall time (the benchmarks measure it).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether_dev.harness.consul import Consul
from tether_dev.harness.kube import (
    apply,
    condition,
    delete_namespace,
    events,
    get,
    kubectl,
    resource,
    wait_condition,
    wait_gone,
)
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

KIND = "consulservice"
KIND_NAME = "ConsulService"
NODE = "tether-kubernetes"  # the shared operator's cluster is the default, "kubernetes"


# -- what the EndpointSlice controller would write ----------------------------------------


def service(name: str, ports: list[tuple[str, int, int]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"ports": [{"name": n, "port": p, "targetPort": t} for n, p, t in ports]},
    }


def ready(address: str) -> tuple[str, dict[str, bool]]:
    return address, {"ready": True, "serving": True, "terminating": False}


def not_ready(address: str) -> tuple[str, dict[str, bool]]:
    return address, {"ready": False, "serving": False, "terminating": False}


def draining(address: str) -> tuple[str, dict[str, bool]]:
    return address, {"ready": False, "serving": True, "terminating": True}


def endpoint_slice(
    name: str, svc: str, ports: list[tuple[str, int]], eps: list[tuple[str, dict[str, bool]]]
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/service-name": svc,
                "endpointslice.kubernetes.io/managed-by": "e2e.tether.dev",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
        "endpoints": [{"addresses": [a], "conditions": c} for a, c in eps],
    }


def csvc(name: str, **spec: Any) -> dict[str, Any]:
    return resource("ConsulService", name, spec)


def consul(env: dict[str, str], method: str, path: str, body: Any = None) -> Any:
    """One call to the dev stack's Consul agent: the decoded answer, None on 404."""
    return Consul.from_env(env).call(method, path, body)


# -- what Consul's catalog holds ------------------------------------------------------------


def node_services(env: dict[str, str], node: str = NODE) -> dict[str, dict[str, Any]]:
    got = consul(env, "GET", f"/v1/catalog/node-services/{node}")
    return {s["ID"]: s for s in (got or {}).get("Services") or []}


def node_checks(env: dict[str, str], node: str = NODE) -> dict[str, dict[str, Any]]:
    return {c["CheckID"]: c for c in consul(env, "GET", f"/v1/health/node/{node}") or []}


def instances(env: dict[str, str], namespace: str, name: str, node: str = NODE) -> dict[str, tuple[int, str]]:
    """address → (port, check status) of the instances owned by ``namespace/name``."""
    checks = node_checks(env, node)
    out = {}
    for sid, svc in node_services(env, node).items():
        meta = svc.get("Meta") or {}
        if (meta.get("tether-namespace"), meta.get("tether-name")) == (namespace, name):
            out[svc["Address"]] = (svc["Port"], checks.get(f"{sid}:endpoint", {}).get("Status", "none"))
    return out


def until(
    env: dict[str, str],
    namespace: str,
    name: str,
    expected: dict[str, tuple[int, str]],
    *,
    node: str = NODE,
    op: OperatorProcess | None = None,
    timeout: float = 20,
) -> float:
    """Wait until the owner's instances are exactly ``expected``; seconds it took (printed, not asserted)."""
    started = time.monotonic()
    try:
        wait_for(
            lambda: instances(env, namespace, name, node) == expected,
            timeout=timeout,
            interval=0.05,
            message=f"instances of {namespace}/{name} on {node} to be {expected}",
        )
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\nactual: {instances(env, namespace, name, node)}"
            + (f"\n--- operator log:\n{op.log_tail()}" if op else "")
        ) from None
    took = time.monotonic() - started
    print(f"{namespace}/{name}: catalog matched after {took:.2f}s")
    return took


def table(env: dict[str, str], namespace: str, name: str, *args: str) -> dict[str, str]:
    """``kubectl get`` as column → cell (cells may be empty: split at the header's offsets)."""
    header, row = kubectl(env, "get", KIND, name, "-n", namespace, *args).stdout.splitlines()[:2]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    ends = [*starts[1:], len(row) + 1]
    return {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, ends, strict=True)}


def status(env: dict[str, str], namespace: str, name: str) -> dict[str, Any]:
    return dict(((get(env, namespace, KIND, name) or {}).get("status")) or {})


# -- fixtures -------------------------------------------------------------------------------------


@contextlib.contextmanager
def own_namespace(env: dict[str, str], prefix: str) -> Iterator[str]:
    """A namespace outside the shared operator's ``t-*``, for a test's own operators."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    kubectl(env, "create", "namespace", name)
    try:
        yield name
    finally:
        kubectl(env, "delete", "consulservices", "--all", "-n", name, "--timeout=60s", check=False)
        delete_namespace(env, name)


def own_operator(
    env: dict[str, str], log: Path, namespace: str, cluster: str, **extra: str
) -> OperatorProcess:
    return OperatorProcess(
        env, log, args=("-n", namespace), extra_env={"TETHER_CLUSTER_NAME": cluster, **extra}, verbose=True
    ).start()


def settle_writes(op: OperatorProcess, *, quiet: float = 3.0, timeout: float = 60) -> dict[str, int]:
    """Wait until the operator's write counters stop moving for ``quiet`` seconds."""
    last: dict[str, int] = {}
    since = time.monotonic()

    def still() -> bool:
        nonlocal last, since
        now = op.writes()
        if now != last:
            last, since = now, time.monotonic()
        return time.monotonic() - since >= quiet

    wait_for(still, timeout=timeout, interval=0.25, message="operator writes to settle")
    return last


# -- tests ----------------------------------------------------------------------------------------


def test_endpoints_become_catalog_instances(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    env = dev_env
    apply(env, namespace, service("web", [("http", 80, 8080), ("metrics", 9100, 9100)]))
    apply(
        env,
        namespace,
        endpoint_slice(
            "web-a",
            "web",
            [("http", 8080), ("metrics", 9100)],
            [ready("10.1.0.1"), ready("10.1.0.2"), not_ready("10.1.0.3")],
        ),
    )
    apply(
        env,
        namespace,
        csvc("web", endpoints={"service": "web", "port": 80}, tags=["k8s"], meta={"team": "shop"}),
    )
    obj = wait_condition(env, namespace, KIND, "web", op=operator)
    until(
        env,
        namespace,
        "web",
        {"10.1.0.1": (8080, "passing"), "10.1.0.2": (8080, "passing"), "10.1.0.3": (8080, "critical")},
        op=operator,
    )
    st = obj["status"]
    assert st["serviceID"] == f"{namespace}-web"
    assert st["instances"] == {"total": 3, "passing": 2, "warning": 0, "critical": 1}
    assert st["health"] == "warning"
    assert condition(obj, "Healthy")["status"] == "True"

    svc = node_services(env)[f"{namespace}-web-10.1.0.1-8080"]
    assert (svc["Service"], svc["Tags"]) == ("web", ["k8s"])
    assert svc["Meta"] == {
        "team": "shop",
        "external-source": "kubernetes",
        "tether-cluster": "kubernetes",
        "tether-namespace": namespace,
        "tether-name": "web",
    }
    node = consul(env, "GET", f"/v1/catalog/node/{NODE}")["Node"]
    assert node["Meta"] == {"external-source": "kubernetes", "tether-cluster": "kubernetes"}
    # Consul's own health API sees what Tether wrote: only the ready endpoints pass.
    passing = consul(env, "GET", "/v1/health/service/web?passing=true")
    assert sorted(e["Service"]["Address"] for e in passing if e["Node"]["Node"] == NODE) == [
        "10.1.0.1",
        "10.1.0.2",
    ]
    # Printer columns: the ID prefix, Ready and the aggregate health; the wide
    # output adds the Service followed and the instances.
    columns = table(env, namespace, "web", "-o", "wide")
    assert (columns["SERVICE"], columns["ADDRESS"], columns["READY"], columns["HEALTH"]) == (
        f"{namespace}-web",
        "",
        "True",
        "warning",
    )
    assert (columns["ENDPOINTS"], columns["INSTANCES"], columns["PASSING"]) == ("web", "3", "2")


def test_readiness_flips_and_pods_coming_and_going(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    env = dev_env
    apply(env, namespace, service("api", [("", 80, 8080)]))
    apply(
        env, namespace, endpoint_slice("api-a", "api", [("", 8080)], [ready("10.2.0.1"), ready("10.2.0.2")])
    )
    apply(env, namespace, csvc("api", endpoints={"service": "api"}))
    wait_condition(env, namespace, KIND, "api", op=operator)
    until(env, namespace, "api", {"10.2.0.1": (8080, "passing"), "10.2.0.2": (8080, "passing")}, op=operator)
    before = operator.writes()

    # A readiness flip: one check write, nothing else.
    apply(
        env,
        namespace,
        endpoint_slice("api-a", "api", [("", 8080)], [ready("10.2.0.1"), not_ready("10.2.0.2")]),
    )
    until(env, namespace, "api", {"10.2.0.1": (8080, "passing"), "10.2.0.2": (8080, "critical")}, op=operator)
    wait_for(
        lambda: status(env, namespace, "api").get("instances", {}).get("critical") == 1,
        timeout=10,
        message="status.instances.critical 1",
    )
    # A new Pod in a second slice (with its own target port number), a deleted Pod.
    apply(env, namespace, endpoint_slice("api-b", "api", [("", 8081)], [ready("10.2.0.3")]))
    until(
        env,
        namespace,
        "api",
        {"10.2.0.1": (8080, "passing"), "10.2.0.2": (8080, "critical"), "10.2.0.3": (8081, "passing")},
        op=operator,
    )
    apply(env, namespace, endpoint_slice("api-a", "api", [("", 8080)], [draining("10.2.0.1")]))
    until(env, namespace, "api", {"10.2.0.1": (8080, "critical"), "10.2.0.3": (8081, "passing")}, op=operator)
    check = node_checks(env)[f"{namespace}-api-10.2.0.1-8080:endpoint"]
    assert "terminating" in check["Output"] and "still serving" in check["Output"]
    kubectl(env, "delete", "endpointslice", "api-b", "-n", namespace)
    until(env, namespace, "api", {"10.2.0.1": (8080, "critical")}, op=operator)
    obj = wait_condition(env, namespace, KIND, "api", op=operator)
    wait_for(
        lambda: status(env, namespace, "api").get("health") == "critical",
        timeout=10,
        message="health critical",
    )
    assert condition(get(env, namespace, KIND, "api"), "Healthy")["status"] == "False"
    assert obj["status"]["observedGeneration"] == 1
    # Four changes, each one transaction (a new instance's service and check go together).
    consul_writes = settle_writes(operator)["consul"] - before["consul"]
    assert consul_writes <= 6, f"{consul_writes} Consul writes for 5 endpoint changes"


def test_idle_writes_nothing_and_restart_writes_nothing(dev_env: dict[str, str], tmp_path: Path) -> None:
    env = dev_env
    with own_namespace(env, "ep-restart") as ns:
        op = own_operator(env, tmp_path / "op.log", ns, "restart")
        try:
            apply(env, ns, service("web", [("http", 80, 8080)]))
            apply(
                env,
                ns,
                endpoint_slice(
                    "web-a", "web", [("http", 8080)], [ready(f"10.3.0.{i}") for i in range(1, 21)]
                ),
            )
            for name in ("one", "two"):
                apply(env, ns, csvc(name, endpoints={"service": "web", "port": "http"}))
            for name in ("one", "two"):
                wait_condition(env, ns, KIND, name, op=op)
            settled = settle_writes(op)
            time.sleep(10)
            assert op.writes() == settled, "writes while idle"
            op.stop()
            op.start()
            wait_for(
                lambda: (
                    op.metrics().get('tether_reconciles_total{kind="ConsulService",result="ready"}', 0) >= 2
                ),
                timeout=60,
                message=f"restarted operator to reconcile both ({op.log_tail()})",
            )
            time.sleep(3)
            assert op.writes() == {"consul": 0, "etcd": 0, "kubernetes": 0}, op.log_tail()
            assert len(instances(env, ns, "one", "tether-restart")) == 20
        finally:
            # Released by the operator while it still runs, so that the finalizers go.
            kubectl(env, "delete", "consulservices", "--all", "-n", ns, "--timeout=60s", check=False)
            op.stop()


def test_a_rename_updates_the_instances_in_place(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    # spec.name changes, spec.id does not: the same instance IDs carry the new
    # name, and their checks (filed by Consul under the old name) follow.
    env = dev_env
    apply(env, namespace, service("rn", [("http", 80, 8080)]))
    eps = [ready("10.7.0.1"), not_ready("10.7.0.2")]
    apply(env, namespace, endpoint_slice("rn-a", "rn", [("http", 8080)], eps))
    apply(env, namespace, resource(KIND_NAME, "rn", {"endpoints": {"service": "rn"}, "name": "before"}))
    wait_condition(env, namespace, KIND, "rn", op=operator)
    want = {"10.7.0.1": (8080, "passing"), "10.7.0.2": (8080, "critical")}
    until(env, namespace, "rn", want, op=operator)
    ids = sorted(sid for sid, svc in node_services(env).items() if svc["Meta"].get("tether-name") == "rn")
    apply(env, namespace, resource(KIND_NAME, "rn", {"endpoints": {"service": "rn"}, "name": "after"}))
    obj = wait_for(
        lambda: (o := get(env, namespace, KIND, "rn")) and o["status"].get("observedGeneration") == 2
        and condition(o)["status"] == "True" and o,
        timeout=20, message=f"Ready at generation 2 ({operator.log_tail()})",
    )
    assert condition(obj)["status"] == "True", condition(obj)
    until(env, namespace, "rn", want, op=operator)
    services = node_services(env)
    assert sorted(sid for sid, svc in services.items() if svc["Meta"].get("tether-name") == "rn") == ids
    assert {services[sid]["Service"] for sid in ids} == {"after"}
    assert {node_checks(env)[f"{sid}:endpoint"]["ServiceName"] for sid in ids} == {"after"}
    passing = consul(env, "GET", "/v1/health/service/after?passing=true")
    assert [e["Service"]["Address"] for e in passing if e["Node"]["Node"] == NODE] == ["10.7.0.1"]


def test_switching_modes_both_ways_leaves_nothing_behind(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    """Endpoints mode → a fixed instance → endpoints mode, twice: after each switch
    Consul holds only what the current mode registers (issue 23: the catalog
    instances used to stay, passing, after a switch back to a fixed instance)."""
    env = dev_env
    apply(env, namespace, service("sw", [("http", 80, 8080)]))
    eps = [ready("10.8.0.1"), ready("10.8.0.2")]
    apply(env, namespace, endpoint_slice("sw-a", "sw", [("http", 8080)], eps))
    follow = {"name": "sw", "endpoints": {"service": "sw"}}
    fixed = {"name": "sw", "address": "10.8.0.9", "port": 80}

    def on_agent() -> set[str]:
        services = consul(env, "GET", "/v1/agent/services") or {}
        return {
            sid for sid, svc in services.items()
            if (svc.get("Meta") or {}).get("tether-namespace") == namespace
            and (svc.get("Meta") or {}).get("tether-name") == "sw"
        }

    def passing() -> list[str]:
        entries = consul(env, "GET", "/v1/health/service/sw?passing=true")
        return sorted(e["Service"]["Address"] for e in entries)

    def ready_at_latest() -> None:
        wait_for(
            lambda: (o := get(env, namespace, KIND, "sw")) is not None
            and o["status"].get("observedGeneration") == o["metadata"]["generation"]
            and condition(o)["status"] == "True",
            timeout=20, message=f"sw Ready at its latest generation ({operator.log_tail()})",
        )

    for _ in range(2):
        apply(env, namespace, resource(KIND_NAME, "sw", follow))
        ready_at_latest()
        both = {"10.8.0.1": (8080, "passing"), "10.8.0.2": (8080, "passing")}
        until(env, namespace, "sw", both, op=operator)
        wait_for(lambda: on_agent() == set(), timeout=10, message="the fixed instance deregistered")
        assert passing() == ["10.8.0.1", "10.8.0.2"]

        apply(env, namespace, resource(KIND_NAME, "sw", fixed))
        ready_at_latest()
        until(env, namespace, "sw", {}, op=operator, timeout=10)
        wait_for(
            lambda: on_agent() == {f"{namespace}-sw"}, timeout=10, message="the fixed instance registered"
        )
        assert passing() == ["10.8.0.9"]


def test_drift_is_repaired(dev_env: dict[str, str], operator: OperatorProcess, namespace: str) -> None:
    env = dev_env
    apply(env, namespace, service("db", [("pg", 5432, 5432)]))
    apply(
        env, namespace, endpoint_slice("db-a", "db", [("pg", 5432)], [ready("10.4.0.1"), ready("10.4.0.2")])
    )
    apply(env, namespace, csvc("db", endpoints={"service": "db"}))
    wait_condition(env, namespace, KIND, "db", op=operator)
    want = {"10.4.0.1": (5432, "passing"), "10.4.0.2": (5432, "passing")}
    until(env, namespace, "db", want, op=operator)
    sid = f"{namespace}-db-10.4.0.1-5432"

    # An instance deregistered out of band.
    consul(env, "PUT", "/v1/catalog/deregister", {"Node": NODE, "ServiceID": sid})
    until(env, namespace, "db", want, op=operator)
    # Its check set to critical out of band.
    check = {
        k: node_checks(env)[f"{sid}:endpoint"][k]
        for k in ("Node", "CheckID", "Name", "ServiceID", "ServiceName")
    }
    consul(env, "PUT", "/v1/txn", [{"Check": {"Verb": "set", "Check": {**check, "Status": "critical"}}}])
    until(env, namespace, "db", want, op=operator)
    # A second check added to it out of band (it would change the instance's health).
    extra = {**check, "CheckID": f"{sid}:extra", "Name": "extra", "Status": "critical"}
    consul(env, "PUT", "/v1/txn", [{"Check": {"Verb": "set", "Check": extra}}])
    wait_for(lambda: f"{sid}:extra" not in node_checks(env), timeout=20, message="the extra check removed")
    # Its port changed out of band.
    svc = {k: node_services(env)[sid][k] for k in ("ID", "Service", "Address", "Tags", "Meta")}
    consul(env, "PUT", "/v1/txn", [{"Service": {"Verb": "set", "Node": NODE, "Service": {**svc, "Port": 1}}}])
    until(env, namespace, "db", want, op=operator)
    # The whole synthetic node removed: node and instances come back.
    consul(env, "PUT", "/v1/catalog/deregister", {"Node": NODE})
    until(env, namespace, "db", want, op=operator)
    assert consul(env, "GET", f"/v1/catalog/node/{NODE}")["Node"]["Meta"]["tether-cluster"] == "kubernetes"
    wait_for(
        lambda: "DriftRepaired" in {e["reason"] for e in events(env, namespace, "db")},
        timeout=10,
        message="a DriftRepaired event",
    )


def test_two_clusters_sharing_one_consul_never_touch_each_other(
    dev_env: dict[str, str], tmp_path: Path
) -> None:
    env = dev_env
    with own_namespace(env, "ep-red") as red_ns, own_namespace(env, "ep-green") as green_ns:
        red = own_operator(env, tmp_path / "red.log", red_ns, "red")
        green = own_operator(env, tmp_path / "green.log", green_ns, "green")
        try:
            for ns, base in ((red_ns, "10.5.1"), (green_ns, "10.5.2")):
                apply(env, ns, service("shared", [("http", 80, 8080)]))
                apply(
                    env,
                    ns,
                    endpoint_slice(
                        "shared-a", "shared", [("http", 8080)], [ready(f"{base}.{i}") for i in range(1, 6)]
                    ),
                )
                # The same Consul service name and the same ID prefix in both clusters.
                apply(env, ns, csvc("shared", endpoints={"service": "shared"}, id="shared"))
            for ns, op in ((red_ns, red), (green_ns, green)):
                wait_condition(env, ns, KIND, "shared", op=op)
            until(
                env,
                red_ns,
                "shared",
                {f"10.5.1.{i}": (8080, "passing") for i in range(1, 6)},
                node="tether-red",
                op=red,
            )
            until(
                env,
                green_ns,
                "shared",
                {f"10.5.2.{i}": (8080, "passing") for i in range(1, 6)},
                node="tether-green",
                op=green,
            )
            green_before = (node_services(env, "tether-green"), node_checks(env, "tether-green"))
            # Churn on red: flips, a rollout, a deletion. Green's entries keep their ModifyIndex.
            for round_ in range(3):
                apply(
                    env,
                    red_ns,
                    endpoint_slice(
                        "shared-a",
                        "shared",
                        [("http", 8080)],
                        [
                            (ready if (i + round_) % 2 else not_ready)(f"10.5.1.{i + 10 * round_}")
                            for i in range(1, 6)
                        ],
                    ),
                )
                time.sleep(0.5)
            kubectl(env, "delete", KIND, "shared", "-n", red_ns, "--timeout=60s")
            wait_for(lambda: not node_services(env, "tether-red"), timeout=20, message="red's node empty")
            wait_for(
                lambda: consul(env, "GET", f"/v1/catalog/node/{'tether-red'}") is None,
                timeout=20,
                message="red's empty node removed",
            )
            assert (node_services(env, "tether-green"), node_checks(env, "tether-green")) == green_before
            red.stop()
            # Both clusters on one node name is a misconfiguration: refused, nothing written.
            blue = own_operator(env, tmp_path / "blue.log", red_ns, "blue", TETHER_CONSUL_NODE="tether-green")
            try:
                apply(env, red_ns, csvc("intruder", endpoints={"service": "shared"}))
                obj = wait_condition(
                    env, red_ns, KIND, "intruder", status="False", reason="Conflict", op=blue
                )
                assert "cluster 'green'" in condition(obj)["message"]
                kubectl(env, "delete", KIND, "intruder", "-n", red_ns, "--timeout=60s")
            finally:
                blue.stop()
            assert (node_services(env, "tether-green"), node_checks(env, "tether-green")) == green_before
        finally:
            red.stop()
            kubectl(env, "delete", "consulservices", "--all", "-n", green_ns, "--timeout=60s", check=False)
            green.stop()


def _missing(env: dict[str, str], namespace: str, name: str, op: OperatorProcess) -> dict[str, Any]:
    """Wait for Ready=False naming the missing Service ``name``; the object."""
    obj = wait_condition(env, namespace, KIND, name, status="False", reason="InvalidSpec", timeout=10, op=op)
    assert f"Service {namespace}/{name} not found" in condition(obj)["message"]
    st = obj["status"]
    assert st["instances"]["total"] == 0 and st["health"] == "critical"
    assert condition(obj, "Healthy")["status"] == "False"
    return obj


def test_a_deleted_service_takes_its_instances_with_it(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    """Issue 23 item 3: the Service was not watched, and its leftover slices stayed registered."""
    env = dev_env
    apply(env, namespace, service("shop", [("http", 80, 8080)]))
    apply(env, namespace, endpoint_slice("shop-a", "shop", [("http", 8080)], [ready("10.7.0.1")]))
    apply(env, namespace, csvc("shop", endpoints={"service": "shop", "port": "http"}))
    wait_condition(env, namespace, KIND, "shop", op=operator)
    until(env, namespace, "shop", {"10.7.0.1": (8080, "passing")}, op=operator)
    # The dev stack runs no garbage collector: the slice stays, as a custom
    # controller's would.
    kubectl(env, "delete", "service", "shop", "-n", namespace)
    until(env, namespace, "shop", {}, op=operator, timeout=10)
    _missing(env, namespace, "shop", operator)
    # A leftover slice that changes registers nothing either.
    apply(
        env, namespace,
        endpoint_slice("shop-a", "shop", [("http", 8080)], [ready("10.7.0.1"), ready("10.7.0.2")]),
    )
    time.sleep(2)
    assert instances(env, namespace, "shop") == {}
    # The Service comes back: Ready by itself, through the Service watch.
    apply(env, namespace, service("shop", [("http", 80, 8080)]))
    wait_condition(env, namespace, KIND, "shop", timeout=10, op=operator)
    until(
        env, namespace, "shop", {"10.7.0.1": (8080, "passing"), "10.7.0.2": (8080, "passing")},
        op=operator, timeout=10,
    )


def test_slices_without_their_service_register_nothing_until_it_exists(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    env = dev_env
    apply(env, namespace, endpoint_slice("late-a", "late", [("http", 8080)], [ready("10.8.0.1")]))
    apply(env, namespace, csvc("late", endpoints={"service": "late", "port": "http"}))
    _missing(env, namespace, "late", operator)
    assert instances(env, namespace, "late") == {}
    apply(env, namespace, service("late", [("http", 80, 8080)]))
    obj = wait_condition(env, namespace, KIND, "late", timeout=10, op=operator)
    until(env, namespace, "late", {"10.8.0.1": (8080, "passing")}, op=operator, timeout=10)
    assert condition(obj, "Healthy")["status"] == "True"


@pytest.mark.parametrize("policy", ["Delete", "Orphan"])
def test_deletion(dev_env: dict[str, str], operator: OperatorProcess, namespace: str, policy: str) -> None:
    env = dev_env
    apply(env, namespace, service("gone", [("http", 80, 8080)]))
    apply(
        env,
        namespace,
        endpoint_slice("gone-a", "gone", [("http", 8080)], [ready("10.6.0.1"), ready("10.6.0.2")]),
    )
    apply(env, namespace, csvc("gone", endpoints={"service": "gone"}, deletionPolicy=policy))
    wait_condition(env, namespace, KIND, "gone", op=operator)
    until(env, namespace, "gone", {"10.6.0.1": (8080, "passing"), "10.6.0.2": (8080, "passing")}, op=operator)
    ids = [f"{namespace}-gone-10.6.0.{i}-8080" for i in (1, 2)]
    kubectl(env, "delete", KIND, "gone", "-n", namespace, "--wait=false")
    wait_gone(env, namespace, KIND, "gone")
    left = node_services(env)
    if policy == "Delete":
        assert not set(ids) & set(left)
    else:
        assert set(ids) <= set(left)
        for sid in ids:
            assert left[sid]["Meta"] == {"external-source": "kubernetes"}, "ownership meta dropped"
        # Nobody owns them any more: not even a sweep removes them.
        time.sleep(2)
        assert set(ids) <= set(node_services(env))
        for sid in ids:
            consul(env, "PUT", "/v1/catalog/deregister", {"Node": NODE, "ServiceID": sid})


def test_schema_keeps_the_modes_apart(dev_env: dict[str, str], namespace: str) -> None:
    bad = csvc("mixed", endpoints={"service": "web"}, address="10.0.0.1", port=80)
    done = kubectl(dev_env, "apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert done.returncode != 0 and "exclusive" in done.stderr
    neither = csvc("neither", tags=["x"])
    done = kubectl(dev_env, "apply", "-n", namespace, "-f", "-", input=json.dumps(neither), check=False)
    assert done.returncode != 0 and "spec.port is required" in done.stderr
    no_service = csvc("noservice", endpoints={"port": "http"})
    done = kubectl(dev_env, "apply", "-n", namespace, "-f", "-", input=json.dumps(no_service), check=False)
    assert done.returncode != 0 and "service" in done.stderr
