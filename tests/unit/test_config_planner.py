"""The config engine's planner: desired keys + what the store holds → guarded transactions.

Every test runs for both stores: etcd (rooted keys, ownership under
``/tether/``, 128 operations per transaction) and Consul KV (keys without a
leading ``/``, ownership under ``tether/``, 64 operations). The plans are run
through each store's own translation (``etcd.store.transaction``,
``consul.kv.transaction``) against an in-memory model of that store's
transaction semantics (:mod:`kvmodels`), so the tests check outcomes, not
the shape of the operations: what the store holds after the plan ran,
chunked or not, interrupted or not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from kvmodels import MODELS, Model

from tether.config import planner
from tether.config.values import Committed, Entry, Guard, Put

BACKENDS = sorted(MODELS)
ME = planner.owner_id("kubernetes", "team-a", "cfg")
OTHER = planner.owner_id("kubernetes", "team-b", "other")
FAR = planner.owner_id("west", "team-c", "far")
ETCD = planner.Layout("/tether/", rooted=True)
CONSUL = planner.Layout("tether/", rooted=False)


@pytest.fixture(params=BACKENDS)
def m(request: pytest.FixtureRequest) -> Model:
    return MODELS[request.param]()


# --------------------------------------------------------------------------- running plans on a model


def observe(
    m: Model, owner: str, directory: str | None
) -> tuple[dict[str, Entry], dict[str, Entry], Entry | None]:
    """What the reconciler reads for one resource (mirrors ``ConfigReconciler._observe``)."""
    layout = m.layout
    entries = m.entries()
    index = entries.get(layout.index_key(owner))
    data: dict[str, Entry] = {}
    claims: dict[str, Entry] = {}
    if directory is not None:
        for key, e in entries.items():
            if key.startswith(directory):
                data[key] = e
            if key.startswith(layout.claim_key(directory)):
                full = layout.full_key_of_claim(key)
                assert full is not None
                claims[full] = e
    for key in planner.decode_index(index.value if index else None, layout):
        if key in entries:
            data[key] = entries[key]
        claim = entries.get(layout.claim_key(key))
        if claim is not None:
            claims[key] = claim
    return data, claims, index


def make_plan(
    m: Model, desired: Mapping[str, bytes], *, owner: str = ME, directory: str | None = "app/",
    prune: bool = True, adopt: bool = False,
) -> planner.Plan:
    """Plan for ``desired``; ``directory`` is a path (``app/``), turned into the store's key."""
    data, claims, index = observe(m, owner, None if directory is None else m.k(directory))
    return planner.plan(
        owner=owner, layout=m.layout, desired=desired, data=data, claims=claims, index=index,
        prune=prune, adopt=adopt, kind=m.kind,
    )


def steps(m: Model, plan: planner.Plan, *, max_ops: int | None = None) -> list[planner.Step]:
    limits = m.limits
    return planner.steps(plan, max_ops=max_ops or limits.max_ops, max_bytes=limits.max_txn_bytes)


def run(
    m: Model, plan: planner.Plan, *, max_ops: int | None = None, stop_after: int | None = None,
) -> list[Committed]:
    """Execute the plan's steps as the reconciler does; ``stop_after`` simulates a crash."""
    max_ops = max_ops or m.limits.max_ops
    results = []
    index_revision = plan.index_revision
    for n, step in enumerate(steps(m, plan, max_ops=max_ops)):
        if stop_after is not None and n >= stop_after:
            break
        result = m.commit(step, index_key=plan.index_key, index_revision=index_revision, max_ops=max_ops)
        results.append(result)
        if not result.succeeded:
            break
        index_revision = planner.index_revision_after(step, index_revision, result.revision)
    return results


def converge(m: Model, desired: Mapping[str, bytes], **kwargs: object) -> planner.Plan:
    p = make_plan(m, desired, **kwargs)  # type: ignore[arg-type]
    assert all(r.succeeded for r in run(m, p))
    return p


def claim_of(m: Model, key: str) -> bytes | None:
    e = m.entry(m.layout.claim_key(key))
    return e.value if e else None


def index_of(m: Model, owner: str = ME) -> tuple[str, ...] | None:
    e = m.entry(m.layout.index_key(owner))
    return None if e is None else planner.decode_index(e.value, m.layout)


def owned_by(m: Model, owner: str) -> set[str]:
    out = set()
    for key, e in m.entries().items():
        full = m.layout.full_key_of_claim(key)
        if full is not None and e.value == owner.encode():
            out.add(full)
    return out


def under(m: Model, path: str) -> dict[str, bytes]:
    return {k: v for k, v in m.values().items() if k.startswith(m.k(path))}


