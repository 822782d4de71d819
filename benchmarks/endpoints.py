"""The ``endpoints`` section of ``make bench``: ConsulService endpoints mode at scale.

S Services, each with one EndpointSlice of E ready endpoints (written by the
driver, as the EndpointSlice controller would: the dev stack has none), and
S ConsulServices following them, on a fresh dev stack with the operator
running. Measured, in order:

1. **convergence** — time until every ConsulService is Ready with E instances
   and Consul's catalog holds all S*E instances; Consul write calls;
2. **idle** — writes over a quiet window;
3. **condition change → Consul health** — flip one endpoint's ``ready`` in
   its slice, poll the instance's check in Consul until it follows; p50/p99
   over ``samples`` flips (each flipped back, also measured);
4. **rollout** — every slice's endpoints replaced by new addresses at once:
   Consul write calls and time until the catalog holds exactly the new set;
5. **gated rollout** (``gate="on"`` or ``"both"``; see :func:`gated_rollout`)
   — the same rollout with every endpoint backed by a Pod that lists the
   readiness gate ``tether.dev/consul-passing``: time until every new Pod's
   gate is ``True`` and Consul holds exactly the new instances passing;
   Consul and Kubernetes writes, and the gate patches Tether made. With
   ``"both"`` the ungated rollout of phase 4 runs first on the same stack:
   the two are the price of the gate;
6. **restart** — SIGTERM, start, wait until it has caught up: writes.

Nothing here asserts wall time; the figures go into the report's
``endpoints`` section.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from benchmarks import phases
from benchmarks.kubeapi import KubeApi, ready
from benchmarks.processes import delta, log, summed
from benchmarks.stats import latency_summary
from tether_dev.harness.operator import OperatorProcess, writes

NS = "bench-ep"
GATE = "tether.dev/consul-passing"
GENERATION_LABEL = "bench.tether.dev/generation"
GATES = ("off", "on", "both")
NODE = "tether-kubernetes"  # TETHER_CONSUL_NODE's default for the default cluster name
CSVC = "consulservices"


def name_of(s: int) -> str:
    return f"ep-{s:04d}"


def address(generation: int, s: int, e: int) -> str:
    return f"10.{generation}.{s % 256}.{e + 1}"


def service_body(s: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name_of(s), "namespace": NS},
        # Headless: the dev stack's service range (a /24) has no address for a
        # thousand Services, and Tether reads the slices, not the cluster IP.
        "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }


def endpoints_of(generation: int, s: int, per: int, not_ready: int | None = None) -> list[dict[str, Any]]:
    return [
        {
            "addresses": [address(generation, s, e)],
            "conditions": {"ready": e != not_ready, "serving": e != not_ready, "terminating": False},
        }
        for e in range(per)
    ]


def slice_body(s: int, per: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name_of(s)}-a",
            "namespace": NS,
            "labels": {
                "kubernetes.io/service-name": name_of(s),
                "endpointslice.kubernetes.io/managed-by": "bench.tether.dev",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints_of(0, s, per),
    }


def csvc_body(s: int) -> dict[str, Any]:
    return {
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "ConsulService",
        "metadata": {"name": name_of(s), "namespace": NS},
        "spec": {"endpoints": {"service": name_of(s), "port": "http"}},
    }


def slice_path(s: int) -> str:
    return f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/{name_of(s)}-a"


def pod_name(generation: int, s: int, e: int) -> str:
    return f"{name_of(s)}-g{generation}-{e:03d}"


def pod_body(generation: int, s: int, e: int) -> dict[str, Any]:
    """A Pod that lists the gate; nothing runs it (the dev stack has no kubelet, nor scheduler)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(generation, s, e),
            "namespace": NS,
            "labels": {GENERATION_LABEL: str(generation), "app": name_of(s)},
        },
        "spec": {
            "readinessGates": [{"conditionType": GATE}],
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        },
    }


