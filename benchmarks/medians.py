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
import base64
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import kubernetes.config as k8s_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from opfixture import OperatorProcess  # noqa: E402

GROUP, VERSION = "tether.dev", "v1alpha1"


def env_from_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            out[key] = os.path.expandvars(value.strip().strip('"').strip("'"))
    return out


def wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError("condition not reached")


class Bench:
    def __init__(self, env: dict[str, str], namespace: str) -> None:
        self.env = env
        self.ns = namespace
        k8s_config.load_kube_config(config_file=env["KUBECONFIG"])
        self.api = k8s.CustomObjectsApi()

    def create(self, plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
        self.api.create_namespaced_custom_object(GROUP, VERSION, self.ns, plural, body)

    def ready(self, plural: str, name: str) -> bool:
        obj = self.api.get_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name)
        status = obj.get("status") or {}
        return status.get("observedGeneration") == obj["metadata"]["generation"] and any(
            c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])
        )

    def consul(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(
            self.env["CONSUL_HTTP_ADDR"] + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                text = r.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return json.loads(text) if text.strip() else None

    def etcd(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.env["ETCD_ENDPOINTS"].split(",")[0] + path
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            result: dict[str, Any] = json.loads(r.read())
        return result

    def etcd_get(self, key: str) -> str | None:
        out = self.etcd("/v3/kv/range", {"key": base64.b64encode(key.encode()).decode()})
        kvs = out.get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")).decode() if kvs else None

    def etcd_put(self, key: str, value: str) -> None:
        self.etcd(
            "/v3/kv/put",
            {
                "key": base64.b64encode(key.encode()).decode(),
                "value": base64.b64encode(value.encode()).decode(),
            },
        )


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
    parser.add_argument("--env-file", type=Path, default=REPO / ".tether" / "dev" / "env")
    args = parser.parse_args()
    env = env_from_file(args.env_file)
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    subprocess.run(
        ["kubectl", "create", "namespace", ns], env={**os.environ, **env}, check=True, capture_output=True
    )
    log = Path(f"/tmp/tether-medians-{ns}.log")
    op = OperatorProcess(env, log, args=("-n", ns)).start()
    bench = Bench(env, ns)
    prefix = f"/bench/{ns}"
    results: dict[str, Any] = {"namespace": ns}
    try:
        apply_c, apply_e, drift_c, drift_e = [], [], [], []
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
        for i in range(args.runs):
            # Drifts are measured one at a time, as they happen in practice: the
            # Consul watcher spaces its full scans 0.25 s apart under churn.
            time.sleep(0.5)
            sid = f"{ns}-lat-{i}"
            start = time.monotonic()
            bench.consul("PUT", f"/v1/agent/service/deregister/{sid}")
            wait(lambda sid=sid: bench.consul("GET", f"/v1/agent/service/{sid}") is not None, 15)
            drift_c.append(time.monotonic() - start)
            key = f"{prefix}/lat-{i}/k"
            start = time.monotonic()
            bench.etcd_put(key, "tampered")
            wait(lambda key=key: bench.etcd_get(key) == "v", 15)
            drift_e.append(time.monotonic() - start)
        results["consul_apply_to_ready"] = summary(apply_c)
        results["etcd_apply_to_ready"] = summary(apply_e)
        results["consul_drift_repair"] = summary(drift_c)
        results["etcd_drift_repair"] = summary(drift_e)
        for i in range(args.runs, args.count):
            bench.create("consulservices", "ConsulService", f"lat-{i}", {"port": 1000 + i})
            bench.create(
                "etcdconfigs", "EtcdConfig", f"lat-{i}", {"prefix": f"{prefix}/lat-{i}", "data": {"k": "v"}}
            )
        for i in range(args.count):
            wait(
                lambda i=i: (
                    bench.ready("consulservices", f"lat-{i}") and bench.ready("etcdconfigs", f"lat-{i}")
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
        subprocess.run(
            ["kubectl", "delete", "consulservices,etcdconfigs", "--all", "-n", ns, "--timeout=120s"],
            env={**os.environ, **env},
            capture_output=True,
        )
        op.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
