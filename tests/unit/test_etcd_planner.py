"""Planner for EtcdConfig: desired keys + what etcd holds → guarded transactions.

The plans are run against a small in-memory model of etcd's KV store (revisions,
compares, all-or-nothing transactions), so the tests check outcomes, not the
shape of the operations: what etcd holds after the plan ran, chunked or not,
interrupted or not.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tether.api import ObjectRef
from tether.etcd import planner
from tether.etcd.client import Compare, Delete, KeyValue, Put, TooManyOps, TxnResult, WatchEvent
from tether.etcd.reconciling import EtcdConfigs
from tether.reconciling import Resource

LAYOUT = planner.Layout("/tether/")
ME = planner.owner_id("kubernetes", "team-a", "cfg")
OTHER = planner.owner_id("kubernetes", "team-b", "other")
FAR = planner.owner_id("west", "team-c", "far")


# --------------------------------------------------------------------------- a model of etcd


class Etcd:
    """etcd's KV semantics that plans rely on: revisions, compares, atomic txns."""

    def __init__(self) -> None:
        self.kv: dict[bytes, KeyValue] = {}
        self.revision = 1
        self.txns = 0

    # Writes by someone else than the planner (a person, another tool).
    def put(self, key: str, value: bytes) -> None:
        self.revision += 1
        self._put(key.encode(), value)

    def delete(self, key: str) -> None:
        self.revision += 1
        self.kv.pop(key.encode(), None)

    def _put(self, key: bytes, value: bytes) -> None:
        old = self.kv.get(key)
        self.kv[key] = KeyValue(
            key, value, old.create_revision if old else self.revision, self.revision,
            old.version + 1 if old else 1,
        )

    def _holds(self, c: Compare) -> bool:
        kv = self.kv.get(c.key)
        if c.target == "value":
            if kv is None:
                return False  # etcd: a value compare on a missing key fails
            actual: int | bytes = kv.value
        else:
            attr = {"version": "version", "create": "create_revision", "mod": "mod_revision"}[c.target]
            actual = getattr(kv, attr) if kv else 0
        if c.op == "=":
            return actual == c.value
        if c.op == "!=":
            return actual != c.value
        if c.op == "<":
            return actual < c.value  # type: ignore[operator]
        return actual > c.value  # type: ignore[operator]

    def txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        keys = [op.key for op in ops]
        assert len(keys) == len(set(keys)), "etcd refuses a key twice in one transaction"
        if not all(self._holds(c) for c in compares):
            return TxnResult(False, self.revision)
        self.txns += 1
        self.revision += 1
        for op in ops:
            if isinstance(op, Put):
                self._put(op.key, op.value)
            else:
                self.kv.pop(op.key, None)
        return TxnResult(True, self.revision)

    # What the reconciler reads for one resource (mirrors EtcdConfigs._observe).
    def observe(self, owner: str, directory: str | None) -> dict[str, object]:
        data: dict[str, KeyValue] = {}
        claims: dict[str, KeyValue] = {}
        index = self.kv.get(LAYOUT.index_key(owner).encode())
        for raw, kv in self.kv.items():
            key = raw.decode()
            if directory is not None and key.startswith(directory):
                data[key] = kv
            full = LAYOUT.full_key_of_claim(key)
            if directory is not None and full is not None and full.startswith(directory):
                claims[full] = kv
        for key in planner.decode_index(index.value if index else None):
            if key.encode() in self.kv:
                data[key] = self.kv[key.encode()]
            claim = self.kv.get(LAYOUT.claim_key(key).encode())
            if claim is not None:
                claims[key] = claim
        return {"data": data, "claims": claims, "index": index}

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        return {k.decode(): (kv.value, kv.mod_revision) for k, kv in self.kv.items()}

    def values(self) -> dict[str, bytes]:
        return {k.decode(): kv.value for k, kv in self.kv.items()}


def make_plan(
    etcd: Etcd, desired: Mapping[str, bytes], *, owner: str = ME, directory: str | None = "/app/",
    prune: bool = True, adopt: bool = False,
) -> planner.Plan:
    seen = etcd.observe(owner, directory)
    return planner.plan(
        owner=owner, layout=LAYOUT, desired=desired, prune=prune, adopt=adopt,
        data=seen["data"], claims=seen["claims"], index=seen["index"],  # type: ignore[arg-type]
    )


def run(
    etcd: Etcd, plan: planner.Plan, *, max_ops: int = 128, max_bytes: int = planner.MAX_TXN_BYTES,
    stop_after: int | None = None,
) -> list[TxnResult]:
    """Execute the plan's steps as the reconciler does; ``stop_after`` simulates a crash."""
    results = []
    index_revision = plan.index_revision
    for n, step in enumerate(planner.steps(plan, max_ops=max_ops, max_bytes=max_bytes)):
        if stop_after is not None and n >= stop_after:
            break
        compares, ops = planner.transaction(step, index_key=plan.index_key, index_revision=index_revision)
        assert len(ops) <= max_ops and len(compares) <= max_ops
        result = etcd.txn(compares, ops)
        results.append(result)
        if not result.succeeded:
            break
        index_revision = planner.index_revision_after(step, index_revision, result.revision)
    return results


def converge(etcd: Etcd, desired: Mapping[str, bytes], **kwargs: object) -> planner.Plan:
    p = make_plan(etcd, desired, **kwargs)  # type: ignore[arg-type]
    assert all(r.succeeded for r in run(etcd, p))
    return p


