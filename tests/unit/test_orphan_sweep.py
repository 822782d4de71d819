"""The orphan sweep both Consul watchers share: grace, interval, one timer."""

from __future__ import annotations

import asyncio

from tether.api import ObjectRef
from tether.consulservice.sweeping import OrphanSweep

A = ObjectRef("consulservices", "team", "a")
B = ObjectRef("consulservices", "team", "b")


async def test_an_owner_is_due_after_the_grace_then_once_per_interval() -> None:
    woken = asyncio.Event()
    sweep = OrphanSweep(woken.set)
    assert sweep.due([A], 0.0, grace=5.0, interval=10.0) == []  # just seen
    assert sweep.due([A, B], 4.0, grace=5.0, interval=10.0) == []  # B just seen, A in its grace
    assert sweep.due([A, B], 5.0, grace=5.0, interval=10.0) == [A]
    assert sweep.due([A, B], 9.0, grace=5.0, interval=10.0) == [B]
    assert sweep.due([A, B], 14.0, grace=5.0, interval=10.0) == []  # both asked less than 10 s ago
    assert sweep.due([A, B], 15.0, grace=5.0, interval=10.0) == [A]
    # Tracked again, then untracked again: a new grace.
    assert sweep.due([B], 16.0, grace=5.0, interval=10.0) == []
    assert sweep.due([A, B], 17.0, grace=5.0, interval=10.0) == []
    assert sweep.due([A, B], 21.0, grace=5.0, interval=10.0) == [B]  # A still in its new grace
    assert sweep.due([A, B], 22.0, grace=5.0, interval=10.0) == [A]


async def test_one_timer_wakes_the_watcher_whatever_the_number_of_owners() -> None:
    woken = asyncio.Event()
    sweep = OrphanSweep(woken.set)
    loop = asyncio.get_running_loop()
    owners = [ObjectRef("consulservices", "team", f"o{i}") for i in range(100)]
    assert sweep.due(owners, loop.time(), grace=0.0, interval=0.05) == owners
    assert sweep.due(owners, loop.time(), grace=0.0, interval=0.05) == []  # the same timer
    await asyncio.wait_for(woken.wait(), 1.0)
    # Nothing untracked: no timer.
    woken.clear()
    assert sweep.due([], loop.time(), grace=0.0, interval=0.05) == []
    await asyncio.sleep(0.15)
    assert not woken.is_set()
