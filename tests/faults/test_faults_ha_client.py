"""Tether's etcd client on the 3-member HA stack: failover and unknown outcomes.

Real members, real faults (``tether_dev.faults``): the member the client
is talking to is *blackholed* (its packets dropped, so the connection stays
open and silent, never refused), cut off from its peers only, or SIGKILLed.

What must hold (see ``tether.clients.etcd.client``'s contract):

- a read fails over to a healthy member within the client's deadline;
- a transaction is sent once; when its outcome is unknown the client raises
  ``EtcdUnavailable`` saying so (and logs it), never returns success; what
  happened is learnt by re-reading, and the next write goes to a healthy member
  within its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest
from faultkit import log
from hakit import HaFaultStack

from tether.clients.etcd.client import Compare, EtcdClient, EtcdConnection, EtcdUnavailable, Put
from tether_dev import stack as devstack

#: The client's deadline for one call, failover included (its default).
DEADLINE = 5.0
#: Slack for scheduling on a loaded 2-core machine.
SLACK = 1.5


def connection(ha_stack: HaFaultStack) -> EtcdConnection:
    return EtcdConnection.from_env(ha_stack.env)


async def pin_to(client: EtcdClient, member: str, ha_stack: HaFaultStack) -> None:
    """Make ``member`` the client's current endpoint (it prefers the current one)."""
    url = ha_stack.url(member)
    await client.status()  # opens the channels
    index = list(client.connection.endpoints).index(url)
    client._current = index  # test-only: choose the victim deterministically
    await client.status()
    assert client._current == index


def key() -> bytes:
    return f"/ha-client/{uuid.uuid4().hex[:8]}".encode()


@pytest.mark.parametrize("clients", [True, False], ids=["blackholed", "cut-from-peers"])
def test_reads_fail_over_within_the_deadline_when_the_member_is_partitioned(
    ha_stack: HaFaultStack, clients: bool
) -> None:
    """The current member (the etcd leader) stops answering; reads still succeed in time."""
    leader, _ = ha_stack.settle()
    others = [m for m in devstack.ETCD_MEMBERS if m != leader]

    async def scenario() -> list[float]:
        async with EtcdClient(connection(ha_stack)) as client:
            k = key()
            await client.txn([], [Put(k, b"v1")])
            await pin_to(client, leader, ha_stack)
            took: list[float] = []
            with ha_stack.faults.partition([leader], others, clients=clients, limit=30):
                await asyncio.sleep(0.2)
                # Several reads: the first pays for the failover, the rest must
                # not keep going back to the silent member.
                for _ in range(3):
                    started = time.monotonic()
                    got = await client.get(k)
                    took.append(time.monotonic() - started)
                    assert got is not None and got.value == b"v1"
            return took

    took = asyncio.run(scenario())
    how = "blackholed" if clients else "cut from its peers"
    log(f"reads with {leader} {how}: {[round(t, 2) for t in took]} s")
    assert took[0] <= DEADLINE + SLACK, took
    assert max(took[1:]) <= DEADLINE / 3 + SLACK, f"later reads went back to the silent member: {took}"


