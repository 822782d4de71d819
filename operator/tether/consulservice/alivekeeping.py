"""The leader keeps the synthetic node's ``tether:alive`` check passing.

It runs with the other backend watchers, so only on the replica that holds
the leader Lease: once when that replica starts serving (a leader back after
``tether deadman`` set the check critical restores every instance's own
status with this one write), then whenever :meth:`AliveKeeper.nudge` is
called — by the catalog watcher, which already follows the node's checks
with a blocking query and nudges when the check is absent or not passing
(:func:`tether.consulservice.nodecheck.drifted`).

Each pass reads the node and the check, asks the pure plan
(:func:`tether.consulservice.nodecheck.restore`) and writes at most one
guarded operation. This is also what closes the dead-man switch's race: if
``tether deadman`` judged the leader dead a moment before it came back and
its critical write lands after the leader's passing one (its guard read
the new index), the watcher sees the check move and the next pass writes
passing again.
"""

from __future__ import annotations

import asyncio
import logging

from tether.clients.consul.client import Catalog, ConsulContended, ConsulError
from tether.consulservice import nodecheck
from tether.retrying import Retry

log = logging.getLogger(__name__)

# Guarded writes that lost a race are re-planned from a fresh read this many
# times before waiting for the next nudge (or the backoff).
_ATTEMPTS = 3


class AliveKeeper:
    """Writes ``tether:alive`` passing on the synthetic node when it is not."""

    def __init__(self, catalog: Catalog, *, node: str, cluster: str) -> None:
        self.catalog = catalog
        self.node = node
        self.cluster = cluster
        self._wake = asyncio.Event()
        self._wake.set()  # the first pass runs at once: the leader just started serving
        #: Writes made, for tests and logs.
        self.writes = 0

    def nudge(self) -> None:
        """Look again soon (called by the catalog watcher on the event loop)."""
        self._wake.set()

    async def run(self) -> None:
        retry = Retry(f"check {nodecheck.CHECK_ID!r} on node {self.node!r}", base=0.5, cap=5.0, logger=log)
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.once()
            except ConsulError as exc:
                await retry.pause(exc)
                self._wake.set()  # not done: try again after the pause
                continue
            retry.succeeded()

    async def once(self) -> bool:
        """One pass: read, plan, write at most one operation; True when it wrote."""
        for attempt in range(_ATTEMPTS):
            _, node_entry, _ = await self.catalog.node_services(self.node, where=_NO_SERVICE)
            _, checks = await self.catalog.node_checks(self.node, where=_ALIVE_ONLY)
            plan = nodecheck.restore(node_entry, checks, node=self.node, cluster=self.cluster)
            if plan.conflict:
                log.warning("dead-man check: %s", plan.conflict)
                return False
            if not plan.ops:
                return False
            try:
                await self.catalog.catalog_txn(list(plan.ops))
            except ConsulContended:
                if attempt == _ATTEMPTS - 1:
                    raise
                continue
            self.writes += 1
            log.info("set check %r on node %r passing (%s)", nodecheck.CHECK_ID, self.node, plan.reason)
            return True
        return False


# Filters keep each read to the node and the one check, whatever is on the node.
_NO_SERVICE = 'ID == ""'
_ALIVE_ONLY = f'CheckID == "{nodecheck.CHECK_ID}"'