# --------------------------------------------------------------------------- layout and validation


@pytest.mark.parametrize("kind", ["EtcdConfig", "ConsulConfig"])
def test_owner_id_and_its_description(kind: str) -> None:
    assert ME == "kubernetes/team-a/cfg"
    assert planner.describe_owner(OTHER.encode(), cluster="kubernetes", kind=kind) == f"{kind} team-b/other"
    far = planner.describe_owner(FAR.encode(), cluster="kubernetes", kind=kind)
    assert far == f"{kind} team-c/far in cluster west"
    # A cluster name with slashes still parses from the right.
    assert planner.describe_owner(b"a/b/ns/n", cluster="a/b", kind=kind) == f"{kind} ns/n"


@pytest.mark.parametrize("raw", [b"secret-looking-garbage", b"\xff\xfe", b"a//n", b""])
def test_unrecognised_claims_are_never_echoed(raw: bytes) -> None:
    text = planner.describe_owner(raw, cluster="kubernetes", kind="EtcdConfig")
    assert text == "an unrecognised ownership record"


def test_etcd_layout_keys() -> None:
    assert ETCD.claim_key("/app/x") == "/tether/keys/app/x"
    assert ETCD.full_key_of_claim("/tether/keys/app/x") == "/app/x"
    assert ETCD.full_key_of_claim("/tether/owners/kubernetes/ns/n") is None
    assert ETCD.full_key_of_claim("/tether/keysX/app") is None
    assert ETCD.full_key_of_claim("/tether/keys/") is None
    assert ETCD.index_key(ME) == "/tether/owners/kubernetes/team-a/cfg"
    assert ETCD.reserved("/tether/x")
    assert not ETCD.reserved("/tetherx/y") and not ETCD.reserved("/tether")
    assert ETCD.valid_key("/app/x") and not ETCD.valid_key("app/x") and not ETCD.valid_key("")
    with pytest.raises(ValueError):
        planner.Layout("tether/")
    with pytest.raises(ValueError):
        planner.Layout("/tether")
    with pytest.raises(ValueError):
        planner.Layout("/")


def test_consul_layout_keys() -> None:
    assert CONSUL.claim_key("app/x") == "tether/keys/app/x"
    assert CONSUL.full_key_of_claim("tether/keys/app/x") == "app/x"
    assert CONSUL.full_key_of_claim("tether/owners/kubernetes/ns/n") is None
    assert CONSUL.full_key_of_claim("/tether/keys/app/x") is None
    assert CONSUL.index_key(ME) == "tether/owners/kubernetes/team-a/cfg"
    assert CONSUL.reserved("tether/x")
    assert not CONSUL.reserved("tetherx/y") and not CONSUL.reserved("/tether/x")
    assert CONSUL.valid_key("app/x") and not CONSUL.valid_key("/app/x") and not CONSUL.valid_key("")
    with pytest.raises(ValueError):
        planner.Layout("/tether/", rooted=False)
    with pytest.raises(ValueError):
        planner.Layout("tether", rooted=False)


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("/app/config", "/app/config/"), ("/app/config/", "/app/config/"), ("/", "/"),
        ("shop/payments", "shop/payments/"), ("shop/payments/", "shop/payments/"),
    ],
)
def test_directory_never_matches_sibling_prefixes(prefix: str, expected: str) -> None:
    assert planner.directory(prefix) == expected


def test_index_encoding_is_canonical() -> None:
    a = planner.encode_index(["/b", "/a", "/b"])
    assert a == planner.encode_index(["/a", "/b"]) == b'{"keys":["/a","/b"]}'
    assert planner.encode_index([]) is None
    assert planner.decode_index(a, ETCD) == ("/a", "/b")
    c = planner.encode_index(["shop/b", "shop/a"])
    assert planner.decode_index(c, CONSUL) == ("shop/a", "shop/b")


def test_an_index_lists_only_keys_of_its_store_shape() -> None:
    mixed = planner.encode_index(["/app/a", "app/b"])
    assert planner.decode_index(mixed, ETCD) == ("/app/a",)
    assert planner.decode_index(mixed, CONSUL) == ("app/b",)


@pytest.mark.parametrize(
    "raw", [None, b"", b"not json", b"[1,2]", b'{"keys": "x"}', b'{"keys": [1, "%s"]}']
)
def test_damaged_index_lists_nothing(m: Model, raw: bytes | None) -> None:
    if raw is not None and b"%s" in raw:
        # A key of the other store's shape.
        raw = raw.replace(b"%s", b"app/x" if m.layout.rooted else b"/app/x")
    assert planner.decode_index(raw, m.layout) == ()


