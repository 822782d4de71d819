"""The agent watcher's scan pacing: a lone change at once, churn at a bounded CPU share."""

from __future__ import annotations

from tether.consul.index import AgentIndex
from tether.consul.watching import MAX_GAP, SCAN_DUTY, ConsulWatcher


def watcher() -> ConsulWatcher:
    return ConsulWatcher(None, AgentIndex(cluster="c", plural="consulservices"), lambda ref: None)  # type: ignore[arg-type]


def test_cheap_scans_keep_the_minimum_interval() -> None:
    assert watcher().gap(0.001) == 0.25


def test_costly_scans_are_spaced_by_their_cost_up_to_a_cap() -> None:
    w = watcher()
    assert w.gap(0.1) == 0.1 * SCAN_DUTY
    # The scanner's share of the time stays at or below 1 / (1 + SCAN_DUTY).
    assert 0.1 / (0.1 + w.gap(0.1)) <= 1 / (1 + SCAN_DUTY) + 1e-9
    assert w.gap(10.0) == MAX_GAP
