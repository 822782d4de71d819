"""TetherPolicy enforcement latency: a policy edit refuses a Ready resource, then allows it again.

Runs against the dev stack (``tether dev up`` first; reads ``.tether/dev/env``)
with its own operator process in its own namespace, labelled for one policy
of its own. One ConsulService (fixed instance) and one EtcdConfig, both
Ready; then ``--edits`` times:

- **refuse**: the policy is edited (a merge patch of its spec) so that it no
  longer allows the service name or the prefix; the clock runs from just
  before the patch until each resource reads ``Ready=False``, reason
  ``Forbidden`` (and, for the ConsulService, until its instance has left the
  Consul agent);
- **allow**: the policy is edited back; the clock runs until each is
  ``Ready=True`` at its generation again (and the instance is back).

The three figures of a step are polled together, every 20 ms. Prints
p50/p99/max per figure as JSON; asserts nothing (the contract's bound is
10 s, the e2e tests check it with slack).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.medians import GROUP, VERSION, Bench
from benchmarks.stats import latency_summary
from tether_dev.harness import devstack, kube
from tether_dev.harness.consul import Consul
from tether_dev.harness.operator import OperatorProcess

LABEL = "bench.tether.dev/team"
POLL = 0.02
TIMEOUT = 60.0  # per wait; far above the contract's 10 s, so a slow machine still yields a figure


def _until(predicates: dict[str, Callable[[], bool]], started: float) -> dict[str, float]:
    """Seconds from ``started`` until each predicate first held, all polled together (bounded)."""
    deadline = started + TIMEOUT
    took: dict[str, float] = {}
    while len(took) < len(predicates):
        for name, predicate in predicates.items():
            if name not in took and predicate():
                took[name] = time.monotonic() - started
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sorted(set(predicates) - set(took))} not reached within {TIMEOUT:.0f} s")
        time.sleep(POLL)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--edits", type=int, default=20, help="refuse/allow cycles (20)")
    parser.add_argument("--env-file", type=Path, default=devstack.state_dir() / "env")
    args = parser.parse_args()
    bench = Bench.on_dev_stack(args.env_file, "policies")
    env, ns = bench.env, bench.ns
    kube.kubectl(env, "label", "namespace", ns, f"{LABEL}={ns}")
    service, prefix, policy = f"pol-{ns}", f"/bench-policies/{ns}", f"bench-{ns}"
    allowing = {"namespaceSelector": {"matchLabels": {LABEL: ns}},
                "consulServiceNames": [service], "etcdPrefixes": [prefix]}
    refusing = {"consulServiceNames": [f"other-{ns}"], "etcdPrefixes": [f"/elsewhere/{ns}"]}
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TetherPolicy", "metadata": {"name": policy},
            "spec": allowing}
    bench.api.create_cluster_custom_object(GROUP, VERSION, "tetherpolicies", body)
    consul = Consul.from_env(env)
    log = Path(f"/tmp/tether-policies-{ns}.log")
    operator = OperatorProcess(env, log, args=("-n", ns)).start()
    figures: dict[str, list[float]] = {
        "refuse_consulservice_forbidden": [], "refuse_instance_gone": [], "refuse_etcdconfig_forbidden": [],
        "allow_consulservice_ready": [], "allow_instance_back": [], "allow_etcdconfig_ready": [],
    }
    kinds = {"consulservice": "consulservices", "etcdconfig": "etcdconfigs"}

    def get(kind: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = bench.api.get_namespaced_custom_object(GROUP, VERSION, ns, kinds[kind], name)
        return obj

    def forbidden(kind: str, name: str) -> Callable[[], bool]:
        return lambda: kube.condition(get(kind, name)).get("reason") == "Forbidden"

    def ready(kind: str, name: str) -> Callable[[], bool]:
        return lambda: kube.is_ready(get(kind, name))

    def registered() -> bool:
        return consul.service(f"{ns}-web") is not None

    def edit(spec: dict[str, Any]) -> float:
        started = time.monotonic()
        bench.api.patch_cluster_custom_object(GROUP, VERSION, "tetherpolicies", policy, {"spec": spec})
        return started

    try:
        web = {"name": service, "address": "10.9.0.1", "port": 80}
        bench.create("consulservices", "ConsulService", "web", web)
        bench.create("etcdconfigs", "EtcdConfig", "cfg", {"prefix": prefix, "data": {"k": "v"}})
        _until({"ready": lambda: ready("consulservice", "web")() and ready("etcdconfig", "cfg")()},
               time.monotonic())
        for _ in range(args.edits):
            started = edit(refusing)
            for name, seconds in _until({
                "refuse_consulservice_forbidden": forbidden("consulservice", "web"),
                "refuse_instance_gone": lambda: not registered(),
                "refuse_etcdconfig_forbidden": forbidden("etcdconfig", "cfg"),
            }, started).items():
                figures[name].append(seconds)
            started = edit(allowing)
            for name, seconds in _until({
                "allow_consulservice_ready": ready("consulservice", "web"),
                "allow_instance_back": registered,
                "allow_etcdconfig_ready": ready("etcdconfig", "cfg"),
            }, started).items():
                figures[name].append(seconds)
    finally:
        kinds_all = "consulservices,etcdconfigs"
        kube.kubectl(env, "delete", kinds_all, "--all", "-n", ns, "--timeout=60s", check=False)
        operator.stop()
        kube.kubectl(env, "delete", "tetherpolicy", policy, "--ignore-not-found", check=False)
        kube.delete_namespace(env, ns)
    print(json.dumps({"edits": args.edits, **{k: latency_summary(v) for k, v in figures.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
