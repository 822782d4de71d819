"""ConsulService end to end: a real kube-apiserver, Consul agent and operator process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from tether_dev.harness.consul import Consul
from tether_dev.harness.kube import (
    apply,
    condition,
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


def csvc(resource_name: str, **spec: Any) -> dict[str, Any]:
    return resource("ConsulService", resource_name, spec)


class _Probe(BaseHTTPRequestHandler):
    """Records the requests Consul's HTTP check makes."""

    seen: ClassVar[list[tuple[str, str, str]]] = []

    def _record(self) -> None:
        self.seen.append((self.command, self.path, self.headers.get("X-Probe", "")))
        self.send_response(200)
        self.end_headers()

    do_GET = do_POST = _record

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()


def test_create_with_every_field_matches_consul(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str, probe_server: int
) -> None:
    """Consul hides check definitions from its API, so the checks are observed at work:
    the HTTP check must call our server with the method and header from the spec."""
    full = {
        "name": "payments",
        "id": f"payments-{namespace}",
        "address": "127.0.0.1",
        "port": 8443,
        "tags": ["blue", "v2"],
        "meta": {"team": "payments", "tier": "backend"},
        "checks": [
            {
                "name": "http",
                "http": f"http://127.0.0.1:{probe_server}/healthz",
                "method": "POST",
                "header": {"X-Probe": ["tether"]},
                "tlsSkipVerify": True,
                "interval": "1s",
                "timeout": "1s",
                "deregisterCriticalServiceAfter": "90m",
            },
            {"name": "tcp", "tcp": "127.0.0.1:1", "interval": "1s"},
            {"name": "grpc", "grpc": "127.0.0.1:1/health", "interval": "1s"},
            {"name": "ttl", "ttl": "1h"},
        ],
    }
    sid = full["id"]
    apply(dev_env, namespace, csvc("pay", **full))
    obj = wait_condition(dev_env, namespace, KIND, "pay", op=operator)
    assert obj["status"]["serviceID"] == sid
    svc = Consul.from_env(dev_env).service(sid)
    assert svc is not None
    assert (svc["Service"], svc["Address"], svc["Port"]) == ("payments", "127.0.0.1", 8443)
    assert sorted(svc["Tags"]) == ["blue", "v2"]
    assert svc["Meta"] == {
        "team": "payments",
        "tier": "backend",
        "external-source": "kubernetes",
        "tether-cluster": "kubernetes",
        "tether-namespace": namespace,
        "tether-name": "pay",
    }
    by_name = {c["Name"]: c for c in Consul.from_env(dev_env).checks(sid).values()}
    assert {n: c["Type"] for n, c in by_name.items()} == {
        "http": "http",
        "tcp": "tcp",
        "grpc": "grpc",
        "ttl": "ttl",
    }
    assert (by_name["http"]["Interval"], by_name["http"]["Timeout"]) == ("1s", "1s")
    wait_for(
        lambda: ("POST", "/healthz", "tether") in _Probe.seen,
        timeout=15,
        interval=0.2,
        message="Consul's HTTP check to call with POST and the X-Probe header",
    )

    def outputs() -> dict[str, str]:
        return {c["Name"]: c["Output"] for c in Consul.from_env(dev_env).checks(sid).values()}

    wait_for(
        lambda: "127.0.0.1:1" in outputs()["tcp"] and "127.0.0.1:1" in outputs()["grpc"],
        timeout=15,
        interval=0.2,
        message="tcp and grpc checks to probe their targets",
    )
    # tcp/grpc point at a closed port and the TTL was never refreshed: critical, as Consul says.
    wait_for(
        lambda: (get(dev_env, namespace, KIND, "pay") or {}).get("status", {}).get("health") == "critical",
        timeout=10,
        interval=0.2,
        message="health critical",
    )
    assert condition(get(dev_env, namespace, KIND, "pay"), "Healthy")["status"] == "False"
    # A routine creation is logged, not posted as an event (the status says it).
    assert f"consulservices/{namespace}/pay Registered:" in operator.log_text()
    assert "Registered" not in {e["reason"] for e in events(dev_env, namespace, "pay")}


