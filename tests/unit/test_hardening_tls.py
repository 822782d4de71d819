"""Hardening (issue 14): TLS settings with a plain-HTTP address are a start-up error,
credentials in cleartext are warned about, and a load-balanced CONSUL_HTTP_ADDR is
reported as BackendRejected with what to do."""

from __future__ import annotations

from typing import Any

import pytest
from catalogmodels import consul_services

from tether import conditions
from tether.api import FINALIZER, ObjectRef
from tether.clients import cleartext
from tether.clients.consul.connection import ConsulConnection
from tether.clients.etcd.connection import EtcdConnection
from tether.consulservice import agent as consul_reconciling
from tether.consulservice.index import AgentIndex
from tether.consulservice.topology import NodeTracker
from tether.reconciling import Resource
from tether.settings import Settings


@pytest.mark.parametrize("var", ["CONSUL_CACERT", "CONSUL_CLIENT_CERT"])
def test_consul_tls_files_with_a_plain_http_address_are_refused(var: str) -> None:
    env = {"CONSUL_HTTP_ADDR": "http://consul.example:8500", var: "/etc/tls/x.pem"}
    if var == "CONSUL_CLIENT_CERT":
        env["CONSUL_CLIENT_KEY"] = "/etc/tls/k.pem"
    with pytest.raises(ValueError, match=f"{var}.*plain HTTP"):
        ConsulConnection.from_env(env)


def test_consul_tls_files_with_https_or_consul_http_ssl_are_fine() -> None:
    assert ConsulConnection.from_env(
        {"CONSUL_HTTP_ADDR": "https://consul.example:8501", "CONSUL_CACERT": "/ca.pem"}
    ).ca_cert == "/ca.pem"
    conn = ConsulConnection.from_env(
        {"CONSUL_HTTP_ADDR": "consul.example:8501", "CONSUL_HTTP_SSL": "true", "CONSUL_CACERT": "/ca.pem"}
    )
    assert conn.scheme == "https"


def test_a_token_in_cleartext_is_warned_about_unless_loopback() -> None:
    remote = ConsulConnection.from_env({"CONSUL_HTTP_ADDR": "http://10.0.0.1:8500", "CONSUL_HTTP_TOKEN": "t"})
    assert remote.warnings() and "cleartext" in remote.warnings()[0]
    assert "t" not in remote.warnings()[0].split()  # the token itself is never printed
    local = ConsulConnection.from_env({"CONSUL_HTTP_ADDR": "http://127.0.0.1:8500", "CONSUL_HTTP_TOKEN": "t"})
    assert local.warnings() == []
    tls = ConsulConnection.from_env({"CONSUL_HTTP_ADDR": "https://10.0.0.1:8501", "CONSUL_HTTP_TOKEN": "t"})
    assert tls.warnings() == []


def test_etcd_password_in_cleartext_is_warned_about() -> None:
    conn = EtcdConnection.from_env(
        {"ETCD_ENDPOINTS": "http://etcd.example:2379", "ETCD_USERNAME": "u", "ETCD_PASSWORD": "secret"}
    )
    assert conn.warnings() and all("secret" not in w for w in conn.warnings())
    settings = Settings.from_env(
        {"ETCD_ENDPOINTS": "http://etcd.example:2379", "ETCD_USERNAME": "u", "ETCD_PASSWORD": "secret",
         "CONSUL_HTTP_ADDR": "http://10.1.1.1:8500", "CONSUL_HTTP_TOKEN": "t"}
    )
    assert len(settings.warnings()) == 2


def test_etcd_password_to_loopback_endpoints_is_not_warned_about() -> None:
    conn = EtcdConnection.from_env(
        {"ETCD_ENDPOINTS": "http://localhost:2379,http://[::1]:2379,http://127.0.0.2:2379",
         "ETCD_USERNAME": "u", "ETCD_PASSWORD": "secret"}
    )
    assert conn.warnings() == []


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True),
    ("10.0.0.1", False), ("consul.example", False), ("localhost.example", False), ("", False),
])
def test_only_loopback_hosts_keep_cleartext_on_the_machine(host: str, loopback: bool) -> None:
    assert cleartext.loopback(host) is loopback


def test_node_tracker_allows_one_replacement_but_not_a_flip_flop() -> None:
    tracker = NodeTracker("http://consul:8500")
    assert tracker.seen("a", 0.0) is None
    assert tracker.seen("a", 1.0) is None
    assert tracker.seen("b", 2.0) is None  # the agent was replaced
    assert tracker.seen("b", 3.0) is None
    problem = tracker.seen("a", 4.0)
    assert problem is not None and "several Consul agents" in problem and "hostIP" in problem
    # Long after, a single change is fine again.
    assert tracker.seen("c", 10_000.0) is None


class BalancedAgent:
    """Two agents behind one address: every call may land on the other one."""

    def __init__(self) -> None:
        self.calls = 0
        self.services: dict[str, dict[str, Any]] = {}

    async def node_name(self) -> str:
        self.calls += 1
        return f"node-{self.calls % 2}"

    async def service(self, service_id: str) -> dict[str, Any] | None:
        return None

    async def service_checks(self, service_id: str) -> list[dict[str, Any]]:
        return []

    async def checks_with_ids(self, check_ids: Any) -> list[dict[str, Any]]:
        return []

    async def register(self, body: Any, *, replace_checks: bool = True) -> None:
        pass

    async def deregister(self, service_id: str) -> None:
        pass


async def test_a_load_balanced_address_is_backend_rejected_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every apply samples the node here (in production: at most once a second).
    monkeypatch.setattr(consul_reconciling, "NODE_SAMPLE_SECONDS", 0.0)
    services = consul_services(
        BalancedAgent(), AgentIndex(cluster="k", plural="consulservices"), cluster="k",  # type: ignore[arg-type]
        agent_url="http://consul-lb:8500",
    )
    res = Resource(
        ref=ObjectRef("consulservices", "ns", "web"), uid="u", generation=1, resource_version="1",
        spec={"address": "10.0.0.1", "port": 80}, status={}, finalizers=(FINALIZER,), deleting=False,
    )
    reasons = [(await services.apply(res)).reason for _ in range(3)]
    assert conditions.BACKEND_REJECTED in reasons
    outcome = await services.apply(res)
    assert outcome.reason == conditions.BACKEND_REJECTED and "CONSUL_HTTP_ADDR" in outcome.message


def test_an_unknown_node_name_is_no_evidence() -> None:
    """A token without agent:read: node names are unknown, nothing is reported."""
    tracker = NodeTracker("http://consul:8500")
    assert all(tracker.seen("", float(t)) is None for t in range(10))


async def test_the_agent_is_identified_at_most_once_a_second_while_all_is_well() -> None:
    agent = BalancedAgent()
    services = consul_services(
        agent, AgentIndex(cluster="k", plural="consulservices"), cluster="k",  # type: ignore[arg-type]
        agent_url="http://consul:8500",
    )
    res = Resource(
        ref=ObjectRef("consulservices", "ns", "web"), uid="u", generation=1, resource_version="1",
        spec={"address": "10.0.0.1", "port": 80}, status={}, finalizers=(FINALIZER,), deleting=False,
    )
    for _ in range(5):
        assert (await services.apply(res)).ready == "True"
    assert agent.calls == 1  # /v1/agent/self is the heaviest read of an apply
