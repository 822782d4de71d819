"""Port choice for the dev stack: outside the ephemeral range, free, distinct."""

from __future__ import annotations

import random
import socket

import pytest

from tether_dev import ports
from tether_dev.reporting import DevStackError


def test_ephemeral_start_reads_the_first_number() -> None:
    assert ports.ephemeral_start(lambda: "32768\t60999\n") == 32768


@pytest.mark.parametrize("text", ["", "garbage", "\n"])
def test_ephemeral_start_falls_back_to_linux_default(text: str) -> None:
    assert ports.ephemeral_start(lambda: text) == ports.DEFAULT_EPHEMERAL_START


def test_ephemeral_start_survives_an_unreadable_file() -> None:
    def unreadable() -> str:
        raise OSError("no /proc here")

    assert ports.ephemeral_start(unreadable) == ports.DEFAULT_EPHEMERAL_START


def test_candidates_stay_below_the_ephemeral_range() -> None:
    candidates = ports.candidate_range(32768)
    assert candidates.start == ports.LOWEST
    assert candidates.stop == 32768


def test_a_low_ephemeral_range_still_leaves_candidates() -> None:
    candidates = ports.candidate_range(15000)
    assert len(candidates) >= 1000
    assert min(candidates) >= 10000


def test_allocate_returns_distinct_bindable_ports() -> None:
    chosen = ports.allocate(12, rng=random.Random(7))
    assert len(set(chosen)) == 12
    candidates = ports.candidate_range(ports.ephemeral_start())
    for port in chosen:
        assert port in candidates
        assert ports.is_free(port)


def test_a_listening_port_is_not_free() -> None:
    with socket.socket() as listener:
        listener.bind((ports.HOST, 0))
        listener.listen()
        assert not ports.is_free(listener.getsockname()[1])


def test_allocate_gives_up_boundedly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_try_bind", lambda port: None)
    with pytest.raises(DevStackError, match="no free port"):
        ports.allocate(1)
