"""The TetherPolicy rule engine: restrict, reserve, default, boundaries, patterns, adopt.

The rules are the contract's (DESIGN.md, TetherPolicy): allowed when a
selecting policy allows; refused when the namespace is selected by any policy
or what it asks for is reserved for other namespaces; otherwise the default.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tether.api import policies
from tether.api.policies import Claims, Policy

TEAM_A = {"team": "a"}
TEAM_B = {"team": "b"}
NOBODY: dict[str, str] = {}


def pol(name: str, **spec: Any) -> Policy:
    spec.setdefault("namespaceSelector", {})
    parsed = policies.parse(name, spec)
    assert parsed.valid, parsed.problems
    return parsed


def team(name: str, team_label: str, **spec: Any) -> Policy:
    return pol(name, namespaceSelector={"matchLabels": {"team": team_label}}, **spec)


def svc(name: str, adopt: bool = False) -> Claims:
    return Claims("service", name, adopt)


def etcd(prefix: str, adopt: bool = False) -> Claims:
    return Claims("etcd", prefix, adopt)


def kv(prefix: str, adopt: bool = False) -> Claims:
    return Claims("consulkv", prefix, adopt)


# -- the hijack of the issue ---------------------------------------------------


def test_a_team_cannot_register_another_teams_service_name() -> None:
    rules = [team("team-a", "a", consulServiceNames=["payments"]),
             team("team-b", "b", consulServiceNames=["shipping"])]
    assert policies.decide(rules, "team-a", TEAM_A, svc("payments")).allowed
    refused = policies.decide(rules, "team-b", TEAM_B, svc("payments"))
    assert not refused.allowed
    assert "payments" in refused.message and "team-b" in refused.message
    assert "team-a" in refused.message  # reserves it
    assert set(refused.policies) == {"team-a", "team-b"}


def test_reserved_name_refused_in_a_namespace_no_policy_selects() -> None:
    rules = [team("team-a", "a", consulServiceNames=["payments"])]
    refused = policies.decide(rules, "dev", NOBODY, svc("payments"))
    assert not refused.allowed and refused.policies == ("team-a",)
    assert "reserve" in refused.message
    # What nobody reserved is the default's to decide.
    assert policies.decide(rules, "dev", NOBODY, svc("orders")).allowed
    assert not policies.decide(rules, "dev", NOBODY, svc("orders"), default="deny").allowed


def test_restrict_refuses_what_the_selecting_policies_do_not_allow() -> None:
    rules = [team("team-b", "b", consulServiceNames=["shipping"])]
    refused = policies.decide(rules, "team-b", TEAM_B, svc("orders"))
    assert not refused.allowed and refused.policies == ("team-b",)
    # Default allow does not help a restricted namespace.
    assert not policies.decide(rules, "team-b", TEAM_B, svc("orders"), default="allow").allowed


def test_default_deny_message_names_the_setting() -> None:
    refused = policies.decide([], "dev", NOBODY, etcd("/x"), default="deny")
    assert not refused.allowed and "TETHER_POLICY_DEFAULT" in refused.message
    assert refused.policies == ()


def test_overlapping_policies_any_selecting_one_allows() -> None:
    rules = [team("narrow", "a", consulServiceNames=["payments"]),
             pol("everyone", consulServiceNames=["shared-*"])]
    assert policies.decide(rules, "team-a", TEAM_A, svc("shared-cache")).allowed
    assert policies.decide(rules, "team-b", TEAM_B, svc("shared-cache")).allowed
    assert not policies.decide(rules, "team-b", TEAM_B, svc("payments")).allowed


# -- properties ----------------------------------------------------------------

labels_st = st.dictionaries(
    st.sampled_from(["team", "env", "tier"]), st.sampled_from(["a", "b", "c"]), max_size=3
)
names_st = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
segment_st = st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True)
etcd_prefix_st = st.lists(segment_st, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s))
selector_st = st.one_of(
    st.just({}),
    labels_st.map(lambda labels: {"matchLabels": labels}),
    st.builds(
        lambda key, op, values: {"matchExpressions": [
            {"key": key, "operator": op, **({"values": values} if op in ("In", "NotIn") else {})}
        ]},
        st.sampled_from(["team", "env"]), st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]),
        st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True),
    ),
)
policy_st = st.builds(
    lambda i, sel, names, prefixes, adopt: pol(
        f"p{i}", namespaceSelector=sel, consulServiceNames=names, etcdPrefixes=prefixes, allowAdopt=adopt
    ),
    st.integers(0, 1000), selector_st, st.lists(names_st, max_size=3),
    st.lists(etcd_prefix_st, max_size=3), st.booleans(),
)
claims_st = st.one_of(st.builds(svc, names_st, st.booleans()), st.builds(etcd, etcd_prefix_st, st.booleans()))


@given(st.lists(policy_st, max_size=5), labels_st, claims_st, st.sampled_from(["allow", "deny"]))
def test_the_rules_in_order(
    rules: list[Policy], labels: dict[str, str], claims: Claims, default: Any
) -> None:
    """The decision is exactly the contract's four rules, written out the slow way."""
    decision = policies.decide(rules, "ns", labels, claims, default=default)
    selecting = [p for p in rules if p.selects(labels)]
    others = [p for p in rules if not p.selects(labels)]
    if any(p.allows(claims.subject, claims.value) for p in selecting):
        expected = not claims.adopt or any(p.allow_adopt for p in selecting)
    elif selecting or any(p.reserves(claims.subject, claims.value) for p in others):
        expected = False
    else:
        expected = default == "allow"
    assert decision.allowed is expected
    if not decision.allowed:
        assert decision.message
        assert set(decision.policies) <= {p.name for p in rules}


