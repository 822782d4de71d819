"""Planner for ConsulService: spec + what the agent reports → actions."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.api import InvalidSpec, ObjectRef
from tether.api import consulservices as api
from tether.consulservice import planner
from tether.consulservice.index import AgentIndex, Tracked

OWNER = planner.Owner("kubernetes", "team-a", "web")


def spec(**overrides: Any) -> api.ConsulServiceSpec:
    raw: dict[str, Any] = {"address": "10.0.0.5", "port": 8080}
    raw.update(overrides)
    return api.parse("team-a", "web", raw)


def as_agent(body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What the agent reports after registering ``body`` (Consul's re-rendering)."""
    service = {
        "ID": body["ID"],
        "Service": body["Name"],
        "Address": body["Address"],
        "Port": body["Port"],
        "Tags": list(body["Tags"]) or None,
        "Meta": dict(body["Meta"]),
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
    }
    checks = []
    for c in body["Checks"]:
        kind = "ttl" if "TTL" in c else "http" if "HTTP" in c else "tcp" if "TCP" in c else "grpc"
        checks.append(
            {
                "CheckID": c["CheckID"],
                "Name": c["Name"],
                "Status": "critical",
                "ServiceID": body["ID"],
                "Type": kind,
                "Interval": c.get("Interval", ""),
                "Timeout": c.get("Timeout", ""),
                "Definition": {},  # Consul never shows a check's definition
            }
        )
    return service, checks


ALL_CHECKS = [
    {
        "name": "http",
        "http": "https://10.0.0.5:8080/healthz",
        "interval": "10s",
        "timeout": "2s",
        "method": "POST",
        "header": {"X-Probe": ["tether"]},
        "tlsSkipVerify": True,
        "deregisterCriticalServiceAfter": "5m",
    },
    {"name": "tcp", "tcp": "10.0.0.5:8080", "interval": "15s"},
    {"name": "grpc", "grpc": "10.0.0.5:9090/health", "interval": "1m30s"},
    {"name": "ttl", "ttl": "30s"},
]


def test_registration_carries_every_field_and_ownership() -> None:
    s = spec(tags=["a", "b"], meta={"team": "x"}, checks=ALL_CHECKS, name="web", id="web-1")
    body = planner.registration(s, OWNER)
    assert body["ID"] == "web-1" and body["Name"] == "web" and body["Port"] == 8080
    assert body["Meta"] == {
        "team": "x",
        "external-source": "kubernetes",
        "tether-cluster": "kubernetes",
        "tether-namespace": "team-a",
        "tether-name": "web",
    }
    http = body["Checks"][0]
    assert http["HTTP"] == "https://10.0.0.5:8080/healthz" and http["Method"] == "POST"
    assert http["Header"] == {"X-Probe": ["tether"]} and http["TLSSkipVerify"] is True
    assert http["DeregisterCriticalServiceAfter"] == "5m0s" and http["Interval"] == "10s"
    assert body["Checks"][2]["Interval"] == "1m30s"
    assert body["Checks"][3] == {"CheckID": "web-1/ttl", "Name": "ttl", "TTL": "30s"}


def test_defaults_name_and_id_from_metadata() -> None:
    body = planner.registration(spec(), OWNER)
    assert body["Name"] == "web" and body["ID"] == "team-a-web"


def test_absent_service_is_registered() -> None:
    body = planner.registration(spec(), OWNER)
    p = planner.plan(body, OWNER, None, [], {})
    assert p.register == body and p.created and not p.conflict


def test_matching_service_needs_no_write() -> None:
    body = planner.registration(spec(tags=["x"], meta={"k": "v"}, checks=ALL_CHECKS), OWNER)
    svc, checks = as_agent(body)
    p = planner.plan(body, OWNER, svc, checks, {})
    assert p.register is None and not p.deregister and not p.conflict


