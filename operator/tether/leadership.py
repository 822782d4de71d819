"""Leader election on a ``coordination.k8s.io`` Lease, the way client-go does it.

One replica reconciles; the others wait. Three rules keep two leaders from
ever writing at once, whatever the clocks say:

* **Expiry is judged by observed time.** A candidate never compares the
  holder's ``renewTime`` with its own clock (a skewed clock would let it take
  over a live leader). It notes, on its own monotonic clock, when it last saw
  the Lease record *change*, and takes over only once the record has stayed
  unchanged for a whole ``leaseDurationSeconds`` — as client-go's
  ``observedTime`` does.
* **A leader stops before a rival can start.** A rival that saw the last
  renewal cannot take over before ``leaseDuration`` after that renewal was
  *sent*. The holder gives up at ``renew_deadline`` (shorter) after its last
  successful renewal was sent, even when a renewal call hangs: ``on_lost``
  exits the process (as controller-runtime does), so no write races the new
  leader.
* **A stopping leader hands over at once.** :meth:`LeaseElector.release`
  clears the holder (client-go's ``ReleaseOnCancel``), so a candidate takes
  over at its next attempt instead of after the lease runs out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import kubernetes.client as k8s
from kubernetes.client.exceptions import ApiException

from tether import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

# Every Lease call has a deadline (connect, read), so a hung API server cannot
# keep a thread, and with it the process, alive after a stop.
_REQUEST_TIMEOUT = (3.0, 5.0)
# A release happens during a stop, which must end within 2 s in all.
_RELEASE_SECONDS = 1.0


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Observer:
    """Pure: when this candidate last saw the Lease record change (its own monotonic clock)."""

    record: tuple[Any, ...] | None = None
    changed_at: float = 0.0

    def observe(self, record: tuple[Any, ...], now: float) -> None:
        if record != self.record:
            self.record = record
            self.changed_at = now

    def expired(self, *, holder: str | None, duration: float, now: float) -> bool:
        """Free to take: nobody holds it, or the record has not moved for ``duration``."""
        if not holder:
            return True
        return now > self.changed_at + duration


def _record(spec: Any) -> tuple[Any, ...]:
    """The parts of a Lease that change with each renewal or hand-over."""
    return (
        spec.holder_identity, spec.renew_time, spec.acquire_time,
        spec.lease_duration_seconds, spec.lease_transitions,
    )


class LeaseElector:
    """Acquire and hold one Lease; call ``on_lost`` the moment holding it is in doubt."""

    def __init__(
        self, *, namespace: str, name: str, identity: str, lease_seconds: int = 15,
        renew_deadline: float = 10.0, retry_period: float = 2.0, acquire_period: float = 1.0,
        on_lost: Callable[[], None],
        api: Any = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < retry_period < renew_deadline < lease_seconds:
            raise ValueError("need 0 < retry_period < renew_deadline < lease_seconds")
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        # A standby looks more often than the holder renews (reads only): after
        # a release it takes over within about this long (rolling updates).
        self.acquire_period = acquire_period
        self.on_lost = on_lost
        self._api = api if api is not None else k8s.CoordinationV1Api()
        self._clock = clock
        self._observer = Observer()
        # When the last successful acquire/renew request was *sent*: a rival
        # cannot take over before lease_seconds after it.
        self._last_ok_sent: float | None = None
        # A private pool: a stop abandons a hung call instead of waiting for it.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lease")

    @property
    def leading(self) -> bool:
        return self._last_ok_sent is not None

    async def _thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def _try(self) -> bool:
        """One attempt to acquire or renew; True when we hold the lease."""
        now = _now()
        try:
            lease = self._api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=_REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = k8s.V1Lease(
                metadata=k8s.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=k8s.V1LeaseSpec(
                    holder_identity=self.identity, lease_duration_seconds=self.lease_seconds,
                    acquire_time=now, renew_time=now, lease_transitions=0,
                ),
            )
            try:
                self._api.create_namespaced_lease(self.namespace, body, _request_timeout=_REQUEST_TIMEOUT)
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False
                raise
            return True
        spec = lease.spec or k8s.V1LeaseSpec()
        lease.spec = spec
        self._observer.observe(_record(spec), self._clock())
        mine = spec.holder_identity == self.identity
        if not mine and not self._observer.expired(
            holder=spec.holder_identity, duration=float(spec.lease_duration_seconds or self.lease_seconds),
            now=self._clock(),
        ):
            return False
        if not mine:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = now
        spec.holder_identity = self.identity
        spec.lease_duration_seconds = self.lease_seconds
        spec.renew_time = now
        try:
            # replace carries resourceVersion: two candidates cannot both win.
            self._api.replace_namespaced_lease(
                self.name, self.namespace, lease, _request_timeout=_REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def acquire(self) -> None:
        """Wait until this replica holds the lease."""
        log.info("waiting to become leader (Lease %s/%s) as %s", self.namespace, self.name, self.identity)
        while True:
            sent = self._clock()
            try:
                if await self._thread(self._try):
                    self._last_ok_sent = sent
                    metrics.LEADER.set(1)
                    log.info("became leader as %s", self.identity)
                    return
            except Exception as exc:
                log.warning("leader election attempt failed: %s", exc)
            await asyncio.sleep(self.acquire_period)

    async def hold(self) -> None:
        """Renew until the lease is lost or in doubt, then call ``on_lost``."""
        while True:
            await asyncio.sleep(self.retry_period)
            if self._last_ok_sent is None:
                return  # released (stopping) or never acquired: nothing to hold
            sent = self._clock()
            remaining = self._last_ok_sent + self.renew_deadline - sent
            ok: bool | None = None
            if remaining > 0:
                try:
                    # A hung call is abandoned at the deadline, not waited for.
                    ok = await asyncio.wait_for(self._thread(self._try), remaining)
                except TimeoutError:
                    log.warning("lease renewal did not answer within the renew deadline")
                except Exception as exc:
                    log.warning("lease renewal failed: %s", exc)
            if ok:
                self._last_ok_sent = sent
                continue
            if ok is False or self._clock() >= self._last_ok_sent + self.renew_deadline:
                self._lost()
                return

    def _lost(self) -> None:
        self._last_ok_sent = None
        metrics.LEADER.set(0)
        log.error("lost the leader Lease %s/%s; stopping", self.namespace, self.name)
        self.on_lost()

    def _release(self) -> bool:
        lease = self._api.read_namespaced_lease(self.name, self.namespace, _request_timeout=_REQUEST_TIMEOUT)
        spec = lease.spec
        if spec is None or spec.holder_identity != self.identity:
            return False
        spec.holder_identity = None
        spec.lease_duration_seconds = 1
        spec.renew_time = _now()
        self._api.replace_namespaced_lease(
            self.name, self.namespace, lease, _request_timeout=_REQUEST_TIMEOUT
        )
        return True

    async def release(self) -> None:
        """Give the lease up (after every writer stopped) so a candidate takes over at once.

        Best effort within ``_RELEASE_SECONDS``: if it fails, the lease simply expires.
        """
        if not self.leading:
            return
        self._last_ok_sent = None
        metrics.LEADER.set(0)
        try:
            if await asyncio.wait_for(self._thread(self._release), _RELEASE_SECONDS):
                log.info("released the leader Lease %s/%s", self.namespace, self.name)
        except Exception as exc:
            log.warning("could not release the leader Lease (it will expire): %s", exc)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
