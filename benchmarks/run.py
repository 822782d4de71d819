"""``make bench``: Tether's benchmarks on a dev stack of their own.

For each size N (100, 1000 and 5000 by default) on a fresh stack each time:

1. **floor** — a plain script creates N ConsulServices and N EtcdConfigs and,
   as each create returns, makes the writes the operator would make (the
   Consul registration or the etcd transaction, then one status patch), with
   as many in flight per kind as the operator has workers;
2. **protocol floor** — the same script making every write a correct
   operator must make, in its order: Tether's finalizer, the backend write,
   the status the operator builds (``--skip-protocol-floor`` leaves it out);
3. **convergence** — the operator running, the same 2N resources created the
   same way; time until every one is Ready, seen on a watch; per-resource
   create → Ready latency; writes per resource from the operator's metrics.

At N = 1000 (``--steady-size``; ``--steady-sizes`` for several) the operator then
stays up over its 2N resources for the steady-state figures: **idle** (writes,
CPU and memory over a quiet window), **restart** (SIGTERM, start, time until
caught up, writes it made), **one change → backend** and **drift repair**
latencies, and **drift CPU** (the operator's CPU seconds to repair 100 drifts
per backend injected 0.3 s apart, with their repair latency).

Then, on a fresh stack, the **endpoints** section (:mod:`benchmarks.endpoints`):
ConsulServices in endpoints mode following Services' EndpointSlices —
condition change → Consul health latency, a full rollout's write calls and
convergence, idle and restart writes; with ``--endpoints-gate on|both``, the
same rollout behind the readiness gate (``both``: the price of the gate).

Prints a table and writes ``benchmarks/results/latest.json``. Nothing here
asserts wall time: the figures are for people to read and compare.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import background, endpoints, phases, stats, workload
from benchmarks.kubeapi import KubeApi, ready
from benchmarks.processes import (
    Profiler,
    Stack,
    cpu_seconds,
    delta,
    find_py_spy,
    labelled,
    log,
    machine_busy,
    machine_cpu,
    rss_mib,
    self_cpu_seconds,
    summarize_profile,
)
from tether.clients.etcd.client import EtcdClient
from tether.clients.etcd.connection import EtcdConnection
from tether_dev.harness import kube as kube_harness
from tether_dev.harness.operator import OperatorProcess, writes

REPO = Path(__file__).resolve().parents[1]

DEFAULT_WORKERS = 16  # tether run's default TETHER_WORKERS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,5000",
                        help="comma-separated N (default 100,1000,5000)")
    parser.add_argument("--steady-size", type=int, default=None,
                        help="N for the steady-state phases (default 1000 if among the sizes, else largest)")
    parser.add_argument("--steady-sizes", default=None,
                        help="comma-separated N: the steady-state phases at each (added to --sizes if "
                             "missing); the top-level steady keys are --steady-size's, else 1000's, "
                             "else the smallest's; the background phase runs at that one only")
    parser.add_argument("--drift-events", type=int, default=100,
                        help="drift CPU: drifts injected per backend (100)")
    parser.add_argument("--drift-gap", type=float, default=0.3,
                        help="drift CPU: seconds between two injections (0.3)")
    parser.add_argument("--background-objects", type=int, default=20000,
                        help="unrelated Secrets + ConfigMaps for the background phase (0: skip it)")
    parser.add_argument("--background-etcd-per-minute", type=int, default=10000,
                        help="foreign etcd writes per minute during the background phase")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: N=100 only, 10 s idle window, 10 samples per latency")
    parser.add_argument("--keep-stack", action="store_true",
                        help="leave the last dev stack (and the operator's resources) up")
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/tether-bench"),
                        help="the benchmark's own dev stack (never the shared .tether/dev)")
    parser.add_argument("--artifacts", type=Path, default=Path("/tmp/tether-bench-artifacts"),
                        help="operator logs and profiles")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "latest.json")
    parser.add_argument("--idle-seconds", type=float, default=None, help="idle window (60; 10 with --quick)")
    parser.add_argument("--samples", type=int, default=None, help="changes and drifts per backend (20)")
    parser.add_argument("--create-concurrency", type=int, default=16,
                        help="creates in flight, in both the floor and the operator phase")
    parser.add_argument("--workers", type=int, default=None,
                        help="TETHER_WORKERS for the operator (default: the operator's own, 16); "
                             "also the floor's writes in flight per kind")
    parser.add_argument("--profile", action="store_true",
                        help="sample the operator with py-spy during convergence at the largest N")
    parser.add_argument("--repeat", type=int, default=1,
                        help="floor + convergence runs per size; the median run is reported (1)")
    parser.add_argument("--skip-floor", action="store_true", help="no floor (nor protocol floor)")
    parser.add_argument("--skip-protocol-floor", action="store_true",
                        help="no protocol floor (finalizer + backend write + the operator's status)")
    parser.add_argument("--skip-steady", action="store_true", help="convergence only")
    parser.add_argument("--endpoints-services", type=int, default=100,
                        help="endpoints section: ConsulServices, each following its own Service (100)")
    parser.add_argument("--endpoints-per-service", type=int, default=10,
                        help="endpoints section: endpoints in each Service's slice (10)")
    parser.add_argument("--endpoints-gate", choices=endpoints.GATES, default="off",
                        help="endpoints section's rollout: ungated (off), with every endpoint backed by a "
                             "Pod listing the readiness gate tether.dev/consul-passing (on), or both in "
                             "one run, ungated first, for the price of the gate (both); default off")
    parser.add_argument("--skip-endpoints", action="store_true", help="no endpoints section")
    parser.add_argument("--ha", action="store_true",
                        help="every stack is `tether dev up --ha` (3 etcd members, 3 Consul servers)")
    parser.add_argument("--endpoints-only", action="store_true",
                        help="only the endpoints section (no floor, convergence or steady state)")
    parser.add_argument("--policies", type=int, default=0,
                        help="TetherPolicies present before the operator starts, none of them about "
                             "the bench namespace or its names (the cost of checking them; 0)")
    return parser


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                             check=False)
        return out.stdout.strip()
    except OSError:
        return ""


def _operator_source() -> dict[str, Any]:
    """Which operator code ran: the package path and uncommitted changes to it."""
    import tether

    path = Path(tether.__file__).resolve().parent
    return {
        "package": str(path),
        "uncommitted": _git("status", "--short", "--", "operator").splitlines()
        if path.is_relative_to(REPO) else ["(outside the repository)"],
    }


async def _wait_gone(kube: KubeApi, plural: str, namespace: str, name: str, budget: float) -> bool:
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        if not await kube.get(plural, namespace, name):
            return True
        await asyncio.sleep(0.1)
    return False


async def _warm_up(kube: KubeApi, *, operator: bool, budget: float = 60.0) -> float:
    """One resource of each kind through create → Ready → delete, outside the measured namespace.

    A fresh API server answers its first requests for a new CRD slowly (about
    two seconds here); both phases pay that here, before the clock starts.
    With the operator, this also proves its watches are open, so measured
    latencies are the operator's and not its start-up. Without it, the status
    patch stands in for the operator's.
    """
    started = time.monotonic()
    namespace = "bench-warmup"
    await kube.ensure_namespace(namespace)
    bodies = {
        workload.CSVC: {"apiVersion": "tether.dev/v1alpha1", "kind": "ConsulService",
                        "metadata": {"name": "warmup", "namespace": namespace},
                        "spec": {"address": "10.255.0.1", "port": 1}},
        workload.ECFG: {"apiVersion": "tether.dev/v1alpha1", "kind": "EtcdConfig",
                        "metadata": {"name": "warmup", "namespace": namespace},
                        "spec": {"prefix": "/bench-warmup", "data": {"k": "v"}}},
    }
    for plural, body in bodies.items():
        await kube.create(plural, namespace, body)
        if not operator:
            status = {"observedGeneration": 1, "conditions": [{
                "type": "Ready", "status": "True", "reason": "Reconciled", "message": "warm-up",
                "lastTransitionTime": "2000-01-01T00:00:00Z"}]}
            await kube.merge_patch(plural, namespace, "warmup", {"status": status}, sub="status")
    deadline = started + budget
    for plural in bodies:
        while not ready(await kube.get(plural, namespace, "warmup")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up {plural} did not become Ready within {budget:.0f}s")
            await asyncio.sleep(0.1)
    for plural in bodies:
        await kube.delete(plural, namespace, "warmup")
    for plural in bodies:
        if not await _wait_gone(kube, plural, namespace, "warmup", max(1.0, deadline - time.monotonic())):
            raise RuntimeError(f"warm-up {plural} was not released within {budget:.0f}s")
    return time.monotonic() - started


async def _floor(
    stack: Stack, n: int, args: argparse.Namespace, workers: int, *, protocol: bool = False,
) -> dict[str, Any]:
    stack.fresh()
    cpu0, me0, box0 = stack.cpu(), self_cpu_seconds(), machine_cpu()
    etcd_conn = EtcdConnection.from_env(stack.env)
    name = "protocol floor" if protocol else "floor"
    async with KubeApi(stack.kubeconfig) as kube, phases.Consul(stack.consul_url) as consul, \
            EtcdClient(etcd_conn) as etcd:
        await _warm_up(kube, operator=False)
        log(f"{name} N={n}: creating and writing directly, {workers} writes in flight per kind")
        result = await phases.floor(kube, consul, etcd, n, create_concurrency=args.create_concurrency,
                                    write_concurrency=workers, protocol=protocol)
        result["consul_services"] = await consul.count()
    result["cpu_seconds"] = _cpu_delta(stack.cpu(), cpu0, self_cpu_seconds() - me0)
    result["machine_busy"] = machine_busy(box0, machine_cpu())
    log(f"{name} N={n}: {result['seconds']:.2f}s")
    return result


def _cpu_delta(after: dict[str, float], before: dict[str, float], harness: float) -> dict[str, float]:
    out = {k: round(after.get(k, 0) - before.get(k, 0), 2) for k in after}
    out["bench-driver"] = round(harness, 2)
    return out


def policy_objects(count: int) -> list[dict[str, Any]]:
    """``count`` TetherPolicies of other teams: each selects a label the bench namespace lacks
    and allows names and prefixes the workload never uses, so every resource is still allowed
    (rule 3) but only after every policy was consulted for a reservation."""
    return [
        {
            "apiVersion": "tether.dev/v1alpha1",
            "kind": "TetherPolicy",
            "metadata": {"name": f"bench-team-{i:03d}", "labels": {"tether.dev/bench": "1"}},
            "spec": {
                "namespaceSelector": {"matchLabels": {"bench.tether.dev/team": f"team-{i:03d}"}},
                "consulServiceNames": [f"team-{i:03d}-*", f"shared-{i:03d}"],
                "etcdPrefixes": [f"/teams/team-{i:03d}"],
                "consulKVPrefixes": [f"teams/team-{i:03d}"],
            },
        }
        for i in range(count)
    ]


async def _operator_phase(
    stack: Stack, n: int, args: argparse.Namespace, *, steady: bool, report: dict[str, Any],
    extra_env: dict[str, str],
) -> dict[str, Any]:
    stack.fresh()
    args.artifacts.mkdir(parents=True, exist_ok=True)
    if args.policies:
        items = {"apiVersion": "v1", "kind": "List", "items": policy_objects(args.policies)}
        kube_harness.kubectl(stack.env, "apply", "-f", "-", input=json.dumps(items))
    # JSON logs, as the Deployment runs it: the figures include what production logging costs.
    operator = OperatorProcess(
        stack.env,
        args.artifacts / f"operator-{n}.log",
        args=("-A", "--log-format", "json"),
        extra_env=extra_env,
    )
    profiler: Profiler | None = None
    result: dict[str, Any] = {}
    try:
        operator.start(wait=False)
        result["metrics_up_seconds"] = round(operator.wait_serving(), 2)
        async with KubeApi(stack.kubeconfig) as kube, phases.Consul(stack.consul_url) as consul, \
                EtcdClient(EtcdConnection.from_env(stack.env)) as etcd:
            result["warm_up_seconds"] = round(await _warm_up(kube, operator=True), 2)
            before, _ = await phases.settle(operator, quiet=1.0)
            # N = 0: the operator up, watches open, nothing managed (the warm-up's gone).
            result["operator_rss_mib_empty"] = round(rss_mib(operator.pid), 1)
            cpu0, op0, me0 = stack.cpu(), cpu_seconds(operator.pid), self_cpu_seconds()
            box0 = machine_cpu()
            if args.profile and n == max(args.size_list):
                py_spy = find_py_spy()
                if py_spy is None:
                    report.setdefault("problems", []).append("--profile: py-spy not found")
                else:
                    profiler = Profiler(py_spy, operator.pid, args.artifacts / f"profile-{n}.txt")
                    await asyncio.sleep(1.0)  # let py-spy attach before the clock starts
            log(f"operator N={n}: creating {2 * n} resources")
            converged = await phases.converge(
                kube, n, concurrency=args.create_concurrency, budget=max(300.0, 1.0 * n),
            )
            at_ready = await asyncio.to_thread(operator.metrics)
            busy = machine_busy(box0, machine_cpu())
            op_cpu = cpu_seconds(operator.pid) - op0
            cpu = _cpu_delta(stack.cpu(), cpu0, self_cpu_seconds() - me0)
            cpu["operator"] = round(op_cpu, 2)
            if profiler is not None:
                err = profiler.stop()
                summary = summarize_profile(profiler.out)
                if not summary["samples"]:
                    report.setdefault("problems", []).append(f"py-spy recorded nothing: {err}")
                report["profile"] = {"n": n, "raw": str(profiler.out), **summary}
                profiler = None
            settled, settle_seconds = await phases.settle(operator)
            w_ready = delta(writes(at_ready), writes(before))
            w_settled = delta(writes(settled), writes(before))
            result.update(converged)
            result.update({
                "writes": w_settled,
                "writes_at_ready": w_ready,
                "writes_per_resource": {
                    "consul": round(w_settled["consul"] / n, 3),
                    "etcd": round(w_settled["etcd"] / n, 3),
                    "kubernetes": round(w_settled["kubernetes"] / (2 * n), 3),
                },
                "settle_seconds": round(settle_seconds, 2),
                "reconciles": {
                    k: int(v - labelled(before, "tether_reconciles_total").get(k, 0))
                    for k, v in labelled(settled, "tether_reconciles_total").items()
                },
                "reconcile_mean_ms": _mean_reconcile_ms(before, settled),
                "operator_cpu_seconds": round(op_cpu, 2),
                # Share of both cores busy (anything on the machine): near 1.0, the
                # run is CPU-bound and other tenants' load moves the figures.
                "machine_busy": busy,
                "cpu_seconds": cpu,
                "operator_rss_mib": round(rss_mib(operator.pid), 1),
            })
            log(f"operator N={n}: all Ready in {converged['seconds']:.2f}s "
                f"(p50 {converged['latency']['p50_ms']} ms, p99 {converged['latency']['p99_ms']} ms)")
            if steady and converged["complete"]:
                await _steady(operator, kube, consul, etcd, n, args, report)
            elif steady:
                report.setdefault("problems", []).append(
                    f"N={n}: {converged['not_ready']} resources never became Ready; steady-state skipped")
    finally:
        if profiler is not None:
            profiler.stop()
        result["stop_seconds"] = round(operator.stop(), 2)
    return result


def _mean_reconcile_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean reconcile duration per kind between two scrapes (sum / count deltas)."""
    out = {}
    sums = labelled(after, "tether_reconcile_duration_seconds_sum")
    counts = labelled(after, "tether_reconcile_duration_seconds_count")
    sums0 = labelled(before, "tether_reconcile_duration_seconds_sum")
    counts0 = labelled(before, "tether_reconcile_duration_seconds_count")
    for labels, total in sums.items():
        count = counts.get(labels, 0) - counts0.get(labels, 0)
        if count > 0:
            out[labels.strip("{}")] = round(1000 * (total - sums0.get(labels, 0)) / count, 1)
    return out


