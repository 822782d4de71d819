"""The one watcher per Consul agent that finds ConsulService drift and health changes.

Two Consul blocking queries (catalog services and check states) per agent,
however many resources exist; when either index moves, one scan lists the
agent's services and checks, refreshes the shared
:class:`~tether.consulservice.index.AgentIndex`, and enqueues only the resources
that drifted or whose health changed.

Registrations of this cluster that no reconcile tracks go to ``enqueue_orphan``
once they have stayed untracked for ``grace`` seconds, then at most once per owner
per ``sweep_interval``: a registration whose outcome was unknown — sent while Consul
was paused, applied after the client gave up — can land after its resource was
released, and nothing else would ever remove it. The reconciler asks Kubernetes
before it removes anything. Every resource is untracked for a moment after a start
(the watcher scans before the first reconciles): the grace keeps a restart over
thousands of resources from asking Kubernetes about each of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tether import supervising
from tether.api import ObjectRef
from tether.clients.consul import blocking
from tether.clients.consul.client import Agent, ConsulRejected, ConsulUnavailable
from tether.consulservice.index import AgentIndex
from tether.consulservice.sweeping import OrphanSweep
from tether.retrying import Retry

log = logging.getLogger(__name__)

# Backoff of a failing query (base, cap in seconds): drift after a Consul
# restart must be repaired in well under 10 s.
_BACKOFF = (0.5, 3.0)


class ConsulWatcher:
    """One pair of blocking queries per agent; enqueues drifted resources."""

    def __init__(
        self, agent: Agent, index: AgentIndex, enqueue: Callable[[ObjectRef], None],
        enqueue_orphan: Callable[[ObjectRef], None],
        *, wait: str = "60s", min_scan_interval: float = 0.25, sweep_interval: float = 10.0,
        grace: float = 10.0, busy: Callable[[], bool] | None = None, busy_spacing: float = 10.0,
    ) -> None:
        self.agent = agent
        self.index = index
        self.enqueue = enqueue
        self.enqueue_orphan = enqueue_orphan
        self.wait = wait
        self.min_scan_interval = min_scan_interval
        self.sweep_interval = sweep_interval
        self.grace = grace
        self.busy = busy
        self.busy_spacing = busy_spacing
        self._changed = asyncio.Event()
        self._sweep = OrphanSweep(self._changed.set)

    async def run(self) -> None:
        await supervising.together(
            self._poll(self.agent.wait_services, "services"),
            self._poll(self.agent.wait_health, "health"),
            self._scanner(),
        )

    async def _poll(self, wait: Callable[[int, str], Awaitable[int]], what: str) -> None:
        async def fetch(index: int, wait_for: str) -> tuple[int, None]:
            return await wait(index, wait_for), None

        def answered(answer: blocking.Answer[None]) -> None:
            # Any move, including backwards (an agent that restarted empty) and
            # the first answer after an outage, means the agent's state may
            # differ from what resources want.
            if answer.moved:
                self._changed.set()

        # One query per agent, not per object: a short cap costs little.
        retry = Retry(f"Consul {what} watch", base=_BACKOFF[0], cap=_BACKOFF[1], logger=log)
        await blocking.follow(fetch, answered, retry=retry, wait=self.wait)

    async def _scanner(self) -> None:
        loop = asyncio.get_running_loop()
        last_scan = -self.min_scan_interval
        last_cost = 0.0
        while True:
            await self._changed.wait()
            # Every registration, ours included, moves the index; listing and
            # comparing everything costs O(resources), so scans are at least
            # min_scan_interval apart (a lone change is scanned at once). Changes
            # during the pause coalesce into the next scan. (Spacing scans by
            # their cost saved CPU while 1000 services converged, but a drift
            # repaired right after another then waited for the spacing: p99
            # 385 ms became 1.7 s, so the fixed interval stays.)
            #
            # While the reconcilers have a backlog (a start, a rollout of many
            # resources: every one of their writes moves the index), scans are
            # also spaced by their own cost, so that they take at most about
            # 1/busy_spacing of the time: at 5000 registrations a scan costs
            # tens of milliseconds, and at one every 0.25 s the scans alone were
            # a quarter of the operator's CPU while converging. A quiet operator
            # keeps the fixed interval, so a lone drift is repaired as fast.
            spacing = self.min_scan_interval
            if self.busy is not None and self.busy():
                spacing = max(spacing, self.busy_spacing * last_cost)
            await asyncio.sleep(max(0.0, last_scan + spacing - loop.time()))
            last_scan = loop.time()
            self._changed.clear()
            try:
                services = await self.agent.services()
                checks = await self.agent.checks()
            except (ConsulUnavailable, ConsulRejected) as exc:
                log.debug("Consul scan failed: %s", exc)
                await asyncio.sleep(1.0)
                self._changed.set()
                continue
            for ref in self.index.drifted(services, checks):  # refreshes the owner index too
                self.enqueue(ref)
            last_cost = loop.time() - last_scan
            for ref in self._sweep.due(
                self.index.untracked(), loop.time(), grace=self.grace, interval=self.sweep_interval
            ):
                self.enqueue_orphan(ref)