def kubelet_status(generation: int, s: int, e: int) -> dict[str, Any]:
    """What the kubelet reports once the containers are ready: Ready still false, the gate holds it."""
    return {"status": {
        "phase": "Running",
        "podIP": address(generation, s, e),
        "conditions": [
            {"type": "ContainersReady", "status": "True"},
            {"type": "Ready", "status": "False"},
        ],
    }}


def gated_endpoints_of(generation: int, s: int, per: int, uids: dict[str, str]) -> list[dict[str, Any]]:
    """The slice's endpoints while the gate holds the Pods not Ready: ``ready: false``, with targetRefs."""
    return [
        {
            "addresses": [address(generation, s, e)],
            "conditions": {"ready": False, "serving": False, "terminating": False},
            "targetRef": {
                "kind": "Pod", "namespace": NS, "name": pod_name(generation, s, e),
                "uid": uids[pod_name(generation, s, e)],
            },
        }
        for e in range(per)
    ]


def gate_open(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == GATE and c.get("status") == "True" for c in conditions)


def gate_patches(log_text: str) -> dict[str, int]:
    """The gate conditions Tether patched, by status, from its log lines (one per successful patch).

    ``tether_backend_writes_total{system="kubernetes"}`` also counts the
    ConsulServices' status writes; this counts the ``pods/status`` patches alone.
    """
    marker = f"readiness gate {GATE} of Pod "
    counts = {"True": 0, "False": 0}
    for line in log_text.splitlines():
        if marker in line:
            for status in counts:
                if f" set to {status} " in line:
                    counts[status] += 1
    return {"total": counts["True"] + counts["False"], "to_true": counts["True"], "to_false": counts["False"]}


async def _set_endpoints(kube: KubeApi, s: int, eps: list[dict[str, Any]]) -> None:
    # A merge patch replaces the whole list, as the EndpointSlice controller's update does.
    await kube.request(
        "PATCH", slice_path(s), {"endpoints": eps}, content_type="application/merge-patch+json"
    )


async def _node(consul: phases.Consul) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The synthetic node's instances by ID, and check statuses by CheckID."""
    async with consul.session.get(f"{consul.url}/v1/catalog/node-services/{NODE}") as resp:
        data = await resp.json() if resp.status == 200 else None
    async with consul.session.get(f"{consul.url}/v1/health/node/{NODE}") as resp:
        checks = await resp.json() if resp.status == 200 else []
    services = {s["ID"]: s for s in ((data or {}).get("Services") or [])}
    return services, {c["CheckID"]: c["Status"] for c in checks or []}


async def _until(check: Callable[[], Awaitable[bool]], budget: float, poll: float = 0.005) -> float | None:
    started = time.monotonic()
    deadline = started + budget
    while time.monotonic() < deadline:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(poll)
    return None


async def _gather_limited(coros: list[Awaitable[Any]], limit: int) -> None:
    gate = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[Any]) -> None:
        async with gate:
            await coro

    await asyncio.gather(*(one(c) for c in coros))


async def converge(
    kube: KubeApi, consul: phases.Consul, services: int, per: int, *, concurrency: int, budget: float
) -> dict[str, Any]:
    await kube.ensure_namespace(NS)
    started = time.monotonic()
    await _gather_limited(
        [kube.request("POST", f"/api/v1/namespaces/{NS}/services", service_body(s)) for s in range(services)],
        concurrency,
    )
    await _gather_limited(
        [
            kube.request(
                "POST", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", slice_body(s, per)
            )
            for s in range(services)
        ],
        concurrency,
    )
    await _gather_limited([kube.create(CSVC, NS, csvc_body(s)) for s in range(services)], concurrency)
    created = time.monotonic()

    async def all_ready() -> bool:
        items = (await kube.list(CSVC, NS)).get("items") or []
        return len(items) == services and all(
            ready(o) and ((o.get("status") or {}).get("instances") or {}).get("total") == per for o in items
        )

    took = await _until(all_ready, budget, poll=0.25)
    in_consul, _ = await _node(consul)
    return {
        "seconds": None if took is None else round(created - started + took, 3),
        "create_seconds": round(created - started, 3),
        "complete": took is not None,
        "instances_in_consul": len(in_consul),
    }