def test_a_transaction_to_a_blackholed_member_is_unknown_then_the_next_fails_over(
    ha_stack: HaFaultStack, caplog: pytest.LogCaptureFixture
) -> None:
    """Sent to a silent member: EtcdUnavailable ("may or may not"), never success; then re-read."""
    leader, _ = ha_stack.settle()
    others = [m for m in devstack.ETCD_MEMBERS if m != leader]
    caplog.set_level(logging.WARNING, logger="tether.clients.etcd.client")

    async def scenario() -> tuple[str, float, bytes | None, float]:
        async with EtcdClient(connection(ha_stack)) as client:
            k = key()
            first = await client.txn([], [Put(k, b"v1")])
            guard = [Compare(k, "mod", "=", first.revision)]
            await pin_to(client, leader, ha_stack)
            with ha_stack.faults.partition([leader], others, clients=True, limit=30):
                await asyncio.sleep(0.2)
                started = time.monotonic()
                with pytest.raises(EtcdUnavailable) as raised:
                    await client.txn(guard, [Put(k, b"v2")])
                unknown_after = time.monotonic() - started
                # Re-read (fails over), then write again guarded by what was read.
                current = await client.get(k)
                assert current is not None
                started = time.monotonic()
                retry = await client.txn([Compare(k, "mod", "=", current.mod_revision)], [Put(k, b"v3")])
                retry_took = time.monotonic() - started
                assert retry.succeeded
            return str(raised.value), unknown_after, current.value, retry_took

    message, unknown_after, seen, retry_took = asyncio.run(scenario())
    log(
        f"txn to blackholed {leader}: unknown after {unknown_after:.2f} s ({message[:120]}); "
        f"re-read saw {seen!r}; guarded retry took {retry_took:.2f} s"
    )
    assert "may or may not have been applied" in message
    assert unknown_after <= DEADLINE + SLACK
    # A blackholed leader cannot commit (no quorum): the write did not land.
    assert seen == b"v1"
    assert retry_took <= DEADLINE + SLACK
    assert any("outcome unknown" in r.getMessage() for r in caplog.records)


def test_an_unknown_outcome_on_an_isolated_leader_is_settled_by_re_reading(
    ha_stack: HaFaultStack,
) -> None:
    """The leader is cut from its peers but not from the client: it takes the request, cannot commit.

    The client must raise (unknown), not report success; after healing, a
    re-read tells what happened, and a write guarded by that read is safe.
    """
    leader, _ = ha_stack.settle()
    others = [m for m in devstack.ETCD_MEMBERS if m != leader]

    async def scenario() -> tuple[str, bytes | None]:
        async with EtcdClient(connection(ha_stack)) as client:
            k = key()
            first = await client.txn([], [Put(k, b"v1")])
            await pin_to(client, leader, ha_stack)
            with ha_stack.faults.partition([leader], others, clients=False, limit=30):
                await asyncio.sleep(0.05)  # before the leader notices it lost its quorum
                with pytest.raises(EtcdUnavailable) as raised:
                    await client.txn([Compare(k, "mod", "=", first.revision)], [Put(k, b"v2")])
            ha_stack.faults.etcd_leader()
            after = await client.get(k)
            assert after is not None
            # A write guarded by the re-read succeeds exactly once, whatever happened.
            retry = await client.txn([Compare(k, "mod", "=", after.mod_revision)], [Put(k, b"v3")])
            assert retry.succeeded
            return str(raised.value), after.value

    message, seen = asyncio.run(scenario())
    log(f"txn to isolated leader {leader}: {message[:160]}; re-read after healing saw {seen!r}")
    assert seen in (b"v1", b"v2")


def test_reads_and_writes_fail_over_when_the_member_is_killed(ha_stack: HaFaultStack) -> None:
    leader, _ = ha_stack.settle()

    async def scenario() -> tuple[float, float]:
        async with EtcdClient(connection(ha_stack)) as client:
            k = key()
            await client.txn([], [Put(k, b"v1")])
            await pin_to(client, leader, ha_stack)
            ha_stack.faults.kill(leader)
            started = time.monotonic()
            got = await client.get(k)
            read_took = time.monotonic() - started
            assert got is not None and got.value == b"v1"
            started = time.monotonic()
            # The election may still be under way: a transient refusal is honest;
            # a write must land within a couple of deadlines.
            for _ in range(3):
                try:
                    result = await client.txn([Compare(k, "mod", "=", got.mod_revision)], [Put(k, b"v2")])
                    break
                except EtcdUnavailable as exc:
                    log(f"write during the election: {exc}")
                    got = await client.get(k)
                    assert got is not None
                    if got.value == b"v2":
                        break
            else:
                raise AssertionError("no write landed within three attempts after the leader died")
            write_took = time.monotonic() - started
            assert got.value == b"v2" or result.succeeded
            return read_took, write_took

    try:
        read_took, write_took = asyncio.run(scenario())
    finally:
        ha_stack.restart()
    log(f"{leader} killed: read failed over in {read_took:.2f} s, write landed after {write_took:.2f} s")
    assert read_took <= DEADLINE + SLACK
    assert write_took <= 2 * DEADLINE + SLACK