def claim_of(etcd: Etcd, key: str) -> bytes | None:
    kv = etcd.kv.get(LAYOUT.claim_key(key).encode())
    return kv.value if kv else None


def index_of(etcd: Etcd, owner: str = ME) -> tuple[str, ...] | None:
    kv = etcd.kv.get(LAYOUT.index_key(owner).encode())
    return None if kv is None else planner.decode_index(kv.value)


def owned_by(etcd: Etcd, owner: str) -> set[str]:
    out = set()
    for raw, kv in etcd.kv.items():
        full = LAYOUT.full_key_of_claim(raw.decode())
        if full is not None and kv.value == owner.encode():
            out.add(full)
    return out


# --------------------------------------------------------------------------- layout and validation


def test_owner_id_and_its_description() -> None:
    assert ME == "kubernetes/team-a/cfg"
    assert planner.describe_owner(OTHER.encode(), cluster="kubernetes") == "EtcdConfig team-b/other"
    far = planner.describe_owner(FAR.encode(), cluster="kubernetes")
    assert far == "EtcdConfig team-c/far in cluster west"
    # A cluster name with slashes still parses from the right.
    assert planner.describe_owner(b"a/b/ns/n", cluster="a/b") == "EtcdConfig ns/n"


@pytest.mark.parametrize("raw", [b"secret-looking-garbage", b"\xff\xfe", b"a//n", b""])
def test_unrecognised_claims_are_never_echoed(raw: bytes) -> None:
    text = planner.describe_owner(raw, cluster="kubernetes")
    assert text == "an unrecognised ownership record"


def test_layout_keys() -> None:
    assert LAYOUT.claim_key("/app/x") == "/tether/keys/app/x"
    assert LAYOUT.full_key_of_claim("/tether/keys/app/x") == "/app/x"
    assert LAYOUT.full_key_of_claim("/tether/owners/kubernetes/ns/n") is None
    assert LAYOUT.full_key_of_claim("/tether/keysX/app") is None
    assert LAYOUT.index_key(ME) == "/tether/owners/kubernetes/team-a/cfg"
    assert LAYOUT.reserved("/tether/x")
    assert not LAYOUT.reserved("/tetherx/y") and not LAYOUT.reserved("/tether")
    with pytest.raises(ValueError):
        planner.Layout("tether/")
    with pytest.raises(ValueError):
        planner.Layout("/tether")


@pytest.mark.parametrize(
    ("prefix", "expected"), [("/app/config", "/app/config/"), ("/app/config/", "/app/config/"), ("/", "/")]
)
def test_directory_never_matches_sibling_prefixes(prefix: str, expected: str) -> None:
    assert planner.directory(prefix) == expected


def test_index_encoding_is_canonical() -> None:
    a = planner.encode_index(["/b", "/a", "/b"])
    assert a == planner.encode_index(["/a", "/b"]) == b'{"keys":["/a","/b"]}'
    assert planner.encode_index([]) is None
    assert planner.decode_index(a) == ("/a", "/b")


@pytest.mark.parametrize(
    "raw", [None, b"", b"not json", b"[1,2]", b'{"keys": "x"}', b'{"keys": [1, "relative"]}']
)
def test_damaged_index_lists_nothing(raw: bytes | None) -> None:
    assert planner.decode_index(raw) == ()


def test_prefix_inside_the_reserved_prefix_is_invalid() -> None:
    problem = planner.prefix_problem("/tether/stuff", LAYOUT)
    assert problem is not None and "/tether/" in problem
    assert planner.prefix_problem("/tether", LAYOUT) is not None  # lists as /tether/
    assert planner.prefix_problem("/app", LAYOUT) is None
    assert planner.prefix_problem("/", LAYOUT) is None


def test_keys_reaching_into_the_reserved_prefix_are_invalid() -> None:
    # prefix "/" + relative key "tether/keys/x" would forge a claim.
    problem = planner.desired_problem({"/tether/keys/x": b"v", "/a": b"v"}, LAYOUT)
    assert problem is not None and "/tether/keys/x" in problem