def test_prefix_inside_the_reserved_prefix_is_invalid(m: Model) -> None:
    problem = planner.prefix_problem(m.k("tether/stuff"), m.layout)
    assert problem is not None and m.layout.ownership_prefix in problem
    assert planner.prefix_problem(m.k("tether"), m.layout) is not None  # lists as .../tether/
    assert planner.prefix_problem(m.k("app"), m.layout) is None
    assert planner.prefix_problem(m.k("tetherx"), m.layout) is None


def test_root_prefix_of_etcd_is_valid() -> None:
    assert planner.prefix_problem("/", ETCD) is None


def test_keys_reaching_into_the_reserved_prefix_are_invalid(m: Model) -> None:
    # prefix "/" (etcd) or "tether" + relative keys would forge a claim.
    forged = m.k("tether/keys/x")
    problem = planner.desired_problem({forged: b"v", m.k("a"): b"v"}, m.layout, m.limits, kind=m.kind)
    assert problem is not None and forged in problem


def test_oversized_value_names_the_key_not_the_value(m: Model) -> None:
    limit = m.limits.max_value_bytes
    value = b"S3CR3T" * (limit // 6 + 1)
    problem = planner.desired_problem(
        {m.k("app/big"): value, m.k("app/small"): b"x"}, m.layout, m.limits, kind=m.kind
    )
    assert problem is not None and m.k("app/big") in problem and "S3CR3T" not in problem
    assert m.limits.store in problem
    ok = {m.k("app/ok"): b"x" * (limit - 100)}
    assert planner.desired_problem(ok, m.layout, m.limits, kind=m.kind) is None


def test_too_many_keys_for_one_index_record(m: Model) -> None:
    desired = {m.k(f"app/{'k' * 200}/{i}"): b"" for i in range(8000)}
    problem = planner.desired_problem(desired, m.layout, m.limits, kind=m.kind)
    assert problem is not None and "split" in problem and m.kind in problem


# --------------------------------------------------------------------------- plans


def test_create_claims_and_writes_everything_in_one_transaction(m: Model) -> None:
    k = m.k
    desired = {k("app/a"): b"1", k("app/b/c"): b"2"}
    plan = make_plan(m, desired)
    assert plan.conflict is None and plan.put_keys == (k("app/a"), k("app/b/c"))
    assert plan.claimed_keys == (k("app/a"), k("app/b/c"))
    assert len(steps(m, plan)) == 1
    run(m, plan)
    assert m.txns == 1
    assert under(m, "app/") == desired
    assert claim_of(m, k("app/a")) == claim_of(m, k("app/b/c")) == ME.encode()
    assert index_of(m) == (k("app/a"), k("app/b/c"))
    # All data keys share the transaction's revision / index.
    a, c = m.entry(k("app/a")), m.entry(k("app/b/c"))
    assert a is not None and c is not None
    assert a.revision == c.revision == m.stamp


def test_nothing_to_do_when_the_store_matches(m: Model) -> None:
    converge(m, {m.k("app/a"): b"1"})
    plan = make_plan(m, {m.k("app/a"): b"1"})
    assert plan.noop and steps(m, plan) == []


def test_changed_value_is_put_guarded_by_its_revision(m: Model) -> None:
    k = m.k
    converge(m, {k("app/a"): b"1", k("app/b"): b"2"})
    plan = make_plan(m, {k("app/a"): b"1", k("app/b"): b"3"})
    assert plan.put_keys == (k("app/b"),) and plan.claimed_keys == () and plan.deletes == ()
    (item,) = plan.writes
    b = m.entry(k("app/b"))
    assert b is not None
    assert item.op == Put(k("app/b"), b"3")
    assert item.guard == Guard(k("app/b"), b.revision) and not item.guard.absent
    # The index does not change, so it is only guarded, not written.
    (step,) = steps(m, plan)
    assert not step.writes_index


def test_out_of_band_edit_and_delete_are_restored(m: Model) -> None:
    k = m.k
    desired = {k("app/a"): b"1", k("app/b"): b"2"}
    converge(m, desired)
    m.put(k("app/a"), b"tampered")
    m.delete(k("app/b"))
    plan = converge(m, desired)
    assert plan.put_keys == (k("app/a"), k("app/b")) and plan.claimed_keys == ()
    assert under(m, "app/") == desired


def test_key_owned_by_another_resource_is_a_conflict_and_nothing_is_written(m: Model) -> None:
    k = m.k
    converge(m, {k("app/shared"): b"theirs"}, owner=OTHER)
    before = m.snapshot()
    plan = make_plan(m, {k("app/mine"): b"1", k("app/shared"): b"mine"}, adopt=True)
    assert plan.conflict is not None
    assert f"key {k('app/shared')} is owned by {m.kind} team-b/other" in plan.conflict
    assert k("app/mine") not in plan.conflict and "theirs" not in plan.conflict
    assert steps(m, plan) == [] and plan.noop
    assert m.snapshot() == before


def test_other_clusters_are_named_in_conflicts(m: Model) -> None:
    converge(m, {m.k("app/x"): b"1"}, owner=FAR)
    plan = make_plan(m, {m.k("app/x"): b"1"})
    assert plan.conflict is not None and "team-c/far in cluster west" in plan.conflict


def test_unmanaged_key_needs_adopt(m: Model) -> None:
    k = m.k
    m.put(k("app/legacy"), b"old")
    plan = make_plan(m, {k("app/legacy"): b"new", k("app/fresh"): b"1"})
    assert plan.conflict is not None
    assert f"key {k('app/legacy')} exists and is not managed by Tether; set adopt: true" in plan.conflict
    assert "old" not in plan.conflict and "new" not in plan.conflict
    assert steps(m, plan) == []

    plan = converge(m, {k("app/legacy"): b"new", k("app/fresh"): b"1"}, adopt=True)
    assert plan.claimed_keys == (k("app/fresh"), k("app/legacy"))
    assert m.values()[k("app/legacy")] == b"new" and claim_of(m, k("app/legacy")) == ME.encode()


def test_adopting_an_equal_value_only_claims_it(m: Model) -> None:
    k = m.k
    m.put(k("app/legacy"), b"same")
    before = m.entry(k("app/legacy"))
    plan = converge(m, {k("app/legacy"): b"same"}, adopt=True)
    assert plan.put_keys == () and plan.claimed_keys == (k("app/legacy"),)
    assert m.entry(k("app/legacy")) == before


def test_conflict_message_names_a_few_keys_and_counts_the_rest(m: Model) -> None:
    k = m.k
    for i in range(6):
        m.put(k(f"app/k{i}"), b"v")
    plan = make_plan(m, {k(f"app/k{i}"): b"w" for i in range(6)})
    assert plan.conflict is not None
    assert k("app/k0") in plan.conflict and k("app/k2") in plan.conflict and k("app/k3") not in plan.conflict
    assert "and 3 more conflicting keys" in plan.conflict
    assert plan.conflict.endswith("Nothing was written.")


def test_prune_deletes_only_owned_keys(m: Model) -> None:
    k = m.k
    m.put(k("app/unrelated"), b"keep")
    converge(m, {k("app/shared-dir/x"): b"1"}, owner=OTHER)
    converge(m, {k("app/a"): b"1", k("app/b"): b"2"})
    plan = converge(m, {k("app/a"): b"1"})
    assert plan.deleted_keys == (k("app/b"),) and plan.released_keys == ()
    values = m.values()
    assert k("app/b") not in values and claim_of(m, k("app/b")) is None
    assert values[k("app/unrelated")] == b"keep" and values[k("app/shared-dir/x")] == b"1"
    assert index_of(m) == (k("app/a"),)


def test_without_prune_undeclared_keys_are_released_not_deleted(m: Model) -> None:
    k = m.k
    converge(m, {k("app/a"): b"1", k("app/b"): b"2"})
    plan = converge(m, {k("app/a"): b"1"}, prune=False)
    assert plan.deleted_keys == () and plan.released_keys == (k("app/b"),)
    assert m.values()[k("app/b")] == b"2" and claim_of(m, k("app/b")) is None
    assert index_of(m) == (k("app/a"),)
    # Released means unowned: declaring it again needs adopt.
    assert make_plan(m, {k("app/a"): b"1", k("app/b"): b"2"}).conflict is not None


def test_prefix_move_finds_old_keys_through_the_index(m: Model) -> None:
    k = m.k
    m.put(k("old/unrelated"), b"keep")
    converge(m, {k("old/a"): b"1", k("old/b"): b"2"}, directory="old/")
    plan = converge(m, {k("new/a"): b"1", k("new/b"): b"2"}, directory="new/")
    assert set(plan.deleted_keys) == {k("old/a"), k("old/b")}
    values = m.values()
    assert values[k("new/a")] == b"1" and k("old/a") not in values and values[k("old/unrelated")] == b"keep"
    assert owned_by(m, ME) == {k("new/a"), k("new/b")}
    assert index_of(m) == (k("new/a"), k("new/b"))


def test_claims_missing_from_a_damaged_index_are_still_owned(m: Model) -> None:
    k = m.k
    converge(m, {k("app/a"): b"1", k("app/b"): b"2"})
    m.put(m.layout.index_key(ME), b"garbage")
    plan = converge(m, {k("app/a"): b"1"})
    assert plan.owned_before == {k("app/a"), k("app/b")}
    assert k("app/b") not in m.values() and index_of(m) == (k("app/a"),)


def test_index_entries_whose_claim_was_lost_are_still_owned(m: Model) -> None:
    # The index never lists a key before its claim commits (steps() grows it in
    # the same transaction), so a listed key without a claim lost its claim out
    # of band (issue 14): the claim is restored, and pruning still finds it.
    k = m.k
    m.put(m.layout.index_key(ME), planner.encode_index([k("app/a"), k("elsewhere/x")]) or b"")
    m.put(k("app/a"), b"1")
    m.put(k("elsewhere/x"), b"ours, claim lost")
    plan = converge(m, {k("app/a"): b"1"})
    assert plan.conflict is None and plan.deleted_keys == (k("elsewhere/x"),)
    assert claim_of(m, k("app/a")) == ME.encode() and k("elsewhere/x") not in m.values()
    assert index_of(m) == (k("app/a"),)


@pytest.mark.parametrize("policy", ["Delete", "Orphan"])
def test_release_with_each_deletion_policy(m: Model, policy: str) -> None:
    k = m.k
    m.put(k("app/unrelated"), b"x")
    converge(m, {k("app/theirs"): b"t"}, owner=OTHER)
    converge(m, {k("app/a"): b"1", k("app/b"): b"2"})
    plan = converge(m, {}, prune=policy == "Delete")
    values = m.values()
    if policy == "Delete":
        assert plan.deleted_keys == (k("app/a"), k("app/b")) and k("app/a") not in values
    else:
        assert plan.released_keys == (k("app/a"), k("app/b")) and values[k("app/a")] == b"1"
    assert owned_by(m, ME) == set() and index_of(m) is None
    assert values[k("app/unrelated")] == b"x" and values[k("app/theirs")] == b"t"
    assert claim_of(m, k("app/theirs")) == OTHER.encode()
    assert make_plan(m, {}).noop


def test_release_without_a_prefix_uses_the_index(m: Model) -> None:
    # A spec that no longer parses still releases everything the index lists.
    converge(m, {m.k("app/a"): b"1"})
    converge(m, {}, directory=None)
    assert m.k("app/a") not in m.values() and index_of(m) is None


def test_concurrent_change_fails_the_guards_and_writes_nothing(m: Model) -> None:
    k = m.k
    converge(m, {k("app/a"): b"1"})
    plan = make_plan(m, {k("app/a"): b"2", k("app/b"): b"3"})
    m.put(k("app/a"), b"edited meanwhile")
    before = m.snapshot()
    (result,) = run(m, plan)
    assert not result.succeeded and m.snapshot() == before
    # Re-reading gives a plan that succeeds.
    converge(m, {k("app/a"): b"2", k("app/b"): b"3"})
    assert m.values()[k("app/a")] == b"2"


def test_key_created_meanwhile_fails_the_guards(m: Model) -> None:
    k = m.k
    plan = make_plan(m, {k("app/a"): b"mine"})
    m.put(k("app/a"), b"someone else's")
    before = m.snapshot()
    (result,) = run(m, plan)
    assert not result.succeeded and m.snapshot() == before


def test_racing_claim_by_another_resource_fails_the_guards(m: Model) -> None:
    k = m.k
    mine = make_plan(m, {k("app/x"): b"mine"})
    converge(m, {k("app/x"): b"theirs"}, owner=OTHER)
    (result,) = run(m, mine)
    assert not result.succeeded and m.values()[k("app/x")] == b"theirs"
    assert make_plan(m, {k("app/x"): b"mine"}).conflict is not None


def test_racing_reconcile_of_the_same_resource_fails_on_the_index_guard(m: Model) -> None:
    k = m.k
    converge(m, {k("app/a"): b"1"})
    first = make_plan(m, {k("app/a"): b"1", k("app/b"): b"2"})
    second = make_plan(m, {k("app/a"): b"1", k("app/c"): b"3"})
    assert all(r.succeeded for r in run(m, second))
    (result,) = run(m, first)
    assert not result.succeeded
    assert owned_by(m, ME) == {k("app/a"), k("app/c")} and index_of(m) == (k("app/a"), k("app/c"))


def test_an_unchanged_index_is_still_guarded(m: Model) -> None:
    """A step that leaves the index alone must still fail if it moved (another replica)."""
    k = m.k
    converge(m, {k("app/a"): b"1"})
    plan = make_plan(m, {k("app/a"): b"2"})
    (step,) = steps(m, plan)
    assert not step.writes_index
    index_key = m.layout.index_key(ME)
    raw = m.entry(index_key)
    assert raw is not None
    m.put(index_key, raw.value)  # same value, new revision
    (result,) = run(m, plan)
    assert not result.succeeded and m.values()[k("app/a")] == b"1"


def test_one_transaction_up_to_the_limit_then_chunks(m: Model) -> None:
    # A new key costs two operations (claim + value); the index record one more,
    # and every transaction guards it.
    fits = (m.limits.max_ops - 1) // 2
    for count, expected in ((fits, 1), (fits + 1, 2)):
        model = type(m)()
        plan = make_plan(model, {model.k(f"app/k{i:03d}"): b"v" for i in range(count)})
        assert len(steps(model, plan)) == expected, count
        run(model, plan)
        assert len(owned_by(model, ME)) == count


def test_300_keys_converge_in_ordered_chunks(m: Model) -> None:
    desired = {m.k(f"app/k{i:03d}"): f"v{i}".encode() for i in range(300)}
    plan = make_plan(m, desired)
    chunks = steps(m, plan)
    # 600 items (claim + value each), each transaction also guarding the index.
    assert len(chunks) == math.ceil(600 / (m.limits.max_ops - 1))
    # The index grows in each transaction that claims keys, never ahead of the claims.
    assert all(s.writes_index for s in chunks)
    run(m, plan)
    assert under(m, "app/") == desired
    assert make_plan(m, desired).noop


def test_large_values_are_split_by_size_and_fit_the_server(m: Model) -> None:
    size = m.limits.max_txn_bytes * 2 // 5
    desired = {m.k(f"app/k{i}"): bytes([65 + i]) * size for i in range(5)}
    # As large as the store takes at all: it goes out alone, and still fits one request.
    desired[m.k("app/huge")] = b"h" * (m.limits.max_value_bytes - 1024)
    assert planner.desired_problem(desired, m.layout, m.limits, kind=m.kind) is None
    plan = make_plan(m, desired)
    chunks = steps(m, plan)
    assert len(chunks) > 1
    for step in chunks:
        assert len(step.items) == 1 or sum(i.size() for i in step.items) <= m.limits.max_txn_bytes
    # The models refuse any request above the server's real limit.
    assert all(r.succeeded for r in run(m, plan))
    assert under(m, "app/") == desired


def test_steps_need_room_for_the_index_guard(m: Model) -> None:
    plan = make_plan(m, {m.k("app/a"): b"1"})
    with pytest.raises(ValueError):
        planner.steps(plan, max_ops=1, max_bytes=m.limits.max_txn_bytes)
    # [index grown to cover the key + its claim], [the value]: the grown
    # index is already the final one.
    chunks = steps(m, plan, max_ops=2)
    assert [(len(s.items), s.writes_index) for s in chunks] == [(1, True), (1, False)]
    assert all(r.succeeded for r in run(m, plan, max_ops=2))
    assert under(m, "app/") == {m.k("app/a"): b"1"}


def test_index_revision_is_threaded_through_steps() -> None:
    write = planner.Step(index=b"{}")
    remove = planner.Step(delete_index=True)
    keep = planner.Step()
    assert planner.index_revision_after(write, 5, 9) == 9
    assert planner.index_revision_after(remove, 5, 9) == 0
    assert planner.index_revision_after(keep, 5, 9) == 5
    assert planner.index_guard("tether/owners/x", 0) == Guard("tether/owners/x", 0)
    assert planner.index_guard("tether/owners/x", 0).absent
    assert not planner.index_guard("tether/owners/x", 7).absent


def test_summary() -> None:
    assert planner.summary(["/a"]) == "/a"
    assert planner.summary(["/a", "/b", "/c", "/d", "/e"]) == "/a, /b, /c and 2 more"


def test_index_record_is_json_listing_every_key(m: Model) -> None:
    converge(m, {m.k("app/a"): b"1", m.k("app/b"): b"2"})
    raw = m.entry(m.layout.index_key(ME))
    assert raw is not None
    assert json.loads(raw.value) == {"keys": [m.k("app/a"), m.k("app/b")]}


def test_plans_are_values(m: Model) -> None:
    plan = make_plan(m, {m.k("app/a"): b"s3cr3t"})
    assert replace(plan) == plan
    assert "s3cr3t" not in repr(plan)


# --------------------------------------------------------------------------- properties

RELATIVE = st.sampled_from(["a", "b", "c", "d/e", "d/f", "g/h/i"])
DIRS = st.sampled_from(["app/", "app/d/", "other/"])
VALUES = st.binary(max_size=6)
OWNERS = st.sampled_from([OTHER, FAR])


@dataclass(frozen=True)
class World:
    """A store with history: foreign keys, other owners, our earlier state, edits."""

    m: Model
    foreign: dict[str, bytes]
    theirs: dict[str, str]  # key → other owner


@st.composite
def worlds(draw: st.DrawFn, backend: str) -> World:
    m = MODELS[backend]()
    for _ in range(draw(st.integers(0, 3))):
        owner, directory = draw(OWNERS), draw(DIRS)
        keys = draw(st.dictionaries(RELATIVE, VALUES, max_size=3))
        desired = {m.k(directory + k): v for k, v in keys.items()}
        p = make_plan(m, desired, owner=owner, directory=directory, adopt=True)
        if p.conflict is None:
            run(m, p)
    # Our earlier state, possibly under another prefix (a prefix move).
    old_dir = draw(DIRS)
    old = {m.k(old_dir + k): v for k, v in draw(st.dictionaries(RELATIVE, VALUES, max_size=4)).items()}
    p = make_plan(m, old, directory=old_dir, adopt=draw(st.booleans()))
    if p.conflict is None:
        run(m, p, max_ops=draw(st.sampled_from([2, 3, 5, m.limits.max_ops])))
    foreign = {}
    for _ in range(draw(st.integers(0, 4))):
        key = m.k(draw(DIRS) + draw(RELATIVE))
        if claim_of(m, key) is None:
            foreign[key] = draw(VALUES)
            m.put(key, foreign[key])
    # Out-of-band edits and deletes of keys that are owned.
    for key in draw(st.lists(st.sampled_from(sorted(owned_by(m, ME)) or [m.k("app/none")]), max_size=2)):
        if draw(st.booleans()):
            m.put(key, b"edited")
        else:
            m.delete(key)
    theirs = {key: owner for owner in (OTHER, FAR) for key in owned_by(m, owner)}
    return World(m, foreign, theirs)


@st.composite
def requests(draw: st.DrawFn, backend: str) -> tuple[str, dict[str, bytes]]:
    """A directory (as a path) and the desired keys under it (as the store's keys)."""
    directory = draw(DIRS)
    keys = draw(st.dictionaries(RELATIVE, VALUES, max_size=5))
    k = MODELS[backend].k
    return directory, {k(directory + key): v for key, v in keys.items()}


def op_counts(backend: str) -> st.SearchStrategy[int]:
    """Operation limits to chunk at: tiny ones, and the store's own."""
    return st.sampled_from([2, 3, 4, 7, MODELS[backend].limits.max_ops])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=300, deadline=None)
