"""The config stores' adapters: a planned step in each store's wire shape.

:mod:`tether.config.stores.consulkv` turns every guarded item into one check-and-set
operation (``cas`` with index 0 to create, ``cas`` with the read index to
update, ``delete-cas`` to delete) and guards the owner's index record with
``check-index`` / ``check-not-exists`` when the step leaves it alone;
:mod:`tether.config.stores.etcd` turns guards into compares. Neither ever sends a
recursive or unguarded operation.
"""

from __future__ import annotations

import base64
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.clients.etcd import values as etcd
from tether.config import planner
from tether.config.stores import consulkv as kv
from tether.config.stores import etcd as etcd_store
from tether.config.stores.consulkv import ConsulKVStore
from tether.config.stores.etcd import EtcdStore
from tether.config.values import Committed, Delete, Guard, Put

INDEX = "tether/owners/kubernetes/team-a/cfg"


def item(op: Put | Delete, revision: int) -> planner.Item:
    return planner.Item(op, Guard(op.key, revision))


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


# --------------------------------------------------------------------------- Consul KV


def test_consul_create_update_and_delete_are_check_and_set() -> None:
    step = planner.Step(items=(
        item(Put("tether/keys/app/new", b"kubernetes/team-a/cfg"), 0),
        item(Put("app/new", b"\x00\xffbinary"), 0),
        item(Put("app/old", b"v2"), 7),
        item(Delete("app/gone"), 9),
        item(Delete("tether/keys/app/gone"), 8),
    ))
    ops = kv.transaction(step, index_key=INDEX, index_revision=12)
    assert ops == [
        {"KV": {
            "Verb": "cas", "Key": "tether/keys/app/new", "Value": b64(b"kubernetes/team-a/cfg"), "Index": 0,
        }},
        {"KV": {"Verb": "cas", "Key": "app/new", "Value": b64(b"\x00\xffbinary"), "Index": 0}},
        {"KV": {"Verb": "cas", "Key": "app/old", "Value": b64(b"v2"), "Index": 7}},
        {"KV": {"Verb": "delete-cas", "Key": "app/gone", "Index": 9}},
        {"KV": {"Verb": "delete-cas", "Key": "tether/keys/app/gone", "Index": 8}},
        # The step leaves the index record alone: it is only checked.
        {"KV": {"Verb": "check-index", "Key": INDEX, "Index": 12}},
    ]


def test_consul_index_guard_for_a_record_that_does_not_exist_yet() -> None:
    step = planner.Step(items=(item(Put("app/a", b"1"), 3),))
    ops = kv.transaction(step, index_key=INDEX, index_revision=0)
    assert ops[-1] == {"KV": {"Verb": "check-not-exists", "Key": INDEX}}


def test_consul_index_record_written_or_deleted_by_check_and_set() -> None:
    created = kv.transaction(planner.Step(index=b'{"keys":["app/a"]}'), index_key=INDEX, index_revision=0)
    assert created == [{"KV": {"Verb": "cas", "Key": INDEX, "Value": b64(b'{"keys":["app/a"]}'), "Index": 0}}]
    updated = kv.transaction(planner.Step(index=b'{"keys":[]}'), index_key=INDEX, index_revision=40)
    assert updated[0]["KV"]["Verb"] == "cas" and updated[0]["KV"]["Index"] == 40
    deleted = kv.transaction(planner.Step(delete_index=True), index_key=INDEX, index_revision=41)
    assert deleted == [{"KV": {"Verb": "delete-cas", "Key": INDEX, "Index": 41}}]


def test_consul_delete_of_an_absent_key_only_checks_it_stays_absent() -> None:
    op = kv.operation(Delete("app/x"), Guard("app/x", 0))
    assert op == {"KV": {"Verb": "check-not-exists", "Key": "app/x"}}


_KEYS = st.sampled_from(["app/a", "app/b", "app/c/d", "tether/keys/app/a", "tether/keys/app/b"])


@st.composite
def steps(draw: st.DrawFn) -> tuple[planner.Step, int]:
    keys = draw(st.lists(_KEYS, unique=True, max_size=5))
    items = []
    for key in keys:
        revision = draw(st.integers(0, 50))
        if revision and draw(st.booleans()):
            items.append(item(Delete(key), revision))
        else:
            items.append(item(Put(key, draw(st.binary(max_size=8))), revision))
    index = draw(st.sampled_from([None, b'{"keys":["app/a"]}', "delete"]))
    step = planner.Step(
        items=tuple(items), index=index if isinstance(index, bytes) else None, delete_index=index == "delete"
    )
    return step, draw(st.integers(0 if index != "delete" else 1, 50))


@settings(max_examples=200, deadline=None)
@given(case=steps())
def test_consul_transactions_are_exact_and_fully_guarded(case: tuple[planner.Step, int]) -> None:
    step, index_revision = case
    ops = kv.transaction(step, index_key=INDEX, index_revision=index_revision)
    # One operation per item and one for the index record, on distinct keys.
    assert len(ops) == len(step.items) + 1
    keys = [op["KV"]["Key"] for op in ops]
    assert len(set(keys)) == len(keys) and keys[-1] == INDEX
    for op, planned in zip(ops, step.items, strict=False):
        body: dict[str, Any] = op["KV"]
        assert body["Key"] == planned.op.key
        if isinstance(planned.op, Put):
            assert body["Verb"] == "cas" and body["Index"] == planned.guard.revision
            assert base64.b64decode(body["Value"]) == planned.op.value
        else:
            assert body["Verb"] == "delete-cas" and body["Index"] == planned.guard.revision
    # Only exact, guarded verbs: never set, delete or delete-tree.
    assert {op["KV"]["Verb"] for op in ops} <= {"cas", "delete-cas", "check-index", "check-not-exists"}