async def condition_changes(
    kube: KubeApi,
    consul: phases.Consul,
    services: int,
    per: int,
    *,
    count: int,
    budget: float = 30.0,
    gap: float = 0.3,
) -> dict[str, Any]:
    """Flip one endpoint's ready in its slice; time until Consul's check follows (and back)."""
    down: list[float] = []
    up: list[float] = []
    timeouts = 0
    for k, s in enumerate(phases.spread(services, count, 3)):
        e = k % per
        check_id = f"{NS}-{name_of(s)}-{address(0, s, e)}-8080:endpoint"
        url = f"{consul.url}/v1/health/checks/{name_of(s)}"

        async def status_is(wanted: str, check_id: str = check_id, url: str = url) -> bool:
            async with consul.session.get(url) as resp:
                checks = await resp.json() if resp.status == 200 else []
            return any(c["CheckID"] == check_id and c["Status"] == wanted for c in checks or [])

        for wanted, eps, into in (
            ("critical", endpoints_of(0, s, per, not_ready=e), down),
            ("passing", endpoints_of(0, s, per), up),
        ):
            started = time.monotonic()
            await _set_endpoints(kube, s, eps)
            took = await _until(functools.partial(status_is, wanted), budget)
            if took is None:
                timeouts += 1
            else:
                into.append(time.monotonic() - started)
            await asyncio.sleep(gap)
    return {
        "to_critical": latency_summary(down),
        "to_passing": latency_summary(up),
        "all": latency_summary(down + up),
        "timeouts": timeouts,
    }


async def rollout(
    kube: KubeApi,
    consul: phases.Consul,
    operator: OperatorProcess,
    services: int,
    per: int,
    *,
    concurrency: int,
    budget: float,
) -> dict[str, Any]:
    """Replace every endpoint by a new address at once; writes and time until Consul matches."""
    before = await asyncio.to_thread(operator.metrics)
    wanted = {(address(1, s, e), 8080) for s in range(services) for e in range(per)}

    async def matches() -> bool:
        in_consul, statuses = await _node(consul)
        have = {(svc["Address"], svc["Port"]) for svc in in_consul.values()}
        return have == wanted and all(statuses.get(f"{sid}:endpoint") == "passing" for sid in in_consul)

    started = time.monotonic()
    await _gather_limited(
        [_set_endpoints(kube, s, endpoints_of(1, s, per)) for s in range(services)], concurrency
    )
    patched = time.monotonic()
    took = await _until(matches, budget, poll=0.1)
    settled, _ = await phases.settle(operator)
    return {
        "endpoints_replaced": services * per,
        "patch_seconds": round(patched - started, 3),
        "seconds": None if took is None else round(patched - started + took, 3),
        "writes": delta(writes(settled), writes(before)),
        "operations_needed": services * per * 3,
    }


async def _pods_of(kube: KubeApi, generation: int) -> list[dict[str, Any]]:
    listing = await kube.request(
        "GET", f"/api/v1/namespaces/{NS}/pods", params={"labelSelector": f"{GENERATION_LABEL}={generation}"}
    )
    return list(listing.get("items") or [])


async def _delete_pods(kube: KubeApi, generation: int, *, concurrency: int) -> None:
    await _gather_limited(
        [
            kube.request("DELETE", f"/api/v1/namespaces/{NS}/pods/{p['metadata']['name']}", ok_missing=True)
            for p in await _pods_of(kube, generation)
        ],
        concurrency,
    )