def test_oversized_value_names_the_key_not_the_value() -> None:
    value = b"S3CR3T" * (planner.MAX_VALUE_BYTES // 6 + 1)
    problem = planner.desired_problem({"/app/big": value, "/app/small": b"x"}, LAYOUT)
    assert problem is not None and "/app/big" in problem and "S3CR3T" not in problem
    assert planner.desired_problem({"/app/ok": b"x" * (planner.MAX_VALUE_BYTES - 100)}, LAYOUT) is None


def test_too_many_keys_for_one_index_record() -> None:
    desired = {f"/app/{'k' * 200}/{i}": b"" for i in range(8000)}
    problem = planner.desired_problem(desired, LAYOUT)
    assert problem is not None and "split" in problem


# --------------------------------------------------------------------------- plans


def test_create_claims_and_writes_everything_in_one_transaction() -> None:
    etcd = Etcd()
    desired = {"/app/a": b"1", "/app/b/c": b"2"}
    plan = make_plan(etcd, desired)
    assert plan.conflict is None and plan.put_keys == ("/app/a", "/app/b/c")
    assert plan.claimed_keys == ("/app/a", "/app/b/c")
    assert len(planner.steps(plan)) == 1
    run(etcd, plan)
    assert etcd.txns == 1
    assert {k: v for k, v in etcd.values().items() if k.startswith("/app/")} == desired
    assert claim_of(etcd, "/app/a") == claim_of(etcd, "/app/b/c") == ME.encode()
    assert index_of(etcd) == ("/app/a", "/app/b/c")
    # All data keys share the transaction's revision.
    assert etcd.kv[b"/app/a"].mod_revision == etcd.kv[b"/app/b/c"].mod_revision == etcd.revision


def test_nothing_to_do_when_etcd_matches() -> None:
    etcd = Etcd()
    converge(etcd, {"/app/a": b"1"})
    plan = make_plan(etcd, {"/app/a": b"1"})
    assert plan.noop and planner.steps(plan) == []


def test_changed_value_is_put_guarded_by_its_revision() -> None:
    etcd = Etcd()
    converge(etcd, {"/app/a": b"1", "/app/b": b"2"})
    plan = make_plan(etcd, {"/app/a": b"1", "/app/b": b"3"})
    assert plan.put_keys == ("/app/b",) and plan.claimed_keys == () and plan.deletes == ()
    (item,) = plan.writes
    assert item.op == Put(b"/app/b", b"3")
    assert item.guard == Compare(b"/app/b", "mod", "=", etcd.kv[b"/app/b"].mod_revision)
    # The index does not change, so it is only guarded, not written.
    (step,) = planner.steps(plan)
    assert not step.writes_index


def test_out_of_band_edit_and_delete_are_restored() -> None:
    etcd = Etcd()
    desired = {"/app/a": b"1", "/app/b": b"2"}
    converge(etcd, desired)
    etcd.put("/app/a", b"tampered")
    etcd.delete("/app/b")
    plan = converge(etcd, desired)
    assert plan.put_keys == ("/app/a", "/app/b") and plan.claimed_keys == ()
    assert etcd.values()["/app/a"] == b"1" and etcd.values()["/app/b"] == b"2"


def test_key_owned_by_another_resource_is_a_conflict_and_nothing_is_written() -> None:
    etcd = Etcd()
    converge(etcd, {"/app/shared": b"theirs"}, owner=OTHER)
    before = etcd.snapshot()
    plan = make_plan(etcd, {"/app/mine": b"1", "/app/shared": b"mine"}, adopt=True)
    assert plan.conflict is not None
    assert "key /app/shared is owned by EtcdConfig team-b/other" in plan.conflict
    assert "/app/mine" not in plan.conflict and "theirs" not in plan.conflict
    assert planner.steps(plan) == [] and plan.noop
    assert etcd.snapshot() == before


def test_other_clusters_are_named_in_conflicts() -> None:
    etcd = Etcd()
    converge(etcd, {"/app/x": b"1"}, owner=FAR)
    plan = make_plan(etcd, {"/app/x": b"1"})
    assert plan.conflict is not None and "team-c/far in cluster west" in plan.conflict


def test_unmanaged_key_needs_adopt() -> None:
    etcd = Etcd()
    etcd.put("/app/legacy", b"old")
    plan = make_plan(etcd, {"/app/legacy": b"new", "/app/fresh": b"1"})
    assert plan.conflict is not None
    assert "key /app/legacy exists and is not managed by Tether; set adopt: true" in plan.conflict
    assert "old" not in plan.conflict and "new" not in plan.conflict
    assert planner.steps(plan) == []

    plan = converge(etcd, {"/app/legacy": b"new", "/app/fresh": b"1"}, adopt=True)
    assert plan.claimed_keys == ("/app/fresh", "/app/legacy")
    assert etcd.values()["/app/legacy"] == b"new" and claim_of(etcd, "/app/legacy") == ME.encode()


def test_adopting_an_equal_value_only_claims_it() -> None:
    etcd = Etcd()
    etcd.put("/app/legacy", b"same")
    mod = etcd.kv[b"/app/legacy"].mod_revision
    plan = converge(etcd, {"/app/legacy": b"same"}, adopt=True)
    assert plan.put_keys == () and plan.claimed_keys == ("/app/legacy",)
    assert etcd.kv[b"/app/legacy"].mod_revision == mod


def test_conflict_message_names_a_few_keys_and_counts_the_rest() -> None:
    etcd = Etcd()
    for i in range(6):
        etcd.put(f"/app/k{i}", b"v")
    plan = make_plan(etcd, {f"/app/k{i}": b"w" for i in range(6)})
    assert plan.conflict is not None
    assert "/app/k0" in plan.conflict and "/app/k2" in plan.conflict and "/app/k3" not in plan.conflict
    assert "and 3 more conflicting keys" in plan.conflict
    assert plan.conflict.endswith("Nothing was written.")


def test_prune_deletes_only_owned_keys() -> None:
    etcd = Etcd()
    etcd.put("/app/unrelated", b"keep")
    converge(etcd, {"/app/shared-dir/x": b"1"}, owner=OTHER)
    converge(etcd, {"/app/a": b"1", "/app/b": b"2"})
    plan = converge(etcd, {"/app/a": b"1"})
    assert plan.deleted_keys == ("/app/b",) and plan.released_keys == ()
    values = etcd.values()
    assert "/app/b" not in values and claim_of(etcd, "/app/b") is None
    assert values["/app/unrelated"] == b"keep" and values["/app/shared-dir/x"] == b"1"
    assert index_of(etcd) == ("/app/a",)


def test_without_prune_undeclared_keys_are_released_not_deleted() -> None:
    etcd = Etcd()
    converge(etcd, {"/app/a": b"1", "/app/b": b"2"})
    plan = converge(etcd, {"/app/a": b"1"}, prune=False)
    assert plan.deleted_keys == () and plan.released_keys == ("/app/b",)
    assert etcd.values()["/app/b"] == b"2" and claim_of(etcd, "/app/b") is None
    assert index_of(etcd) == ("/app/a",)
    # Released means unowned: declaring it again needs adopt.
    assert make_plan(etcd, {"/app/a": b"1", "/app/b": b"2"}).conflict is not None


def test_prefix_move_finds_old_keys_through_the_index() -> None:
    etcd = Etcd()
    etcd.put("/old/unrelated", b"keep")
    converge(etcd, {"/old/a": b"1", "/old/b": b"2"}, directory="/old/")
    plan = converge(etcd, {"/new/a": b"1", "/new/b": b"2"}, directory="/new/")
    assert set(plan.deleted_keys) == {"/old/a", "/old/b"}
    values = etcd.values()
    assert values["/new/a"] == b"1" and "/old/a" not in values and values["/old/unrelated"] == b"keep"
    assert owned_by(etcd, ME) == {"/new/a", "/new/b"}
    assert index_of(etcd) == ("/new/a", "/new/b")


def test_claims_missing_from_a_damaged_index_are_still_owned() -> None:
    etcd = Etcd()
    converge(etcd, {"/app/a": b"1", "/app/b": b"2"})
    etcd.put(LAYOUT.index_key(ME), b"garbage")
    plan = converge(etcd, {"/app/a": b"1"})
    assert plan.owned_before == {"/app/a", "/app/b"}
    assert "/app/b" not in etcd.values() and index_of(etcd) == ("/app/a",)


def test_index_entries_without_our_claim_are_not_owned() -> None:
    # A crash after the index grew but before the claims were written.
    etcd = Etcd()
    etcd.put(LAYOUT.index_key(ME), planner.encode_index(["/app/a", "/elsewhere/x"]) or b"")
    etcd.put("/elsewhere/x", b"someone else's")
    plan = converge(etcd, {"/app/a": b"1"})
    assert plan.owned_before == frozenset() and plan.deleted_keys == ()
    assert etcd.values()["/elsewhere/x"] == b"someone else's"
    assert index_of(etcd) == ("/app/a",)


@pytest.mark.parametrize("policy", ["Delete", "Orphan"])
def test_release_with_each_deletion_policy(policy: str) -> None:
    etcd = Etcd()
    etcd.put("/app/unrelated", b"x")
    converge(etcd, {"/app/theirs": b"t"}, owner=OTHER)
    converge(etcd, {"/app/a": b"1", "/app/b": b"2"})
    plan = converge(etcd, {}, prune=policy == "Delete")
    values = etcd.values()
    if policy == "Delete":
        assert plan.deleted_keys == ("/app/a", "/app/b") and "/app/a" not in values
    else:
        assert plan.released_keys == ("/app/a", "/app/b") and values["/app/a"] == b"1"
    assert owned_by(etcd, ME) == set() and index_of(etcd) is None
    assert values["/app/unrelated"] == b"x" and values["/app/theirs"] == b"t"
    assert claim_of(etcd, "/app/theirs") == OTHER.encode()
    assert make_plan(etcd, {}).noop


def test_release_without_a_prefix_uses_the_index() -> None:
    # A spec that no longer parses still releases everything the index lists.
    etcd = Etcd()
    converge(etcd, {"/app/a": b"1"})
    converge(etcd, {}, directory=None)
    assert "/app/a" not in etcd.values() and index_of(etcd) is None


def test_concurrent_change_fails_the_guards_and_writes_nothing() -> None:
    etcd = Etcd()
    converge(etcd, {"/app/a": b"1"})
    plan = make_plan(etcd, {"/app/a": b"2", "/app/b": b"3"})
    etcd.put("/app/a", b"edited meanwhile")
    before = etcd.snapshot()
    (result,) = run(etcd, plan)
    assert not result.succeeded and etcd.snapshot() == before
    # Re-reading gives a plan that succeeds.
    converge(etcd, {"/app/a": b"2", "/app/b": b"3"})
    assert etcd.values()["/app/a"] == b"2"


def test_racing_claim_by_another_resource_fails_the_guards() -> None:
    etcd = Etcd()
    mine = make_plan(etcd, {"/app/x": b"mine"})
    converge(etcd, {"/app/x": b"theirs"}, owner=OTHER)
    (result,) = run(etcd, mine)
    assert not result.succeeded and etcd.values()["/app/x"] == b"theirs"
    assert make_plan(etcd, {"/app/x": b"mine"}).conflict is not None


def test_racing_reconcile_of_the_same_resource_fails_on_the_index_guard() -> None:
    etcd = Etcd()
    converge(etcd, {"/app/a": b"1"})
    first = make_plan(etcd, {"/app/a": b"1", "/app/b": b"2"})
    second = make_plan(etcd, {"/app/a": b"1", "/app/c": b"3"})
    assert all(r.succeeded for r in run(etcd, second))
    (result,) = run(etcd, first)
    assert not result.succeeded
    assert owned_by(etcd, ME) == {"/app/a", "/app/c"} and index_of(etcd) == ("/app/a", "/app/c")


def test_one_transaction_up_to_the_limit_then_chunks() -> None:
    # A new key costs two operations (claim + value); the index record one.
    for count, expected in ((63, 1), (64, 2)):
        etcd = Etcd()
        plan = make_plan(etcd, {f"/app/k{i:03d}": b"v" for i in range(count)})
        assert len(planner.steps(plan)) == expected
        run(etcd, plan)
        assert len(owned_by(etcd, ME)) == count


def test_300_keys_converge_in_ordered_chunks() -> None:
    etcd = Etcd()
    desired = {f"/app/k{i:03d}": f"v{i}".encode() for i in range(300)}
    plan = make_plan(etcd, desired)
    steps = planner.steps(plan)
    assert len(steps) == 5
    # The index grows first and is not written again: the first write covered all.
    assert steps[0].index is not None and not any(s.writes_index for s in steps[1:])
    run(etcd, plan)
    assert {k: v for k, v in etcd.values().items() if k.startswith("/app/")} == desired
    assert make_plan(etcd, desired).noop


def test_large_values_are_split_by_size() -> None:
    etcd = Etcd()
    desired = {f"/app/k{i}": bytes([65 + i]) * 400_000 for i in range(5)}
    plan = make_plan(etcd, desired)
    steps = planner.steps(plan)
    assert len(steps) > 1
    for step in steps:
        assert len(step.items) == 1 or sum(i.size() for i in step.items) <= planner.MAX_TXN_BYTES
    run(etcd, plan)
    assert {k: v for k, v in etcd.values().items() if k.startswith("/app/")} == desired


def test_steps_need_room_for_the_index_guard() -> None:
    plan = make_plan(Etcd(), {"/app/a": b"1"})
    with pytest.raises(ValueError):
        planner.steps(plan, max_ops=1)
    # [index grown to cover the key + its claim], [the value]: the grown
    # index is already the final one.
    steps = planner.steps(plan, max_ops=2)
    assert [(len(s.items), s.writes_index) for s in steps] == [(1, True), (1, False)]


def test_index_revision_is_threaded_through_steps() -> None:
    write = planner.Step(index=b"{}")
    remove = planner.Step(delete_index=True)
    keep = planner.Step()
    assert planner.index_revision_after(write, 5, 9) == 9
    assert planner.index_revision_after(remove, 5, 9) == 0
    assert planner.index_revision_after(keep, 5, 9) == 5
    assert planner.index_guard("/tether/owners/x", 0) == Compare(b"/tether/owners/x", "version", "=", 0)
    assert planner.index_guard("/tether/owners/x", 7) == Compare(b"/tether/owners/x", "mod", "=", 7)


def test_summary() -> None:
    assert planner.summary(["/a"]) == "/a"
    assert planner.summary(["/a", "/b", "/c", "/d", "/e"]) == "/a, /b, /c and 2 more"


# --------------------------------------------------------------------------- properties

RELATIVE = st.sampled_from(["a", "b", "c", "d/e", "d/f", "g/h/i"])
DIRS = st.sampled_from(["/app/", "/app/d/", "/other/"])
VALUES = st.binary(max_size=6)
OWNERS = st.sampled_from([OTHER, FAR])


@dataclass(frozen=True)
class World:
    """An etcd with history: foreign keys, other owners, our earlier state, edits."""

    etcd: Etcd
    foreign: dict[str, bytes]
    theirs: dict[str, str]  # key → other owner


@st.composite
def worlds(draw: st.DrawFn) -> World:
    etcd = Etcd()
    for _ in range(draw(st.integers(0, 3))):
        owner, directory = draw(OWNERS), draw(DIRS)
        keys = draw(st.dictionaries(RELATIVE, VALUES, max_size=3))
        desired = {directory + k: v for k, v in keys.items()}
        p = make_plan(etcd, desired, owner=owner, directory=directory, adopt=True)
        if p.conflict is None:
            run(etcd, p)
    # Our earlier state, possibly under another prefix (a prefix move).
    old_dir = draw(DIRS)
    old = {old_dir + k: v for k, v in draw(st.dictionaries(RELATIVE, VALUES, max_size=4)).items()}
    p = make_plan(etcd, old, directory=old_dir, adopt=draw(st.booleans()))
    if p.conflict is None:
        run(etcd, p, max_ops=draw(st.sampled_from([2, 3, 5, 128])))
    foreign = {}
    for _ in range(draw(st.integers(0, 4))):
        key = draw(DIRS) + draw(RELATIVE)
        if claim_of(etcd, key) is None:
            foreign[key] = draw(VALUES)
            etcd.put(key, foreign[key])
    # Out-of-band edits and deletes of keys that are owned.
    for key in draw(st.lists(st.sampled_from(sorted(owned_by(etcd, ME)) or ["/app/none"]), max_size=2)):
        if draw(st.booleans()):
            etcd.put(key, b"edited")
        else:
            etcd.delete(key)
    theirs = {key: owner for owner in (OTHER, FAR) for key in owned_by(etcd, owner)}
    return World(etcd, foreign, theirs)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, bytes]]:
    directory = draw(DIRS)
    keys = draw(st.dictionaries(RELATIVE, VALUES, max_size=5))
    return directory, {directory + k: v for k, v in keys.items()}


