"""RootWatchers: one watch task per root of the managed keys, following the expectations."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tether.api import ObjectRef
from tether.config.expectations import Expectations, digest
from tether.config.roots import RootWatchers, root_of


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.001)


def ref(name: str) -> ObjectRef:
    return ObjectRef("consulconfigs", "ns", name)


async def test_watches_follow_the_roots_of_managed_keys() -> None:
    expectations = Expectations()
    started: list[str] = []
    cancelled: list[str] = []

    async def watch(root: str) -> None:
        started.append(root)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(root)
            raise

    roots = RootWatchers(expectations, fixed={"tether/owners/x"}, watch=watch, name="test")
    task = asyncio.create_task(roots.run())
    try:
        await wait_until(lambda: roots.running() == ["tether/"])
        expectations.track(ref("a"), {"app/a": digest(b"1"), "app/b": digest(b"2")})
        expectations.track(ref("b"), {"shop/x": digest(b"1")})
        await wait_until(lambda: roots.running() == ["app/", "shop/", "tether/"])
        # Another key under a watched root starts nothing new.
        expectations.track(ref("c"), {"app/c": digest(b"3")})
        await asyncio.sleep(0.01)
        assert sorted(started) == ["app/", "shop/", "tether/"]
        # A root nobody uses any more is dropped at the next change of the set.
        expectations.untrack(ref("b"))
        expectations.track(ref("d"), {"new/x": digest(b"4")})
        await wait_until(lambda: roots.running() == ["app/", "new/", "tether/"])
        await wait_until(lambda: cancelled == ["shop/"])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert roots.running() == []
    assert sorted(cancelled) == ["app/", "new/", "shop/", "tether/"]


async def test_a_crashed_watch_is_started_again_on_the_next_change() -> None:
    expectations = Expectations()
    starts: list[str] = []

    async def watch(root: str) -> None:
        starts.append(root)
        if root == "app/" and starts.count("app/") == 1:
            raise RuntimeError("a bug in the watch")
        await asyncio.Event().wait()

    roots = RootWatchers(expectations, fixed=set(), watch=watch, name="test")
    task = asyncio.create_task(roots.run())
    try:
        expectations.track(ref("a"), {"app/a": digest(b"1")})
        await wait_until(lambda: starts == ["app/"])
        expectations.track(ref("b"), {"shop/x": digest(b"1")})
        await wait_until(lambda: sorted(starts) == ["app/", "app/", "shop/"])
        assert roots.running() == ["app/", "shop/"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_root_of() -> None:
    assert root_of("/app/web/db") == "/app/"
    assert root_of("shop/payments/db") == "shop/"
    assert root_of("/flat") == "/flat"
    assert root_of("flat") == "flat"
