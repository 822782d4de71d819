"""The etcd client's watch stream against a model of etcd's progress rule.

etcd answers a progress request only when every watcher of the stream is
synced *and* its store revision has reached the watcher's start revision
(``progressIfSync`` in its watchable store); otherwise it answers nothing.
The model below keeps that rule, so the tests show what a quiet but healthy
store does to a watch opened "from the next revision" — the case of an
operator started while nothing is being written.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
import pytest
from aetcd import rpc

from tether.clients.etcd.client import EtcdClient
from tether.clients.etcd.connection import EtcdConnection
from tether.clients.etcd.errors import Compacted, EtcdUnavailable

PREFIX = b"/app/"


class Store:
    """The etcd server as far as one watch stream goes: revision, history, compaction."""

    def __init__(self, revision: int, *, compacted: int = 0) -> None:
        self.revision = revision
        self.compacted = compacted
        self.history: list[tuple[int, bytes, bytes]] = []  # (revision, key, value)
        self.opened: list[int] = []  # start revision of every watch opened
        self.progress_requests = 0
        self.progress_answers = 0


class ModelCall:
    """One Watch call: replays history from its start revision, answers progress like etcd."""

    def __init__(self, store: Store, start_revision: int) -> None:
        self.store = store
        self.start = start_revision
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        if 0 < start_revision < store.compacted:
            self.messages.put_nowait(
                rpc.WatchResponse(canceled=True, compact_revision=store.compacted)
            )
            return
        events = [
            rpc.Event(type=rpc.Event.PUT, kv=rpc.KeyValue(key=k, value=v, mod_revision=r, version=1))
            for r, k, v in store.history if r >= start_revision and k.startswith(PREFIX)
        ]
        if events:
            response = rpc.WatchResponse(events=events)
            response.header.revision = store.revision
            self.messages.put_nowait(response)

    async def read(self) -> Any:
        return await self.messages.get()

    async def write(self, request: Any) -> None:
        assert request.HasField("progress_request"), request
        self.store.progress_requests += 1
        # etcd's rule: no answer at all while its revision is below the start revision.
        if self.store.revision >= self.start:
            self.store.progress_answers += 1
            response = rpc.WatchResponse(watch_id=-1)
            response.header.revision = self.store.revision
            self.messages.put_nowait(response)

    def cancel(self) -> bool:
        self.messages.put_nowait(grpc.aio.EOF)
        return True


class _Endpoint:
    index = 0
    url = "http://127.0.0.1:2379"


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> EtcdClient:
    client = EtcdClient(EtcdConnection(endpoints=("http://127.0.0.1:2379",), timeout=0.1))

    async def ensure_open() -> None:
        return None

    monkeypatch.setattr(client, "_ensure_open", ensure_open)
    monkeypatch.setattr(client, "_advance", lambda endpoint: None)
    return client


def open_on(client: EtcdClient, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    async def open_watch(prefix: bytes, start_revision: int) -> tuple[Any, Any, str]:
        store.opened.append(start_revision)
        return _Endpoint(), ModelCall(store, start_revision), ""

    monkeypatch.setattr(client, "_open_watch", open_watch)


async def collect(stream: AsyncIterator[tuple[int, list[Any]]], count: int) -> list[tuple[int, list[Any]]]:
    out = []
    async for item in stream:
        out.append(item)
        if len(out) == count:
            break
    return out


async def test_a_quiet_healthy_store_is_not_taken_for_a_broken_stream(
    client: EtcdClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The watcher handled revision 100 and watches from 101; nothing is written.
    store = Store(revision=100)
    open_on(client, store, monkeypatch)
    stream = client.watch_prefix(PREFIX, 101, progress_interval=0.02)
    try:
        # Many progress rounds, each well past progress_interval + timeout.
        answers = await asyncio.wait_for(collect(stream, 8), 5.0)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    assert answers == [(100, [])] * 8, "every progress request answered: the stream is alive"
    assert store.progress_answers == store.progress_requests >= 8


async def test_the_early_revision_is_never_delivered_again(
    client: EtcdClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(revision=101)
    store.history = [(100, b"/app/a", b"handled"), (101, b"/app/a", b"new"), (101, b"/other", b"x")]
    open_on(client, store, monkeypatch)
    stream = client.watch_prefix(PREFIX, 101, progress_interval=0.02)
    try:
        (revision, events), progress = await asyncio.wait_for(collect(stream, 2), 5.0)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    assert revision == 101 and [(e.kv.key, e.kv.value) for e in events] == [(b"/app/a", b"new")]
    assert progress == (101, [])


async def test_a_store_compacted_at_the_start_revision_is_watched_from_it(
    client: EtcdClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Compacted at 101: revision 100 is gone, but nothing from 101 on was lost.
    store = Store(revision=101, compacted=101)
    open_on(client, store, monkeypatch)
    stream = client.watch_prefix(PREFIX, 101, progress_interval=0.02)
    try:
        assert await asyncio.wait_for(collect(stream, 1), 5.0) == [(101, [])]
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    assert store.opened == [100, 101]


async def test_a_compacted_start_revision_is_still_reported(
    client: EtcdClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(revision=300, compacted=250)
    open_on(client, store, monkeypatch)
    with pytest.raises(Compacted) as caught:
        await asyncio.wait_for(collect(client.watch_prefix(PREFIX, 101, progress_interval=0.02), 1), 5.0)
    assert caught.value.compact_revision == 250


async def test_a_stream_that_answers_nothing_is_still_broken(
    client: EtcdClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(revision=100)
    open_on(client, store, monkeypatch)

    async def deaf(self: ModelCall, request: Any) -> None:
        store.progress_requests += 1  # a hung member: the request goes nowhere

    monkeypatch.setattr(ModelCall, "write", deaf)
    with pytest.raises(EtcdUnavailable, match="silent"):
        await asyncio.wait_for(collect(client.watch_prefix(PREFIX, 101, progress_interval=0.02), 1), 5.0)
    assert store.progress_requests == 1