@settings(max_examples=300, deadline=None)
@given(world=worlds(), request=requests(), prune=st.booleans(), adopt=st.booleans(),
       max_ops=st.sampled_from([2, 3, 4, 7, 128]))
def test_a_plan_converges_to_desired_and_touches_nothing_else(
    world: World, request: tuple[str, dict[str, bytes]], prune: bool, adopt: bool, max_ops: int
) -> None:
    directory, desired = request
    etcd = world.etcd
    before = etcd.snapshot()
    owned = owned_by(etcd, ME)
    other_claims = {k: claim_of(etcd, k) for k in world.theirs}

    plan = make_plan(etcd, desired, directory=directory, prune=prune, adopt=adopt)
    blocked_by_owner = any(
        claim_of(etcd, k) not in (None, ME.encode()) for k in desired
    )
    blocked_by_unmanaged = not adopt and any(
        claim_of(etcd, k) is None and k in before for k in desired
    )
    assert (plan.conflict is not None) == (blocked_by_owner or blocked_by_unmanaged)
    if plan.conflict is not None:
        assert planner.steps(plan, max_ops=max_ops) == []
        return

    assert all(r.succeeded for r in run(etcd, plan, max_ops=max_ops))
    after = etcd.snapshot()
    # Exactly the desired values, owned by us, listed in our index.
    for key, value in desired.items():
        assert after[key][0] == value
    assert owned_by(etcd, ME) == set(desired)
    assert index_of(etcd) == (tuple(sorted(desired)) if desired else None)
    # Keys we did not own and do not want are untouched, value and revision.
    for key, state in before.items():
        if LAYOUT.reserved(key) or key in desired or key in owned:
            continue
        assert after.get(key) == state, key
    # Other owners' claims are untouched.
    assert {k: claim_of(etcd, k) for k in world.theirs} == other_claims
    # Owned keys no longer declared: deleted with prune, released (kept) without.
    for key in owned - desired.keys():
        if prune:
            assert key not in after
        else:
            assert after.get(key) == before.get(key)
    # And the next plan has nothing to do.
    assert make_plan(etcd, desired, directory=directory, prune=prune, adopt=adopt).noop