@given(st.lists(policy_st, max_size=5), labels_st, claims_st)
def test_without_policies_on_the_namespace_or_the_claim_the_default_decides(
    rules: list[Policy], labels: dict[str, str], claims: Claims
) -> None:
    assume(not any(p.selects(labels) for p in rules))
    assume(not any(p.reserves(claims.subject, claims.value) for p in rules))
    assert policies.decide(rules, "ns", labels, claims, default="allow").allowed
    assert not policies.decide(rules, "ns", labels, claims, default="deny").allowed


@given(st.lists(policy_st, max_size=5), labels_st, claims_st)
def test_a_restricted_namespace_never_gets_what_its_policies_do_not_allow(
    rules: list[Policy], labels: dict[str, str], claims: Claims
) -> None:
    selecting = [p for p in rules if p.selects(labels)]
    assume(selecting)
    decision = policies.decide(rules, "ns", labels, claims, default="allow")
    if not any(p.allows(claims.subject, claims.value) for p in selecting):
        assert not decision.allowed


@given(st.lists(policy_st, max_size=4), names_st)
def test_a_name_allowed_to_a_team_is_refused_to_every_namespace_outside_it(
    rules: list[Policy], name: str
) -> None:
    owner = team("owner", "a", consulServiceNames=[name])
    everyone = [owner, *rules]
    for labels in (TEAM_B, NOBODY, {"team": "c", "env": "a"}):
        if any(p.selects(labels) and p.allows("service", name) for p in rules):
            continue  # another policy grants it here too: rule 1 comes first
        assert not policies.decide(everyone, "other", labels, svc(name)).allowed


# -- prefix boundaries -----------------------------------------------------------


@pytest.mark.parametrize(("asked", "allowed"), [
    ("/team-x", True), ("/team-x/", True), ("/team-x/a", True), ("/team-x/a/b", True),
    ("/team-xy", False), ("/team-x-y", False), ("/team", False), ("/", False), ("/other", False),
])
def test_etcd_prefix_boundaries(asked: str, allowed: bool) -> None:
    rules = [pol("x", etcdPrefixes=["/team-x"])]
    assert policies.decide(rules, "ns", NOBODY, etcd(asked)).allowed is allowed


