"""Leader election on a ``coordination.k8s.io`` Lease.

One replica reconciles; the others wait. The holder renews every
``retry_period``; a candidate takes over once ``renewTime + leaseDuration`` has
passed. A holder that cannot renew before its own lease runs out must stop
writing at once: it calls ``on_lost``, which exits the process (as
controller-runtime does), so no write can race the new leader.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes.client as k8s
from kubernetes.client.exceptions import ApiException

from tether import metrics

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


def expired(spec: dict[str, Any], now: datetime) -> bool:
    """Pure: has the holder's lease run out?"""
    renew = spec.get("renewTime") or spec.get("acquireTime")
    if not spec.get("holderIdentity") or renew is None:
        return True
    if isinstance(renew, str):
        renew = datetime.fromisoformat(renew.replace("Z", "+00:00"))
    duration = int(spec.get("leaseDurationSeconds") or 15)
    return bool(renew + timedelta(seconds=duration) < now)


class LeaseElector:
    """Acquire and hold one Lease; call ``on_lost`` the moment it is lost."""

    def __init__(
        self, *, namespace: str, name: str, identity: str, lease_seconds: int = 15,
        retry_period: float = 2.0, on_lost: Callable[[], None],
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.retry_period = retry_period
        self.on_lost = on_lost
        self._api = k8s.CoordinationV1Api()

    def _try(self) -> bool:
        """One attempt to acquire or renew; True when we hold the lease."""
        now = _now()
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace)
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
                self._api.create_namespaced_lease(self.namespace, body)
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False
                raise
            return True
        spec = lease.spec or k8s.V1LeaseSpec()
        lease.spec = spec
        current = {
            "holderIdentity": spec.holder_identity,
            "renewTime": spec.renew_time,
            "acquireTime": spec.acquire_time,
            "leaseDurationSeconds": spec.lease_duration_seconds,
        }
        mine = spec.holder_identity == self.identity
        if not mine and not expired(current, now):
            return False
        if not mine:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = now
        spec.holder_identity = self.identity
        spec.lease_duration_seconds = self.lease_seconds
        spec.renew_time = now
        try:
            # replace carries resourceVersion: two candidates cannot both win.
            self._api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def acquire(self) -> None:
        """Wait until this replica holds the lease."""
        log.info("waiting to become leader (Lease %s/%s) as %s", self.namespace, self.name, self.identity)
        while True:
            try:
                if await asyncio.to_thread(self._try):
                    metrics.LEADER.set(1)
                    log.info("became leader as %s", self.identity)
                    return
            except Exception as exc:
                log.warning("leader election attempt failed: %s", exc)
            await asyncio.sleep(self.retry_period)

    async def hold(self) -> None:
        """Renew until the lease is lost, then call ``on_lost``."""
        last_renew = time.monotonic()
        while True:
            await asyncio.sleep(self.retry_period)
            try:
                ok = await asyncio.wait_for(asyncio.to_thread(self._try), self.lease_seconds / 2)
            except Exception as exc:
                log.warning("lease renewal failed: %s", exc)
                ok = None
            if ok:
                last_renew = time.monotonic()
                continue
            # Another holder took it, or we could not renew before the lease
            # could be considered expired by others: stop now.
            if ok is False or time.monotonic() - last_renew > self.lease_seconds - self.retry_period:
                metrics.LEADER.set(0)
                log.error("lost the leader Lease %s/%s; stopping", self.namespace, self.name)
                self.on_lost()
                return