@settings(max_examples=200, deadline=None)
@given(world=worlds(), request=requests(), prune=st.booleans(), max_ops=st.sampled_from([2, 3, 5, 9]),
       crash=st.integers(0, 20))
def test_a_crash_between_chunks_never_orphans_a_key(
    world: World, request: tuple[str, dict[str, bytes]], prune: bool, max_ops: int, crash: int
) -> None:
    directory, desired = request
    etcd = world.etcd
    plan = make_plan(etcd, desired, directory=directory, prune=prune, adopt=True)
    assume(plan.conflict is None)
    run(etcd, plan, max_ops=max_ops, stop_after=crash)
    # Every claim of ours is listed in our index, whatever step we stopped at...
    assert owned_by(etcd, ME) <= set(index_of(etcd) or ())
    # ...so a fresh reconcile (a restarted operator) finishes the job.
    plan = make_plan(etcd, desired, directory=directory, prune=prune, adopt=True)
    assert plan.conflict is None
    run(etcd, plan, max_ops=max_ops)
    assert owned_by(etcd, ME) == set(desired)
    assert all(etcd.values()[k] == v for k, v in desired.items())


@settings(max_examples=200, deadline=None)
@given(world=worlds(), request=requests(), prune=st.booleans(), max_ops=st.integers(2, 12))
def test_chunking_respects_limits_and_gives_the_same_result(
    world: World, request: tuple[str, dict[str, bytes]], prune: bool, max_ops: int
) -> None:
    directory, desired = request
    plan = make_plan(world.etcd, desired, directory=directory, prune=prune, adopt=True)
    assume(plan.conflict is None)
    whole, chunked = world.etcd, Etcd()
    chunked.kv, chunked.revision = dict(whole.kv), whole.revision
    for step in planner.steps(plan, max_ops=max_ops):
        compares, ops = planner.transaction(step, index_key=plan.index_key, index_revision=1)
        assert len(ops) <= max_ops and len(compares) <= max_ops
        keys = [op.key for op in ops]
        assert len(keys) == len(set(keys))
    run(whole, plan)
    run(chunked, plan, max_ops=max_ops)
    assert whole.values() == chunked.values()