def test_tag_order_alone_is_not_drift() -> None:
    """Consul does not give tag order a meaning, so a reordering is left alone."""
    body = planner.registration(spec(tags=["a", "b"]), OWNER)
    svc, checks = as_agent(body)
    svc["Tags"] = ["b", "a"]
    assert planner.plan(body, OWNER, svc, checks, {}).register is None
    svc["Tags"] = ["b", "a", "a"]
    assert planner.plan(body, OWNER, svc, checks, {}).register == body


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("Port", 9999, "port"),
        ("Address", "10.9.9.9", "address"),
        ("Tags", ["zzz"], "tags"),
        ("Service", "other", "name"),
    ],
)
def test_out_of_band_service_change_is_drift(field: str, value: Any, expected: str) -> None:
    body = planner.registration(spec(tags=["a"]), OWNER)
    svc, checks = as_agent(body)
    svc[field] = value
    p = planner.plan(body, OWNER, svc, checks, {})
    assert p.register == body
    assert any(c.startswith(expected) for c in p.changes)


def test_meta_change_is_drift_without_leaking_values() -> None:
    body = planner.registration(spec(meta={"secretish": "s3cr3t"}), OWNER)
    svc, checks = as_agent(body)
    svc["Meta"] = {**svc["Meta"], "secretish": "other"}
    p = planner.plan(body, OWNER, svc, checks, {})
    assert p.register == body and "meta" in p.changes
    assert "s3cr3t" not in " ".join(p.changes)


def test_removed_check_is_drift() -> None:
    body = planner.registration(spec(checks=ALL_CHECKS), OWNER)
    svc, checks = as_agent(body)
    p = planner.plan(body, OWNER, svc, checks[1:], {})
    assert p.register == body and any("missing" in c for c in p.changes)


def test_extra_check_is_drift() -> None:
    body = planner.registration(spec(), OWNER)
    svc, _ = as_agent(body)
    extra = {"CheckID": "rogue", "Name": "rogue", "Status": "passing", "Type": "ttl", "Definition": {}}
    assert planner.plan(body, OWNER, svc, [extra], {}).register == body


def test_changed_check_interval_is_drift() -> None:
    body = planner.registration(spec(checks=ALL_CHECKS), OWNER)
    svc, checks = as_agent(body)
    checks[1]["Interval"] = "16s"
    assert planner.plan(body, OWNER, svc, checks, {}).register == body


def test_check_type_change_is_drift() -> None:
    body = planner.registration(spec(checks=[{"name": "t", "tcp": "h:1", "interval": "60s"}]), OWNER)
    svc, checks = as_agent(body)
    checks[0]["Type"] = "http"
    assert planner.plan(body, OWNER, svc, checks, {}).register == body


def test_durations_rendered_differently_are_equal() -> None:
    body = planner.registration(spec(checks=[{"name": "t", "tcp": "h:1", "interval": "60s"}]), OWNER)
    svc, checks = as_agent(body)
    checks[0]["Interval"] = "1m0s"
    assert planner.plan(body, OWNER, svc, checks, {}).register is None


def test_foreign_service_is_a_conflict_and_never_written() -> None:
    body = planner.registration(spec(), OWNER)
    foreign = {"ID": body["ID"], "Service": "web", "Port": 1, "Meta": {}}
    p = planner.plan(body, OWNER, foreign, [], {})
    assert p.conflict and p.register is None and not p.deregister
    assert "outside Tether" in p.conflict and body["ID"] in p.conflict


def test_service_owned_by_another_resource_is_a_conflict() -> None:
    body = planner.registration(spec(), OWNER)
    other = planner.Owner("kubernetes", "team-b", "web")
    svc, _ = as_agent(planner.registration(spec(), other))
    p = planner.plan(body, OWNER, svc, [], {})
    assert p.conflict and "team-b/web" in p.conflict


def test_service_owned_by_another_cluster_is_a_conflict() -> None:
    body = planner.registration(spec(), OWNER)
    svc, _ = as_agent(planner.registration(spec(), planner.Owner("prod-eu", "team-a", "web")))
    assert planner.plan(body, OWNER, svc, [], {}).conflict


def test_moved_id_deregisters_old_owned_registration() -> None:
    old = planner.registration(spec(id="old-id"), OWNER)
    new = planner.registration(spec(id="new-id"), OWNER)
    old_svc, _ = as_agent(old)
    p = planner.plan(new, OWNER, None, [], {"old-id": old_svc})
    assert p.register == new and p.deregister == ("old-id",)


def test_move_never_deregisters_foreign_or_absent() -> None:
    new = planner.registration(spec(id="new-id"), OWNER)
    foreign = {"ID": "old-id", "Service": "web", "Meta": {"external-source": "nomad"}}
    p = planner.plan(new, OWNER, None, [], {"old-id": foreign, "gone": None})
    assert p.deregister == ()


