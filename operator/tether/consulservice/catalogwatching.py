"""The one watcher of the synthetic node: endpoints-mode drift, whatever the number of resources.

Two Consul blocking queries on the synthetic node only — its services
(``/v1/catalog/node-services/<node>``, which also answers whether the node
exists) and its checks (``/v1/health/node/<node>``): a service change moves
the first, a check's status the second, and neither moves for anything
elsewhere in the datacenter. Each answer carries the node's entries, so
there is no separate scan: the newest pair is compared with what every
resource wants (the shared :class:`~tether.consulservice.index.CatalogIndex`), and
only the resources that differ are enqueued; the node-level check
``tether:alive`` (the dead-man switch) found absent or not passing nudges
its keeper (``alive_drift``). The owners of instances of
this cluster that no tracked resource accounts for are enqueued as orphans
(``enqueue_orphan``, at most once per owner per ``sweep_interval``): the
reconciler asks Kubernetes before removing anything. Resources with Pods
behind the readiness gate are enqueued when one of their gated instances'
status moved (:class:`~tether.consulservice.index.GateIndex`). The watcher
itself never writes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from tether import supervising
from tether.api import ObjectRef
from tether.clients.consul import blocking
from tether.clients.consul.client import Catalog
from tether.consulservice import gates as gate_rules
from tether.consulservice import nodecheck
from tether.consulservice.index import CatalogIndex, GateIndex
from tether.consulservice.sweeping import OrphanSweep
from tether.retrying import Retry

log = logging.getLogger(__name__)

# Backoff of a failing query (base, cap in seconds): drift after a Consul
# restart must be repaired in well under 10 s.
_BACKOFF = (0.5, 3.0)
# What one entry of the node's answer costs to read and parse (about 500 bytes of
# JSON; measured at 10-20 us on the reference machine), for the pacing while busy.
_ENTRY_SECONDS = 20e-6


class CatalogWatcher:
    """Blocking queries on one node; enqueues drifted resources and the owners of orphans."""

    def __init__(
        self, catalog: Catalog, index: CatalogIndex, node: str, enqueue: Callable[[ObjectRef], None],
        enqueue_orphan: Callable[[ObjectRef], None], *, wait: str = "60s", min_scan_interval: float = 0.1,
        settle: float = 0.05,
        sweep_interval: float = 10.0, gates: GateIndex | None = None,
        alive_drift: Callable[[], None] | None = None,
        busy: Callable[[], bool] | None = None, busy_spacing: float = 10.0,
    ) -> None:
        self.catalog = catalog
        self.index = index
        self.node = node
        self.enqueue = enqueue
        self.enqueue_orphan = enqueue_orphan
        self.wait = wait
        self.min_scan_interval = min_scan_interval
        self.settle = settle
        self.sweep_interval = sweep_interval
        self.gates = gates
        self.alive_drift = alive_drift
        self.busy = busy
        self.busy_spacing = busy_spacing
        self._services: list[dict[str, Any]] = []
        self._checks: list[dict[str, Any]] = []
        self._node_present = False
        self._changed = asyncio.Event()
        self._sweep = OrphanSweep(self._changed.set)

    async def run(self) -> None:
        await supervising.together(self._poll_services(), self._poll_checks(), self._compare())

    async def _poll(
        self, fetch: Callable[[int, str], Awaitable[tuple[int, None]]], what: str, size: Callable[[], int]
    ) -> None:
        def answered(answer: blocking.Answer[None]) -> None:
            # Any move, backwards included (a Consul that restarted empty).
            if answer.moved:
                self._changed.set()

        async def paced(index: int, wait: str) -> tuple[int, None]:
            # Each answer is the whole node, and while the reconcilers have work
            # queued (a rollout), every one of their transactions moves the
            # index: the next query waits in proportion to the last answer's
            # size, so that reading and parsing them takes about 1/busy_spacing
            # of the time (2 s between queries at 10 000 instances, 2 ms at 100).
            # Nothing is missed: a later query with the same index returns at once.
            if self.busy is not None and self.busy():
                await asyncio.sleep(self.busy_spacing * _ENTRY_SECONDS * size())
            return await fetch(index, wait)

        # Capped and jittered; one query per node, not per object.
        base, cap = _BACKOFF
        retry = Retry(f"Consul {what} watch on node {self.node!r}", base=base, cap=cap, logger=log)
        await blocking.follow(paced, answered, retry=retry, wait=self.wait)

    async def _poll_services(self) -> None:
        async def fetch(index: int, wait: str) -> tuple[int, None]:
            new, node, services = await self.catalog.node_services(self.node, index=index, wait=wait)
            self._services = services if node is not None else []
            self._node_present = node is not None
            return new, None

        await self._poll(fetch, "services", lambda: len(self._services))

    async def _poll_checks(self) -> None:
        async def fetch(index: int, wait: str) -> tuple[int, None]:
            new, checks = await self.catalog.node_checks(self.node, index=index, wait=wait)
            self._checks = checks
            return new, None

        await self._poll(fetch, "checks", lambda: len(self._checks))

    async def _compare(self) -> None:
        loop = asyncio.get_running_loop()
        last = -self.min_scan_interval
        while True:
            await self._changed.wait()
            # One transaction moves both indexes, and the two answers arrive
            # apart: a short pause lets the second catch up (a comparison of new
            # services with old checks would flag a false drift), and spacing
            # comparisons coalesces a burst of writes into one.
            await asyncio.sleep(max(self.settle, last + self.min_scan_interval - loop.time()))
            last = loop.time()
            self._changed.clear()
            drifted, untracked = self.index.drifted(self._services, self._checks)
            self._check_alive()
            for ref in drifted:
                self.enqueue(ref)
            if self.gates is not None:
                # The readiness gate follows Consul's view: a gated instance whose
                # status moved (just registered, now passing) wakes its resource.
                for ref in self.gates.moved(gate_rules.instance_statuses(self._checks)):
                    self.enqueue(ref)
            # A resource not reconciled yet after a start is also untracked: the
            # reconciler asks Kubernetes (no grace: it reads the catalog anyway).
            owners = (ObjectRef(self.index.plural, o.namespace, o.name) for o in untracked)
            for ref in self._sweep.due(owners, loop.time(), grace=0.0, interval=self.sweep_interval):
                self.enqueue_orphan(ref)

    def _check_alive(self) -> None:
        """The dead-man check: nudge its keeper (the writer) when it is absent or not passing."""
        # Only while the node exists: without it nothing can pass, and the
        # index of an absent node's query moves with every catalog change elsewhere.
        if (
            self.alive_drift is not None and self._node_present
            and nodecheck.drifted(self._checks, self.index.cluster)
        ):
            self.alive_drift()