@pytest.mark.parametrize(("asked", "allowed"), [
    ("team-x", True), ("team-x/", True), ("team-x/a", True), ("team-xy", False), ("team", False),
])
def test_consul_kv_prefix_boundaries(asked: str, allowed: bool) -> None:
    rules = [pol("x", consulKVPrefixes=["team-x/"])]
    assert policies.decide(rules, "ns", NOBODY, kv(asked)).allowed is allowed


@given(etcd_prefix_st, st.lists(segment_st, max_size=3), segment_st)
def test_prefix_coverage_is_on_slash_boundaries(base: str, below: list[str], suffix: str) -> None:
    rules = [team("x", "a", etcdPrefixes=[base])]
    deeper = "/".join([base, *below])
    assert policies.decide(rules, "ns", TEAM_A, etcd(deeper)).allowed
    # The same characters without the '/' boundary are another prefix.
    assert not policies.decide(rules, "ns", TEAM_A, etcd(base + suffix)).allowed


@given(etcd_prefix_st, st.lists(segment_st, min_size=1, max_size=3))
def test_reserved_prefixes_block_above_and_below(base: str, below: list[str]) -> None:
    rules = [team("a", "a", etcdPrefixes=[base])]
    deeper = "/".join([base, *below])
    parent = base.rsplit("/", 1)[0] or "/"
    for asked in (base, deeper, parent):
        refused = policies.decide(rules, "b", TEAM_B, etcd(asked))
        assert not refused.allowed, asked
        assert refused.policies == ("a",)
    # A sibling is not reserved.
    sibling = base + "-other"
    assert policies.decide(rules, "b", TEAM_B, etcd(sibling)).allowed


def test_reserved_consul_kv_prefix_blocks_above_and_below() -> None:
    rules = [team("a", "a", consulKVPrefixes=["shop/payments"])]
    for asked in ("shop", "shop/payments", "shop/payments/db"):
        assert not policies.decide(rules, "b", TEAM_B, kv(asked)).allowed, asked
    assert policies.decide(rules, "b", TEAM_B, kv("shop/orders")).allowed


def test_etcd_and_consul_kv_prefixes_are_separate() -> None:
    rules = [team("a", "a", etcdPrefixes=["/shop"])]
    assert policies.decide(rules, "b", TEAM_B, kv("shop")).allowed
    assert not policies.decide(rules, "b", TEAM_B, etcd("/shop")).allowed


def test_the_etcd_root_allows_and_reserves_everything() -> None:
    rules = [team("admins", "a", etcdPrefixes=["/"])]
    assert policies.decide(rules, "a", TEAM_A, etcd("/anything/at/all")).allowed
    assert not policies.decide(rules, "b", NOBODY, etcd("/anything")).allowed


# -- patterns ----------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "name", "matches"), [
    ("payments", "payments", True), ("payments", "payments2", False),
    ("team-a-*", "team-a-", True), ("team-a-*", "team-a-web", True), ("team-a-*", "team-b-web", False),
    ("*-api", "orders-api", True), ("*-api", "orders-apix", False),
    ("a*b*c", "abc", True), ("a*b*c", "a-x-b-y-c", True), ("a*b*c", "acb", False),
    ("*", "anything", True), ("a*a", "a", False), ("a*a", "aa", True),
])
def test_name_patterns(pattern: str, name: str, matches: bool) -> None:
    assert policies.name_matches(pattern, name) is matches


@given(st.from_regex(r"[a-z*-]{1,12}", fullmatch=True), st.from_regex(r"[a-z-]{0,12}", fullmatch=True))
def test_name_patterns_agree_with_a_glob_regex(pattern: str, name: str) -> None:
    regex = "".join(".*" if c == "*" else re.escape(c) for c in pattern)
    assert policies.name_matches(pattern, name) is bool(re.fullmatch(regex, name, re.DOTALL))


# -- adopt (rule 4) ------------------------------------------------------------------