@settings(max_examples=200, deadline=None)
@given(world=worlds(), request=requests(), adopt=st.booleans())
def test_operations_never_touch_keys_of_other_owners(
    world: World, request: tuple[str, dict[str, bytes]], adopt: bool
) -> None:
    directory, desired = request
    plan = make_plan(world.etcd, desired, directory=directory, adopt=adopt)
    theirs = {k.encode() for k in world.theirs} | {LAYOUT.claim_key(k).encode() for k in world.theirs}
    touched = {item.op.key for item in (*plan.writes, *plan.deletes)}
    assert not touched & theirs
    # Every operation is guarded by a compare on its own key.
    assert all(item.guard.key == item.op.key for item in (*plan.writes, *plan.deletes))


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.binary(min_size=8, max_size=16), min_size=1, max_size=4), adopt=st.booleans())
def test_conflict_messages_never_contain_values(values: list[bytes], adopt: bool) -> None:
    etcd = Etcd()
    ours = {}
    for i, value in enumerate(values):
        etcd.put(f"/app/k{i}", value + b"-existing")
        ours[f"/app/k{i}"] = value + b"-wanted"
    converge(etcd, {"/app/owned": values[0]}, owner=OTHER)
    ours["/app/owned"] = values[0] + b"-wanted"
    plan = make_plan(etcd, ours, adopt=adopt)
    assert plan.conflict is not None
    for value in values:
        assert value.decode("latin-1") not in plan.conflict
        assert repr(value) not in plan.conflict


