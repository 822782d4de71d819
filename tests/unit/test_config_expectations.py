"""Expectations: what every managed key should hold, shared by the config kinds and their watchers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tether.api import ObjectRef
from tether.config.expectations import Expectations, digest, root_of
from tether.config.values import Change

A = ObjectRef("etcdconfigs", "ns", "a")
B = ObjectRef("etcdconfigs", "ns", "b")


def test_a_change_names_exactly_the_resources_it_leaves_unsatisfied() -> None:
    e = Expectations()
    # Two resources declaring one key (one of them is about to be in conflict).
    e.track(A, {"/k": digest(b"a"), "/only-a": None})
    e.track(B, {"/k": digest(b"b")})
    assert e.drifted([Change("/k", b"a")]) == {B}
    assert e.drifted([Change("/k", b"b")]) == {A}
    assert e.drifted([Change("/k", None)]) == {A, B}
    # A key that should be absent drifts when it appears, not when it goes.
    assert e.drifted([Change("/only-a", b"x")]) == {A}
    assert e.drifted([Change("/only-a", None)]) == set()
    assert e.drifted([Change("/unmanaged", b"x")]) == set()


def test_tracking_again_replaces_and_untracking_forgets_keys() -> None:
    e = Expectations()
    e.track(A, {"/k": digest(b"1"), "/old": digest(b"1")})
    e.track(B, {"/k": digest(b"1")})
    e.track(A, {"/k": digest(b"2")})
    assert sorted(e.managed_keys()) == ["/k"]
    assert e.expected(A) == {"/k": digest(b"2")}
    e.untrack(A)
    assert e.drifted([Change("/k", b"2")]) == {B} and e.expected(A) is None
    assert sorted(e.managed_keys()) == ["/k"] and e.tracked_count() == 1
    e.untrack(B)
    assert list(e.managed_keys()) == [] and e.tracked_count() == 0


def test_listeners_hear_only_of_roots_that_appear_or_empty() -> None:
    e = Expectations()
    heard: list[set[str]] = []
    e.subscribe(lambda: heard.append(e.roots()))
    e.track(A, {"/app/x": None})
    e.track(B, {"/app/x": None, "/app/z": None})
    e.track(A, {"/app/x": digest(b"v")})
    assert heard == [{"/app/"}]
    e.track(B, {"/app/x": None, "/shop/y": None})
    assert heard == [{"/app/"}, {"/app/", "/shop/"}]
    e.untrack(A)  # B still manages /app/x
    assert len(heard) == 2
    e.untrack(B)
    assert heard[-1] == set() and e.roots() == set()


def test_known_resources_outlive_untracking_until_forgotten() -> None:
    e = Expectations()
    e.seen(A)
    e.track(B, {"/app/x": None})
    e.untrack(B)
    assert e.known() == [A, B]
    e.forget(A)
    assert e.known() == [B]


def test_under_names_the_resources_with_keys_below_a_prefix() -> None:
    e = Expectations()
    e.track(A, {"/app/x": None, "/tether/keys/app/x": None})
    e.track(B, {"/other/y": None})
    assert e.under("/app/") == [A]
    assert e.under("/tether/") == [A]
    assert e.under("/") == [A, B]
    assert e.under("/none/") == []


def test_only_digests_are_kept() -> None:
    e = Expectations()
    e.track(A, {"/k": digest(b"hunter2")})
    assert b"hunter2" not in repr(e.expected(A)).encode()
    assert digest(b"hunter2") != b"hunter2" and len(digest(b"hunter2")) == 16


@given(st.lists(st.tuples(
    st.sampled_from([A, B]),
    st.none() | st.dictionaries(st.sampled_from(["/app/x", "/app/y", "/shop/z", "flat", "kv/a"]), st.none()),
), max_size=30))
def test_roots_are_always_the_roots_of_the_managed_keys(
    steps: list[tuple[ObjectRef, dict[str, None] | None]],
) -> None:
    e = Expectations()
    for ref, keys in steps:
        if keys is None:
            e.untrack(ref)
        else:
            e.track(ref, dict(keys))
        assert e.roots() == {root_of(k) for k in e.managed_keys()}
