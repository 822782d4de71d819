"""EtcdConfig end to end: a real kube-apiserver, etcd and operator process."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

from tether_dev.harness.etcd import Etcd
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

KIND = "etcdconfig"


def ecfg(name: str, **spec: Any) -> dict[str, Any]:
    return resource("EtcdConfig", name, spec)


def unique_prefix() -> str:
    return f"/e2e/{uuid.uuid4().hex[:10]}"


def test_create_writes_all_keys_in_one_transaction(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    prefix = unique_prefix()
    data = {"a": "1", "b/c": "two", "d/e/f": "three"}
    apply(dev_env, namespace, ecfg("cfg", prefix=prefix + "/", data=data))
    obj = wait_condition(dev_env, namespace, KIND, "cfg", op=operator)
    kvs = Etcd.from_env(dev_env).entries(prefix + "/")
    assert {k: v for k, (v, _) in kvs.items()} == {f"{prefix}/{k}": v for k, v in data.items()}
    revisions = {rev for _, rev in kvs.values()}
    assert len(revisions) == 1, f"keys written in several transactions: {revisions}"
    assert obj["status"]["keys"] == 3
    assert obj["status"]["revision"] == revisions.pop()


def test_300_keys_converge(dev_env: dict[str, str], operator: OperatorProcess, namespace: str) -> None:
    prefix = unique_prefix()
    data = {f"k{i:03d}": f"v{i}" for i in range(300)}
    apply(dev_env, namespace, ecfg("big", prefix=prefix, data=data))
    obj = wait_condition(dev_env, namespace, KIND, "big", timeout=60, op=operator)
    kvs = Etcd.from_env(dev_env).entries(prefix + "/")
    assert len(kvs) == 300 and obj["status"]["keys"] == 300
    assert all(kvs[f"{prefix}/{k}"][0] == v for k, v in data.items())


def test_update_prune_and_prefix_move(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    prefix = unique_prefix()
    Etcd.from_env(dev_env).put(f"{prefix}/unrelated", "keep me")
    apply(dev_env, namespace, ecfg("u", prefix=prefix, data={"a": "1", "b": "2"}))
    wait_condition(dev_env, namespace, KIND, "u", op=operator)
    apply(dev_env, namespace, ecfg("u", prefix=prefix, data={"a": "10", "c": "3"}))
    obj = wait_condition(dev_env, namespace, KIND, "u", op=operator)
    kvs = {k: v for k, (v, _) in Etcd.from_env(dev_env).entries(prefix + "/").items()}
    assert kvs == {f"{prefix}/a": "10", f"{prefix}/c": "3", f"{prefix}/unrelated": "keep me"}
    assert obj["status"]["keys"] == 2
    moved = unique_prefix()
    apply(dev_env, namespace, ecfg("u", prefix=moved, data={"a": "10", "c": "3"}))
    wait_condition(dev_env, namespace, KIND, "u", op=operator)
    assert {k: v for k, (v, _) in Etcd.from_env(dev_env).entries(prefix + "/").items()} == {
        f"{prefix}/unrelated": "keep me"
    }
    assert {k: v for k, (v, _) in Etcd.from_env(dev_env).entries(moved + "/").items()} == {
        f"{moved}/a": "10",
        f"{moved}/c": "3",
    }


def test_prune_false_keeps_removed_keys(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    prefix = unique_prefix()
    apply(dev_env, namespace, ecfg("np", prefix=prefix, prune=False, data={"a": "1", "b": "2"}))
    wait_condition(dev_env, namespace, KIND, "np", op=operator)
    apply(dev_env, namespace, ecfg("np", prefix=prefix, prune=False, data={"a": "1"}))
    wait_condition(dev_env, namespace, KIND, "np", op=operator)
    assert set(Etcd.from_env(dev_env).entries(prefix + "/")) == {f"{prefix}/a", f"{prefix}/b"}


def test_delete_policies_leave_unrelated_keys(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    for policy in ("Delete", "Orphan"):
        prefix = unique_prefix()
        Etcd.from_env(dev_env).put(f"{prefix}/unrelated", "x")
        name = f"del-{policy.lower()}"
        apply(dev_env, namespace, ecfg(name, prefix=prefix, deletionPolicy=policy, data={"a": "1"}))
        wait_condition(dev_env, namespace, KIND, name, op=operator)
        kubectl(dev_env, "delete", KIND, name, "-n", namespace, "--wait=false")
        wait_gone(dev_env, namespace, KIND, name)
        keys = set(Etcd.from_env(dev_env).entries(prefix + "/"))
        if policy == "Delete":
            assert keys == {f"{prefix}/unrelated"}
        else:
            assert keys == {f"{prefix}/unrelated", f"{prefix}/a"}


def test_two_resources_claiming_one_key(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    prefix = unique_prefix()
    apply(dev_env, namespace, ecfg("first", prefix=prefix, data={"shared": "first"}))
    wait_condition(dev_env, namespace, KIND, "first", op=operator)
    apply(dev_env, namespace, ecfg("second", prefix=prefix, data={"shared": "second", "own": "x"}))
    obj = wait_condition(dev_env, namespace, KIND, "second", status="False", reason="Conflict", op=operator)
    message = condition(obj)["message"]
    assert f"{prefix}/shared" in message and "first" in message
    kvs = {k: v for k, (v, _) in Etcd.from_env(dev_env).entries(prefix + "/").items()}
    assert kvs == {f"{prefix}/shared": "first"}, "nothing may be written for a conflicting resource"
    # When the first one goes away the second converges on its own.
    kubectl(dev_env, "delete", KIND, "first", "-n", namespace)
    wait_condition(dev_env, namespace, KIND, "second", timeout=90, op=operator)
    kvs = {k: v for k, (v, _) in Etcd.from_env(dev_env).entries(prefix + "/").items()}
    assert kvs == {f"{prefix}/shared": "second", f"{prefix}/own": "x"}


def test_pre_existing_key_needs_adopt(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    prefix = unique_prefix()
    Etcd.from_env(dev_env).put(f"{prefix}/legacy", "old")
    apply(dev_env, namespace, ecfg("ad", prefix=prefix, data={"legacy": "new"}))
    obj = wait_condition(dev_env, namespace, KIND, "ad", status="False", reason="Conflict", op=operator)
    assert "adopt" in condition(obj)["message"] and f"{prefix}/legacy" in condition(obj)["message"]
    assert Etcd.from_env(dev_env).entries(prefix + "/")[f"{prefix}/legacy"][0] == "old"
    apply(dev_env, namespace, ecfg("ad", prefix=prefix, adopt=True, data={"legacy": "new"}))
    wait_condition(dev_env, namespace, KIND, "ad", op=operator)
    assert Etcd.from_env(dev_env).entries(prefix + "/")[f"{prefix}/legacy"][0] == "new"


def test_out_of_band_changes_are_restored(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    prefix = unique_prefix()
    apply(dev_env, namespace, ecfg("drift", prefix=prefix, data={"a": "1", "b": "2"}))
    wait_condition(dev_env, namespace, KIND, "drift", op=operator)
    Etcd.from_env(dev_env).put(f"{prefix}/a", "tampered")
    wait_for(
        lambda: Etcd.from_env(dev_env).entries(prefix + "/")[f"{prefix}/a"][0] == "1",
        timeout=10,
        interval=0.1,
        message="changed key restored",
    )
    Etcd.from_env(dev_env).delete(f"{prefix}/b")
    wait_for(
        lambda: f"{prefix}/b" in Etcd.from_env(dev_env).entries(prefix + "/"),
        timeout=10,
        interval=0.1,
        message="deleted key restored",
    )
    wait_for(
        lambda: "DriftRepaired" in {e["reason"] for e in events(dev_env, namespace, "drift")},
        timeout=10,
        interval=0.3,
        message="DriftRepaired event",
    )


def test_config_map_and_secret_changes_propagate_and_secrets_stay_secret(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    prefix = unique_prefix()
    secret_value = f"s3cr3t-{uuid.uuid4().hex}"
    kubectl(
        dev_env,
        "create",
        "configmap",
        "defaults",
        "-n",
        namespace,
        "--from-literal=mode=blue",
        "--from-literal=level=1",
    )
    kubectl(
        dev_env,
        "create",
        "secret",
        "generic",
        "creds",
        "-n",
        namespace,
        f"--from-literal=password={secret_value}",
    )
    apply(
        dev_env,
        namespace,
        ecfg(
            "src",
            prefix=prefix,
            data={"level": "override"},
            **{"from": [{"configMapRef": {"name": "defaults"}}, {"secretRef": {"name": "creds"}}]},
        ),
    )
    wait_condition(dev_env, namespace, KIND, "src", op=operator)
    kvs = {k: v for k, (v, _) in Etcd.from_env(dev_env).entries(prefix + "/").items()}
    assert kvs == {
        f"{prefix}/mode": "blue",
        f"{prefix}/level": "override",
        f"{prefix}/password": secret_value,
    }
    kubectl(dev_env, "patch", "configmap", "defaults", "-n", namespace, "-p", '{"data":{"mode":"green"}}')
    wait_for(
        lambda: Etcd.from_env(dev_env).entries(prefix + "/")[f"{prefix}/mode"][0] == "green",
        timeout=10,
        interval=0.1,
        message="ConfigMap change in etcd",
    )
    new_secret = f"rotated-{uuid.uuid4().hex}"
    patch = json.dumps({"data": {"password": base64.b64encode(new_secret.encode()).decode()}})
    kubectl(dev_env, "patch", "secret", "creds", "-n", namespace, "-p", patch)
    wait_for(
        lambda: Etcd.from_env(dev_env).entries(prefix + "/")[f"{prefix}/password"][0] == new_secret,
        timeout=10,
        interval=0.1,
        message="Secret change in etcd",
    )
    time.sleep(1)
    obj = get(dev_env, namespace, KIND, "src")
    everything = json.dumps(obj) + json.dumps(events(dev_env, namespace, "src")) + operator.log_tail(100000)
    for value in (secret_value, new_secret):
        assert value not in everything, "a Secret value leaked into status, events or the operator log"


def test_missing_source_is_reported_and_recovers(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    prefix = unique_prefix()
    apply(dev_env, namespace, ecfg("miss", prefix=prefix, **{"from": [{"configMapRef": {"name": "later"}}]}))
    obj = wait_condition(dev_env, namespace, KIND, "miss", status="False", op=operator)
    assert "later" in condition(obj)["message"]
    kubectl(dev_env, "create", "configmap", "later", "-n", namespace, "--from-literal=x=1")
    wait_condition(dev_env, namespace, KIND, "miss", timeout=15, op=operator)
    assert Etcd.from_env(dev_env).entries(prefix + "/")[f"{prefix}/x"][0] == "1"
    apply(
        dev_env,
        namespace,
        ecfg(
            "opt", prefix=unique_prefix(), **{"from": [{"configMapRef": {"name": "nope", "optional": True}}]}
        ),
    )
    wait_condition(dev_env, namespace, KIND, "opt", op=operator)
