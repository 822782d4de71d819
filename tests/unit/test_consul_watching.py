"""The agent watcher's scan pacing: isolated changes at once, churn at a bounded share."""

from __future__ import annotations

from tether.consul.watching import ScanBudget


def test_isolated_scans_never_wait() -> None:
    budget = ScanBudget(share=0.1, capacity=1.0, now=0.0)
    now = 0.0
    for _ in range(20):  # one 50 ms scan every 2 s: far below the share
        assert budget.wait(now) == 0.0
        budget.spend(0.05, now + 0.05)
        now += 2.0


def test_sustained_churn_is_held_to_the_share() -> None:
    budget = ScanBudget(share=0.1, capacity=1.0, now=0.0)
    now, scanning = 0.0, 0.0
    for _ in range(500):  # 200 ms scans, back to back whenever allowed
        now += budget.wait(now)
        budget.spend(0.2, now + 0.2)
        now += 0.2
        scanning += 0.2
    # After the initial burst, at most `share` of the time goes to scanning.
    assert (scanning - 1.0) / now <= 0.1 / (1 - 0.1) + 1e-6
    assert scanning / now > 0.05  # and it does keep scanning
