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


def test_a_port_held_on_another_loopback_address_is_not_free_for_the_harness(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An HA member's port (127.0.0.10) is free on 127.0.0.1 but not for a wildcard bind."""
    from tether_dev.harness.ports import ANY, free_port

    with socket.socket() as member:
        member.bind(("127.0.0.10", 0))
        member.listen()
        held = member.getsockname()[1]
        assert ports.is_free(held)  # on 127.0.0.1: the trap the harness must avoid
        assert not ports.is_free(held, ANY)
        with socket.socket() as probe:
            probe.bind((ports.HOST, 0))
            spare = probe.getsockname()[1]
        # Only the held port and one free port to choose from: the harness must take the free one.
        monkeypatch.setattr(ports, "candidate_range", lambda ephemeral: [held, spare])
        chosen = {free_port() for _ in range(20)}
        assert chosen == {spare}