@settings(max_examples=100, deadline=None)
@given(request=requests(), max_ops=st.sampled_from([2, 5, 128]))
def test_applying_twice_is_a_noop(request: tuple[str, dict[str, bytes]], max_ops: int) -> None:
    directory, desired = request
    etcd = Etcd()
    run(etcd, make_plan(etcd, desired, directory=directory), max_ops=max_ops)
    revision = etcd.revision
    plan = make_plan(etcd, desired, directory=directory)
    assert plan.noop and run(etcd, plan) == [] and etcd.revision == revision


def test_index_record_is_json_listing_every_key() -> None:
    etcd = Etcd()
    converge(etcd, {"/app/a": b"1", "/app/b": b"2"})
    raw = etcd.kv[LAYOUT.index_key(ME).encode()].value
    assert json.loads(raw) == {"keys": ["/app/a", "/app/b"]}


def test_plans_are_values() -> None:
    plan = make_plan(Etcd(), {"/app/a": b"1"})
    assert replace(plan) == plan and "1" not in repr([i.op for i in plan.writes if isinstance(i.op, Put)])


# --------------------------------------------------------------------------- the reconciler on the model
#
# Not end-to-end (those run against a real etcd): these check the reconciler's
# own logic — outcomes, events, drift bookkeeping, retries — on the model.


class AsyncEtcd:
    """The reconciler's view of etcd (``reconciling.Etcd``) over the model."""

    def __init__(self, etcd: Etcd, *, max_ops: int = 128) -> None:
        self.etcd = etcd
        self.max_ops = max_ops
        self.before_txn: list[Callable[[], None]] = []

    async def get_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        kvs = sorted((kv for k, kv in self.etcd.kv.items() if k.startswith(prefix)), key=lambda kv: kv.key)
        return self.etcd.revision, kvs

    async def get(self, key: bytes) -> KeyValue | None:
        return self.etcd.kv.get(key)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Put | Delete],
        failure: Sequence[Put | Delete] = (),
    ) -> TxnResult:
        if len(success) > self.max_ops or len(compares) > self.max_ops:
            raise TooManyOps("etcdserver: too many operations in txn request")
        for hook in self.before_txn:
            hook()
        return self.etcd.txn(compares, success)

    def watch_prefix(self, prefix: bytes, start_revision: int) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        raise NotImplementedError

    async def status(self) -> int:
        return self.etcd.revision


class Kube:
    def __init__(self) -> None:
        self.config_maps: dict[str, dict[str, bytes]] = {}
        self.secrets: dict[str, dict[str, bytes]] = {}

    async def read_config_map(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return self.config_maps.get(name)

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return self.secrets.get(name)


def resource(name: str, spec: dict[str, Any], *, reconciled: bool = False, revision: int = 0) -> Resource:
    status: dict[str, Any] = {}
    if reconciled:
        status = {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]}
    if revision:
        status["revision"] = revision
    return Resource(ObjectRef("etcdconfigs", "team-a", name), "uid", 1, "1", spec, status, (), False)


def configs(etcd: Etcd, kube: Kube | None = None, **kwargs: Any) -> tuple[EtcdConfigs, AsyncEtcd]:
    client = AsyncEtcd(etcd, **kwargs)
    return EtcdConfigs(client, kube or Kube(), cluster="kubernetes", ownership_prefix="/tether/"), client


def event(kind: Literal["put", "delete"], key: str, value: bytes = b"") -> WatchEvent:
    return WatchEvent(kind, KeyValue(key.encode(), value, 1, 1, 1))


async def test_reconciler_writes_repairs_and_releases() -> None:
    etcd = Etcd()
    kinds, _ = configs(etcd)
    spec = {"prefix": "/app", "data": {"a": "1", "b": "2"}}
    out = await kinds.apply(resource("cfg", spec))
    assert (out.ready, out.reason, out.message) == ("True", "Reconciled", "2 keys under /app in etcd")
    assert out.fields == {"keys": 2, "revision": etcd.revision}
    assert [(n.reason, n.message) for n in out.notes] == [("Written", "wrote 2 keys, deleted 0")]
    written = etcd.revision

    out = await kinds.apply(resource("cfg", spec, reconciled=True, revision=written))
    assert out.notes == () and out.fields == {"keys": 2, "revision": written} and etcd.revision == written

    etcd.put("/app/a", b"tampered")
    out = await kinds.apply(resource("cfg", spec, reconciled=True, revision=written))
    assert [n.reason for n in out.notes] == ["DriftRepaired"] and "/app/a" in out.notes[0].message
    assert etcd.values()["/app/a"] == b"1" and out.fields["revision"] == etcd.revision

    out = await kinds.release(resource("cfg", spec))
    assert out.released and "deleted 2 keys" in out.message
    assert not any(k.startswith(("/app/", "/tether/")) for k in etcd.values())
    assert kinds.tracked_count() == 0


