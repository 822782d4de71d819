"""The etcd drift watch of one root: events held against expectations, and resyncs.

A scripted client hands out watch streams whose events the test pushes, so
the tests can walk one :class:`~tether.config.watchers.etcd.PrefixWatch` through a
first start, edits, Tether's own writes, a compaction, a store that went
back in time and an outage, and check what it enqueues and where it resumes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Literal

import pytest

from tether.api import ObjectRef
from tether.clients.etcd import values as etcd
from tether.clients.etcd.errors import Compacted, EtcdUnavailable
from tether.config.expectations import Expectations, digest
from tether.config.watchers.etcd import PrefixWatch

REF = ObjectRef("etcdconfigs", "team-a", "cfg")
ELSEWHERE = ObjectRef("etcdconfigs", "team-b", "elsewhere")
Item = tuple[int, list[etcd.WatchEvent]] | Exception | None


def event(kind: Literal["put", "delete"], key: str, value: bytes = b"", revision: int = 1) -> etcd.WatchEvent:
    return etcd.WatchEvent(kind, etcd.KeyValue(key.encode(), value, 1, revision, 1))


class ScriptedEtcd:
    """``status`` and ``watch_prefix`` (``tether.config.stores.etcd.Client``) under the test's control."""

    def __init__(self, revision: int) -> None:
        self.revision = revision
        self.opened: list[tuple[bytes, int]] = []  # (prefix, start revision) of every watch
        self.items: asyncio.Queue[Item] = asyncio.Queue()

    async def status(self) -> int:
        return self.revision

    def watch_prefix(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[tuple[int, list[etcd.WatchEvent]]]:
        self.opened.append((prefix, start_revision))
        return self._stream()

    async def _stream(self) -> AsyncIterator[tuple[int, list[etcd.WatchEvent]]]:
        while True:
            item = await self.items.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                return
            yield item

    async def get_prefix(self, prefix: bytes) -> tuple[int, list[etcd.KeyValue]]:
        raise AssertionError("the watch never lists")

    async def get(self, key: bytes) -> etcd.KeyValue | None:
        raise AssertionError("the watch never reads")

    async def txn(
        self, compares: Sequence[etcd.Compare], success: Sequence[etcd.Put | etcd.Delete],
        failure: Sequence[etcd.Put | etcd.Delete] = (),
    ) -> etcd.TxnResult:
        raise AssertionError("a watch never writes")


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.001)


class Rig:
    def __init__(self) -> None:
        self.client = ScriptedEtcd(revision=100)
        self.expectations = Expectations()
        self.enqueued: list[ObjectRef] = []
        self.expectations.track(REF, {"/app/a": digest(b"1")})
        self.expectations.track(ELSEWHERE, {"/other/x": digest(b"x")})
        self.watch = PrefixWatch(
            self.client, self.expectations, self.enqueued.append, prefix=b"/app/", backoff_cap=0.001
        )

    async def push(self, item: Item, *, then_revision: int | None = None, opened: int | None = None) -> None:
        self.client.items.put_nowait(item)
        if then_revision is not None:
            await wait_until(lambda: self.watch.revision == then_revision)
        if opened is not None:
            await wait_until(lambda: len(self.client.opened) == opened)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    task = asyncio.create_task(r.watch.run())
    await wait_until(lambda: len(r.client.opened) == 1)
    yield r
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_first_start_rechecks_the_resources_of_its_root_and_watches_from_now(rig: Rig) -> None:
    # REF's keys are under /app/; ELSEWHERE's are not this watch's business.
    assert rig.enqueued == [REF]
    assert rig.client.opened == [(b"/app/", 101)]


async def test_events_are_held_against_what_resources_expect(rig: Rig) -> None:
    rig.enqueued.clear()
    await rig.push((101, [event("put", "/app/a", b"1", 101)]), then_revision=101)
    assert rig.enqueued == [], "Tether's own write wakes nobody"
    await rig.push((102, [event("put", "/app/a", b"tampered", 102)]), then_revision=102)
    assert rig.enqueued == [REF]
    await rig.push((103, [event("put", "/app/unrelated", b"x", 103)]), then_revision=103)
    await rig.push((104, [event("delete", "/app/a", revision=104)]), then_revision=104)
    assert rig.enqueued == [REF, REF]
    # Progress notifications (no events) only move the revision.
    await rig.push((150, []), then_revision=150)
    assert rig.enqueued == [REF, REF]


async def test_a_compaction_rechecks_every_resource_and_watches_from_now(rig: Rig) -> None:
    await rig.push((120, []), then_revision=120)
    rig.enqueued.clear()
    rig.client.revision = 300
    await rig.push(Compacted(250), opened=2)
    assert sorted(rig.enqueued) == [REF, ELSEWHERE]
    assert rig.client.opened[-1] == (b"/app/", 301)


async def test_a_store_that_went_back_in_time_is_rechecked(rig: Rig) -> None:
    await rig.push((500, []), then_revision=500)
    rig.enqueued.clear()
    rig.client.revision = 40  # restored from an old snapshot
    await rig.push(EtcdUnavailable("etcd restarting"), opened=2)
    assert sorted(rig.enqueued) == [REF, ELSEWHERE]
    assert rig.client.opened[-1] == (b"/app/", 41)


async def test_an_outage_resumes_after_the_last_revision_without_rechecks(rig: Rig) -> None:
    await rig.push((130, []), then_revision=130)
    rig.enqueued.clear()
    rig.client.revision = 135
    await rig.push(EtcdUnavailable("etcd: no leader"), opened=2)
    # Events after 130 are still in etcd's history: resume there, nothing lost.
    assert rig.client.opened[-1] == (b"/app/", 131) and rig.enqueued == []
    assert rig.watch.failures == 1
    await rig.push((131, []), then_revision=131)
    assert rig.watch.failures == 0


async def test_a_stream_that_ends_is_opened_again_where_it_left_off(rig: Rig) -> None:
    await rig.push((140, []), then_revision=140)
    rig.client.revision = 140
    await rig.push(None, opened=2)
    assert rig.enqueued == [REF], "only the first start's re-check"
    assert rig.client.opened[-1] == (b"/app/", 141)
