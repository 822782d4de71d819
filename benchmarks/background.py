"""The background phase: the operator's cost with unrelated objects and foreign writes around it.

Why: a cluster holds tens of thousands of Secrets and ConfigMaps that have
nothing to do with Tether, and etcd clusters are shared with other writers.
This phase measures the operator's CPU, memory and watch events over two equal
windows — quiet, then with those around it — at the steady-state size.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks import workload
from benchmarks.kubeapi import KubeApi, ready
from benchmarks.phases import _until, settle
from benchmarks.processes import cpu_seconds, delta, log, rss_mib, summed
from tether.clients.etcd.client import EtcdClient
from tether.clients.etcd.values import Put
from tether_dev.harness.operator import OperatorProcess, writes

NS = workload.NAMESPACE

async def _window(operator: OperatorProcess, seconds: float) -> dict[str, Any]:
    """The operator's CPU, memory and writes over a window of ``seconds``."""
    before = await asyncio.to_thread(operator.metrics)
    cpu0 = cpu_seconds(operator.pid)
    await asyncio.sleep(seconds)
    after = await asyncio.to_thread(operator.metrics)
    return {
        "seconds": seconds,
        "cpu_seconds": round(cpu_seconds(operator.pid) - cpu0, 3),
        "rss_mib": round(rss_mib(operator.pid), 1),
        "writes": delta(writes(after), writes(before)),
        "watch_events": int(summed(after, "tether_watch_events_total")
                            - summed(before, "tether_watch_events_total")),
    }


async def _noise_objects(kube: KubeApi, namespaces: list[str], total: int, concurrency: int) -> int:
    """``total`` Secrets and ConfigMaps (half each) spread over ``namespaces``; returns failures."""
    queue: asyncio.Queue[tuple[str, str, dict[str, Any]]] = asyncio.Queue()
    for i in range(total):
        ns = namespaces[i % len(namespaces)]
        if i % 2:
            body = {"metadata": {"name": f"noise-{i:06d}"}, "data": {"password": "bm9pc2U="}}
            queue.put_nowait((f"/api/v1/namespaces/{ns}/secrets", ns, body))
        else:
            body = {"metadata": {"name": f"noise-{i:06d}"}, "data": {"mode": "noise"}}
            queue.put_nowait((f"/api/v1/namespaces/{ns}/configmaps", ns, body))
    failures = 0

    async def worker() -> None:
        nonlocal failures
        while not queue.empty():
            path, _, body = queue.get_nowait()
            try:
                await kube.request("POST", path, body)
            except Exception:
                failures += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


async def run(
    operator: OperatorProcess, kube: KubeApi, etcd: EtcdClient, *, objects: int, etcd_per_minute: int,
    seconds: float, concurrency: int,
) -> dict[str, Any]:
    """The operator's cost with and without unrelated objects and foreign etcd writes around it.

    One EtcdConfig of the bench namespace names a ConfigMap and a Secret, so
    that namespace is watched (the case where unrelated objects share a
    namespace with managed ones): a tenth of the noise goes there, the rest
    into namespaces with nothing of Tether's. Foreign etcd writes go under
    ``/foreign/``, outside every managed prefix. Two windows of ``seconds``:
    quiet, then with ``objects`` in place and the foreign writes running.
    """
    await kube.request("POST", f"/api/v1/namespaces/{NS}/configmaps",
                       {"metadata": {"name": "bg-source"}, "data": {"mode": "on"}})
    await kube.request("POST", f"/api/v1/namespaces/{NS}/secrets",
                       {"metadata": {"name": "bg-secret"}, "data": {"token": "dG9rZW4="}})
    body = {"apiVersion": "tether.dev/v1alpha1", "kind": "EtcdConfig",
            "metadata": {"name": "bg-sourced", "namespace": NS},
            "spec": {"prefix": "/bench-bg", "from": [{"configMapRef": {"name": "bg-source"}},
                                                      {"secretRef": {"name": "bg-secret"}}]}}
    await kube.create(workload.ECFG, NS, body)
    await _until(lambda: _ready(kube, workload.ECFG, "bg-sourced"), 60.0)
    await settle(operator)
    quiet = await _window(operator, seconds)
    log(f"background: quiet window cpu {quiet['cpu_seconds']}s, rss {quiet['rss_mib']} MiB")

    others = [f"bench-noise-{i}" for i in range(9)]
    for ns in others:
        await kube.ensure_namespace(ns)
    # 1 of every 10 into the watched bench namespace, 9 into the others.
    spread_over = [NS, *others]
    started = time.monotonic()
    cpu0 = cpu_seconds(operator.pid)
    failures = await _noise_objects(kube, spread_over, objects, concurrency)
    creating = {"seconds": round(time.monotonic() - started, 1),
                "operator_cpu_seconds": round(cpu_seconds(operator.pid) - cpu0, 3), "failures": failures}
    log(f"background: {objects} Secrets and ConfigMaps created in {creating['seconds']}s")
    await settle(operator)

    stop = asyncio.Event()
    foreign = 0

    async def writer() -> None:
        nonlocal foreign
        interval = 60.0 / etcd_per_minute
        next_at = time.monotonic()
        while not stop.is_set():
            await etcd.txn([], [Put(f"/foreign/app/k{foreign % 1000:04d}".encode(), f"v{foreign}".encode())])
            foreign += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    task = asyncio.create_task(writer())
    try:
        noisy = await _window(operator, seconds)
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
    noisy["foreign_etcd_writes"] = foreign
    log(f"background: noisy window cpu {noisy['cpu_seconds']}s, rss {noisy['rss_mib']} MiB, "
        f"{foreign} foreign etcd writes")
    return {
        "objects": objects, "etcd_writes_per_minute": etcd_per_minute, "creating": creating,
        "quiet": quiet, "noisy": noisy,
        "cpu_ratio": round(noisy["cpu_seconds"] / quiet["cpu_seconds"], 2) if quiet["cpu_seconds"] else None,
        "rss_ratio": round(noisy["rss_mib"] / quiet["rss_mib"], 3) if quiet["rss_mib"] else None,
    }


async def _ready(kube: KubeApi, plural: str, name: str) -> bool:
    return ready(await kube.get(plural, NS, name))
