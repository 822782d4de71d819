"""The auditor itself: every kind of damage it claims to find, it finds.

A suite whose audit always says "0 anomalies" proves nothing unless the audit
can fail. Here the operator is paused (SIGSTOP, so it repairs nothing), damage
of every category is planted by hand, and one audit pass must name each.
"""

from __future__ import annotations

from audit import Auditor
from faultkit import CLUSTER, OWNERSHIP_PREFIX, FaultStack, Kube, log
from generator import Limits
from kubernetes.client.exceptions import ApiException
from scenario import make_scenario

from tether_dev.harness.consul import Consul
from tether_dev.harness.etcd import Etcd
from tether_dev.harness.operator import OperatorProcess

HOLD = "example.com/hold"


def _drop_finalizer(kube: Kube, ns: str, name: str, finalizer: str) -> None:
    """Remove one finalizer, guarded by resourceVersion (the operator edits the list too)."""
    for _ in range(20):  # bounded: each round either succeeds or saw a newer object
        obj = kube.get("cs", ns, name)
        if obj is None or finalizer not in (obj["metadata"].get("finalizers") or []):
            return
        keep = [f for f in obj["metadata"]["finalizers"] if f != finalizer]
        try:
            kube.custom.patch_namespaced_custom_object(
                "tether.dev",
                "v1alpha1",
                ns,
                "consulservices",
                name,
                {"metadata": {"finalizers": keep, "resourceVersion": obj["metadata"]["resourceVersion"]}},
                _content_type="application/merge-patch+json",
            )
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
    raise AssertionError(f"could not remove {finalizer} from {ns}/{name}")


def test_audit_finds_planted_damage(
    stack: FaultStack, operator: OperatorProcess, kube: Kube, consul: Consul, etcd: Etcd,
    run_id: str, seed: int,
) -> None:
    sc = make_scenario(
        stack,
        operator,
        kube,
        consul,
        etcd,
        run_id=run_id,
        seed=seed,
        namespaces=1,
        limits=Limits(orphan_share=0.0, invalid_share=0.0),
    )
    ns = sc.model.namespaces[0]
    svc = sc.workload.create("cs", ns, spec={"port": 8080, "tags": ["a"]}, name="svc")
    cfg = sc.workload.create(
        "ec",
        ns,
        spec={"prefix": f"{sc.model.root}/{ns}/cfg", "data": {"a": "1", "b": "2"}},
        name="cfg",
        plant_foreign=False,
    )
    held = sc.workload.create("cs", ns, spec={"port": 9090}, name="held")
    sc.wait_ready([svc, cfg, held], timeout=60)
    assert not Auditor(kube, consul, etcd, sc.model).audit(), "the audit should start clean"

    foreign = f"{sc.model.root}/{ns}/cfg/not-tethers"
    etcd.put(foreign, "keep")
    sc.model.foreign[foreign] = "keep"
    # A finalizer nobody will remove: the deletion must show as stuck.
    kube.custom.patch_namespaced_custom_object(
        "tether.dev",
        "v1alpha1",
        ns,
        "consulservices",
        "held",
        {"metadata": {"finalizers": ["tether.dev/cleanup", HOLD]}},
        _content_type="application/merge-patch+json",
    )
    declared = dict(cfg.spec)
    operator.pause()
    try:
        sc.workload.delete(held)
        consul.register(
            {
                "ID": f"{ns}-ghost",
                "Name": "ghost",
                "Port": 1,
                "Meta": {
                    "external-source": "kubernetes",
                    "tether-cluster": CLUSTER,
                    "tether-namespace": ns,
                    "tether-name": "ghost",
                },
            }
        )
        sid = f"{ns}-svc"
        current = consul.services()[sid]
        consul.register(
            {
                "ID": sid,
                "Name": current["Service"],
                "Port": 1234,
                "Tags": current["Tags"],
                "Meta": current["Meta"],
            }
        )
        # Another tool's service holding a check in svc's check-ID space.
        consul.register({
            "ID": f"{ns}-thief", "Name": "thief", "Port": 1,
            "Checks": [{"CheckID": f"{sid}/stolen", "Name": "stolen", "TTL": "10m"}],
        })
        etcd.put(f"{sc.model.root}/{ns}/cfg/a", "tampered")
        etcd.put(f"{sc.model.root}/{ns}/stray/key", "x")
        etcd.put(f"{OWNERSHIP_PREFIX}keys{sc.model.root}/{ns}/stray/key", f"{CLUSTER}/{ns}/gone")
        etcd.put(f"{OWNERSHIP_PREFIX}owners/{CLUSTER}/{ns}/gone", '{"keys":["/x"]}')
        etcd.put(foreign, "touched")
        cfg.spec = {**declared, "data": {"a": "1", "b": "3"}}  # as if an update had been lost

        found = Auditor(kube, consul, etcd, sc.model).audit()
        for anomaly in found:
            log(f"planted damage found: {anomaly}")
        text = "\n".join(map(str, found))
        expected = [
            f"[stuck-deleting] cs {ns}/held",
            f"[orphan] Consul service {ns}-ghost",
            f"[wrong] cs {ns}/svc (Consul ID {sid}): Port is 1234",
            f"[orphan] etcd key {sc.model.root}/{ns}/stray/key",
            f"[orphan] etcd claim {OWNERSHIP_PREFIX}keys{sc.model.root}/{ns}/stray/key",
            f"[orphan] etcd index {OWNERSHIP_PREFIX}owners/{CLUSTER}/{ns}/gone",
            f"[foreign-touched] etcd key {foreign}",
            f"[lost-update] ec {ns}/cfg",
            f"[check-ownership] Consul check {sid}/stolen",
            f"[wrong] ec {ns}/cfg",
        ]
        missing = [line for line in expected if line not in text]
        assert not missing, f"the audit missed planted damage: {missing}\nit found:\n{text}"
    finally:
        operator.resume()
    # Undo what the operator is not meant to undo, then everything must converge.
    consul.deregister(f"{ns}-ghost")
    consul.deregister(f"{ns}-thief")
    for key in (
        f"{sc.model.root}/{ns}/stray/key",
        f"{OWNERSHIP_PREFIX}keys{sc.model.root}/{ns}/stray/key",
        f"{OWNERSHIP_PREFIX}owners/{CLUSTER}/{ns}/gone",
    ):
        etcd.delete(key)
    etcd.put(foreign, "keep")
    cfg.spec = declared
    _drop_finalizer(kube, ns, "held", HOLD)
    sc.assert_converged(60, "after the planted damage was undone (the operator repairs the rest)")
    sc.delete_all()
    sc.assert_converged(60, "after deleting everything")
