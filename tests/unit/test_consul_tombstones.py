"""ConsulConfig's index tombstones: a late create after a release, and the tombstone's life.

A transaction can reach the store long after its sender gave up or died
(etcd applied one 33 s after its operator was SIGKILLed, in a fault run; see
the etcd tests in ``test_config_reconciler.py``). Consul KV has no lease, so
its tombstone carries its creation time and the store's sweeper
(:class:`~tether.config.stores.consulkv.Tombstones`) deletes it after its
lifetime. These tests hold a create in flight across a release, let it land
late through the real ``/v1/txn`` body on the in-memory Consul model, and
follow the tombstone until it is gone.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from kvmodels import ConsulModel, FakeClock, FakeConsulKV
from test_config_reconciler import Rig, make_rig

from tether.clients.consul.client import ConsulUnavailable
from tether.config import planner
from tether.config.stores import consulkv
from tether.config.stores.consulkv import ConsulKVStore, Tombstones
from tether.config.values import Entry
from tether.errors import BackendError

SPEC = {"prefix": "app", "data": {"a": "1", "b": "2"}}
LIFETIME = consulkv.TOMBSTONE_SECONDS


def _consul_rig() -> tuple[Rig, list[list[dict[str, Any]]]]:
    """A Consul KV rig whose next transaction is kept in flight: captured, not applied, outcome unknown."""
    rig = make_rig("consul")
    client = rig.kinds.store.client  # type: ignore[attr-defined]
    held: list[list[dict[str, Any]]] = []
    sent: list[int] = []
    real_txn = client.kv_txn

    async def hold_once(ops: list[dict[str, Any]]) -> tuple[bool, list[dict[str, Any]]]:
        sent.append(1)
        if len(sent) == 1:
            held.append(json.loads(json.dumps(ops)))
            raise ConsulUnavailable("Consul did not answer a KV transaction (it may or may not be applied)")
        return await real_txn(ops)  # type: ignore[no-any-return]

    client.kv_txn = hold_once
    return rig, held


def _lands(rig: Rig, ops: list[dict[str, Any]]) -> bool:
    """The held transaction reaches Consul now; whether its guards held (False: Consul's 409)."""
    assert isinstance(rig.m, ConsulModel)
    ok, _ = rig.m.txn(ops)
    return ok


def _store(rig: Rig) -> ConsulKVStore:
    store = rig.kinds.store
    assert isinstance(store, ConsulKVStore)
    return store


def _index(rig: Rig, name: str = "cfg") -> str:
    return rig.m.layout.index_key(rig.owner(name))


# --------------------------------------------------------------------------- a create held in flight


async def test_a_create_that_lands_after_the_release_fails_its_guard() -> None:
    rig, held = _consul_rig()
    out = await rig.kinds.apply(rig.resource("cfg", SPEC))
    assert out.reason == "BackendUnavailable" and len(held) == 1 and rig.m.txns == 0
    # The held create is guarded by the index record's absence (cas with index 0).
    create = held[0][-1]["KV"]
    assert (create["Verb"], create["Key"], create["Index"]) == ("cas", _index(rig), 0)
    # Deleted before any retry: the release finds nothing, and fences with a tombstone.
    out = await rig.kinds.release(rig.resource("cfg", SPEC))
    assert out.released and out.notes == () and rig.m.txns == 1
    assert rig.m.tombstones() == [_index(rig)]
    assert not _lands(rig, held[0])
    assert rig.under("app/") == {} and rig.owned_by(rig.owner("cfg")) == set()
    await rig.tombstones_expire("cfg")
    assert rig.m.values() == {}


async def test_a_create_repeated_then_released_cannot_be_resurrected_by_the_first_attempt() -> None:
    rig, held = _consul_rig()
    await rig.kinds.apply(rig.resource("cfg", SPEC))
    out = await rig.kinds.apply(rig.resource("cfg", SPEC))  # re-read, not applied: written again
    assert out.ready == "True" and rig.under("app/") == {"app/a": b"1", "app/b": b"2"}
    out = await rig.kinds.release(rig.resource("cfg", SPEC))
    assert out.released and out.message == "deleted 2 keys from Consul KV"
    assert not _lands(rig, held[0])
    assert rig.under("app/") == {} and rig.owned_by(rig.owner("cfg")) == set()
    await rig.tombstones_expire("cfg")
    assert rig.m.values() == {}


async def test_a_create_that_lands_during_the_release_is_pruned_by_it() -> None:
    rig, held = _consul_rig()
    await rig.kinds.apply(rig.resource("cfg", SPEC))
    # The release reads (nothing), then the late create lands just before its
    # tombstone: the tombstone's guard (index 0) fails, the release reads again and prunes.
    landed: list[bool] = []
    rig.faults.before_txn.append(lambda: held and landed.append(_lands(rig, held.pop())))
    out = await rig.kinds.release(rig.resource("cfg", SPEC))
    assert landed == [True], "the late create did land in the middle of the release"
    assert out.released and out.message == "deleted 2 keys from Consul KV"
    assert rig.under("app/") == {} and rig.owned_by(rig.owner("cfg")) == set()
    await rig.tombstones_expire("cfg")
    assert rig.m.values() == {}


async def test_without_the_tombstone_the_late_create_would_leave_orphans() -> None:
    """The window itself: the same late create, once the tombstone is gone, lands (so the tests can fail)."""
    rig, held = _consul_rig()
    await rig.kinds.apply(rig.resource("cfg", SPEC))
    await rig.kinds.release(rig.resource("cfg", SPEC))
    await rig.tombstones_expire("cfg")
    assert _lands(rig, held[0])
    assert rig.owned_by(rig.owner("cfg")) == {"app/a", "app/b"}


# --------------------------------------------------------------------------- the tombstone's life


async def test_the_tombstone_names_its_creation_time_and_is_gone_after_its_lifetime() -> None:
    rig = make_rig("consul")
    await rig.kinds.apply(rig.resource("cfg", SPEC))
    await rig.kinds.release(rig.resource("cfg", SPEC))
    record = rig.m.entry(_index(rig))
    assert record is not None and json.loads(record.value) == {
        "keys": [], "tombstone": True, "created": int(rig.clock.wall),
    }
    sweeper = _store(rig).sweeper
    assert sweeper.pending() == {_index(rig): record.revision}
    rig.clock.advance(LIFETIME - 1)
    assert await sweeper.sweep() == 0 and rig.m.tombstones() == [_index(rig)]
    rig.clock.advance(1)
    assert await sweeper.sweep() == 1
    assert rig.m.values() == {} and sweeper.pending() == {}


async def test_a_resource_of_the_same_name_writes_over_a_live_tombstone_which_then_stays() -> None:
    rig = make_rig("consul")
    await rig.kinds.apply(rig.resource("cfg", SPEC))
    await rig.kinds.release(rig.resource("cfg", SPEC))
    assert rig.m.tombstones() == [_index(rig)]
    # Releasing again (a retried release) writes nothing more.
    before = rig.m.txns
    out = await rig.kinds.release(rig.resource("cfg", SPEC))
    assert out.released and rig.m.txns == before
    # Created again under the same name: the tombstone is guarded and replaced
    # (as in etcd), and its expiry leaves the new record alone.
    out = await rig.kinds.apply(rig.resource("cfg", SPEC))
    assert out.ready == "True" and rig.m.tombstones() == []
    rig.clock.advance(LIFETIME)
    assert await _store(rig).sweeper.sweep() == 0
    assert _store(rig).sweeper.pending() == {}
    record = rig.m.entry(_index(rig))
    assert record is not None and json.loads(record.value) == {"keys": ["app/a", "app/b"]}
    assert rig.owned_by(rig.owner("cfg")) == {"app/a", "app/b"}
    before = rig.m.txns
    await rig.kinds.apply(rig.resource("cfg", SPEC, reconciled=True))
    assert rig.m.txns == before, "nothing changed: nothing written"


async def test_a_resource_of_the_same_name_after_the_tombstone_expired_is_created_afresh() -> None:
    rig = make_rig("consul")
    await rig.kinds.apply(rig.resource("cfg", SPEC))
    await rig.kinds.release(rig.resource("cfg", SPEC))
    await rig.tombstones_expire("cfg")
    assert rig.m.values() == {}
    out = await rig.kinds.apply(rig.resource("cfg", {"prefix": "app", "data": {"c": "3"}}))
    assert out.ready == "True" and rig.under("app/") == {"app/c": b"3"}
    assert rig.owned_by(rig.owner("cfg")) == {"app/c"}


async def test_pruning_every_key_leaves_a_tombstone_too() -> None:
    rig = make_rig("consul")
    await rig.kinds.apply(rig.resource("cfg", SPEC))
    out = await rig.kinds.apply(rig.resource("cfg", {"prefix": "app", "data": {}}))
    assert out.ready == "True" and rig.under("app/") == {}
    await rig.tombstones_expire("cfg")


# --------------------------------------------------------------------------- the sweeper


def _sweeper(model: ConsulModel, clock: FakeClock, lifetime: float = LIFETIME) -> Tombstones:
    return ConsulKVStore(
        FakeConsulKV(model), tombstone_seconds=lifetime, clock=clock.now, wall=clock.time
    ).sweeper


async def test_tombstones_left_by_an_earlier_process_are_found_and_kept_for_what_is_left() -> None:
    model, clock = ConsulModel(), FakeClock()
    old, future, undated = "tether/owners/k/ns/old", "tether/owners/k/ns/future", "tether/owners/k/ns/undated"
    model.put(old, consulkv.tombstone(clock.wall - 500))
    model.put(future, consulkv.tombstone(clock.wall + 3600))  # a writer's clock far ahead
    model.put(undated, planner.TOMBSTONE)
    model.put("tether/owners/k/ns/live", b'{"keys":["app/a"]}')
    sweeper = _sweeper(model, clock)
    assert await sweeper.scan() == 3
    clock.advance(99)
    assert await sweeper.sweep() == 0
    clock.advance(2)
    assert await sweeper.sweep() == 1 and old not in model.kv
    # Never more than a whole lifetime from when it was met.
    clock.advance(LIFETIME - 101)
    assert await sweeper.sweep() == 2
    assert sorted(model.kv) == ["tether/owners/k/ns/live"]


async def test_a_tombstone_met_by_a_read_is_swept_and_a_look_alike_data_key_never() -> None:
    model, clock = ConsulModel(), FakeClock()
    store = ConsulKVStore(FakeConsulKV(model), clock=clock.now, wall=clock.time)
    stone = consulkv.tombstone(clock.wall)
    model.put("tether/owners/k/ns/gone", stone)
    model.put("app/looks-like-one", stone)  # a user's value, under their own prefix
    assert await store.read("app/looks-like-one") is not None
    assert await store.read("tether/owners/k/ns/gone") is not None
    gone = model.kv["tether/owners/k/ns/gone"]
    assert store.sweeper.pending() == {"tether/owners/k/ns/gone": gone["ModifyIndex"]}
    clock.advance(LIFETIME)
    assert await store.sweeper.sweep() == 1
    assert sorted(model.kv) == ["app/looks-like-one"]


async def test_a_sweep_that_fails_keeps_the_tombstone_for_the_next_one() -> None:
    model, clock = ConsulModel(), FakeClock()
    client = FakeConsulKV(model)
    store = ConsulKVStore(client, clock=clock.now, wall=clock.time)
    model.put("tether/owners/k/ns/gone", consulkv.tombstone(clock.wall))
    await store.read("tether/owners/k/ns/gone")
    clock.advance(LIFETIME)
    client.faults.unavailable = True
    with pytest.raises(BackendError):
        await store.sweeper.sweep()
    assert list(store.sweeper.pending()) == ["tether/owners/k/ns/gone"]
    client.faults.unavailable = False
    assert await store.sweeper.sweep() == 1 and model.kv == {}


class _Counting(FakeConsulKV):
    """Counts every call the sweeper makes."""

    calls: list[str]

    async def kv_get(self, key: str) -> dict[str, Any] | None:
        self.calls.append("get")
        return await super().kv_get(key)

    async def kv_tree(
        self, prefix: str, *, index: int = 0, wait: str = ""
    ) -> tuple[int, list[dict[str, Any]]]:
        self.calls.append(f"list {prefix}")
        return await super().kv_tree(prefix, index=index, wait=wait)

    async def kv_txn(self, ops: list[dict[str, Any]]) -> tuple[bool, list[dict[str, Any]]]:
        self.calls.append(" ".join(f"{op['KV']['Verb']} {op['KV']['Key']}" for op in ops))
        return await super().kv_txn(ops)


async def test_the_sweeper_scans_once_is_idle_without_tombstones_and_wakes_for_a_new_one() -> None:
    model = ConsulModel()
    client = _Counting(model)
    client.calls = []
    # Real clocks, a lifetime of 0.2 s.
    store = ConsulKVStore(client, tombstone_seconds=0.2)
    task = asyncio.create_task(store.sweeper.run())
    try:
        await asyncio.sleep(0.3)
        assert client.calls == ["list tether/owners/"], "idle: one scan at start, then nothing"
        # A release's tombstone, written through the store.
        step = planner.Step(delete_index=True)
        assert (await store.commit(step, index_key="tether/owners/k/ns/cfg", index_revision=0)).succeeded
        assert "tether/owners/k/ns/cfg" in model.kv
        for _ in range(50):
            if "tether/owners/k/ns/cfg" not in model.kv:
                break
            await asyncio.sleep(0.02)
        assert "tether/owners/k/ns/cfg" not in model.kv, "deleted once its lifetime was over"
        assert client.calls[-1] == "delete-cas tether/owners/k/ns/cfg"
        calls = len(client.calls)
        await asyncio.sleep(0.3)
        assert len(client.calls) == calls, "idle again"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_the_tombstone_is_written_with_the_guard_of_the_delete_it_replaces() -> None:
    stone = consulkv.tombstone(1_765_000_000.5)
    assert stone == b'{"keys":[],"tombstone":true,"created":1765000000}'
    assert planner.is_tombstone(stone) and planner.is_tombstone(planner.TOMBSTONE)
    assert not planner.is_tombstone(b'{"keys":[]}') and not planner.is_tombstone(None)
    assert consulkv.created_of(stone) == 1_765_000_000 and consulkv.created_of(planner.TOMBSTONE) is None
    step = planner.Step(delete_index=True)
    ops = consulkv.transaction(step, index_key="tether/owners/x", index_revision=42, tombstone=stone)
    value = base64.b64encode(stone).decode()
    assert ops == [{"KV": {"Verb": "cas", "Key": "tether/owners/x", "Value": value, "Index": 42}}]
    # Without a tombstone (the planner's own tests), it is an exact delete as before.
    assert consulkv.transaction(step, index_key="tether/owners/x", index_revision=42) == [
        {"KV": {"Verb": "delete-cas", "Key": "tether/owners/x", "Index": 42}}
    ]


def test_an_entry_read_outside_the_owners_records_is_never_a_tombstone() -> None:
    sweeper = _sweeper(ConsulModel(), FakeClock())
    sweeper.met(Entry("tether/keys/app/a", planner.TOMBSTONE, 7))
    sweeper.met(Entry("tether/owners/k/ns/live", b'{"keys":["app/a"]}', 8))
    assert sweeper.pending() == {}