async def gated_rollout(
    kube: KubeApi,
    consul: phases.Consul,
    operator: OperatorProcess,
    services: int,
    per: int,
    *,
    generation: int,
    concurrency: int,
    budget: float,
) -> dict[str, Any]:
    """Replace every endpoint by a new gated Pod's at once; time until every gate is open.

    Up front (not timed): one Pod per new endpoint, listing the gate, then the
    operator settles (each new gated Pod makes its namespace's ConsulServices
    reconcile once, writing nothing). Timed: for each Service, the bench plays
    the kubelet (the new Pods' ``pods/status``: ``ContainersReady=True``,
    ``Ready=False``, ``podIP``) and then the EndpointSlice controller (the
    slice's endpoints replaced by the new Pods', ``ready: false`` with their
    ``targetRef``s, as written while the gate holds Ready false), 16 Services
    in flight as in :func:`rollout`, where the new endpoints also arrive ready.
    Complete when Consul holds exactly the new instances, all passing, *and*
    every new Pod's gate condition is ``True``. The previous generation's
    Pods are deleted afterwards (as a rollout ends), outside the figures.
    """
    names = [(s, e) for s in range(services) for e in range(per)]
    uids: dict[str, str] = {}

    async def create(s: int, e: int) -> None:
        made = await kube.request("POST", f"/api/v1/namespaces/{NS}/pods", pod_body(generation, s, e))
        uids[made["metadata"]["name"]] = made["metadata"]["uid"]

    await _gather_limited([create(s, e) for s, e in names], concurrency)
    await phases.settle(operator)
    before = await asyncio.to_thread(operator.metrics)
    log_from = len(operator.log_text())
    wanted = {(address(generation, s, e), 8080) for s, e in names}
    consul_took: list[float] = []

    async def kubelet_then_slice(s: int) -> None:
        await asyncio.gather(*(
            kube.request(
                "PATCH", f"/api/v1/namespaces/{NS}/pods/{pod_name(generation, s, e)}/status",
                kubelet_status(generation, s, e), content_type="application/strategic-merge-patch+json",
            )
            for e in range(per)
        ))
        await _set_endpoints(kube, s, gated_endpoints_of(generation, s, per, uids))

    async def matches() -> bool:
        in_consul, statuses = await _node(consul)
        have = {(svc["Address"], svc["Port"]) for svc in in_consul.values()}
        if have != wanted or not all(statuses.get(f"{sid}:endpoint") == "passing" for sid in in_consul):
            return False
        if not consul_took:
            consul_took.append(time.monotonic() - started)
        # Pods are read only once Consul agrees: a gate opens after Consul passes, never before.
        pods = await _pods_of(kube, generation)
        return len(pods) == len(names) and all(gate_open(p) for p in pods)

    started = time.monotonic()
    await _gather_limited([kubelet_then_slice(s) for s in range(services)], concurrency)
    patched = time.monotonic()
    took = await _until(matches, budget, poll=0.1)
    settled, _ = await phases.settle(operator)
    patches = gate_patches(operator.log_text()[log_from:])
    opened = sum(gate_open(p) for p in await _pods_of(kube, generation))
    await _delete_pods(kube, generation - 1, concurrency=concurrency)
    await phases.settle(operator)
    return {
        "endpoints_replaced": len(names),
        "patch_seconds": round(patched - started, 3),
        "consul_seconds": round(consul_took[0], 3) if consul_took else None,
        "seconds": None if took is None else round(patched - started + took, 3),
        "gates_open": opened,
        "writes": delta(writes(settled), writes(before)),
        "gate_patches": patches,
        "operations_needed": len(names) * 3,
    }


async def restart(operator: OperatorProcess, services: int, *, budget: float = 300.0) -> dict[str, Any]:
    await asyncio.to_thread(operator.stop)
    operator.start(wait=False)
    await asyncio.to_thread(operator.wait_serving)
    deadline = operator.started_at + budget
    caught_up = None
    while time.monotonic() < deadline:
        metrics = await asyncio.to_thread(operator.metrics)
        done = summed(metrics, "tether_reconciles_total")
        if done >= services and summed(metrics, "tether_queue_depth") == 0:
            caught_up = time.monotonic() - operator.started_at
            break
        await asyncio.sleep(0.1)
    settled, _ = await phases.settle(operator)
    return {
        "caught_up_seconds": None if caught_up is None else round(caught_up, 3),
        "reconciles": int(summed(settled, "tether_reconciles_total")),
        "writes": writes(settled),
    }


