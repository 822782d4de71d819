"""The measured phases: convergence, the floors, changes, drift, drift CPU, idle, restart.

Each phase is a coroutine that returns plain figures; :mod:`benchmarks.run`
decides the order, the stacks and what goes into the report. Every wait here
is bounded by a deadline, and every loop by a count or that deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from benchmarks import workload
from benchmarks.kubeapi import KubeApi, ready
from benchmarks.processes import cpu_seconds, delta, log, rss_mib, summed
from benchmarks.stats import latency_summary
from tether.clients.etcd.client import EtcdClient
from tether.clients.etcd.values import Delete, Put
from tether.conditions import now as timestamp_now
from tether_dev.harness.operator import OperatorProcess, writes

NS = workload.NAMESPACE
POLL_SECONDS = 0.005  # how often a change/drift probe looks at Consul or etcd


# ------------------------------------------------------------------ backends


class Consul:
    """The few agent calls the benchmark makes, over one aiohttp session."""

    def __init__(self, url: str, *, connections: int = 32) -> None:
        self.url = url
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Consul:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._connections),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    async def register(self, body: dict[str, Any]) -> None:
        # The same call as the operator's adapter, query parameter included.
        async with self.session.put(
            f"{self.url}/v1/agent/service/register", params={"replace-existing-checks": "true"},
            data=json.dumps(body),
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"Consul register: {resp.status} {await resp.text()}")

    async def deregister(self, service_id: str) -> None:
        async with self.session.put(
            f"{self.url}/v1/agent/service/deregister/{quote(service_id, safe='')}"
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"Consul deregister: {resp.status} {await resp.text()}")

    async def service(self, service_id: str) -> dict[str, Any] | None:
        async with self.session.get(
            f"{self.url}/v1/agent/service/{quote(service_id, safe='')}"
        ) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise RuntimeError(f"Consul service: {resp.status} {await resp.text()}")
            result: dict[str, Any] = await resp.json()
            return result

    async def count(self) -> int:
        async with self.session.get(f"{self.url}/v1/agent/services") as resp:
            return len(await resp.json())


# ------------------------------------------------------------------ watching Ready


@dataclass
class ReadyWatch:
    """Both kinds' watch streams; records when each object is first seen Ready."""

    kube: KubeApi
    expected: int
    ready_at: dict[tuple[str, str], float] = field(default_factory=dict)
    events: int = 0
    _all: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self, deadline: float) -> None:
        for plural in (workload.CSVC, workload.ECFG):
            listing = await self.kube.list(plural, NS)
            rv = str(listing["metadata"]["resourceVersion"])
            for obj in listing.get("items") or []:
                self._see(plural, time.monotonic(), obj)
            self._tasks.append(asyncio.create_task(self._run(plural, rv, deadline)))

    def _see(self, plural: str, arrived: float, obj: dict[str, Any]) -> None:
        key = (plural, str(obj["metadata"]["name"]))
        if key not in self.ready_at and ready(obj):
            self.ready_at[key] = arrived
            if len(self.ready_at) >= self.expected:
                self._all.set()

    async def _run(self, plural: str, rv: str, deadline: float) -> None:
        async for arrived, kind, obj in self.kube.watch(plural, NS, rv, deadline=deadline):
            self.events += 1
            if kind in ("ADDED", "MODIFIED"):
                self._see(plural, arrived, obj)

    async def wait_all(self, deadline: float) -> bool:
        try:
            await asyncio.wait_for(self._all.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ------------------------------------------------------------------ convergence


async def create_all(
    kube: KubeApi, n: int, *, concurrency: int,
    after: Callable[[workload.Item, dict[str, Any]], Coroutine[Any, Any, None]] | None = None,
) -> tuple[dict[tuple[str, str], float], float]:
    """Create the workload with ``concurrency`` requests in flight.

    Returns each object's send time (monotonic) and when the last create
    returned. ``after`` runs for each object as soon as its create returns
    (the floor's writes), outside the creation limit, so it never holds up
    the creates behind it.
    """
    await kube.ensure_namespace(NS)
    sent: dict[tuple[str, str], float] = {}
    limit = asyncio.Semaphore(concurrency)
    followers: list[asyncio.Task[None]] = []

    async def create(item: workload.Item) -> None:
        async with limit:
            sent[item.key] = time.monotonic()
            body = await kube.create(item.plural, NS, workload.manifest(item))
        if after is not None:
            followers.append(asyncio.create_task(after(item, body)))

    await asyncio.gather(*(create(item) for item in workload.items(n)))
    created = time.monotonic()
    await asyncio.gather(*followers)
    return sent, created


async def converge(kube: KubeApi, n: int, *, concurrency: int, budget: float) -> dict[str, Any]:
    """Create 2N resources at once; time until every one is Ready (seen on a watch)."""
    deadline = time.monotonic() + budget
    watch = ReadyWatch(kube, expected=2 * n)
    await watch.start(deadline)
    try:
        started = time.monotonic()
        sent, created = await create_all(kube, n, concurrency=concurrency)
        complete = await watch.wait_all(deadline)
        finished = max(watch.ready_at.values(), default=time.monotonic())
    finally:
        await watch.stop()
    latencies = {k: watch.ready_at[k] - sent[k] for k in sent if k in watch.ready_at}
    by_kind = {
        plural: latency_summary([v for k, v in latencies.items() if k[0] == plural])
        for plural in (workload.CSVC, workload.ECFG)
    }
    return {
        "seconds": round(finished - started, 3),
        "create_seconds": round(created - started, 3),
        "complete": complete,
        "not_ready": 2 * n - len(watch.ready_at),
        "latency": latency_summary(list(latencies.values())),
        "latency_by_kind": by_kind,
        "watch_events": watch.events,
    }


# ------------------------------------------------------------------ the floor


async def floor(
    kube: KubeApi, consul: Consul, etcd: EtcdClient, n: int, *, create_concurrency: int,
    write_concurrency: int, protocol: bool = False,
) -> dict[str, Any]:
    """The same creates, then the same writes the operator makes, with no operator.

    Per resource, as soon as its create returns: the Consul registration (or
    the etcd transaction, with its ownership records) and one merge patch of
    ``/status``, with ``write_concurrency`` resources of each kind in flight
    — the operator's workers per kind.

    With ``protocol`` (the *protocol floor*), every write a correct operator
    must make, in its order: first Tether's finalizer (the conditional merge
    patch of ``metadata.finalizers`` the operator sends — before any backend
    write, so a deletion can never leave the backend behind), then the
    backend write, then the status the operator itself builds
    (:func:`workload.operator_status`). What remains between this floor and
    the operator is the operator's own cost: reads, watches, queues, CPU.
    """
    limits = {p: asyncio.Semaphore(write_concurrency) for p in (workload.CSVC, workload.ECFG)}
    done: dict[tuple[str, str], float] = {}
    failures: list[str] = []

    async def write(item: workload.Item, body: dict[str, Any]) -> None:
        async with limits[item.plural]:
            try:
                if protocol:
                    body = await kube.merge_patch(item.plural, NS, item.name, workload.finalizer_patch(body))
                    if workload.FINALIZER not in (body["metadata"].get("finalizers") or []):
                        raise RuntimeError(f"the finalizer patch of {item.name} did not keep the finalizer")
                generation = int(body["metadata"].get("generation") or 1)
                revision = 0
                if item.plural == workload.CSVC:
                    await consul.register(workload.registration(item))
                    extra: dict[str, Any] = {"serviceID": workload.service_id(item.name), "health": "passing"}
                else:
                    compares, ops = workload.transaction(item)
                    result = await etcd.txn(compares, ops)
                    if not result.succeeded:
                        raise RuntimeError(f"etcd txn for {item.name} failed its guards")
                    revision = result.revision
                    extra = {"keys": workload.KEYS_PER_CONFIG, "revision": revision}
                if protocol:
                    status = workload.operator_status(
                        item, generation, timestamp_now(), consul_url=consul.url, revision=revision,
                    )
                else:
                    status = workload.ready_status(item, generation, timestamp_now(), extra)
                await kube.merge_patch(item.plural, NS, item.name, {"status": status}, sub="status")
                done[item.key] = time.monotonic()
            except Exception as exc:  # one failure is a figure, not a crash
                failures.append(f"{item.key}: {exc}")

    started = time.monotonic()
    sent, created = await create_all(kube, n, concurrency=create_concurrency, after=write)
    finished = time.monotonic()
    if failures:
        log(f"{'protocol ' if protocol else ''}floor: {len(failures)} failures, first: {failures[0]}")
    return {
        "seconds": round(finished - started, 3),
        "create_seconds": round(created - started, 3),
        "failures": len(failures),
        "latency": latency_summary([done[k] - sent[k] for k in done]),
        "write_concurrency": write_concurrency,
        "protocol": protocol,
        "kubernetes_writes_per_resource": 2 if protocol else 1,
    }


# ------------------------------------------------------------------ the operator at rest


async def settle(
    operator: OperatorProcess, *, quiet: float = 3.0, budget: float = 180.0
) -> tuple[dict[str, float], float]:
    """Wait until the operator's writes and reconciles stop moving and its queues are empty."""
    started = time.monotonic()
    deadline = started + budget
    last: tuple[Any, ...] | None = None
    since = time.monotonic()
    metrics = await asyncio.to_thread(operator.metrics)
    while time.monotonic() < deadline:
        metrics = await asyncio.to_thread(operator.metrics)
        signature = (
            tuple(writes(metrics).values()), summed(metrics, "tether_reconciles_total"),
        )
        busy = summed(metrics, "tether_queue_depth") > 0
        if signature != last or busy:
            last, since = signature, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        await asyncio.sleep(0.25)
    else:
        log(f"operator did not settle within {budget:.0f}s")
    return metrics, time.monotonic() - started


async def idle(operator: OperatorProcess, seconds: float) -> dict[str, Any]:
    """Writes, reconciles and CPU over ``seconds`` with nothing changing."""
    before = await asyncio.to_thread(operator.metrics)
    cpu0 = cpu_seconds(operator.pid)
    await asyncio.sleep(seconds)
    after = await asyncio.to_thread(operator.metrics)
    cpu1 = cpu_seconds(operator.pid)
    return {
        "seconds": seconds,
        "writes": delta(writes(after), writes(before)),
        "reconciles": int(
            summed(after, "tether_reconciles_total") - summed(before, "tether_reconciles_total")
        ),
        "cpu_seconds": round(cpu1 - cpu0, 3),
        "rss_mib": round(rss_mib(operator.pid), 1),
    }


async def restart(
    operator: OperatorProcess, kube: KubeApi, n: int, *, budget: float = 300.0
) -> dict[str, Any]:
    """SIGTERM the operator, start it again, time until it has caught up with 2N resources.

    Caught up: every resource reconciled once (``tether_reconciles_total``
    reaches 2N) and both queues are empty. An operator that skips unchanged
    resources without counting them is caught up once its counters stay still
    for 3 s with empty queues, and the report names the criterion used.
    """
    stop_seconds = await asyncio.to_thread(operator.stop)
    operator.start(wait=False)
    metrics_up = await asyncio.to_thread(operator.wait_serving)
    deadline = operator.started_at + budget
    criterion = "timeout"
    last_total, still_since = -1.0, time.monotonic()
    caught_up_at = None
    while time.monotonic() < deadline:
        metrics = await asyncio.to_thread(operator.metrics)
        total = summed(metrics, "tether_reconciles_total")
        queued = summed(metrics, "tether_queue_depth")
        if total != last_total:
            last_total, still_since = total, time.monotonic()
        if total >= 2 * n and queued == 0:
            criterion, caught_up_at = "reconciled all", time.monotonic()
            break
        if total > 0 and queued == 0 and time.monotonic() - still_since >= 3.0:
            criterion, caught_up_at = "quiet for 3 s", still_since
            break
        await asyncio.sleep(0.1)
    settled, _ = await settle(operator)
    ready_after = 0
    for plural in (workload.CSVC, workload.ECFG):
        listing = await kube.list(plural, NS)
        ready_after += sum(1 for obj in listing.get("items") or [] if ready(obj))
    return {
        "stop_seconds": round(stop_seconds, 3),
        "metrics_up_seconds": round(metrics_up, 3),
        "caught_up_seconds": round(caught_up_at - operator.started_at, 3) if caught_up_at else None,
        "criterion": criterion,
        "reconciles": int(summed(settled, "tether_reconciles_total")),
        "writes": writes(settled),
        "ready_after": ready_after,
        "expected": 2 * n,
    }


# ------------------------------------------------------------------ one change, one drift


def spread(n: int, count: int, offset: int) -> list[int]:
    """``count`` distinct indices spread over ``range(n)`` (a prime stride)."""
    count = min(count, n)
    return sorted({(offset + k * 7919) % n for k in range(count)})


async def _until(check: Callable[[], Awaitable[bool]], budget: float) -> float | None:
    """Poll ``check`` until true; seconds it took, or None after ``budget``."""
    started = time.monotonic()
    deadline = started + budget
    while time.monotonic() < deadline:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(POLL_SECONDS)
    return None


async def _series(
    indices: Iterable[int], one: Callable[[int], Awaitable[float | None]], *, gap: float
) -> dict[str, Any]:
    results = []
    for index in indices:
        results.append(await one(index))
        await asyncio.sleep(gap)
    samples = [r for r in results if r is not None]
    return {**latency_summary(samples), "timeouts": len(results) - len(samples)}


async def changes(
    kube: KubeApi, consul: Consul, etcd: EtcdClient, n: int, *, count: int, budget: float = 30.0,
    gap: float = 0.3,
) -> dict[str, Any]:
    """Patch one resource's spec at a time; time until the backend shows the change."""

    async def consul_change(index: int) -> float | None:
        name, new_port = f"svc-{index:05d}", workload.port_of(index) + 20000
        sid = workload.service_id(name)

        async def shows() -> bool:
            svc = await consul.service(sid)
            return svc is not None and svc.get("Port") == new_port

        started = time.monotonic()
        await kube.merge_patch(workload.CSVC, NS, name, {"spec": {"port": new_port}})
        took = await _until(shows, budget)
        return None if took is None else time.monotonic() - started

    async def etcd_change(index: int) -> float | None:
        name = f"cfg-{index:05d}"
        value = f"changed-{index}-{time.time_ns()}"
        key = f"{workload.prefix_of(name)}/key-0".encode()

        async def shows() -> bool:
            kv = await etcd.get(key)
            return kv is not None and kv.value == value.encode()

        started = time.monotonic()
        await kube.merge_patch(workload.ECFG, NS, name, {"spec": {"data": {"key-0": value}}})
        took = await _until(shows, budget)
        return None if took is None else time.monotonic() - started

    return {
        "consul": await _series(spread(n, count, 1), consul_change, gap=gap),
        "etcd": await _series(spread(n, count, 2), etcd_change, gap=gap),
    }


async def drift(
    consul: Consul, etcd: EtcdClient, n: int, *, count: int, budget: float = 30.0, gap: float = 0.3,
) -> dict[str, Any]:
    """Change a backend out of band, one object at a time; time until it is restored."""

    async def consul_drift(index: int) -> float | None:
        sid = workload.service_id(f"svc-{index:05d}")

        async def restored() -> bool:
            return await consul.service(sid) is not None

        started = time.monotonic()
        await consul.deregister(sid)
        took = await _until(restored, budget)
        return None if took is None else time.monotonic() - started

    async def etcd_drift(index: int) -> float | None:
        name = f"cfg-{index:05d}"
        key = f"{workload.prefix_of(name)}/key-1".encode()
        expected = workload.etcd_data(index)["key-1"].encode()

        async def restored() -> bool:
            kv = await etcd.get(key)
            return kv is not None and kv.value == expected

        started = time.monotonic()
        await etcd.txn([], [Put(key, b"drifted")])
        took = await _until(restored, budget)
        return None if took is None else time.monotonic() - started

    # Offsets keep these away from the resources the change phase touched.
    return {
        "consul": await _series(spread(n, count, 500), consul_drift, gap=gap),
        "etcd": await _series(spread(n, count, 501), etcd_drift, gap=gap),
    }


# ------------------------------------------------------------------ CPU per drift events


async def _paced(
    operator: OperatorProcess, indices: list[int], inject: Callable[[int], Awaitable[None]],
    restored: Callable[[int], Awaitable[bool]], *, gap: float, budget: float,
) -> dict[str, Any]:
    """Inject one drift every ``gap`` seconds, whether or not the last was repaired yet.

    A fixed cadence from the first injection (not ``gap`` after each repair),
    so the window's length does not depend on the operator's speed, and each
    drift reaches it as a separate change rather than a burst it could fold
    into one scan. The operator's CPU seconds run from just before the first
    injection until the last repair was seen.
    """
    latencies: list[float] = []
    timeouts = 0

    async def one(index: int) -> None:
        nonlocal timeouts
        started = time.monotonic()
        await inject(index)
        took = await _until(lambda: restored(index), budget)
        if took is None:
            timeouts += 1
        else:
            latencies.append(time.monotonic() - started)

    before = await asyncio.to_thread(operator.metrics)
    cpu0 = cpu_seconds(operator.pid)
    started = time.monotonic()
    tasks: list[asyncio.Task[None]] = []
    try:
        for k, index in enumerate(indices):
            await asyncio.sleep(max(0.0, started + k * gap - time.monotonic()))
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    seconds = time.monotonic() - started
    cpu = cpu_seconds(operator.pid) - cpu0
    after = await asyncio.to_thread(operator.metrics)
    return {
        "events": len(indices),
        "gap_seconds": gap,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "cpu_ms_per_event": round(1000 * cpu / len(indices), 2) if indices else None,
        "repairs": int(
            summed(after, "tether_drift_repairs_total") - summed(before, "tether_drift_repairs_total")
        ),
        "writes": delta(writes(after), writes(before)),
        "latency": latency_summary(latencies),
        "timeouts": timeouts,
    }


async def drift_cpu(
    operator: OperatorProcess, consul: Consul, etcd: EtcdClient, n: int, *, events: int = 100,
    gap: float = 0.3, budget: float = 30.0,
) -> dict[str, Any]:
    """The operator's CPU to repair ``events`` drifts of each backend, spaced ``gap`` apart.

    Consul: ``events`` of Tether's agent registrations deregistered behind its
    back; etcd: one data key (``key-2``, which the change and drift phases
    leave alone) deleted from ``events`` EtcdConfigs. Each drift touches a
    different resource.
    """

    async def deregister(index: int) -> None:
        await consul.deregister(workload.service_id(f"svc-{index:05d}"))

    async def registered(index: int) -> bool:
        return await consul.service(workload.service_id(f"svc-{index:05d}")) is not None

    def etcd_key(index: int) -> bytes:
        return f"{workload.prefix_of(f'cfg-{index:05d}')}/key-2".encode()

    async def delete(index: int) -> None:
        await etcd.txn([], [Delete(etcd_key(index))])

    async def rewritten(index: int) -> bool:
        kv = await etcd.get(etcd_key(index))
        return kv is not None and kv.value == workload.etcd_data(index)["key-2"].encode()

    consul_result = await _paced(
        operator, spread(n, events, 1000), deregister, registered, gap=gap, budget=budget
    )
    await settle(operator)
    etcd_result = await _paced(operator, spread(n, events, 1001), delete, rewritten, gap=gap, budget=budget)
    await settle(operator)
    return {"consul": consul_result, "etcd": etcd_result}
