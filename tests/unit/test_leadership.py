"""Leader election (issue 14): expiry by observed time, release on stop, a hung
renewal gives up before a rival may take over. A fake Lease API and a fake
clock; the end-to-end timings are in tests/e2e/test_leader_handover.py."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes.client as k8s
import pytest
from kubernetes.client.exceptions import ApiException

from tether.leadership import LeaseElector, Observer


class FakeLeases:
    """One Lease with resourceVersion checks, like the API server's."""

    def __init__(self) -> None:
        self.lease: k8s.V1Lease | None = None
        self.rv = 0
        self.hang = threading.Event()  # set: replace blocks until released
        self.unblock = threading.Event()

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> k8s.V1Lease:
        if self.lease is None:
            raise ApiException(status=404)
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace: str, body: k8s.V1Lease, **_: Any) -> k8s.V1Lease:
        if self.lease is not None:
            raise ApiException(status=409)
        self.rv += 1
        body.metadata.resource_version = str(self.rv)
        self.lease = copy.deepcopy(body)
        return body

    def replace_namespaced_lease(self, name: str, namespace: str, body: k8s.V1Lease, **_: Any) -> k8s.V1Lease:
        if self.hang.is_set():
            self.unblock.wait(30)
        assert self.lease is not None
        if body.metadata.resource_version != self.lease.metadata.resource_version:
            raise ApiException(status=409)
        self.rv += 1
        body.metadata.resource_version = str(self.rv)
        self.lease = copy.deepcopy(body)
        return body

    def renew_as(self, holder: str, renew_time: datetime) -> None:
        """Another replica renews (its clock says ``renew_time``)."""
        self.rv += 1
        self.lease = k8s.V1Lease(
            metadata=k8s.V1ObjectMeta(name="l", namespace="ns", resource_version=str(self.rv)),
            spec=k8s.V1LeaseSpec(
                holder_identity=holder, lease_duration_seconds=15, renew_time=renew_time,
                acquire_time=renew_time, lease_transitions=0,
            ),
        )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _elector(api: FakeLeases, identity: str, clock: Clock | None = None, **kw: Any) -> LeaseElector:
    return LeaseElector(
        namespace="ns", name="l", identity=identity, api=api, on_lost=kw.pop("on_lost", lambda: None),
        clock=clock or Clock(), **kw,
    )


def test_observer_counts_from_the_last_change_seen() -> None:
    obs = Observer()
    obs.observe(("a", 1), now=0.0)
    assert not obs.expired(holder="a", duration=15, now=14.0)
    obs.observe(("a", 2), now=14.0)  # renewed
    assert not obs.expired(holder="a", duration=15, now=28.0)
    assert obs.expired(holder="a", duration=15, now=29.5)
    assert obs.expired(holder=None, duration=15, now=0.0)  # released


def test_a_skewed_clock_never_takes_over_a_live_leader() -> None:
    """The holder's clock is an hour behind: its renewTime looks long expired."""
    api, clock = FakeLeases(), Clock()
    rival = _elector(api, "rival", clock)
    skewed = datetime.now(UTC) - timedelta(hours=1)
    for i in range(20):
        api.renew_as("leader", skewed + timedelta(seconds=2 * i))  # renewing every 2 s
        assert rival._try() is False
        clock.now += 2.0
    assert api.lease is not None and api.lease.spec.holder_identity == "leader"


def test_a_silent_leader_is_taken_over_after_the_lease_on_the_candidates_clock() -> None:
    api, clock = FakeLeases(), Clock()
    api.renew_as("leader", datetime.now(UTC) + timedelta(hours=1))  # clock ahead: looks fresh forever
    rival = _elector(api, "rival", clock)
    assert rival._try() is False
    clock.now += 14.0
    assert rival._try() is False
    clock.now += 2.0
    assert rival._try() is True
    assert api.lease is not None and api.lease.spec.holder_identity == "rival"


async def test_release_hands_over_at_once() -> None:
    api, clock = FakeLeases(), Clock()
    leader = _elector(api, "leader", clock)
    await leader.acquire()
    rival = _elector(api, "rival", clock)
    assert rival._try() is False
    await leader.release()
    assert api.lease is not None and not api.lease.spec.holder_identity
    assert rival._try() is True  # no waiting for the lease to run out


async def test_release_leaves_someone_elses_lease_alone() -> None:
    api = FakeLeases()
    api.renew_as("other", datetime.now(UTC))
    elector = _elector(api, "me")
    elector._last_ok_sent = 0.0  # believes it leads (e.g. lost it a moment ago)
    await elector.release()
    assert api.lease is not None and api.lease.spec.holder_identity == "other"


async def test_a_hung_renewal_gives_up_at_the_renew_deadline_before_the_lease_ends() -> None:
    api = FakeLeases()
    lost = asyncio.Event()
    loop = asyncio.get_running_loop()
    elector = LeaseElector(
        namespace="ns", name="l", identity="me", api=api, lease_seconds=30, renew_deadline=1.0,
        retry_period=0.1, on_lost=lambda: loop.call_soon_threadsafe(lost.set),
    )
    await elector.acquire()
    sent = elector._last_ok_sent
    assert sent is not None
    api.hang.set()  # every renewal from now on hangs
    try:
        await asyncio.wait_for(elector.hold(), 20)
        assert lost.is_set()
        # Gave up while the renewal call was still hanging, well before any rival
        # (who saw the last renewal no earlier than it was sent) could take over.
        assert time.monotonic() < sent + elector.lease_seconds
    finally:
        api.unblock.set()
        elector.close()


def test_timings_must_leave_room_for_the_hand_over() -> None:
    with pytest.raises(ValueError):
        _elector(FakeLeases(), "me", lease_seconds=15, renew_deadline=15.0)


async def test_tethers_stop_handler_survives_kopf_installing_its_own() -> None:
    """A SIGTERM while Kopf starts must still reach the handler that bounds the stop."""
    import os
    import signal

    from tether import running

    loop = asyncio.get_running_loop()
    got: list[str] = []
    armed: list[str] = []
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    running._keep_signal_handlers(loop, lambda: got.append("tether"), on_first=lambda: armed.append("x"))
    try:
        loop.add_signal_handler(signal.SIGTERM, lambda: got.append("kopf"))  # as Kopf does
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(50):
            await asyncio.sleep(0.01)
            if got:
                break
        assert got == ["tether"] and armed == ["x"]  # the stop deadline is armed at once
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
