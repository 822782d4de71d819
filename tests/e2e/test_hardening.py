"""Issue 14 end to end, on the real dev stack: a foreign check is never taken over, an
orphan is released and never touched again, a lost claim is repaired, bad input is
InvalidSpec, Healthy follows health."""

from __future__ import annotations

import uuid
from typing import Any

from tether_dev.harness.consul import Consul
from tether_dev.harness.etcd import Etcd
from tether_dev.harness.kube import apply as kapply
from tether_dev.harness.kube import condition, get, kubectl, resource, wait_condition, wait_gone
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

KIND = "consulservice"


def csvc(name: str, **spec: Any) -> dict[str, Any]:
    return resource("ConsulService", name, spec)


def test_a_foreign_check_under_our_check_id_is_never_taken_over(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    consul = Consul.from_env(dev_env)
    sid = f"web-{namespace}"
    foreign = f"foreign-{namespace}"
    # Another tool's service owns a check under the ID Tether would use.
    consul.register({
        "ID": foreign, "Name": "foreign", "Port": 1,
        "Checks": [{"CheckID": f"{sid}/alive", "Name": "alive", "TTL": "10m"}],
    })
    try:
        kapply(dev_env, namespace, csvc("web", id=sid, port=80, checks=[{"name": "alive", "ttl": "10m"}]))
        obj = wait_condition(dev_env, namespace, KIND, "web", status="False", reason="Conflict", op=operator)
        assert f"{sid}/alive" in condition(obj)["message"]
        assert condition(obj, "Healthy")["status"] == "Unknown" and obj["status"]["health"] == "unknown"
        check = consul.checks()[f"{sid}/alive"]
        assert check["ServiceID"] == foreign  # still the foreign service's
        assert consul.service(sid) is None
    finally:
        kubectl(dev_env, "delete", KIND, "web", "-n", namespace, "--ignore-not-found", "--wait=true")
        consul.deregister(foreign)


def test_an_orphan_is_released_and_never_touched_again(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    consul = Consul.from_env(dev_env)
    sid = f"orphan-{namespace}"
    spec = {"id": sid, "port": 80, "deletionPolicy": "Orphan", "checks": [{"name": "beat", "ttl": "10m"}]}
    kapply(dev_env, namespace, csvc("svc", **spec))
    wait_condition(dev_env, namespace, KIND, "svc", op=operator)
    try:
        kubectl(dev_env, "delete", KIND, "svc", "-n", namespace, "--wait=true")
        wait_gone(dev_env, namespace, KIND, "svc")
        released = consul.service(sid)
        assert released is not None, "Orphan must leave the registration"
        assert not {"tether-cluster", "tether-namespace", "tether-name"} & set(released["Meta"])
        assert f"{sid}/beat" in consul.checks(sid), "the running checks stay"

        # The same namespace/name again: the orphan is someone else's now.
        kapply(dev_env, namespace, csvc("svc", **{**spec, "deletionPolicy": "Delete"}))
        wait_condition(dev_env, namespace, KIND, "svc", status="False", reason="Conflict", op=operator)
        kubectl(dev_env, "delete", KIND, "svc", "-n", namespace, "--wait=true")
        wait_gone(dev_env, namespace, KIND, "svc")
        assert consul.service(sid) is not None, "a later resource of the same name removed the orphan"
    finally:
        consul.deregister(sid)


def test_a_lost_claim_is_restored_and_deletion_leaves_nothing(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    etcd = Etcd.from_env(dev_env)
    prefix = f"/hardening/{uuid.uuid4().hex[:8]}"
    spec = {"prefix": prefix, "data": {"a": "1", "b": "2"}}
    kapply(dev_env, namespace, resource("EtcdConfig", "cfg", spec))
    wait_condition(dev_env, namespace, "etcdconfig", "cfg", op=operator)
    claim = f"/tether/keys{prefix}/a"
    assert etcd.get(claim) is not None
    etcd.delete(claim)  # out of band
    wait_for(lambda: etcd.get(claim) is not None, timeout=10, interval=0.2, message="claim restored")
    obj = get(dev_env, namespace, "etcdconfig", "cfg")
    assert condition(obj)["status"] == "True", obj
    # Lost again, then deleted: nothing is left behind.
    etcd.delete(claim)
    kubectl(dev_env, "delete", "etcdconfig", "cfg", "-n", namespace, "--wait=true")
    wait_gone(dev_env, namespace, "etcdconfig", "cfg")
    assert etcd.keys(prefix + "/") == {}


def test_input_consul_refuses_is_invalid_spec_not_a_retry_storm(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    # 300 'é': within the CRD's 512 characters, over Consul's 512 bytes.
    kapply(dev_env, namespace, csvc("meta", port=80, meta={"team": "é" * 300}))
    obj = wait_condition(dev_env, namespace, KIND, "meta", status="False", reason="InvalidSpec", op=operator)
    assert condition(obj)["message"].startswith("spec.meta.team")
    kapply(dev_env, namespace, csvc("ttl", port=80, checks=[{"name": "t", "ttl": "0s"}]))
    obj = wait_condition(dev_env, namespace, KIND, "ttl", status="False", reason="InvalidSpec", op=operator)
    assert "ttl" in condition(obj)["message"]
    before = operator.writes()["consul"]
    kapply(dev_env, namespace, csvc("long", port=80, checks=[{"name": "h", "tcp": "127.0.0.1:1",
                                                              "interval": "3000000h"}]))
    wait_condition(dev_env, namespace, KIND, "long", status="False", reason="InvalidSpec", op=operator)
    assert operator.writes()["consul"] == before, "InvalidSpec must not reach Consul"


def test_grpc_use_tls_reaches_consul(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    sid = f"grpc-{namespace}"
    check = {"name": "g", "grpc": "127.0.0.1:1", "interval": "30s", "grpcUseTLS": True, "tlsSkipVerify": True}
    kapply(dev_env, namespace, csvc("grpc", id=sid, port=80, checks=[check]))
    wait_condition(dev_env, namespace, KIND, "grpc", op=operator)
    # The agent shows the check but not its definition; the catalog's health
    # endpoint shows its Type, and the registration was accepted as sent.
    assert Consul.from_env(dev_env).checks(sid)[f"{sid}/g"]["Type"] == "grpc"
