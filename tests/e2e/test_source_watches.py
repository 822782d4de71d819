"""The watches of ConfigMaps, Secrets and EndpointSlices follow what Tether manages.

On the dev stack's real API server: the watch carries metadata only (no Secret
data ever travels on it), objects in namespaces without a dependent never reach
the operator, and a referenced object's change still propagates.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import kubernetes.client as k8s
import kubernetes.config as k8s_config

from tether.clients.kube.http import METADATA, METADATA_LIST, KubeHttp
from tether_dev.harness.etcd import Etcd
from tether_dev.harness.kube import apply, kubectl, resource, wait_condition
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for


def _http(env: dict[str, str]) -> KubeHttp:
    configuration = k8s.Configuration()
    k8s_config.load_kube_config(config_file=env["KUBECONFIG"], client_configuration=configuration)  # type: ignore[no-untyped-call]
    return KubeHttp(configuration)


def test_the_watch_carries_metadata_only(dev_env: dict[str, str], namespace: str) -> None:
    """A Secret created on a watched namespace arrives as PartialObjectMetadata, without its data."""
    value = f"never-on-the-watch-{uuid.uuid4().hex}"

    async def run() -> list[dict[str, Any]]:
        http = _http(dev_env)
        path = f"api/v1/namespaces/{namespace}/secrets"
        try:
            listing = await http.get(path, params={"limit": "1"}, accept=METADATA_LIST)
            version = listing["metadata"]["resourceVersion"]
            await asyncio.to_thread(
                kubectl, dev_env, "create", "secret", "generic", "s1", "-n", namespace,
                f"--from-literal=password={value}",
            )
            events = []
            stream = http.watch(path, params={"resourceVersion": version}, accept=METADATA, timeout_seconds=5)
            async for event in stream:
                events.append(event)
                if event["object"]["metadata"].get("name") == "s1":
                    break
            return events
        finally:
            await http.close()

    events = asyncio.run(run())
    created = [e for e in events if e["object"]["metadata"].get("name") == "s1"]
    assert created and created[0]["type"] == "ADDED", events
    assert created[0]["object"]["kind"] == "PartialObjectMetadata"
    assert "data" not in created[0]["object"]
    assert value not in json.dumps(events)


def _watch_figures(op: OperatorProcess) -> tuple[float, float]:
    metrics = op.metrics()
    return (
        metrics.get('tether_watch_events_total{resource="secrets"}', 0.0),
        metrics.get('tether_watched_namespaces{resource="secrets"}', 0.0),
    )


def test_unrelated_namespaces_never_reach_the_operator(
    dev_env: dict[str, str], operator: OperatorProcess, namespace: str
) -> None:
    # A namespace the operator serves (t-*) but where nothing references a Secret.
    quiet = f"t-{uuid.uuid4().hex[:8]}"
    kubectl(dev_env, "create", "namespace", quiet)
    try:
        prefix = f"/e2e/{uuid.uuid4().hex[:10]}"
        kubectl(dev_env, "create", "secret", "generic", "creds", "-n", namespace,
                "--from-literal=password=one")
        apply(dev_env, namespace, resource("EtcdConfig", "src", {
            "prefix": prefix, "from": [{"secretRef": {"name": "creds"}}],
        }))
        wait_condition(dev_env, namespace, "etcdconfig", "src", op=operator)
        events_before, watched = _watch_figures(operator)
        assert watched >= 1, "the referencing namespace is not watched"

        for i in range(30):
            kubectl(dev_env, "create", "secret", "generic", f"noise-{i}", "-n", quiet, "--from-literal=x=1")
        # The referenced Secret changes after the noise: once its value is in
        # etcd, the noise (created earlier) would have arrived too if watched.
        patch = json.dumps({"data": {"password": base64.b64encode(b"two").decode()}})
        kubectl(dev_env, "patch", "secret", "creds", "-n", namespace, "-p", patch)
        wait_for(
            lambda: Etcd.from_env(dev_env).entries(prefix + "/").get(f"{prefix}/password", ("",))[0] == "two",
            timeout=10, interval=0.2, message="Secret change in etcd",
        )
        time.sleep(1.0)  # other watches' events in flight
        events_after, _ = _watch_figures(operator)
        # Only the referencing namespace's event arrived (the patch), not the
        # 30 Secrets of the quiet one (a cluster-wide watch would bring 31).
        assert 1 <= events_after - events_before <= 3, (events_before, events_after)
    finally:
        kubectl(dev_env, "delete", "namespace", quiet, "--wait=false", check=False)
