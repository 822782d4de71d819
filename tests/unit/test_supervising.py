"""Loops run together: the first failure ends the others, and a cancellation ends them all."""

from __future__ import annotations

import asyncio

import pytest

from tether import supervising


async def test_the_first_failure_cancels_the_others_and_is_raised() -> None:
    cancelled: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("query broke")

    with pytest.raises(RuntimeError, match="query broke"):
        await asyncio.wait_for(supervising.together(forever("a"), fails(), forever("b")), 5)
    assert sorted(cancelled) == ["a", "b"]


async def test_a_cancelled_caller_leaves_no_loop_running() -> None:
    started = asyncio.Event()
    cancelled: list[str] = []

    async def forever(name: str) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    outer = asyncio.create_task(supervising.together(forever("a"), forever("b")))
    await asyncio.wait_for(started.wait(), 5)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert sorted(cancelled) == ["a", "b"]