def test_owner_of_requires_all_markers() -> None:
    assert planner.owner_of({"external-source": "kubernetes"}) is None
    assert planner.owner_of(None) is None
    assert planner.owner_of(OWNER.meta()) == OWNER


@pytest.mark.parametrize(
    ("statuses", "health"),
    [
        ([], "passing"),
        (["passing"], "passing"),
        (["passing", "warning"], "warning"),
        (["warning", "critical", "passing"], "critical"),
        (["maintenance"], "unknown"),
    ],
)
def test_aggregate_health(statuses: list[str], health: str) -> None:
    assert planner.aggregate_health(statuses) == health


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"port": 80, "checks": [{"name": "a", "http": "ftp://x/", "interval": "1s"}]}, "http://"),
        ({"port": 80, "checks": [{"name": "a", "http": "not a url", "interval": "1s"}]}, "URL"),
        ({"port": 80, "checks": [{"name": "a", "tcp": "host-without-port", "interval": "1s"}]}, "host:port"),
        ({"port": 80, "checks": [{"name": "a", "tcp": "h:70000", "interval": "1s"}]}, "host:port"),
        ({"port": 80, "checks": [{"name": "a", "tcp": "h:1"}]}, "interval"),
        ({"port": 80, "checks": [{"name": "a", "ttl": "10s", "interval": "5s"}]}, "ttl check"),
        (
            {"port": 80, "checks": [{"name": "a", "tcp": "h:1", "http": "http://h/", "interval": "1s"}]},
            "exactly one",
        ),
        ({"port": 80, "checks": [{"name": "a", "interval": "1s"}]}, "exactly one"),
        ({"port": 80, "checks": [{"name": "a", "tcp": "h:1", "interval": "10x"}]}, "not a duration"),
        ({"port": 80, "checks": [{"name": "a", "tcp": "h:1", "interval": "1s", "timeout": "2s"}]}, "exceed"),
        (
            {
                "port": 80,
                "checks": [
                    {"name": "a", "tcp": "h:1", "interval": "1s", "deregisterCriticalServiceAfter": "30s"}
                ],
            },
            "minimum is 1m",
        ),
        (
            {"port": 80, "checks": [{"name": "a", "tcp": "h:1", "interval": "1s", "method": "GET"}]},
            "http checks only",
        ),
        (
            {
                "port": 80,
                "checks": [
                    {"name": "a", "tcp": "h:1", "interval": "1s"},
                    {"name": "a", "tcp": "h:2", "interval": "1s"},
                ],
            },
            "duplicate",
        ),
        ({"port": 80, "meta": {"consul-x": "1"}}, "reserved"),
        ({"port": 80, "meta": {"tether-name": "1"}}, "reserved"),
        ({"port": 80, "meta": {"bad key": "1"}}, "letters"),
        ({"port": 80, "meta": {"k": "v" * 513}}, "512"),
        ({"port": 80, "tags": ["a", "a"]}, "duplicate"),
        ({"port": 0}, "1 to 65535"),
        ({"port": 80, "address": "not_a host!"}, "neither"),
        ({"port": 80, "name": "-bad-"}, "service name"),
        ({"port": 80, "id": "a/b"}, "service ID"),
        ({"port": 80, "deletionPolicy": "Keep"}, "Delete or Orphan"),
    ],
)
def test_invalid_specs_name_the_problem(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        api.parse("team-a", "web", raw)


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).filter(
    lambda s: (
        not s.startswith("-")
        and not s.endswith("-")
        and not s.startswith("consul-")
        and not s.startswith("tether-")
        and s != "external-source"
    )
)


@settings(max_examples=150, deadline=None)
@given(
    tags=st.lists(_label, unique=True, max_size=6),
    meta=st.dictionaries(_label, st.text(max_size=40), max_size=8),
    port=st.integers(1, 65535),
    checks=st.lists(st.sampled_from(ALL_CHECKS), unique_by=lambda c: c["name"], max_size=4),
)
def test_registering_then_observing_is_a_fixed_point(
    tags: list[str], meta: dict[str, str], port: int, checks: list[dict[str, Any]]
) -> None:
    """Whatever the spec, the agent's rendering of our own write never looks like drift."""
    body = planner.registration(spec(tags=tags, meta=meta, port=port, checks=copy.deepcopy(checks)), OWNER)
    svc, observed = as_agent(body)
    assert planner.plan(body, OWNER, svc, observed, {}).register is None


