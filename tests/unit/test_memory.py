"""Freed memory handed back after bursts of reconciles, never while idle or busy."""

from __future__ import annotations

import asyncio

import pytest

from tether import memory


async def test_trims_once_per_burst_and_never_while_busy_or_idle() -> None:
    state = {"busy": False, "count": 0}
    trims: list[int] = []
    task = asyncio.create_task(memory.trim_after_bursts(
        lambda: (bool(state["busy"]), int(state["count"])), interval=0.01,
        trim=lambda: trims.append(int(state["count"])),
    ))
    try:
        await asyncio.sleep(0.05)
        assert trims == [], "nothing ran: nothing to hand back"
        state.update(busy=True, count=500)
        await asyncio.sleep(0.05)
        assert trims == [], "still reconciling"
        state.update(busy=False)
        await asyncio.sleep(0.05)
        assert trims == [500], "once, after the burst"
        await asyncio.sleep(0.05)
        assert trims == [500], "idle again: no more"
        state.update(count=501)
        await asyncio.sleep(0.05)
        assert trims == [500, 501]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_this_c_library_has_malloc_trim_and_the_resident_size_is_read() -> None:
    trim = memory.trimmer()
    assert trim is not None  # glibc (the image's and this machine's)
    assert trim() in (0, 1)
    assert memory.resident_bytes() > 10 * 2**20
