"""The shared test support's pure parts: waits, metrics parsing, etcd ranges, conditions."""

from __future__ import annotations

import time

import pytest

from tether_dev.harness import etcd, kube, operator, waiting


def test_wait_for_returns_the_first_truthy_value_and_counts_errors_as_not_yet() -> None:
    calls = iter([ValueError("restarting"), 0, "done"])

    def predicate() -> object:
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    assert waiting.wait_for(predicate, timeout=5, interval=0.001) == "done"


def test_wait_for_says_what_it_waited_for_and_the_last_error() -> None:
    def predicate() -> bool:
        raise ConnectionRefusedError("no server")

    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"^the server: not true after 0 s \(last error: Connection"):
        waiting.wait_for(predicate, timeout=0.05, interval=0.01, message="the server")
    assert time.monotonic() - started < 1


def test_give_up_ends_a_wait_at_once() -> None:
    def predicate() -> bool:
        raise waiting.GiveUp("the process exited")

    started = time.monotonic()
    with pytest.raises(waiting.GiveUp, match="exited"):
        waiting.wait_for(predicate, timeout=30)
    assert time.monotonic() - started < 1


def test_metrics_keys_are_the_exposition_lines() -> None:
    text = "\n".join(
        [
            "# HELP tether_backend_writes_total Writes made to each system",
            "# TYPE tether_backend_writes_total counter",
            'tether_backend_writes_total{system="consul"} 3.0',
            "tether_leader 1.0",
            'tether_reconcile_duration_seconds_bucket{kind="EtcdConfig",le="+Inf"} 2.0',
        ]
    )
    metrics = operator.parse_metrics(text)
    assert metrics['tether_backend_writes_total{system="consul"}'] == 3.0
    assert metrics["tether_leader"] == 1.0
    assert metrics['tether_reconcile_duration_seconds_bucket{kind="EtcdConfig",le="+Inf"}'] == 2.0
    assert operator.writes(metrics) == {"consul": 3, "etcd": 0, "kubernetes": 0}


def test_prefix_end_covers_exactly_the_prefix() -> None:
    assert etcd.prefix_end("/a/") == b"/a0"
    assert etcd.prefix_end("") == b"\0"


def test_is_ready_needs_the_current_generation() -> None:
    ready = {"type": "Ready", "status": "True"}
    current = {"metadata": {"generation": 2}, "status": {"observedGeneration": 2, "conditions": [ready]}}
    stale = {"metadata": {"generation": 3}, "status": current["status"]}
    assert kube.is_ready(current)
    assert not kube.is_ready(stale)
    assert not kube.is_ready(None)
    assert kube.condition(current) == ready