@given(data=st.data(), prune=st.booleans(), adopt=st.booleans())
def test_a_plan_converges_to_desired_and_touches_nothing_else(
    backend: str, data: st.DataObject, prune: bool, adopt: bool
) -> None:
    world = data.draw(worlds(backend), label="world")
    directory, desired = data.draw(requests(backend), label="request")
    max_ops = data.draw(op_counts(backend), label="max_ops")
    m = world.m
    before = m.snapshot()
    owned = owned_by(m, ME)
    other_claims = {k: claim_of(m, k) for k in world.theirs}

    plan = make_plan(m, desired, directory=directory, prune=prune, adopt=adopt)
    blocked_by_owner = any(claim_of(m, k) not in (None, ME.encode()) for k in desired)
    blocked_by_unmanaged = not adopt and any(claim_of(m, k) is None and k in before for k in desired)
    assert (plan.conflict is not None) == (blocked_by_owner or blocked_by_unmanaged)
    if plan.conflict is not None:
        assert steps(m, plan, max_ops=max_ops) == []
        return

    assert all(r.succeeded for r in run(m, plan, max_ops=max_ops))
    after = m.snapshot()
    # Exactly the desired values, owned by us, listed in our index.
    for key, value in desired.items():
        assert after[key][0] == value
    assert owned_by(m, ME) == set(desired)
    assert index_of(m) == (tuple(sorted(desired)) if desired else None)
    # Keys we did not own and do not want are untouched, value and revision.
    for key, state in before.items():
        if m.layout.reserved(key) or key in desired or key in owned:
            continue
        assert after.get(key) == state, key
    # Other owners' claims are untouched.
    assert {k: claim_of(m, k) for k in world.theirs} == other_claims
    # Owned keys no longer declared: deleted with prune, released (kept) without.
    for key in owned - desired.keys():
        if prune:
            assert key not in after
        else:
            assert after.get(key) == before.get(key)
    # And the next plan has nothing to do: a fixed point.
    assert make_plan(m, desired, directory=directory, prune=prune, adopt=adopt).noop


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=200, deadline=None)
@given(data=st.data(), prune=st.booleans(), max_ops=st.sampled_from([2, 3, 5, 9]), crash=st.integers(0, 20))
def test_a_crash_between_chunks_never_orphans_a_key(
    backend: str, data: st.DataObject, prune: bool, max_ops: int, crash: int
) -> None:
    world = data.draw(worlds(backend), label="world")
    directory, desired = data.draw(requests(backend), label="request")
    m = world.m
    plan = make_plan(m, desired, directory=directory, prune=prune, adopt=True)
    assume(plan.conflict is None)
    run(m, plan, max_ops=max_ops, stop_after=crash)
    # Every claim of ours is listed in our index, whatever step we stopped at,
    # so every key we wrote is owned and findable...
    assert owned_by(m, ME) <= set(index_of(m) or ())
    for key in desired:
        if key in m.values() and m.values()[key] == desired[key] and key not in world.foreign:
            assert claim_of(m, key) == ME.encode(), key
    # ...and a fresh reconcile (a restarted operator) finishes the job.
    plan = make_plan(m, desired, directory=directory, prune=prune, adopt=True)
    assert plan.conflict is None
    run(m, plan, max_ops=max_ops)
    assert owned_by(m, ME) == set(desired)
    assert all(m.values()[k] == v for k, v in desired.items())


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=200, deadline=None)
@given(data=st.data(), prune=st.booleans(), max_ops=st.integers(2, 12))
def test_chunking_respects_limits_and_gives_the_same_result(
    backend: str, data: st.DataObject, prune: bool, max_ops: int
) -> None:
    world = data.draw(worlds(backend), label="world")
    directory, desired = data.draw(requests(backend), label="request")
    whole = world.m
    plan = make_plan(whole, desired, directory=directory, prune=prune, adopt=True)
    assume(plan.conflict is None)
    chunked = type(whole)()
    chunked.kv, chunked.stamp = dict(whole.kv), whole.stamp  # type: ignore[attr-defined]
    for step in steps(whole, plan, max_ops=max_ops):
        keys = [item.op.key for item in step.items]
        assert plan.index_key not in keys and len(keys) == len(set(keys))
    run(whole, plan)
    # run() has each model check the operations of every transaction against max_ops.
    run(chunked, plan, max_ops=max_ops)
    assert whole.values() == chunked.values()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=200, deadline=None)