# The steady-state keys at the top level of the report, as before --steady-sizes:
# the primary steady size's figures, so older results compare key for key.
STEADY_KEYS = ("steady_n", "idle", "restart", "change", "drift", "drift_cpu", "background")


async def _steady(
    operator: OperatorProcess, kube: KubeApi, consul: phases.Consul, etcd: EtcdClient, n: int,
    args: argparse.Namespace, report: dict[str, Any],
) -> None:
    """The steady-state phases at ``n``, into ``steady_by_n`` (and the top level at the primary N)."""
    out: dict[str, Any] = {"steady_n": n}
    report.setdefault("steady_by_n", {})[str(n)] = out
    primary = n == args.primary_steady
    try:
        log(f"idle: {args.idle_seconds:.0f}s over {2 * n} resources")
        out["idle"] = await phases.idle(operator, args.idle_seconds)
        log(f"idle: writes {out['idle']['writes']}, cpu {out['idle']['cpu_seconds']}s")
        log("restart: SIGTERM, start, wait until caught up")
        out["restart"] = await phases.restart(operator, kube, n)
        restarted = out["restart"]
        log(f"restart: caught up in {restarted['caught_up_seconds']}s, writes {restarted['writes']}")
        log(f"changes: {args.samples} per backend")
        out["change"] = await phases.changes(kube, consul, etcd, n, count=args.samples)
        log(f"drift: {args.samples} per backend")
        out["drift"] = await phases.drift(consul, etcd, n, count=args.samples)
        await phases.settle(operator)
        if args.drift_events:
            log(f"drift CPU: {args.drift_events} drifts per backend, one every {args.drift_gap}s")
            out["drift_cpu"] = await phases.drift_cpu(
                operator, consul, etcd, n, events=args.drift_events, gap=args.drift_gap,
            )
            _above_idle(out["drift_cpu"], out["idle"])
            for system, entry in out["drift_cpu"].items():
                log(f"drift CPU ({system}): {entry['cpu_seconds']} cpu-s for {entry['events']} drifts "
                    f"in {entry['seconds']}s, repair p50 {entry['latency']['p50_ms']} ms "
                    f"p99 {entry['latency']['p99_ms']} ms, timeouts {entry['timeouts']}")
        if args.background_objects and primary:
            log(f"background: {args.background_objects} unrelated Secrets and ConfigMaps, "
                f"{args.background_etcd_per_minute} foreign etcd writes per minute")
            out["background"] = await background.run(
                operator, kube, etcd, objects=args.background_objects,
                etcd_per_minute=args.background_etcd_per_minute, seconds=args.idle_seconds,
                concurrency=args.create_concurrency,
            )
    finally:
        if primary:
            report.update({k: out[k] for k in STEADY_KEYS if k in out})


