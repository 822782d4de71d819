"""One Consul blocking-query loop, with the index rules of Consul's documentation done once.

Every Consul watcher of the operator (the agent's services and checks, the
synthetic node's services and checks, each KV root) is the same loop: ask
with the last ``X-Consul-Index``, let Consul hold the request until something
changes or ``wait`` passes, hand the answer on, ask again. The rules of
https://developer.hashicorp.com/consul/api-docs/features/blocking live here:

* the first query has index 0: a plain read, answered at once;
* **an index that goes backwards resets to 0** (a server restored from a
  snapshot, a cluster rebuilt, an agent restarted empty): blocking on the old
  index could wait for a long time while the state already changed. The answer
  is still handed on, marked ``fresh``, and the next query re-reads;
* **an index of 0 or less (or none) is never blocked on**: Consul's docs call it
  a bug that still happens; the next query uses 1, as they ask, after a pause,
  so a server that keeps answering without an index is not asked in a hot loop;
* ``wait`` is bounded: Consul caps it at 10 minutes and adds up to wait/16 of
  jitter; the clients set their deadline from it;
* errors go through the stream's :class:`~tether.retrying.Retry` (backoff,
  one warning per outage), and the query after an error starts again at 0 —
  the server may have come back empty — so its answer is ``fresh`` as well.

A ``fresh`` answer is not a continuation of the previous one: the watcher
compares everything instead of looking for what moved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, NoReturn, TypeVar

from tether.api import InvalidSpec
from tether.api.durations import parse_ns
from tether.clients.consul.client import ConsulError
from tether.retrying import Retry

T = TypeVar("T")

#: Consul's own limit on ``wait``.
MAX_WAIT_SECONDS = 600.0


@dataclass(frozen=True)
class Answer(Generic[T]):
    """One answer of a blocking query."""

    index: int  # X-Consul-Index as Consul returned it (0 when absent)
    value: T
    fresh: bool  # first answer, after an error, or the index went backwards: compare everything
    moved: bool  # the index differs from the one waited on (always true when fresh)


def wait_seconds(wait: str) -> float:
    """``wait`` in seconds, or ValueError when Consul would not honour it."""
    try:
        seconds = parse_ns(wait, field="wait") / 1e9
    except InvalidSpec as exc:
        raise ValueError(str(exc)) from None
    if not 0 < seconds <= MAX_WAIT_SECONDS:
        raise ValueError(f"wait must be more than 0 and at most 10m (Consul's limit), not {wait!r}")
    return seconds


async def follow(
    fetch: Callable[[int, str], Awaitable[tuple[int, T]]],
    answered: Callable[[Answer[T]], None],
    *,
    retry: Retry,
    wait: str = "300s",
    relist_pause: float = 0.1,
    no_index_pause: float = 1.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> NoReturn:
    """Run one blocking query for ever, calling ``answered`` with each answer.

    ``fetch(index, wait)`` makes one query and returns Consul's index and the
    value; it raises :class:`ConsulError` on failure. Lives as long as its
    task (cancellation ends it); every pass awaits a query whose deadline the
    client bounds from ``wait``, or sleeps.
    """
    wait_seconds(wait)
    index = 0
    while True:
        try:
            new, value = await fetch(index, wait)
        except ConsulError as exc:
            await retry.pause(exc)
            index = 0
            continue
        retry.succeeded()
        fresh = index == 0 or new < index
        answered(Answer(new, value, fresh=fresh, moved=fresh or new != index))
        if new <= 0:
            index = 1
            await sleep(no_index_pause)
        elif new < index:
            index = 0
            await sleep(relist_pause)
        else:
            index = new