@given(data=st.data(), adopt=st.booleans())
def test_operations_never_touch_keys_of_other_owners(backend: str, data: st.DataObject, adopt: bool) -> None:
    world = data.draw(worlds(backend), label="world")
    directory, desired = data.draw(requests(backend), label="request")
    m = world.m
    plan = make_plan(m, desired, directory=directory, adopt=adopt)
    theirs = set(world.theirs) | {m.layout.claim_key(k) for k in world.theirs}
    touched = {item.op.key for item in (*plan.writes, *plan.deletes)}
    assert not touched & theirs
    # Foreign keys are written only when adopted, and never deleted.
    deleted = {item.op.key for item in plan.deletes}
    assert not deleted & set(world.foreign)
    if not adopt:
        assert not touched & set(world.foreign)
    # Every operation is guarded by a compare on its own key.
    assert all(item.guard.key == item.op.key for item in (*plan.writes, *plan.deletes))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.binary(min_size=8, max_size=16), min_size=1, max_size=4), adopt=st.booleans())
def test_conflict_messages_never_contain_values(backend: str, values: list[bytes], adopt: bool) -> None:
    m = MODELS[backend]()
    ours = {}
    for i, value in enumerate(values):
        m.put(m.k(f"app/k{i}"), value + b"-existing")
        ours[m.k(f"app/k{i}")] = value + b"-wanted"
    converge(m, {m.k("app/owned"): values[0]}, owner=OTHER)
    ours[m.k("app/owned")] = values[0] + b"-wanted"
    plan = make_plan(m, ours, adopt=adopt)
    assert plan.conflict is not None
    for value in values:
        assert value.decode("latin-1") not in plan.conflict
        assert repr(value) not in plan.conflict


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_applying_twice_is_a_noop(backend: str, data: st.DataObject) -> None:
    directory, desired = data.draw(requests(backend), label="request")
    max_ops = data.draw(op_counts(backend), label="max_ops")
    m = MODELS[backend]()
    run(m, make_plan(m, desired, directory=directory), max_ops=max_ops)
    stamp = m.stamp
    plan = make_plan(m, desired, directory=directory)
    assert plan.noop and run(m, plan) == [] and m.stamp == stamp
