"""The one watcher per Consul agent that finds ConsulService drift and health changes.

Two Consul blocking queries (catalog services and check states) per agent,
however many resources exist; when either index moves, one scan lists the
agent's services and checks, refreshes the shared
:class:`~tether.consul.index.AgentIndex`, and enqueues only the resources
that drifted or whose health changed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from tether.api import ObjectRef
from tether.consul.client import Agent, ConsulRejected, ConsulUnavailable
from tether.consul.index import AgentIndex

log = logging.getLogger(__name__)

# Scans may take this share of the time under sustained churn, after a burst of
# SCAN_BURST_SECONDS of scanning that isolated changes always have available.
SCAN_SHARE = 0.1
SCAN_BURST_SECONDS = 1.0


class ScanBudget:
    """A token bucket of scanning time: bursts at once, sustained churn at ``share``."""

    def __init__(self, *, share: float, capacity: float, now: float) -> None:
        self.share = share
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.share)
        self.updated = now

    def wait(self, now: float) -> float:
        """Seconds until a scan may start (0 while the bucket holds any time)."""
        self._refill(now)
        return 0.0 if self.tokens > 0 else -self.tokens / self.share

    def spend(self, seconds: float, now: float) -> None:
        self._refill(now)
        self.tokens -= seconds


class ConsulWatcher:
    """One pair of blocking queries per agent; enqueues drifted resources."""

    def __init__(
        self, agent: Agent, index: AgentIndex, enqueue: Callable[[ObjectRef], None],
        *, wait: str = "60s", min_scan_interval: float = 0.25,
    ) -> None:
        self.agent = agent
        self.index = index
        self.enqueue = enqueue
        self.wait = wait
        self.min_scan_interval = min_scan_interval
        self._changed = asyncio.Event()

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._poll(self.agent.wait_services, "services")),
            asyncio.create_task(self._poll(self.agent.wait_health, "health")),
            asyncio.create_task(self._scanner()),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll(self, wait: Callable[[int, str], Any], what: str) -> None:
        index = 0
        failures = 0
        while True:
            try:
                new = await wait(index, self.wait)
                failures = 0
            except (ConsulUnavailable, ConsulRejected) as exc:
                failures += 1
                # Short cap: drift after an agent restart must be repaired in
                # well under 10 s, and this is one poll per agent, not per object.
                delay = min(3.0, 0.25 * 2**failures) * random.uniform(0.5, 1.0)
                if failures == 1:
                    log.warning("Consul %s watch failed: %s", what, exc)
                index = 0
                await asyncio.sleep(delay)
                continue
            # Any move, including backwards (an agent that restarted empty),
            # means the agent's state may differ from what resources want.
            if new != index:
                self._changed.set()
            index = max(new, 0)

    async def _scanner(self) -> None:
        loop = asyncio.get_running_loop()
        budget = ScanBudget(share=SCAN_SHARE, capacity=SCAN_BURST_SECONDS, now=loop.time())
        last_scan = -self.min_scan_interval
        while True:
            await self._changed.wait()
            # Every registration, ours included, moves the index, and a scan
            # lists and compares everything: O(resources). A lone change (drift,
            # a repair's echo) is scanned at once, at least min_scan_interval
            # after the last; under sustained churn (1000 services converging)
            # the budget spaces scans so that they take at most SCAN_SHARE of
            # the time. Changes during a pause coalesce into the next scan.
            now = loop.time()
            await asyncio.sleep(max(last_scan + self.min_scan_interval - now, budget.wait(now), 0.0))
            started = last_scan = loop.time()
            self._changed.clear()
            try:
                services = await self.agent.services()
                checks = await self.agent.checks()
            except (ConsulUnavailable, ConsulRejected) as exc:
                log.debug("Consul scan failed: %s", exc)
                await asyncio.sleep(1.0)
                self._changed.set()
                continue
            self.index.refresh(services)
            for ref in self.index.drifted(services, checks):
                self.enqueue(ref)
            budget.spend(loop.time() - started, loop.time())
