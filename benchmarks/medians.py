"""Per-kind latency medians and idle writes, as the kind issues ask for.

Runs against the dev stack (``tether dev up`` first; reads ``.tether/dev/env``)
with its own operator process in its own namespace, and prints JSON:

- apply → Ready, median (and p90) over ``--runs`` fresh resources of each kind;
- drift repair, median over ``--runs`` out-of-band changes of each kind;
- writes to Consul, etcd and Kubernetes during ``--idle`` seconds with
  ``--count`` resources of each kind in place (the contract says 0).

It asserts nothing: it measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import kubernetes.config as k8s_config

from tether_dev.harness import devstack, kube
from tether_dev.harness.consul import Consul
from tether_dev.harness.consulkv import ConsulKV
from tether_dev.harness.etcd import Etcd
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import timed as wait

REPO = Path(__file__).resolve().parents[1]

GROUP, VERSION = "tether.dev", "v1alpha1"


class Bench:
    """A namespace of its own on the dev stack, and the calls a measurement makes there."""

    def __init__(self, env: dict[str, str], namespace: str) -> None:
        self.env = env
        self.ns = namespace
        k8s_config.load_kube_config(config_file=env["KUBECONFIG"])
        self.api = k8s.CustomObjectsApi()

    @classmethod
    def on_dev_stack(cls, env_file: Path, prefix: str) -> Bench:
        """A fresh namespace ``PREFIX-xxxxxx`` on the stack whose env file is ``env_file``."""
        env = devstack.load_env(env_file.parent)
        namespace = f"{prefix}-{uuid.uuid4().hex[:6]}"
        kube.kubectl(env, "create", "namespace", namespace)
        return cls(env, namespace)

    def create(self, plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
        self.api.create_namespaced_custom_object(GROUP, VERSION, self.ns, plural, body)

    def ready(self, plural: str, name: str) -> bool:
        return kube.is_ready(self.api.get_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name))


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_s": round(statistics.median(ordered), 4),
        "p90_s": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
        "max_s": round(ordered[-1], 4),
        "runs": len(ordered),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--env-file", type=Path, default=devstack.state_dir() / "env")
    args = parser.parse_args()
    bench = Bench.on_dev_stack(args.env_file, "bench")
    env, ns = bench.env, bench.ns
    log = Path(f"/tmp/tether-medians-{ns}.log")
    op = OperatorProcess(env, log, args=("-n", ns)).start()
    consul, etcd = Consul.from_env(env, timeout=5), Etcd.from_env(env, timeout=5)
    kv = ConsulKV.from_env(env, timeout=5)
    prefix = f"/bench/{ns}"
    kv_prefix = f"bench/{ns}"
    results: dict[str, Any] = {"namespace": ns}
    try:
        apply_c, apply_e, apply_k, drift_c, drift_e, drift_k = [], [], [], [], [], []
        for i in range(args.runs):
            start = time.monotonic()
            bench.create("consulservices", "ConsulService", f"lat-{i}", {"port": 1000 + i})
            wait(lambda i=i: bench.ready("consulservices", f"lat-{i}"), 30)
            apply_c.append(time.monotonic() - start)
            start = time.monotonic()
            bench.create(
                "etcdconfigs", "EtcdConfig", f"lat-{i}", {"prefix": f"{prefix}/lat-{i}", "data": {"k": "v"}}
            )
            wait(lambda i=i: bench.ready("etcdconfigs", f"lat-{i}"), 30)
            apply_e.append(time.monotonic() - start)
            start = time.monotonic()
            bench.create(
                "consulconfigs",
                "ConsulConfig",
                f"lat-{i}",
                {"prefix": f"{kv_prefix}/lat-{i}", "data": {"k": "v"}},
            )
            wait(lambda i=i: bench.ready("consulconfigs", f"lat-{i}"), 30)
            apply_k.append(time.monotonic() - start)
        for i in range(args.runs):
            # Drifts are measured one at a time, as they happen in practice: the
            # Consul watcher spaces its full scans 0.25 s apart under churn.
            time.sleep(0.5)
            sid = f"{ns}-lat-{i}"
            start = time.monotonic()
            consul.deregister(sid)
            wait(lambda sid=sid: consul.service(sid) is not None, timeout=15)
            drift_c.append(time.monotonic() - start)
            key = f"{prefix}/lat-{i}/k"
            start = time.monotonic()
            etcd.put(key, "tampered")
            wait(lambda key=key: etcd.get(key) == "v", timeout=15)
            drift_e.append(time.monotonic() - start)
            kv_key = f"{kv_prefix}/lat-{i}/k"
            start = time.monotonic()
            kv.put(kv_key, "tampered")
            wait(lambda kv_key=kv_key: kv.get(kv_key) == "v", timeout=15)
            drift_k.append(time.monotonic() - start)
        results["consul_apply_to_ready"] = summary(apply_c)
        results["etcd_apply_to_ready"] = summary(apply_e)
        results["consulconfig_apply_to_ready"] = summary(apply_k)
        results["consul_drift_repair"] = summary(drift_c)
        results["etcd_drift_repair"] = summary(drift_e)
        results["consulconfig_drift_repair"] = summary(drift_k)
        for i in range(args.runs, args.count):
            bench.create("consulservices", "ConsulService", f"lat-{i}", {"port": 1000 + i})
            bench.create(
                "etcdconfigs", "EtcdConfig", f"lat-{i}", {"prefix": f"{prefix}/lat-{i}", "data": {"k": "v"}}
            )
            bench.create(
                "consulconfigs",
                "ConsulConfig",
                f"lat-{i}",
                {"prefix": f"{kv_prefix}/lat-{i}", "data": {"k": "v"}},
            )
        for i in range(args.count):
            wait(
                lambda i=i: (
                    bench.ready("consulservices", f"lat-{i}")
                    and bench.ready("etcdconfigs", f"lat-{i}")
                    and bench.ready("consulconfigs", f"lat-{i}")
                ),
                120,
                0.05,
            )
        time.sleep(3)
        before = op.writes()
        time.sleep(args.idle)
        after = op.writes()
        results["idle"] = {
            "seconds": args.idle,
            "resources_per_kind": args.count,
            "writes": {k: after[k] - before[k] for k in after},
        }
    finally:
        kube.kubectl(
            env,
            "delete",
            "consulservices,etcdconfigs,consulconfigs",
            "--all",
            "-n",
            ns,
            "--timeout=110s",
            check=False,
        )
        op.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