def test_update_tags_port_and_checks(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    apply(
        dev_env,
        namespace,
        csvc("web", port=80, tags=["a"], checks=[{"name": "t", "tcp": "127.0.0.1:1", "interval": "30s"}]),
    )
    wait_condition(dev_env, namespace, KIND, "web", op=operator)
    apply(dev_env, namespace, csvc("web", port=81, tags=["a", "b"], checks=[{"name": "ttl", "ttl": "5m"}]))
    wait_condition(dev_env, namespace, KIND, "web", op=operator)
    sid = f"{namespace}-web"
    svc = Consul.from_env(dev_env).service(sid)
    assert svc is not None and svc["Port"] == 81 and sorted(svc["Tags"]) == ["a", "b"]
    names = sorted(c["Name"] for c in Consul.from_env(dev_env).checks(sid).values())
    assert names == ["ttl"]


def test_rename_moves_the_registration(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    apply(dev_env, namespace, csvc("mv", id="mv-old", port=80))
    wait_condition(dev_env, namespace, KIND, "mv", op=operator)
    assert Consul.from_env(dev_env).service("mv-old") is not None
    apply(dev_env, namespace, csvc("mv", id="mv-new", name="moved", port=80))
    obj = wait_condition(dev_env, namespace, KIND, "mv", op=operator)
    assert obj["status"]["serviceID"] == "mv-new"
    assert Consul.from_env(dev_env).service("mv-old") is None
    new = Consul.from_env(dev_env).service("mv-new")
    assert new is not None and new["Service"] == "moved"


@pytest.mark.parametrize("policy", ["Delete", "Orphan"])
def test_delete_policies(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str, policy: str
) -> None:
    sid = f"del-{policy.lower()}-{namespace}"
    apply(dev_env, namespace, csvc("d", id=sid, port=80, deletionPolicy=policy))
    wait_condition(dev_env, namespace, KIND, "d", op=operator)
    kubectl(dev_env, "delete", KIND, "d", "-n", namespace, "--wait=false")
    wait_gone(dev_env, namespace, KIND, "d")
    if policy == "Delete":
        assert Consul.from_env(dev_env).service(sid) is None
    else:
        assert Consul.from_env(dev_env).service(sid) is not None
        Consul.from_env(dev_env).deregister(sid)


def test_foreign_service_is_a_conflict_and_left_alone(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    sid = f"foreign-{namespace}"
    Consul.from_env(dev_env).register({"ID": sid, "Name": "legacy", "Port": 1234})
    apply(dev_env, namespace, csvc("f", id=sid, port=80))
    obj = wait_condition(dev_env, namespace, KIND, "f", status="False", reason="Conflict", op=operator)
    assert sid in condition(obj)["message"]
    svc = Consul.from_env(dev_env).service(sid)
    assert svc is not None and svc["Port"] == 1234 and svc["Service"] == "legacy"
    # Once the other owner is gone, the resource becomes Ready on its own (retry with backoff).
    Consul.from_env(dev_env).deregister(sid)
    wait_condition(dev_env, namespace, KIND, "f", timeout=90, op=operator)
    # Put a foreign one back under a resource being deleted: it must survive.
    apply(dev_env, namespace, csvc("g", id=f"{sid}-g", port=80))
    wait_condition(dev_env, namespace, KIND, "g", op=operator)
    Consul.from_env(dev_env).deregister(f"{sid}-g")
    Consul.from_env(dev_env).register({"ID": f"{sid}-g", "Name": "legacy", "Port": 1})
    wait_condition(dev_env, namespace, KIND, "g", status="False", reason="Conflict", op=operator)
    kubectl(dev_env, "delete", KIND, "g", "-n", namespace, "--wait=false")
    wait_gone(dev_env, namespace, KIND, "g")
    assert Consul.from_env(dev_env).service(f"{sid}-g") is not None
    Consul.from_env(dev_env).deregister(f"{sid}-g")


def test_out_of_band_changes_are_restored(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    sid = f"drift-{namespace}"
    apply(
        dev_env, namespace, csvc("drift", id=sid, port=80, tags=["x"], checks=[{"name": "ttl", "ttl": "10m"}])
    )
    wait_condition(dev_env, namespace, KIND, "drift", op=operator)
    Consul.from_env(dev_env).deregister(sid)
    started = time.monotonic()
    wait_for(
        lambda: Consul.from_env(dev_env).service(sid) is not None,
        timeout=10,
        interval=0.1,
        message="deregistered service restored",
    )
    restore = time.monotonic() - started
    body = Consul.from_env(dev_env).service(sid)
    assert body is not None
    modified = {"ID": sid, "Name": body["Service"], "Port": 9999, "Tags": ["x"], "Meta": body["Meta"]}
    Consul.from_env(dev_env).register(modified)
    wait_for(
        lambda: (Consul.from_env(dev_env).service(sid) or {}).get("Port") == 80,
        timeout=10,
        interval=0.1,
        message="modified service restored",
    )
    assert [c["Name"] for c in Consul.from_env(dev_env).checks(sid).values()] == ["ttl"]
    wait_for(
        lambda: "DriftRepaired" in {e["reason"] for e in events(dev_env, namespace, "drift")},
        timeout=10,
        interval=0.3,
        message="DriftRepaired event",
    )
    print(f"drift restored in {restore:.2f}s")


def test_ttl_check_health_follows_consul(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    sid = f"ttl-{namespace}"
    apply(dev_env, namespace, csvc("ttl", id=sid, port=80, checks=[{"name": "beat", "ttl": "10m"}]))
    obj = wait_condition(dev_env, namespace, KIND, "ttl", op=operator)
    assert obj["status"]["health"] == "critical"
    Consul.from_env(dev_env).call("PUT", f"/v1/agent/check/pass/{sid}/beat")
    wait_condition(dev_env, namespace, KIND, "ttl", type_="Healthy", status="True", timeout=10, op=operator)
    assert get(dev_env, namespace, KIND, "ttl")["status"]["health"] == "passing"  # type: ignore[index]
    Consul.from_env(dev_env).call("PUT", f"/v1/agent/check/warn/{sid}/beat")
    wait_for(
        lambda: get(dev_env, namespace, KIND, "ttl")["status"]["health"] == "warning",  # type: ignore[index]
        timeout=10,
        interval=0.2,
        message="health warning",
    )
    Consul.from_env(dev_env).call("PUT", f"/v1/agent/check/fail/{sid}/beat")
    wait_condition(
        dev_env,
        namespace,
        KIND,
        "ttl",
        type_="Healthy",
        status="False",
        reason="Critical",
        timeout=10,
        op=operator,
    )


def test_no_checks_means_passing(dev_env: dict[str, str], operator: OperatorProcess, namespace: str) -> None:
    apply(dev_env, namespace, csvc("plain", port=80))
    obj = wait_condition(dev_env, namespace, KIND, "plain", op=operator)
    assert obj["status"]["health"] == "passing"
    assert condition(obj, "Healthy")["status"] == "True"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"port": 80, "checks": [{"name": "h", "http": "ftp://x/", "interval": "10s"}]}, "http://"),
        (
            {"port": 80, "checks": [{"name": "h", "tcp": "h:1", "interval": "10s", "timeout": "20s"}]},
            "exceed",
        ),
    ],
)
def test_invalid_spec_is_reported_and_not_retried(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str, spec: dict[str, Any], fragment: str
) -> None:
    apply(dev_env, namespace, csvc("bad", **spec))
    obj = wait_condition(dev_env, namespace, KIND, "bad", status="False", reason="InvalidSpec", op=operator)
    assert fragment in condition(obj)["message"]
    assert Consul.from_env(dev_env).service(f"{namespace}-bad") is None
    before = operator.metrics().get('tether_reconciles_total{kind="ConsulService",result="InvalidSpec"}', 0)
    time.sleep(3)
    after = operator.metrics().get('tether_reconciles_total{kind="ConsulService",result="InvalidSpec"}', 0)
    assert after - before <= 1, "an InvalidSpec resource must not be retried in a loop"
    # Fixing the spec makes it Ready.
    apply(dev_env, namespace, csvc("bad", port=80))
    wait_condition(dev_env, namespace, KIND, "bad", op=operator)


def test_ready_transition_time_only_moves_on_flip(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    apply(dev_env, namespace, csvc("lt", port=80, tags=["a"]))
    first = condition(wait_condition(dev_env, namespace, KIND, "lt", op=operator))
    time.sleep(1.2)
    apply(dev_env, namespace, csvc("lt", port=80, tags=["b"]))
    second = condition(wait_condition(dev_env, namespace, KIND, "lt", op=operator))
    assert second["lastTransitionTime"] == first["lastTransitionTime"]
    assert second["observedGeneration"] == first["observedGeneration"] + 1