class _ConsulClient:
    def __init__(self, answer: tuple[bool, list[dict[str, Any]]]) -> None:
        self.answer = answer
        self.sent: list[list[dict[str, Any]]] = []

    async def kv_get(self, key: str) -> dict[str, Any] | None:
        if key == "app/empty":
            return {"Key": key, "Value": None, "ModifyIndex": 4}
        return None if key == "app/missing" else {"Key": key, "Value": b64(b"v"), "ModifyIndex": 3}

    async def kv_tree(
        self, prefix: str, *, index: int = 0, wait: str = ""
    ) -> tuple[int, list[dict[str, Any]]]:
        return 9, [{"Key": prefix + "a", "Value": b64(b"1"), "ModifyIndex": 5}]

    async def kv_txn(self, ops: list[dict[str, Any]]) -> tuple[bool, list[dict[str, Any]]]:
        self.sent.append(ops)
        return self.answer


async def test_consul_store_reads_entries() -> None:
    store = ConsulKVStore(_ConsulClient((True, [])))
    found = await store.read("app/x")
    assert found is not None and (found.key, found.value, found.revision) == ("app/x", b"v", 3)
    empty = await store.read("app/empty")
    assert empty is not None and empty.value == b""  # Consul's null value
    assert await store.read("app/missing") is None
    (entry,) = await store.read_tree("app/")
    assert (entry.key, entry.value, entry.revision) == ("app/a", b"1", 5)


async def test_consul_store_reports_the_index_of_its_writes() -> None:
    # Checks return the entry as it was (an older index); writes carry the new one.
    results = [{"Key": "app/a", "ModifyIndex": 77}, {"Key": INDEX, "ModifyIndex": 12}]
    store = ConsulKVStore(_ConsulClient((True, results)))
    step = planner.Step(items=(item(Put("app/a", b"1"), 0),))
    assert await store.commit(step, index_key=INDEX, index_revision=12) == Committed(True, 77)
    # Deletes only: Consul says nothing about the index, so neither does the store.
    deletes = planner.Step(items=(item(Delete("app/a"), 77),))
    store = ConsulKVStore(_ConsulClient((True, [{"Key": INDEX, "ModifyIndex": 12}])))
    assert await store.commit(deletes, index_key=INDEX, index_revision=12) == Committed(True, 0)
    store = ConsulKVStore(_ConsulClient((False, [])))
    assert (await store.commit(step, index_key=INDEX, index_revision=12)).succeeded is False


def test_consul_store_limits_are_the_pinned_servers() -> None:
    limits = ConsulKVStore(_ConsulClient((True, []))).limits
    assert (limits.store, limits.max_ops) == ("Consul KV", 128)
    # base64 grows values by 4/3: the largest value must still fit a 512 KiB request.
    assert limits.max_value_bytes * 4 // 3 < 512 * 1024
    assert limits.max_txn_bytes * 4 // 3 < 512 * 1024


# --------------------------------------------------------------------------- etcd


def test_etcd_guards_become_compares() -> None:
    assert etcd_store.compare(Guard("/app/a", 0)) == etcd.Compare(b"/app/a", "version", "=", 0)
    assert etcd_store.compare(Guard("/app/a", 7)) == etcd.Compare(b"/app/a", "mod", "=", 7)


def test_etcd_transaction_guards_every_item_and_the_index() -> None:
    index = "/tether/owners/kubernetes/team-a/cfg"
    step = planner.Step(
        items=(item(Put("/app/a", b"1"), 0), item(Delete("/app/b"), 5)), index=b'{"keys":["/app/a"]}'
    )
    compares, ops = etcd_store.transaction(step, index_key=index, index_revision=4)
    assert compares == [
        etcd.Compare(b"/app/a", "version", "=", 0),
        etcd.Compare(b"/app/b", "mod", "=", 5),
        etcd.Compare(index.encode(), "mod", "=", 4),
    ]
    assert ops == [
        etcd.Put(b"/app/a", b"1"), etcd.Delete(b"/app/b"), etcd.Put(index.encode(), b'{"keys":["/app/a"]}'),
    ]
    compares, ops = etcd_store.transaction(planner.Step(delete_index=True), index_key=index, index_revision=9)
    assert compares == [etcd.Compare(index.encode(), "mod", "=", 9)] and ops == [etcd.Delete(index.encode())]
    only_put = planner.Step(items=step.items[:1])
    compares, ops = etcd_store.transaction(only_put, index_key=index, index_revision=0)
    assert compares[-1] == etcd.Compare(index.encode(), "version", "=", 0) and len(ops) == 1


def test_etcd_keys_that_are_not_utf8_round_trip() -> None:
    raw = b"/app/\xff\xfe"
    assert etcd_store.encode(etcd_store.decode(raw)) == raw
    entry = etcd_store.entry(etcd.KeyValue(raw, b"v", 1, 2, 1))
    assert etcd_store.compare(Guard(entry.key, entry.revision)).key == raw


async def test_etcd_store_commits_one_step_as_one_txn() -> None:
    sent: list[tuple[list[etcd.Compare], list[etcd.Put | etcd.Delete]]] = []

    class Client:
        async def txn(self, compares: Any, success: Any, failure: Any = ()) -> etcd.TxnResult:
            sent.append((list(compares), list(success)))
            return etcd.TxnResult(True, 42)

    store = EtcdStore(Client(), max_txn_ops=16)  # type: ignore[arg-type]
    assert (store.limits.store, store.limits.max_ops) == ("etcd", 16)
    step = planner.Step(items=(item(Put("/a", b"1"), 0),))
    result = await store.commit(step, index_key="/i", index_revision=0)
    assert result == Committed(True, 42) and len(sent) == 1
