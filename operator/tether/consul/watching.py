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

# Under churn, a scan waits this many times its own duration after the last one
# (≤ ~1/9 of a core for scanning), but never more than MAX_GAP seconds.
SCAN_DUTY = 8.0
MAX_GAP = 2.0


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

    def gap(self, scan_seconds: float) -> float:
        """The pause after a scan that took ``scan_seconds`` before the next one.

        Every registration, ours included, moves the index; listing and
        comparing everything costs O(resources). So scans are at least
        ``min_scan_interval`` apart, and under sustained churn (1000 services
        converging) at least ``SCAN_DUTY`` times their own cost apart, at most
        ``MAX_GAP``: the scanner then takes a bounded share of the CPU however
        many services the agent holds. A lone change is still scanned at once.
        """
        return max(self.min_scan_interval, min(MAX_GAP, SCAN_DUTY * scan_seconds))

    async def _scanner(self) -> None:
        loop = asyncio.get_running_loop()
        next_scan = 0.0
        while True:
            await self._changed.wait()
            # Changes during the pause coalesce into the next scan.
            await asyncio.sleep(max(0.0, next_scan - loop.time()))
            started = loop.time()
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
            next_scan = loop.time() + self.gap(loop.time() - started)