async def test_reconciler_conflict_writes_nothing_and_retries() -> None:
    etcd = Etcd()
    converge(etcd, {"/app/a": b"theirs"}, owner=planner.owner_id("kubernetes", "team-a", "first"))
    before = etcd.snapshot()
    kinds, _ = configs(etcd)
    out = await kinds.apply(resource("second", {"prefix": "/app", "data": {"a": "mine", "b": "x"}}))
    assert (out.ready, out.reason, out.retry) == ("False", "Conflict", True)
    assert "/app/a" in out.message and "team-a/first" in out.message and "theirs" not in out.message
    assert etcd.snapshot() == before and kinds.tracked_count() == 0


async def test_reconciler_resolves_sources_in_order_and_reports_missing_ones() -> None:
    etcd, kube = Etcd(), Kube()
    kinds, _ = configs(etcd, kube)
    spec = {
        "prefix": "/app",
        "from": [{"configMapRef": {"name": "cm"}}, {"secretRef": {"name": "sec"}},
                 {"configMapRef": {"name": "maybe", "optional": True}}],
        "data": {"k": "from-data"},
    }
    out = await kinds.apply(resource("src", spec))
    assert (out.reason, out.retry) == ("InvalidSpec", False)
    assert out.message == "ConfigMap team-a/cm not found (set optional: true to ignore it)"
    ref = ObjectRef("etcdconfigs", "team-a", "src")
    assert kinds.dependents("configMap", "team-a", "cm") == [ref]
    assert kinds.dependents("secret", "team-a", "sec") == [ref]
    assert kinds.dependents("configMap", "team-a", "maybe") == [ref]
    assert kinds.dependents("configMap", "team-b", "cm") == []

    kube.config_maps["cm"] = {"k": b"cm", "c": b"cm", "only-cm": b"1"}
    kube.secrets["sec"] = {"c": b"hunter2-secret", "p": b"pw"}
    out = await kinds.apply(resource("src", spec))
    assert out.ready == "True"
    values = {k: v for k, v in etcd.values().items() if k.startswith("/app/")}
    assert values == {
        "/app/k": b"from-data", "/app/c": b"hunter2-secret", "/app/p": b"pw", "/app/only-cm": b"1",
    }
    everything = repr(out)
    assert "hunter2" not in everything and "pw'" not in everything

    kinds.forget(ref)
    assert kinds.dependents("configMap", "team-a", "cm") == []


async def test_reconciler_rejects_keys_that_sources_cannot_give() -> None:
    kube = Kube()
    kube.config_maps["cm"] = {"..": b"x"}
    kinds, _ = configs(Etcd(), kube)
    out = await kinds.apply(resource("bad", {"prefix": "/app", "from": [{"configMapRef": {"name": "cm"}}]}))
    assert out.reason == "InvalidSpec" and "ConfigMap team-a/cm: key '..'" in out.message
    out = await kinds.apply(resource("reserved", {"prefix": "/tether/x", "data": {"a": "1"}}))
    assert out.reason == "InvalidSpec" and "/tether/" in out.message


async def test_reconciler_learns_a_lower_server_transaction_limit() -> None:
    etcd = Etcd()
    kinds, client = configs(etcd, max_ops=5)
    out = await kinds.apply(resource("big", {"prefix": "/app", "data": {f"k{i}": "v" for i in range(40)}}))
    owner = kinds.owner(ObjectRef("etcdconfigs", "team-a", "big"))
    assert out.ready == "True" and len(owned_by(etcd, owner)) == 40
    assert kinds._txn_ops <= client.max_ops


async def test_reconciler_gives_up_after_repeated_races() -> None:
    etcd = Etcd()
    kinds, client = configs(etcd)
    client.before_txn.append(lambda: etcd.put("/app/a", b"racing writer"))
    etcd.put("/app/a", b"x")
    out = await kinds.apply(resource("race", {"prefix": "/app", "adopt": True, "data": {"a": "1"}}))
    assert (out.reason, out.retry) == ("Conflict", True) and "kept changing" in out.message


async def test_drift_detection_ignores_own_writes_and_sees_everything_else() -> None:
    etcd = Etcd()
    kinds, _ = configs(etcd)
    await kinds.apply(resource("cfg", {"prefix": "/app", "data": {"a": "1"}}))
    ref = ObjectRef("etcdconfigs", "team-a", "cfg")
    claim, index = LAYOUT.claim_key("/app/a"), LAYOUT.index_key(kinds.owner(ref))
    assert kinds.tracked_count() == 1
    own_writes = [event("put", "/app/a", b"1"), event("put", claim, kinds.owner(ref).encode())]
    assert kinds.drifted(own_writes) == set()
    assert kinds.drifted([event("put", index, etcd.kv[index.encode()].value)]) == set()
    assert kinds.drifted([event("put", "/app/a", b"2")]) == {ref}
    assert kinds.drifted([event("delete", "/app/a")]) == {ref}
    assert kinds.drifted([event("delete", claim)]) == {ref}
    assert kinds.drifted([event("put", claim, OTHER.encode())]) == {ref}
    assert kinds.drifted([event("delete", index)]) == {ref}
    assert kinds.drifted([event("put", "/app/unrelated", b"x"), event("delete", "/other")]) == set()
    kinds.forget(ref)
    assert kinds.drifted([event("delete", "/app/a")]) == set() and kinds.tracked_count() == 0
