"""When the watchers hand an untracked owner to the reconciler: the orphan sweep both share.

An owner with registrations (agent) or instances (synthetic node) that no reconcile
tracks is either a resource not reconciled yet, or an orphan nobody else would ever
remove. The watchers hand such owners to the reconciler, which asks Kubernetes
before it removes anything; this decides when, so that neither watcher asks
Kubernetes about every resource after a start, nor about one owner in a loop:

* an owner is due once it has stayed untracked for ``grace`` seconds (the agent
  watcher's; the catalog watcher uses none: its reconciler reads the catalog anyway),
* then at most once per ``interval`` while it stays untracked (a failed collection
  is asked again at the next);
* one timer, whatever the number of owners, wakes the watcher when the next owner
  may be due although Consul stays quiet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from tether.api import ObjectRef


class OrphanSweep:
    """Which untracked owners are due now, and the one timer that comes back for the rest."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        #: When each untracked owner was first seen untracked, and last handed over.
        self._since: dict[ObjectRef, float] = {}
        self._swept: dict[ObjectRef, float] = {}
        self._revisit: asyncio.TimerHandle | None = None

    def due(
        self, untracked: Iterable[ObjectRef], now: float, *, grace: float, interval: float
    ) -> list[ObjectRef]:
        """The owners of ``untracked`` (all untracked now) to hand over at ``now`` (loop time)."""
        owners = list(untracked)
        self._since = {ref: self._since.get(ref, now) for ref in owners}
        self._swept = {ref: t for ref, t in self._swept.items() if ref in self._since}
        out = []
        for ref in owners:
            if now - self._since[ref] < grace or now - self._swept.get(ref, -interval) < interval:
                continue
            self._swept[ref] = now
            out.append(ref)
        if owners and self._revisit is None:
            later = min(interval, grace) if grace > 0 else interval
            self._revisit = asyncio.get_running_loop().call_later(later, self._come_back)
        return out

    def _come_back(self) -> None:
        self._revisit = None
        self._wake()
