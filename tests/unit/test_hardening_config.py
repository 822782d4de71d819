"""Hardening (issue 14) of the shared config engine, for etcd and Consul KV alike:
a lost claim is repaired from the index record, and "Nothing was written" is
only said when it is true."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tether.api import ObjectRef
from tether.api import configs as api
from tether.config import planner
from tether.config.expectations import Expectations
from tether.config.reconciling import ConfigReconciler
from tether.config.sources import SourceIndex
from tether.config.values import Committed, Delete, Entry, Put
from tether.reconciling import Resource

FLAVORS = {
    "etcd": (api.ETCD, planner.Layout("/tether/", rooted=True), "/app"),
    "consul": (api.CONSUL, planner.Layout("tether/", rooted=False), "app"),
}


class MemoryStore:
    """Guarded all-or-nothing transactions over a dict; ``before_commit`` injects a rival."""

    tombstones = False  # a deleted index record is gone (a store without tombstones)

    def __init__(self, max_ops: int = 128) -> None:
        self.kv: dict[str, Entry] = {}
        self.revision = 1
        self.commits = 0
        self.limits = planner.Limits("memory", max_ops, 1 << 20, 1 << 16)
        self.before_commit: Callable[[int], None] | None = None

    def put(self, key: str, value: bytes) -> None:
        self.revision += 1
        self.kv[key] = Entry(key, value, self.revision)

    async def read(self, key: str) -> Entry | None:
        return self.kv.get(key)

    async def read_tree(self, directory: str) -> list[Entry]:
        return [e for k, e in sorted(self.kv.items()) if k.startswith(directory)]

    async def commit(self, step: planner.Step, *, index_key: str, index_revision: int) -> Committed:
        if self.before_commit is not None:
            self.before_commit(self.commits)
        guards = [i.guard for i in step.items] + [planner.index_guard(index_key, index_revision)]
        for g in guards:
            held = self.kv.get(g.key)
            if (held.revision if held else 0) != g.revision:
                return Committed(False, 0)
        self.commits += 1
        self.revision += 1
        for item in step.items:
            if isinstance(item.op, Put):
                self.kv[item.op.key] = Entry(item.op.key, item.op.value, self.revision)
            elif isinstance(item.op, Delete):
                self.kv.pop(item.op.key, None)
        if step.index is not None:
            self.kv[index_key] = Entry(index_key, step.index, self.revision)
        elif step.delete_index:
            self.kv.pop(index_key, None)
        return Committed(True, self.revision)


class NoSources:
    async def read_config_map(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return None

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return None


def _reconciler(flavor: str, store: MemoryStore) -> tuple[ConfigReconciler, planner.Layout, str]:
    fl, layout, prefix = FLAVORS[flavor]
    rec = ConfigReconciler(
        fl, store, NoSources(), cluster="kubernetes", layout=layout,
        expectations=Expectations(), source_index=SourceIndex(),
    )
    return rec, layout, prefix


def _resource(plural: str, spec: dict[str, Any], *, deleting: bool = False) -> Resource:
    return Resource(
        ref=ObjectRef(plural, "team-a", "cfg"), uid="u", generation=1, resource_version="1",
        spec=spec, status={}, finalizers=("tether.dev/cleanup",), deleting=deleting,
    )


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_a_lost_claim_is_restored_not_a_conflict(flavor: str) -> None:
    store = MemoryStore()
    rec, layout, prefix = _reconciler(flavor, store)
    res = _resource(rec.plural, {"prefix": prefix, "data": {"a": "1", "b": "2"}})
    assert _run(rec.apply(res)).ready == "True"
    full = api.join(prefix, "a")
    del store.kv[layout.claim_key(full)]  # out of band

    outcome = _run(rec.apply(res))
    assert outcome.ready == "True", outcome.message
    assert store.kv[layout.claim_key(full)].value == rec.owner(res.ref).encode()


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_a_lost_claim_does_not_leave_the_key_behind_on_deletion(flavor: str) -> None:
    store = MemoryStore()
    rec, layout, prefix = _reconciler(flavor, store)
    spec = {"prefix": prefix, "data": {"a": "1", "b": "2"}}
    _run(rec.apply(_resource(rec.plural, spec)))
    del store.kv[layout.claim_key(api.join(prefix, "a"))]

    outcome = _run(rec.release(_resource(rec.plural, spec, deleting=True)))
    assert outcome.released
    assert store.kv == {}


def test_a_lost_claim_with_data_of_another_owner_claimed_stays_foreign() -> None:
    """Only a *missing* claim is repaired from the index; another owner's claim wins."""
    layout = planner.Layout("/tether/")
    me, other = planner.owner_id("k", "a", "me"), planner.owner_id("k", "b", "other")
    index = Entry(layout.index_key(me), planner.encode_index(["/app/a"]) or b"", 5)
    plan = planner.plan(
        owner=me, layout=layout, desired={"/app/a": b"1"},
        data={"/app/a": Entry("/app/a", b"x", 6)},
        claims={"/app/a": Entry(layout.claim_key("/app/a"), other.encode(), 6)},
        index=index, prune=True, adopt=False, kind="EtcdConfig",
    )
    assert plan.conflict is not None and "b/other" in plan.conflict


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_nothing_written_is_not_claimed_after_a_later_chunk_is_broken(flavor: str) -> None:
    # 2 operations per transaction: every key is its own chunks.
    store = MemoryStore(max_ops=3)
    rec, layout, prefix = _reconciler(flavor, store)
    res = _resource(rec.plural, {"prefix": prefix, "data": {f"k{i}": "v" for i in range(4)}})
    rival_key = api.join(prefix, "k3")

    def rival(commits: int) -> None:
        # After two chunks went in, another resource claims a key of ours.
        if commits == 2 and layout.claim_key(rival_key) not in store.kv:
            store.put(layout.claim_key(rival_key), b"kubernetes/team-b/rival")

    store.before_commit = rival
    outcome = _run(rec.apply(res))
    assert outcome.reason == "Conflict"
    assert store.commits >= 1
    assert "Nothing was written" not in outcome.message
    assert "already written" in outcome.message


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_nothing_written_is_said_when_true(flavor: str) -> None:
    store = MemoryStore()
    rec, layout, prefix = _reconciler(flavor, store)
    store.put(layout.claim_key(api.join(prefix, "a")), b"kubernetes/team-b/rival")
    outcome = _run(rec.apply(_resource(rec.plural, {"prefix": prefix, "data": {"a": "1"}})))
    assert outcome.reason == "Conflict" and outcome.message.endswith("Nothing was written.")
    assert store.commits == 0


class Crash(Exception):
    pass


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
@pytest.mark.parametrize("crash_after", range(8))  # 8 keys: 8 transactions of 2 operations
def test_a_crash_between_chunks_never_lists_an_unclaimed_key(flavor: str, crash_after: int) -> None:
    """Else a listed key without a claim could not be told from a lost claim."""
    store = MemoryStore(max_ops=3)
    rec, layout, prefix = _reconciler(flavor, store)
    owner = rec.owner(ObjectRef(rec.plural, "team-a", "cfg")).encode()

    def crash(commits: int) -> None:
        if commits == crash_after:
            raise Crash

    store.before_commit = crash
    with pytest.raises(Crash):
        _run(rec.apply(_resource(rec.plural, {"prefix": prefix, "data": {f"k{i}": "v" for i in range(8)}})))
    index = store.kv.get(layout.index_key(rec.owner(ObjectRef(rec.plural, "team-a", "cfg"))))
    listed = planner.decode_index(index.value if index else None, layout)
    for key in listed:
        claim = store.kv.get(layout.claim_key(key))
        assert claim is not None and claim.value == owner, key
