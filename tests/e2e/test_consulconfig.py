"""ConsulConfig end to end: a real kube-apiserver, Consul agent and operator process.

The same contract as EtcdConfig with Consul KV as the store: one check-and-set
transaction when it fits, ordered guarded chunks otherwise, exclusive
ownership recorded under ``tether/``, exact deletes, drift restored through
blocking queries, sources propagated, Secret values never shown.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tether_dev.harness.consulkv import ConsulKV
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

#: The short tombstone lifetime of the tombstone test's own operator.
TOMBSTONE_SECONDS = 6

KIND = "consulconfig"
OWNERSHIP = "tether/"


def ccfg(name: str, **spec: Any) -> dict[str, Any]:
    return resource("ConsulConfig", name, spec)


def unique_prefix() -> str:
    return f"e2e/{uuid.uuid4().hex[:10]}"


def test_create_writes_all_keys_in_one_transaction_with_ownership(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    kv = ConsulKV.from_env(dev_env)
    prefix = unique_prefix()
    data = {"a": "1", "b/c": "two", "d/e/f": "three"}
    apply(dev_env, namespace, ccfg("cfg", prefix=prefix + "/", data=data))
    obj = wait_condition(dev_env, namespace, KIND, "cfg", op=operator)
    entries = kv.entries(prefix + "/")
    assert {k: v for k, (v, _) in entries.items()} == {f"{prefix}/{k}": v for k, v in data.items()}
    indexes = {index for _, index in entries.values()}
    assert len(indexes) == 1, f"keys written in several transactions: {indexes}"
    assert obj["status"]["keys"] == 3
    assert obj["status"]["modifyIndex"] == indexes.pop()
    claims = kv.values(f"{OWNERSHIP}keys/{prefix}/")
    owner = f"kubernetes/{namespace}/cfg"
    assert claims == {f"{OWNERSHIP}keys/{prefix}/{k}": owner for k in data}
    record = json.loads(kv.get(f"{OWNERSHIP}owners/{owner}") or "{}")
    assert record == {"keys": sorted(f"{prefix}/{k}" for k in data)}
    # The creation is logged (not posted: the status says it), with its transaction count.
    assert f"consulconfigs/{namespace}/cfg Written: wrote 3 keys, deleted 0, in one transaction" in (
        operator.log_text()
    )
    assert "Written" not in {e.get("reason") for e in events(dev_env, namespace, "cfg")}


def test_200_keys_converge_in_ordered_chunks(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    kv = ConsulKV.from_env(dev_env)
    prefix = unique_prefix()
    data = {f"k{i:03d}": f"v{i}" for i in range(200)}
    apply(dev_env, namespace, ccfg("big", prefix=prefix, data=data))
    obj = wait_condition(dev_env, namespace, KIND, "big", timeout=60, op=operator)
    entries = kv.entries(prefix + "/")
    assert len(entries) == 200 and obj["status"]["keys"] == 200
    assert all(entries[f"{prefix}/{k}"][0] == v for k, v in data.items())
    # 200 keys and their claims cannot fit one Consul transaction: the status
    # and the log say it took several, and every key is owned.
    assert len(kv.entries(f"{OWNERSHIP}keys/{prefix}/")) == 200
    mark = f"consulconfigs/{namespace}/big Written:"
    written = [line for line in operator.log_text().splitlines() if mark in line]
    assert written and "ordered transactions" in written[-1], written


def test_update_prune_prefix_move_and_unrelated_keys(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    kv = ConsulKV.from_env(dev_env)
    prefix = unique_prefix()
    kv.put(f"{prefix}/unrelated", "keep me")
    apply(dev_env, namespace, ccfg("u", prefix=prefix, data={"a": "1", "b": "2"}))
    wait_condition(dev_env, namespace, KIND, "u", op=operator)
    apply(dev_env, namespace, ccfg("u", prefix=prefix, data={"a": "10", "c": "3"}))
    obj = wait_condition(dev_env, namespace, KIND, "u", op=operator)
    assert kv.values(prefix + "/") == {
        f"{prefix}/a": "10",
        f"{prefix}/c": "3",
        f"{prefix}/unrelated": "keep me",
    }
    assert obj["status"]["keys"] == 2
    moved = unique_prefix()
    apply(dev_env, namespace, ccfg("u", prefix=moved, data={"a": "10"}))
    wait_condition(dev_env, namespace, KIND, "u", op=operator)
    assert kv.values(prefix + "/") == {f"{prefix}/unrelated": "keep me"}
    assert kv.values(moved + "/") == {f"{moved}/a": "10"}


def test_delete_policies_are_exact(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    kv = ConsulKV.from_env(dev_env)
    for policy in ("Delete", "Orphan"):
        prefix = unique_prefix()
        kv.put(f"{prefix}/unrelated", "x")
        kv.put(f"{prefix}/a/deeper", "under a managed key's path, not managed")
        name = f"del-{policy.lower()}"
        apply(dev_env, namespace, ccfg(name, prefix=prefix, deletionPolicy=policy, data={"a": "1", "b": "2"}))
        wait_condition(dev_env, namespace, KIND, name, op=operator)
        kubectl(dev_env, "delete", KIND, name, "-n", namespace, "--wait=false")
        wait_gone(dev_env, namespace, KIND, name)
        keys = set(kv.entries(prefix + "/"))
        foreign = {f"{prefix}/unrelated", f"{prefix}/a/deeper"}
        if policy == "Delete":
            assert keys == foreign, "a delete must remove exactly the owned keys (never a tree)"
        else:
            assert keys == foreign | {f"{prefix}/a", f"{prefix}/b"}
        assert kv.entries(f"{OWNERSHIP}keys/{prefix}/") == {}, "claims are released either way"
        # The index record is a tombstone for a while (see test_a_deleted_resources_tombstone_*).
        record = json.loads(kv.get(f"{OWNERSHIP}owners/kubernetes/{namespace}/{name}") or "{}")
        assert (record.get("keys"), record.get("tombstone")) == ([], True), record


def test_conflicts_write_nothing_and_resolve_on_their_own(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    kv = ConsulKV.from_env(dev_env)
    prefix = unique_prefix()
    apply(dev_env, namespace, ccfg("first", prefix=prefix, data={"shared": "first"}))
    wait_condition(dev_env, namespace, KIND, "first", op=operator)
    apply(dev_env, namespace, ccfg("second", prefix=prefix, data={"shared": "second", "own": "x"}))
    obj = wait_condition(dev_env, namespace, KIND, "second", status="False", reason="Conflict", op=operator)
    message = condition(obj)["message"]
    assert f"{prefix}/shared" in message and "ConsulConfig" in message and "first" in message
    assert kv.values(prefix + "/") == {f"{prefix}/shared": "first"}, "nothing written for a conflict"
    kubectl(dev_env, "delete", KIND, "first", "-n", namespace)
    wait_condition(dev_env, namespace, KIND, "second", timeout=90, op=operator)
    assert kv.values(prefix + "/") == {f"{prefix}/shared": "second", f"{prefix}/own": "x"}
    # A pre-existing key nobody owns needs adopt: true.
    legacy = unique_prefix()
    kv.put(f"{legacy}/old", "theirs")
    apply(dev_env, namespace, ccfg("ad", prefix=legacy, data={"old": "ours"}))
    obj = wait_condition(dev_env, namespace, KIND, "ad", status="False", reason="Conflict", op=operator)
    assert "adopt" in condition(obj)["message"]
    assert kv.get(f"{legacy}/old") == "theirs"
    apply(dev_env, namespace, ccfg("ad", prefix=legacy, adopt=True, data={"old": "ours"}))
    wait_condition(dev_env, namespace, KIND, "ad", op=operator)
    assert kv.get(f"{legacy}/old") == "ours"


def test_out_of_band_changes_are_restored(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    kv = ConsulKV.from_env(dev_env)
    prefix = unique_prefix()
    apply(dev_env, namespace, ccfg("drift", prefix=prefix, data={"a": "1", "b": "2"}))
    wait_condition(dev_env, namespace, KIND, "drift", op=operator)
    kv.put(f"{prefix}/a", "tampered")
    kv.delete(f"{prefix}/b")
    wait_for(
        lambda: kv.values(prefix + "/") == {f"{prefix}/a": "1", f"{prefix}/b": "2"},
        timeout=10,
        interval=0.1,
        message="Consul KV drift restored",
    )
    claim = f"{OWNERSHIP}keys/{prefix}/a"
    kv.delete(claim)
    wait_for(lambda: kv.get(claim) is not None, timeout=10, interval=0.1, message="claim restored")
    wait_for(
        lambda: any(e.get("reason") == "DriftRepaired" for e in events(dev_env, namespace, "drift")),
        timeout=10,
        interval=0.2,
        message="DriftRepaired event",
    )


def test_sources_propagate_and_secrets_stay_secret(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    kv = ConsulKV.from_env(dev_env)
    prefix = unique_prefix()
    secret_value = f"s3cr3t-{uuid.uuid4().hex}"
    kubectl(dev_env, "create", "configmap", "defaults", "-n", namespace, "--from-literal=mode=blue")
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
    sources = [{"configMapRef": {"name": "defaults"}}, {"secretRef": {"name": "creds"}}]
    apply(dev_env, namespace, ccfg("src", prefix=prefix, data={"level": "1"}, **{"from": sources}))
    wait_condition(dev_env, namespace, KIND, "src", op=operator)
    assert kv.values(prefix + "/") == {
        f"{prefix}/mode": "blue",
        f"{prefix}/level": "1",
        f"{prefix}/password": secret_value,
    }
    kubectl(dev_env, "patch", "configmap", "defaults", "-n", namespace, "-p", '{"data":{"mode":"green"}}')
    wait_for(
        lambda: kv.get(f"{prefix}/mode") == "green", timeout=10, interval=0.1, message="ConfigMap change"
    )
    rotated = f"rotated-{uuid.uuid4().hex}"
    patch = json.dumps({"data": {"password": base64.b64encode(rotated.encode()).decode()}})
    kubectl(dev_env, "patch", "secret", "creds", "-n", namespace, "-p", patch)
    wait_for(
        lambda: kv.get(f"{prefix}/password") == rotated, timeout=10, interval=0.1, message="Secret change"
    )
    time.sleep(1)
    obj = get(dev_env, namespace, KIND, "src")
    everything = json.dumps(obj) + json.dumps(events(dev_env, namespace, "src")) + operator.log_tail(100000)
    for value in (secret_value, rotated):
        assert value not in everything, "a Secret value leaked into status, events or the operator log"


def test_bad_input_is_invalid_spec(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    # The schema refuses a leading '/'; keys from a ConfigMap are checked by the operator.
    result = kubectl(
        dev_env,
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        check=False,
        input=json.dumps(ccfg("slash", prefix="/rooted", data={"a": "1"})),
    )
    assert result.returncode != 0 and "prefix" in result.stderr
    # A ConfigMap value Kubernetes accepts (up to 1 MiB) but Consul KV would refuse
    # (512 KiB per value, and a transaction body of 512 KiB): InvalidSpec naming the key.
    big = tmp_path / "blob"
    big.write_text("x" * 400_000)
    kubectl(dev_env, "create", "configmap", "big", "-n", namespace, f"--from-file=blob={big}")
    apply(
        dev_env,
        namespace,
        ccfg("big", prefix=unique_prefix(), **{"from": [{"configMapRef": {"name": "big"}}]}),
    )
    obj = wait_condition(dev_env, namespace, KIND, "big", status="False", reason="InvalidSpec", op=operator)
    message = condition(obj)["message"]
    assert "/blob" in message and "Consul KV" in message and "x" * 20 not in message
    apply(dev_env, namespace, ccfg("reserved", prefix="tether/mine", data={"a": "1"}))
    obj = wait_condition(
        dev_env, namespace, KIND, "reserved", status="False", reason="InvalidSpec", op=operator
    )
    assert "tether/" in condition(obj)["message"]


def test_missing_sources_are_reported_and_recover_by_themselves(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    """A missing reference is Ready=False naming it, and the source watches wake the resource."""
    kv = ConsulKV.from_env(dev_env)
    prefix = unique_prefix()
    sources = [{"configMapRef": {"name": "later"}}, {"secretRef": {"name": "later-creds"}}]
    apply(dev_env, namespace, ccfg("miss", prefix=prefix, **{"from": sources}))
    obj = wait_condition(dev_env, namespace, KIND, "miss", status="False", reason="InvalidSpec", op=operator)
    assert f"ConfigMap {namespace}/later not found" in condition(obj)["message"]
    kubectl(dev_env, "create", "configmap", "later", "-n", namespace, "--from-literal=x=1")
    wait_for(
        lambda: f"Secret {namespace}/later-creds not found"
        in condition(get(dev_env, namespace, KIND, "miss"))["message"],
        timeout=10, interval=0.1, message="the missing Secret named",
    )
    kubectl(dev_env, "create", "secret", "generic", "later-creds", "-n", namespace, "--from-literal=y=2")
    wait_condition(dev_env, namespace, KIND, "miss", timeout=10, op=operator)
    assert kv.values(prefix + "/") == {f"{prefix}/x": "1", f"{prefix}/y": "2"}


def _create_if_absent(env: dict[str, str], key: str, value: str) -> bool:
    """``PUT /v1/kv/<key>?cas=0``: a create guarded by the key's absence, as Tether's creates are."""
    url = f"{env['CONSUL_HTTP_ADDR'].rstrip('/')}/v1/kv/{urllib.parse.quote(key, safe='/')}?cas=0"
    request = urllib.request.Request(url, data=value.encode(), method="PUT")
    with urllib.request.urlopen(request, timeout=10) as response:
        return bool(json.loads(response.read()))


def test_a_deleted_resources_tombstone_fences_late_creates_and_goes_away_on_time(
    dev_env: dict[str, str], tmp_path: Path
) -> None:
    # An operator of its own (outside the shared one's "t-*") with a short tombstone lifetime.
    ns = f"x-tomb-{uuid.uuid4().hex[:6]}"
    kubectl(dev_env, "create", "namespace", ns)
    op = OperatorProcess(
        dev_env, tmp_path / "op.log", args=("-n", ns),
        extra_env={"TETHER_CONSUL_TOMBSTONE_SECONDS": str(TOMBSTONE_SECONDS)}, verbose=True,
    ).start()
    kv = ConsulKV.from_env(dev_env)
    prefix = unique_prefix()
    record_key = f"{OWNERSHIP}owners/kubernetes/{ns}/tomb"

    def record() -> dict[str, Any] | None:
        raw = kv.get(record_key)
        return None if raw is None else dict(json.loads(raw))

    def delete() -> float:
        kubectl(dev_env, "delete", KIND, "tomb", "-n", ns, "--wait=false")
        wait_gone(dev_env, ns, KIND, "tomb")
        return time.time()

    try:
        apply(dev_env, ns, ccfg("tomb", prefix=prefix, data={"a": "1"}))
        wait_condition(dev_env, ns, KIND, "tomb", op=op)
        deleted = delete()
        stone = record()
        assert stone is not None and (stone["keys"], stone["tombstone"]) == ([], True), stone
        assert deleted - 30 < stone["created"] <= deleted + 1, (stone, deleted)
        assert kv.values(prefix + "/") == {} and kv.entries(f"{OWNERSHIP}keys/{prefix}/") == {}
        # A create of this resource that Consul applies only now (sent before the
        # release, guarded by the record's absence) is refused and writes nothing.
        assert not _create_if_absent(dev_env, record_key, json.dumps({"keys": [f"{prefix}/a"]}))
        assert record() == stone

        # The same name again while the tombstone lives: written over, and kept
        # when the tombstone's time has passed.
        apply(dev_env, ns, ccfg("tomb", prefix=prefix, data={"b": "2"}))
        wait_condition(dev_env, ns, KIND, "tomb", op=op)
        assert record() == {"keys": [f"{prefix}/b"]}
        time.sleep(TOMBSTONE_SECONDS + 2)
        assert record() == {"keys": [f"{prefix}/b"]} and kv.values(prefix + "/") == {f"{prefix}/b": "2"}

        # Deleted again: the tombstone goes away on its own, within its lifetime and a margin.
        delete()
        assert (record() or {}).get("tombstone") is True
        wait_for(lambda: record() is None, timeout=TOMBSTONE_SECONDS + 10, interval=0.2,
                 message="the tombstone deleted after its lifetime")
        # ... and the name can be used afresh.
        apply(dev_env, ns, ccfg("tomb", prefix=prefix, data={"c": "3"}))
        wait_condition(dev_env, ns, KIND, "tomb", op=op)
        assert record() == {"keys": [f"{prefix}/c"]}

        # A tombstone left by an operator that died is deleted by the next one.
        delete()
        assert (record() or {}).get("tombstone") is True
        op.kill()
        time.sleep(TOMBSTONE_SECONDS)
        assert (record() or {}).get("tombstone") is True, "nobody deletes it while no operator runs"
        op.start()
        wait_for(lambda: record() is None, timeout=15, interval=0.2,
                 message="the dead operator's tombstone deleted by the next one")
    finally:
        kubectl(dev_env, "delete", "consulconfigs", "--all", "-n", ns, "--timeout=60s", check=False)
        op.stop()
        kubectl(dev_env, "delete", "namespace", ns, "--wait=false", check=False)