def _above_idle(drift_cpu: dict[str, Any], idle: dict[str, Any]) -> None:
    """Each drift CPU figure less what the idle operator spends in as long a window.

    The injections are spread over ``events * gap`` seconds, during which the
    operator's own timers and watches cost what they cost at rest; the idle
    phase at the same N measured that rate.
    """
    rate = float(idle.get("cpu_seconds") or 0) / float(idle.get("seconds") or 1)
    for entry in drift_cpu.values():
        entry["idle_cpu_seconds_per_second"] = round(rate, 5)
        entry["cpu_seconds_above_idle"] = round(entry["cpu_seconds"] - rate * entry["seconds"], 3)


def _drift_cpu_ratio(steady_by_n: dict[str, Any]) -> dict[str, Any] | None:
    """Drift CPU at the largest steady N over the smallest, per backend (None with one N)."""
    sizes = sorted((int(n) for n, e in steady_by_n.items() if e.get("drift_cpu")))
    if len(sizes) < 2:
        return None
    small, large = steady_by_n[str(sizes[0])]["drift_cpu"], steady_by_n[str(sizes[-1])]["drift_cpu"]
    out: dict[str, Any] = {"sizes": [sizes[0], sizes[-1]]}
    for system in ("consul", "etcd"):
        low, high = small.get(system, {}).get("cpu_seconds"), large.get(system, {}).get("cpu_seconds")
        out[system] = round(high / low, 2) if low and high is not None else None
    return out


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run with the median wall time (the lower one of an even count)."""
    if not runs:
        return None
    ordered = sorted(runs, key=lambda r: float(r.get("seconds") or float("inf")))
    return ordered[(len(ordered) - 1) // 2]


def _median_runs(
    floors: list[dict[str, Any]], operators: list[dict[str, Any]],
    protocol_floors: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One size's entry: the median floor, protocol floor and operator runs, every run's time,
    the ratios."""
    out: dict[str, Any] = {
        "floor_runs_seconds": [r.get("seconds") for r in floors],
        "operator_runs_seconds": [r.get("seconds") for r in operators],
    }
    floor, operator = _median_run(floors), _median_run(operators)
    protocol = _median_run(protocol_floors or [])
    if floor is not None:
        out["floor"] = floor
    if operator is not None:
        out["operator"] = operator
    if protocol is not None:
        out["protocol_floor"] = protocol
        out["protocol_floor_runs_seconds"] = [r.get("seconds") for r in protocol_floors or []]
    converged = bool(operator and operator.get("complete"))
    if floor and converged and floor.get("seconds"):
        out["ratio_to_floor"] = round(float(operator["seconds"]) / float(floor["seconds"]), 2)
    if protocol and converged and protocol.get("seconds") and not protocol.get("failures"):
        out["ratio_to_protocol_floor"] = round(float(operator["seconds"]) / float(protocol["seconds"]), 2)
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    workers = args.workers or int(os.environ.get("TETHER_WORKERS", DEFAULT_WORKERS))
    extra_env = {"TETHER_WORKERS": str(args.workers)} if args.workers else {}
    report: dict[str, Any] = {
        "ratio_to_floor": None,
        "ratio_to_protocol_floor": None,
        "idle_writes": None,
        "restart_writes": None,
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": _git("rev-parse", "--short", "HEAD") or "unknown",
            "operator_source": _operator_source(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg()[0],
            "sizes": args.size_list,
            "quick": args.quick,
            "workers": workers,
            "create_concurrency": args.create_concurrency,
            "repeat": args.repeat,
            "profiled": args.profile,
            "keys_per_etcdconfig": workload.KEYS_PER_CONFIG,
            "policies": args.policies,
            "steady_sizes": args.steady_list,
            "drift_events": args.drift_events,
            "drift_gap_seconds": args.drift_gap,
        },
        "sizes": {},
    }
    report["meta"]["ha"] = args.ha
    stack = Stack(args.state_dir, ha=args.ha)
    try:
        for n in [] if args.endpoints_only else args.size_list:
            entry: dict[str, Any] = {}
            report["sizes"][str(n)] = entry
            floors: list[dict[str, Any]] = []
            protocol_floors: list[dict[str, Any]] = []
            operators: list[dict[str, Any]] = []
            for attempt in range(args.repeat):
                # Floors and operator alternate so that a burst of load from other
                # tenants of the machine tends to hit all of them, not one.
                if not args.skip_floor:
                    floors.append(await _floor(stack, n, args, workers))
                    if not args.skip_protocol_floor:
                        protocol_floors.append(await _floor(stack, n, args, workers, protocol=True))
                last = attempt == args.repeat - 1
                operators.append(await _operator_phase(
                    stack, n, args, steady=(n in args.steady_list and last and not args.skip_steady),
                    report=report, extra_env=extra_env,
                ))
                entry.update(_median_runs(floors, operators, protocol_floors))
        if not args.skip_endpoints:
            report["endpoints"] = await endpoints.run(
                stack, args.artifacts, services=args.endpoints_services, per=args.endpoints_per_service,
                samples=args.samples, idle_seconds=args.idle_seconds,
                concurrency=args.create_concurrency, extra_env=extra_env, gate=args.endpoints_gate,
            )
            if report["endpoints"].get("problem"):
                report.setdefault("problems", []).append(f"endpoints: {report['endpoints']['problem']}")
    except Exception as exc:
        report.setdefault("problems", []).append(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        if not args.keep_stack:
            try:
                stack.down()
            except Exception as exc:
                report.setdefault("problems", []).append(f"stack down: {exc}")
    largest = max(args.size_list)
    top = report["sizes"].get(str(largest), {})
    report["ratio_to_floor"] = top.get("ratio_to_floor")
    report["ratio_to_floor_by_n"] = {n: e.get("ratio_to_floor") for n, e in report["sizes"].items()}
    report["ratio_to_protocol_floor"] = top.get("ratio_to_protocol_floor")
    report["ratio_to_protocol_floor_by_n"] = {
        n: e.get("ratio_to_protocol_floor") for n, e in report["sizes"].items()
    }
    report["memory"] = _memory(report["sizes"])
    report["largest_n"] = largest
    report["converge_seconds"] = top.get("operator", {}).get("seconds")
    report["floor_seconds"] = top.get("floor", {}).get("seconds")
    report["protocol_floor_seconds"] = top.get("protocol_floor", {}).get("seconds")
    report["drift_cpu_ratio"] = _drift_cpu_ratio(report.get("steady_by_n") or {})
    if "idle" in report:
        report["idle_writes"] = report["idle"]["writes"]
    if "restart" in report:
        report["restart_writes"] = report["restart"]["writes"]
    return report


def _memory(sizes: dict[str, Any]) -> dict[str, Any]:
    """Resident memory at N = 0 (operator up, nothing managed) and at each N once converged,
    and the cost per resource beyond the empty operator (2N resources at each N)."""
    rss: dict[str, float] = {}
    per: dict[str, float] = {}
    empties = []
    for n, entry in sizes.items():
        op = entry.get("operator") or {}
        if op.get("operator_rss_mib_empty"):
            empties.append(op["operator_rss_mib_empty"])
        if op.get("operator_rss_mib"):
            rss[n] = op["operator_rss_mib"]
    if not empties:
        return {"rss_mib": rss}
    empty = sorted(empties)[len(empties) // 2]
    for n, mib in rss.items():
        per[n] = round((mib - empty) * 1024 / (2 * int(n)), 1)
    return {"rss_mib": {"0": empty, **rss}, "kib_per_resource": per}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.size_list = [100]
    else:
        args.size_list = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not args.size_list or min(args.size_list) < 1 or args.repeat < 1:
        print("--sizes and --repeat take positive integers, e.g. --sizes 100,1000", file=sys.stderr)
        return 2
    try:
        args.steady_list = sorted({int(s) for s in (args.steady_sizes or "").split(",") if s.strip()})
    except ValueError:
        args.steady_list = [0]
    if (args.steady_list and min(args.steady_list) < 1) or args.drift_events < 0 or args.drift_gap < 0:
        print("--steady-sizes takes positive integers, e.g. --steady-sizes 1000,5000; "
              "--drift-events and --drift-gap are not negative", file=sys.stderr)
        return 2
    if not args.steady_list:  # as before --steady-sizes: one N
        args.steady_list = [args.steady_size or (1000 if 1000 in args.size_list else max(args.size_list))]
    # The figures at the top level of the report (old references compare with them).
    args.primary_steady = (
        args.steady_size if args.steady_size in args.steady_list
        else 1000 if 1000 in args.steady_list else min(args.steady_list)
    )
    if args.steady_sizes and not args.skip_steady:
        # Steady state needs the operator converged at that N: a steady size is a size.
        # (A lone --steady-size outside --sizes still runs no steady state, as it always did.)
        args.size_list = sorted(set(args.size_list) | set(args.steady_list))
    args.idle_seconds = args.idle_seconds if args.idle_seconds is not None else (10.0 if args.quick else 60.0)
    args.samples = args.samples if args.samples is not None else (10 if args.quick else 20)
    report = asyncio.run(bench(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    if report["sizes"]:  # none with --endpoints-only
        print(stats.table(report))
    print("\n".join(endpoints.table(report.get("endpoints") or {})))
    if report.get("profile"):
        print("\nProfile (py-spy, operator during convergence): top own time")
        for entry in report["profile"]["own"][:15]:
            print(f"  {entry['percent']:5.1f}%  {entry['function']}")
    for problem in report.get("problems", []):
        print(f"problem: {problem}", file=sys.stderr)
    print(f"\nwrote {args.output}")
    return 1 if report.get("problems") else 0


if __name__ == "__main__":
    sys.exit(main())
