"""Namespaces created while the operator starts are all served.

Kopf lists the namespaces once, then starts a namespace watch whose own initial
listing it ignores: a namespace created between the two was never watched, its
resources silently never reconciled (a CI run lost a test to it). Tether's own
namespace watch hands Kopf what it missed (``tether.kopfing``). Here namespaces
are created back to back through the whole start-up, so some land in that
moment, and every one of them must get its resource served.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client, config

from tether_dev.harness.kube import kubectl
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

KOPF_LOGGED_IN = "Initial authentication has finished."
# Bounds: namespaces are created for at most this long after Kopf's login, and at most this many.
CREATE_SECONDS = 1.5
MAX_NAMESPACES = 100


def _names(listing: str) -> dict[str, bool]:
    """namespace → Ready for the EtcdConfigs of one listing."""
    out: dict[str, bool] = {}
    for item in json.loads(listing)["items"]:
        conds = (item.get("status") or {}).get("conditions") or []
        ok = any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
        out[item["metadata"]["namespace"]] = ok
    return out


def _send(env: dict[str, str], verb: str, items: list[dict[str, Any]]) -> None:
    kubectl(env, verb, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def test_namespaces_created_while_the_operator_starts_are_all_served(
    dev_env: dict[str, str], tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    prefix = f"startns-{tag}-"
    op = OperatorProcess(dev_env, tmp_path / "op.log", args=("-n", f"{prefix}*"), verbose=True)
    op.start(wait=False)
    api = client.CoreV1Api(config.new_client_from_config(config_file=dev_env["KUBECONFIG"]))  # type: ignore[no-untyped-call]
    created: list[str] = []
    try:
        # Kopf lists the namespaces right after its login: from then on, create
        # namespaces back to back (about 100 a second) for a bounded moment.
        wait_for(lambda: KOPF_LOGGED_IN in op.log_text(), timeout=60, interval=0.01, message="Kopf's login")
        deadline = time.monotonic() + CREATE_SECONDS
        while time.monotonic() < deadline and len(created) < MAX_NAMESPACES:
            name = f"{prefix}{len(created)}"
            api.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
            created.append(name)
        op.wait_serving(timeout=60)
        configs = [
            {"apiVersion": "tether.dev/v1alpha1", "kind": "EtcdConfig",
             "metadata": {"name": "cfg", "namespace": ns, "labels": {"startns": tag}},
             "spec": {"prefix": f"/startns/{tag}/{ns}/", "data": {"k": ns}}}
            for ns in created
        ]
        _send(dev_env, "apply", configs)

        ready: dict[str, bool] = {}

        def all_ready() -> bool:
            out = kubectl(dev_env, "get", "etcdconfigs", "-A", "-o", "json").stdout
            ready.clear()
            ready.update({ns: ok for ns, ok in _names(out).items() if ns.startswith(prefix)})
            return len(ready) == len(created) and all(ready.values())

        try:
            wait_for(all_ready, timeout=45, interval=0.5, message="every EtcdConfig Ready")
        except AssertionError as exc:
            never = sorted(ns for ns in created if not ready.get(ns))
            raise AssertionError(f"{exc}: not served in {never}\n{op.log_tail()}") from None
        handed = op.metrics().get("tether_kopf_namespaces_handed_total", 0)
        print(f"{len(created)} namespaces created during start-up; handed to Kopf: {handed:.0f}")
    finally:
        # The operator releases the keys (and the finalizers) before it stops.
        kubectl(dev_env, "delete", "etcdconfigs", "-A", "-l", f"startns={tag}", "--timeout=60s", check=False)
        op.stop()
        for ns in created:
            # As the namespace controller the dev stack lacks would: delete, then finalize.
            api.delete_namespace(ns)
            body = api.read_namespace(ns)
            body.spec = client.V1NamespaceSpec(finalizers=[])
            api.replace_namespace_finalize(ns, body)