def gate_price(ungated: dict[str, Any], gated: dict[str, Any]) -> dict[str, Any] | None:
    """The gated rollout next to the ungated one of the same run; None unless both completed."""
    if ungated.get("seconds") is None or gated.get("seconds") is None:
        return None
    return {
        "endpoints": gated.get("endpoints_replaced"),
        "extra_seconds": round(gated["seconds"] - ungated["seconds"], 3),
        "seconds": {"ungated": ungated["seconds"], "gated": gated["seconds"]},
        "consul_writes": {"ungated": ungated["writes"].get("consul"), "gated": gated["writes"].get("consul")},
        "kubernetes_writes": {
            "ungated": ungated["writes"].get("kubernetes"), "gated": gated["writes"].get("kubernetes"),
        },
        "gate_patches": (gated.get("gate_patches") or {}).get("total"),
    }


async def run(
    stack: Any,
    artifacts: Any,
    *,
    services: int,
    per: int,
    samples: int,
    idle_seconds: float,
    concurrency: int,
    extra_env: dict[str, str],
    gate: str = "off",
) -> dict[str, Any]:
    """The whole section on a fresh stack; returns the report's ``endpoints`` entry.

    ``gate``: ``"off"`` the ungated rollout only, ``"on"`` the gated one only,
    ``"both"`` both, ungated first (see :func:`gated_rollout`).
    """
    stack.fresh()
    artifacts.mkdir(parents=True, exist_ok=True)
    # JSON logs, as the Deployment runs it (and as the other sections measure).
    operator = OperatorProcess(
        stack.env, artifacts / "operator-endpoints.log", args=("-A", "--log-format", "json"),
        extra_env=extra_env,
    )
    report: dict[str, Any] = {
        "services": services, "endpoints_per_service": per, "endpoints": services * per, "gate": gate,
    }
    try:
        operator.start(wait=False)
        operator.wait_serving()
        async with KubeApi(stack.kubeconfig) as kube, phases.Consul(stack.consul_url) as consul:
            before, _ = await phases.settle(operator, quiet=1.0)
            log(f"endpoints: {services} Services x {per} endpoints, {services} ConsulServices")
            report["converge"] = await converge(
                kube, consul, services, per, concurrency=concurrency, budget=max(300.0, services * 1.0)
            )
            settled, _ = await phases.settle(operator)
            report["converge"]["writes"] = delta(writes(settled), writes(before))
            log(f"endpoints: converged {report['converge']}")
            if not report["converge"]["complete"]:
                report["problem"] = "did not converge; later phases skipped"
                return report
            log(f"endpoints: idle {idle_seconds:.0f}s")
            report["idle"] = await phases.idle(operator, idle_seconds)
            log(f"endpoints: {samples} condition flips (each flipped back)")
            report["condition_change"] = await condition_changes(kube, consul, services, per, count=samples)
            log(
                f"endpoints: condition → Consul p50 {report['condition_change']['all']['p50_ms']} ms "
                f"p99 {report['condition_change']['all']['p99_ms']} ms"
            )
            await phases.settle(operator)
            budget = max(300.0, services * 1.0)
            if gate != "on":
                log("endpoints: rollout of every endpoint")
                report["rollout"] = await rollout(
                    kube, consul, operator, services, per, concurrency=concurrency, budget=budget
                )
                log(f"endpoints: rollout {report['rollout']}")
            if gate != "off":
                # Generation 2 moves every endpoint onto gated Pods (the section's
                # Services are then backed by gated Pods); generation 3 is the
                # gated rollout measured against the ungated one above.
                log(f"endpoints: {services * per} gated Pods behind the slices (readiness gate {GATE})")
                report["gate_setup"] = await gated_rollout(
                    kube, consul, operator, services, per,
                    generation=2, concurrency=concurrency, budget=budget,
                )
                log(f"endpoints: gate setup {report['gate_setup']}")
                if report["gate_setup"]["seconds"] is None:
                    report["problem"] = "the gated Pods' gates did not all open; gated rollout skipped"
                    return report
                log("endpoints: gated rollout of every endpoint")
                report["gated_rollout"] = await gated_rollout(
                    kube, consul, operator, services, per,
                    generation=3, concurrency=concurrency, budget=budget,
                )
                log(f"endpoints: gated rollout {report['gated_rollout']}")
                price = gate_price(report.get("rollout") or {}, report["gated_rollout"])
                if price is not None:
                    report["gate_price"] = price
            log("endpoints: restart")
            report["restart"] = await restart(operator, services)
            log(f"endpoints: restart {report['restart']}")
    except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
        report["problem"] = f"{type(exc).__name__}: {exc}"
    finally:
        operator.stop()
    return report