def test_adopt_needs_allow_adopt_where_a_policy_selects() -> None:
    plain = [team("a", "a", etcdPrefixes=["/a"])]
    refused = policies.decide(plain, "a", TEAM_A, etcd("/a", adopt=True))
    assert not refused.allowed and "adopt" in refused.message
    assert policies.decide(plain, "a", TEAM_A, etcd("/a")).allowed
    adopting = [*plain, team("a-adopt", "a", allowAdopt=True)]
    assert policies.decide(adopting, "a", TEAM_A, etcd("/a", adopt=True)).allowed


def test_adopt_elsewhere_follows_the_default() -> None:
    assert policies.decide([], "dev", NOBODY, etcd("/x", adopt=True), default="allow").allowed
    assert not policies.decide([], "dev", NOBODY, etcd("/x", adopt=True), default="deny").allowed


# -- selectors -------------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "labels", "selected"), [
    ({}, {}, True),
    ({"matchLabels": {"team": "a"}}, {"team": "a", "x": "y"}, True),
    ({"matchLabels": {"team": "a"}}, {"team": "b"}, False),
    ({"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]}, {"team": "b"}, True),
    ({"matchExpressions": [{"key": "team", "operator": "In", "values": ["a"]}]}, {}, False),
    ({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]}, {}, True),
    ({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]}, {"team": "a"}, False),
    ({"matchExpressions": [{"key": "team", "operator": "Exists"}]}, {"team": ""}, True),
    ({"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}, {"team": "a"}, False),
    ({"matchLabels": {"team": "a"},
      "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}, {"team": "a"}, False),
])
def test_label_selectors(selector: dict[str, Any], labels: dict[str, str], selected: bool) -> None:
    assert pol("p", namespaceSelector=selector).selects(labels) is selected


@pytest.mark.parametrize("selector", [
    None,
    {"matchExpressions": [{"key": "team", "operator": "Has"}]},
    {"matchExpressions": [{"key": "team", "operator": "In", "values": []}]},
    {"matchExpressions": [{"key": "team", "operator": "Exists", "values": ["a"]}]},
    {"matchExpressions": [{"key": "bad key!", "operator": "Exists"}]},
    {"matchLabels": {"team": "not a value"}},
])
def test_invalid_selector_selects_nothing_and_says_why(selector: Any) -> None:
    parsed = policies.parse("broken", {"namespaceSelector": selector, "consulServiceNames": ["payments"]})
    assert not parsed.valid and parsed.problems
    assert not parsed.selects({}) and not parsed.selects({"team": "a"})
    # Its names still reserve (the valid parts apply), and other policies are unaffected.
    good = team("good", "b", consulServiceNames=["orders"])
    assert policies.decide([parsed, good], "b", TEAM_B, svc("orders")).allowed


@pytest.mark.parametrize(("field", "value"), [
    ("consulServiceNames", "pay ments"), ("consulServiceNames", ""), ("consulServiceNames", "a/b"),
    ("etcdPrefixes", "relative"), ("etcdPrefixes", "/a//b"), ("etcdPrefixes", "/a/../b"),
    ("consulKVPrefixes", "/rooted"), ("consulKVPrefixes", "/"), ("consulKVPrefixes", "a//b"),
])
def test_invalid_patterns_are_left_out_with_a_message(field: str, value: str) -> None:
    parsed = policies.parse("p", {"namespaceSelector": {}, field: [value, "fine" if field != "etcdPrefixes"
                                                                    else "/fine"]})
    assert not parsed.valid
    assert any(field in problem and repr(value) in problem for problem in parsed.problems)
    # The valid entry still applies; the invalid one allows nothing.
    subject = {"consulServiceNames": "service", "etcdPrefixes": "etcd", "consulKVPrefixes": "consulkv"}[field]
    assert parsed.allows(subject, "fine" if subject != "etcd" else "/fine")  # type: ignore[arg-type]
    assert len(parsed.service_names + parsed.etcd_prefixes + parsed.consulkv_prefixes) == 1
