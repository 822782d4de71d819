"""Expectations: what every managed key should hold, shared by the config kinds and their watchers."""

from __future__ import annotations

from tether.api import ObjectRef
from tether.config.expectations import Expectations, digest
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


def test_listeners_hear_only_of_keys_nobody_expected_before() -> None:
    e = Expectations()
    heard: list[int] = []
    e.subscribe(lambda: heard.append(1))
    e.track(A, {"/app/x": None})
    e.track(B, {"/app/x": None})
    e.track(A, {"/app/x": digest(b"v")})
    assert heard == [1]
    e.track(B, {"/app/x": None, "/shop/y": None})
    assert heard == [1, 1]


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
