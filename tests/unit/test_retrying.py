"""The one retry object: capped exponential backoff with jitter, and one log line per outage."""

from __future__ import annotations

import logging
import random

import pytest

from tether.retrying import Retry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Fixed(random.Random):
    """A random source whose ``uniform`` always returns one end of the range."""

    def __init__(self, end: str) -> None:
        super().__init__(0)
        self.end = end

    def uniform(self, a: float, b: float) -> float:
        return a if self.end == "low" else b


def make(clock: Clock | None = None, *, end: str = "high", jitter: float = 0.5) -> Retry:
    return Retry(
        "Consul watch of services", base=0.5, cap=3.0, jitter=jitter, rng=Fixed(end), clock=clock or Clock()
    )


def test_delays_double_up_to_the_cap() -> None:
    retry = make()
    assert [retry.failed("down") for _ in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_jitter_never_goes_below_its_fraction_of_the_schedule() -> None:
    low = make(end="low", jitter=0.5)
    assert [low.failed("down") for _ in range(4)] == [0.25, 0.5, 1.0, 1.5]
    spread = Retry("s", base=1.0, cap=30.0, jitter=0.2, rng=random.Random(7))
    for n in range(1, 40):
        ceiling = min(30.0, 2.0 ** (n - 1))
        assert 0.8 * ceiling <= spread.delay(n) <= ceiling


def test_a_success_starts_the_schedule_over() -> None:
    retry = make()
    retry.failed("down")
    retry.failed("down")
    assert retry.succeeded() is True and retry.failures == 0
    assert retry.failed("down") == 0.5
    assert retry.succeeded() is True
    assert retry.succeeded() is False, "no outage, nothing recovered"


def test_a_long_outage_never_overflows() -> None:
    retry = make()
    assert retry.delay(10_000) == 3.0


def test_one_warning_per_outage_and_one_recovery_line(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    retry = make(clock)
    caplog.set_level(logging.DEBUG, logger="tether.retrying")
    for _ in range(5):
        retry.failed(ConnectionError("agent unreachable"))
        clock.now += 2.0
    retry.succeeded()
    retry.succeeded()
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in records] == [logging.WARNING] + [logging.DEBUG] * 4 + [logging.INFO]
    assert "Consul watch of services failed: agent unreachable" in records[0][1]
    assert records[-1][1] == "Consul watch of services recovered after 5 failures/10.0 s"


def test_an_attempt_that_ran_long_enough_is_a_new_outage(caplog: pytest.LogCaptureFixture) -> None:
    """A supervised task: restart delays reset once it ran for ``reset_after``."""
    clock = Clock()
    retry = Retry("watcher consul", base=1.0, cap=30.0, jitter=0.0, reset_after=60.0, clock=clock)
    caplog.set_level(logging.DEBUG, logger="tether.retrying")
    delays = []
    for ran in (1.0, 1.0, 1.0, 61.0, 1.0):
        retry.started()
        clock.now += ran
        delays.append(retry.failed("crashed"))
        clock.now += delays[-1]
    assert delays == [1.0, 2.0, 4.0, 1.0, 2.0]
    levels = [logging.getLevelName(r.levelno) for r in caplog.records]
    assert levels == ["WARNING", "DEBUG", "DEBUG", "INFO", "WARNING", "DEBUG"]


async def test_pause_sleeps_the_delay() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    retry = Retry("s", base=0.25, cap=1.0, rng=Fixed("high"), sleep=sleep)
    assert await retry.pause("down") == 0.25
    await retry.pause("down")
    assert slept == [0.25, 0.5]


@pytest.mark.parametrize(
    "options",
    [
        {"base": 0.0, "cap": 1.0},
        {"base": 2.0, "cap": 1.0},
        {"base": 1.0, "cap": 2.0, "jitter": 1.5},
        {"base": 1.0, "cap": 2.0, "reset_after": 0.0},
    ],
)
def test_nonsense_is_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Retry("s", **options)  # type: ignore[arg-type]