@settings(max_examples=100, deadline=None)
@given(port=st.integers(1, 65535), other=st.integers(1, 65535))
def test_any_port_change_is_detected(port: int, other: int) -> None:
    body = planner.registration(spec(port=port), OWNER)
    svc, checks = as_agent(body)
    svc["Port"] = other
    assert (planner.plan(body, OWNER, svc, checks, {}).register is None) == (port == other)


def test_watcher_flags_a_resource_owning_a_stale_id() -> None:
    """An ID move cut short by a crash leaves an owned registration the status never named."""
    index = AgentIndex(cluster="kubernetes", plural="consulservices")
    current = planner.registration(spec(id="svc-c"), OWNER)
    stale = planner.registration(spec(id="svc-b"), OWNER)
    ref = ObjectRef("consulservices", "team-a", "web")
    index.track(ref, Tracked("svc-c", planner.desired_signature(current), "passing"))
    agent_view = {sid: as_agent(body)[0] for sid, body in (("svc-c", current), ("svc-b", stale))}
    assert index.drifted(agent_view, {}) == [ref]
    del agent_view["svc-b"]
    assert index.drifted(agent_view, {}) == []
    foreign = planner.registration(spec(id="svc-x"), planner.Owner("other-cluster", "team-a", "web"))
    agent_view["svc-x"] = as_agent(foreign)[0]
    assert index.drifted(agent_view, {}) == [], "another cluster's registrations are not ours"


def test_index_reports_drift_and_health_moves_only() -> None:
    index = AgentIndex(cluster="kubernetes", plural="consulservices")
    body = planner.registration(spec(checks=ALL_CHECKS[1:2]), OWNER)
    ref = ObjectRef("consulservices", "team-a", "web")
    svc, checks = as_agent(body)
    index.track(ref, Tracked(body["ID"], planner.desired_signature(body), "critical"))
    by_id = {c["CheckID"]: c for c in checks}
    assert index.drifted({body["ID"]: svc}, by_id) == []
    assert index.drifted({}, by_id) == [ref], "a vanished registration"
    assert index.drifted({body["ID"]: {**svc, "Port": 1}}, by_id) == [ref], "an edited one"
    healthy = {cid: {**c, "Status": "passing"} for cid, c in by_id.items()}
    assert index.drifted({body["ID"]: svc}, healthy) == [ref], "health moved"
    index.untrack(ref)
    assert index.drifted({}, {}) == []


def test_index_keeps_owned_ids_per_owner_from_the_latest_scan() -> None:
    index = AgentIndex(cluster="kubernetes", plural="consulservices")
    other = planner.Owner("kubernetes", "team-b", "api")
    views = {
        "a": as_agent(planner.registration(spec(id="a"), OWNER))[0],
        "b": as_agent(planner.registration(spec(id="b"), OWNER))[0],
        "c": as_agent(planner.registration(spec(id="c"), other))[0],
        "nomad": {"ID": "nomad", "Service": "x", "Meta": {"external-source": "nomad"}},
    }
    index.refresh(views)
    assert index.owned_ids(OWNER) == {"a", "b"} and index.owned_ids(other) == {"c"}
    index.forget_id(OWNER, "a")
    assert index.owned_ids(OWNER) == {"b"}
    # A copy: a caller changing it cannot change the index.
    index.owned_ids(OWNER).add("zzz")
    assert index.owned_ids(OWNER) == {"b"}
    index.refresh({"c": views["c"]})
    assert index.owned_ids(OWNER) == set() and index.owned_ids(other) == {"c"}


def test_release_deregisters_exactly_what_the_owner_holds() -> None:
    mine = as_agent(planner.registration(spec(id="mine"), OWNER))[0]
    old = as_agent(planner.registration(spec(id="old"), OWNER))[0]
    theirs = as_agent(planner.registration(spec(id="theirs"), planner.Owner("west", "team-a", "web")))[0]
    foreign = {"ID": "same-id", "Service": "web", "Meta": {}}
    observed = {"mine": mine, "old": old, "theirs": theirs, "same-id": foreign, "gone": None}
    assert planner.release(OWNER, observed) == ("mine", "old")
    assert planner.release(OWNER, {"same-id": foreign, "gone": None}) == ()
