"""The liveness decision: wedged only when keys wait and nothing moves."""

from __future__ import annotations

import time

from tether.health import Health


def test_idle_is_healthy() -> None:
    health = Health(wedged_after=0.0)
    health.progress = lambda: (False, 0)
    assert health.problem() is None
    time.sleep(0.01)
    assert health.problem() is None


def test_waiting_keys_without_progress_is_wedged() -> None:
    health = Health(wedged_after=0.05)
    health.progress = lambda: (True, 7)
    assert health.problem() is None  # first sight starts the clock
    time.sleep(0.1)
    problem = health.problem()
    assert problem is not None and "no progress" in problem


def test_progress_resets_the_clock() -> None:
    health = Health(wedged_after=0.05)
    count = [0]
    health.progress = lambda: (True, count[0])
    assert health.problem() is None
    for _ in range(3):
        time.sleep(0.03)
        count[0] += 1
        assert health.problem() is None
