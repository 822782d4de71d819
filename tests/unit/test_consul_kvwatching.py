"""The Consul KV drift watcher: one blocking query per root, changes held against expectations.

A scripted client answers each blocking query when the test says so, which
lets the tests walk the watcher through first answers, edits, deletions,
Tether's own writes, an index that goes backwards and an outage, and check
which resources it enqueues and which index it blocks on next.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tether.api import ObjectRef
from tether.clients.consul.client import ConsulUnavailable
from tether.config import roots
from tether.config.expectations import Expectations, digest
from tether.config.watchers import consulkv as kvwatching
from tether.config.watchers.consulkv import KVWatcher

REF = ObjectRef("consulconfigs", "team-a", "cfg")
OTHER = ObjectRef("consulconfigs", "team-b", "other")

Answer = tuple[int, list[dict[str, Any]]] | Exception


def kv(key: str, value: bytes, modify_index: int) -> dict[str, Any]:
    encoded = base64.b64encode(value).decode() if value else None
    return {"Key": key, "Value": encoded, "ModifyIndex": modify_index}


class ScriptedKV:
    """``kv_tree`` answers from a queue per root; every call is recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._answers: dict[str, asyncio.Queue[Answer]] = {}

    def _queue(self, root: str) -> asyncio.Queue[Answer]:
        return self._answers.setdefault(root, asyncio.Queue())

    async def answer(self, root: str, answer: Answer) -> None:
        """Answer the pending query on ``root`` and wait until the watcher asks again."""
        asked = sum(1 for r, _ in self.calls if r == root)
        self._queue(root).put_nowait(answer)
        await wait_until(lambda: sum(1 for r, _ in self.calls if r == root) > asked)

    def last_index(self, root: str) -> int:
        return [i for r, i in self.calls if r == root][-1]

    async def kv_get(self, key: str) -> dict[str, Any] | None:
        raise AssertionError("the watcher only lists")

    async def kv_tree(
        self, prefix: str, *, index: int = 0, wait: str = ""
    ) -> tuple[int, list[dict[str, Any]]]:
        self.calls.append((prefix, index))
        answer = await self._queue(prefix).get()
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def kv_txn(self, ops: list[dict[str, Any]]) -> tuple[bool, list[dict[str, Any]]]:
        raise AssertionError("a watcher never writes")


async def wait_until(condition: Any, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.001)


Watched = tuple[ScriptedKV, Expectations, list[ObjectRef]]


@pytest.fixture
async def watched(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Watched]:
    """A watcher over ``app/`` and ``tether/``, with REF expecting ``app/a`` = 1 and its claim."""
    monkeypatch.setattr(kvwatching, "_BACKOFF_CAP", 0.001)  # reconnect at once in tests
    client, expectations, enqueued = ScriptedKV(), Expectations(), []
    expectations.track(REF, {"app/a": digest(b"1"), "tether/keys/app/a": digest(b"kubernetes/team-a/cfg")})
    watcher = KVWatcher(client, expectations, enqueued.append, ownership_prefix="tether/", wait="300s")
    task = asyncio.create_task(watcher.run())
    await wait_until(lambda: {r for r, _ in client.calls} == {"app/", "tether/"})
    yield client, expectations, enqueued
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_one_query_per_root_first_without_an_index(watched: Watched) -> None:
    client, _, _ = watched
    assert sorted(client.calls) == [("app/", 0), ("tether/", 0)]


async def test_changes_are_held_against_what_resources_expect(watched: Watched) -> None:
    client, _, enqueued = watched
    # The first answer matches what REF wants: nobody drifted.
    await client.answer("app/", (10, [kv("app/a", b"1", 10), kv("app/foreign", b"x", 3)]))
    assert enqueued == [] and client.last_index("app/") == 10
    # Someone edits app/a.
    await client.answer("app/", (11, [kv("app/a", b"tampered", 11), kv("app/foreign", b"x", 3)]))
    assert enqueued == [REF] and client.last_index("app/") == 11
    # A foreign key changes; app/a did not move: nothing to report.
    await client.answer("app/", (12, [kv("app/a", b"tampered", 11), kv("app/foreign", b"y", 12)]))
    assert enqueued == [REF]
    # Tether restores the value: its own write wakes nobody.
    await client.answer("app/", (13, [kv("app/a", b"1", 13), kv("app/foreign", b"y", 12)]))
    assert enqueued == [REF]
    # app/a is deleted.
    await client.answer("app/", (14, [kv("app/foreign", b"y", 12)]))
    assert enqueued == [REF, REF]


async def test_a_missing_key_on_the_first_answer_is_drift(watched: Watched) -> None:
    client, _, enqueued = watched
    await client.answer("tether/", (20, []))  # the claim is gone
    assert enqueued == [REF]


async def test_an_index_going_backwards_relists_from_zero(watched: Watched) -> None:
    client, _, enqueued = watched
    await client.answer("app/", (50, [kv("app/a", b"1", 50)]))
    # Consul restored from a snapshot: the index is lower than the one waited on.
    await client.answer("app/", (7, [kv("app/a", b"1", 5)]))
    assert client.last_index("app/") == 0
    # The re-list compares everything afresh: a key missing now is drift.
    await client.answer("app/", (8, []))
    assert enqueued == [REF] and client.last_index("app/") == 8


async def test_after_an_outage_everything_is_compared_again(watched: Watched) -> None:
    client, _, enqueued = watched
    await client.answer("app/", (30, [kv("app/a", b"1", 30)]))
    await client.answer("app/", ConsulUnavailable("Consul agent is unreachable"))
    assert client.last_index("app/") == 0 and enqueued == []
    # Consul came back empty (a new cluster): what was expected is missing.
    await client.answer("app/", (3, []))
    assert enqueued == [REF]


async def test_a_new_root_gets_its_own_query(watched: Watched) -> None:
    client, expectations, enqueued = watched
    expectations.track(OTHER, {"shop/payments/db": digest(b"pg")})
    await wait_until(lambda: ("shop/", 0) in client.calls)
    await client.answer("shop/", (5, [kv("shop/payments/db", b"mysql", 5)]))
    assert enqueued == [OTHER]


def test_roots_are_first_path_segments() -> None:
    assert roots.root_of("shop/payments/db") == "shop/"
    assert roots.root_of("/app/web/db") == "/app/"
    assert roots.root_of("tether/keys/x") == "tether/"
    assert roots.root_of("flat") == "flat"


async def test_nothing_changed_enqueues_nothing(watched: Watched) -> None:
    client, _, enqueued = watched
    await client.answer("app/", (10, [kv("app/a", b"1", 10)]))
    await client.answer("app/", (10, [kv("app/a", b"1", 10)]))  # the wait ran out
    await client.answer("tether/", (10, [kv("tether/keys/app/a", b"kubernetes/team-a/cfg", 9)]))
    assert enqueued == [] and client.last_index("app/") == 10 and client.last_index("tether/") == 10


async def test_an_outage_logs_once_and_its_end_once(
    watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    client, _, enqueued = watched
    caplog.set_level(logging.DEBUG, logger="tether.config.watchers.consulkv")
    await client.answer("app/", (30, [kv("app/a", b"1", 30)]))
    for _ in range(3):
        await client.answer("app/", ConsulUnavailable("Consul agent is unreachable"))
    await client.answer("app/", (31, [kv("app/a", b"1", 30)]))
    assert enqueued == []
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert [level for level, _ in records] == ["WARNING", "INFO"]
    assert "Consul KV watch of 'app/' failed: Consul agent is unreachable" in records[0][1]
    assert "Consul KV watch of 'app/' recovered after 3 failures" in records[1][1]
