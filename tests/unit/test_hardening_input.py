"""Hardening (issue 14): input Consul refuses is InvalidSpec naming the field (not
BackendRejected retried forever), and every status message is bounded."""

from __future__ import annotations

from typing import Any

import pytest

from tether import conditions
from tether.api import InvalidSpec, durations
from tether.api import consulservices as api
from tether.consulservice import planner
from tether.reconciling import Outcome, _announcement, build_status


def _parse(**raw: Any) -> api.ConsulServiceSpec:
    return api.parse("team-a", "web", {"address": "10.0.0.5", "port": 8080, **raw})


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        # 300 characters, 600 bytes: within the schema's 512 characters, over Consul's 512 bytes.
        ({"meta": {"team": "é" * 300}}, "spec.meta.team"),
        ({"checks": [{"name": "t", "ttl": "0s"}]}, "spec.checks[0] (t).ttl"),
        ({"checks": [{"name": "t", "ttl": "3000000h"}]}, "spec.checks[0] (t).ttl"),
        ({"checks": [{"name": "h", "tcp": "a:1", "interval": "3000000h"}]}, "spec.checks[0] (h).interval"),
        ({"checks": [{"name": "h", "tcp": "a:1", "interval": "500ms"}]}, "spec.checks[0] (h).interval"),
        (
            {"checks": [{"name": "h", "tcp": "a:1", "interval": "10s", "grpcUseTLS": True}]},
            "spec.checks[0] (h)",
        ),
    ],
)
def test_input_consul_refuses_is_invalid_spec_naming_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        _parse(**raw)
    assert str(exc.value).startswith(field)
    outcome = Outcome.from_error(exc.value, doing="register")
    assert outcome.reason == conditions.INVALID_SPEC and not outcome.retry  # no retry storm


def test_meta_at_the_byte_limit_is_accepted() -> None:
    assert _parse(meta={"team": "é" * 256}).meta == (("team", "é" * 256),)


def test_durations_stay_within_go_int64() -> None:
    assert durations.parse_ns("2562047h47m16.854775807s", field="f") == 2**63 - 1
    with pytest.raises(InvalidSpec):
        durations.parse_ns("2562047h47m16.854775808s", field="f")
    # Exact, not float: a nanosecond is not lost on long durations.
    assert durations.parse_ns("1000000h0.000000001s", field="f") == 1_000_000 * 3_600_000_000_000 + 1


def test_grpc_use_tls_is_mapped() -> None:
    check = {
        "name": "g", "grpc": "10.0.0.5:9090", "interval": "10s", "grpcUseTLS": True, "tlsSkipVerify": True,
    }
    body = planner.registration(_parse(checks=[check]), planner.Owner("k", "team-a", "web"))
    assert body["Checks"][0]["GRPCUseTLS"] is True and body["Checks"][0]["TLSSkipVerify"] is True
    plain = {"name": "g", "grpc": "10.0.0.5:9090", "interval": "10s"}
    body = planner.registration(_parse(checks=[plain]), planner.Owner("k", "team-a", "web"))
    assert body["Checks"][0]["GRPCUseTLS"] is False


def test_status_messages_are_bounded_under_the_crd_limit() -> None:
    huge = "key " + "k" * 100_000 + " is owned by someone else"
    outcome = Outcome.failed(conditions.CONFLICT, huge)
    status = build_status({}, outcome, generation=1, timestamp="2026-01-01T00:00:00Z")
    ready = conditions.find(status["conditions"], conditions.READY)
    assert ready is not None and len(ready["message"]) <= 32768
    assert "more characters" in ready["message"]
    # The same outcome again: identical status (no patch) and no second Warning event.
    assert build_status(status, outcome, generation=1, timestamp="2026-01-01T00:01:00Z") == status
    assert _announcement(status, outcome) == ()


def test_check_names_in_messages_are_bounded() -> None:
    with pytest.raises(InvalidSpec) as exc:
        _parse(checks=[{"name": "n" * 10_000, "ttl": "0s"}])
    assert len(str(exc.value)) < 300