def table(section: dict[str, Any]) -> list[str]:
    """Lines for the human summary."""
    if not section:
        return []
    lines = [
        "",
        f"Endpoints mode: {section.get('services')} ConsulServices x "
        f"{section.get('endpoints_per_service')} endpoints = {section.get('endpoints')} instances",
    ]
    conv = section.get("converge") or {}
    if conv:
        lines.append(
            f"  converge: {conv.get('seconds')} s, Consul writes {conv.get('writes', {}).get('consul')}, "
            f"instances in Consul {conv.get('instances_in_consul')}"
        )
    idle = section.get("idle") or {}
    if idle:
        lines.append(f"  idle {idle.get('seconds')} s: writes {idle.get('writes')}")
    change = section.get("condition_change") or {}
    if change:
        lines.append(
            f"  condition change → Consul health: p50 {change['all'].get('p50_ms')} ms, "
            f"p99 {change['all'].get('p99_ms')} ms, max {change['all'].get('max_ms')} ms "
            f"(n={change['all'].get('count')}, timeouts {change.get('timeouts')})"
        )
    roll = section.get("rollout") or {}
    if roll:
        lines.append(
            f"  rollout of {roll.get('endpoints_replaced')} endpoints: {roll.get('seconds')} s, "
            f"Consul write calls {roll.get('writes', {}).get('consul')} "
            f"(txn operations needed {roll.get('operations_needed')}), "
            f"Kubernetes writes {roll.get('writes', {}).get('kubernetes')}"
        )
    for key, what in (("gate_setup", "gated Pods behind"), ("gated_rollout", "gated rollout of")):
        gated = section.get(key) or {}
        if gated:
            lines.append(
                f"  {what} {gated.get('endpoints_replaced')} endpoints: {gated.get('seconds')} s "
                f"(Consul exact after {gated.get('consul_seconds')} s, "
                f"gates open {gated.get('gates_open')}), "
                f"Consul write calls {gated.get('writes', {}).get('consul')}, Kubernetes writes "
                f"{gated.get('writes', {}).get('kubernetes')} "
                f"(gate patches of pods/status {gated.get('gate_patches', {}).get('total')})"
            )
    price = section.get("gate_price") or {}
    if price:
        lines.append(
            f"  price of the gate: +{price['extra_seconds']} s "
            f"({price['seconds']['gated']} s gated vs {price['seconds']['ungated']} s ungated), "
            f"Consul write calls {price['consul_writes']['gated']} vs {price['consul_writes']['ungated']}, "
            f"Kubernetes writes {price['kubernetes_writes']['gated']} vs "
            f"{price['kubernetes_writes']['ungated']}"
        )
    restart = section.get("restart") or {}
    if restart:
        lines.append(
            f"  restart: caught up in {restart.get('caught_up_seconds')} s, writes {restart.get('writes')}"
        )
    if section.get("problem"):
        lines.append(f"  problem: {section['problem']}")
    return lines
