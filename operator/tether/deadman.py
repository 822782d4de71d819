"""``tether deadman``: the dead-man switch that outlives the operator.

Consul's catalog has no TTL, so instances on the synthetic node written by a
Tether that is gone would stay passing for ever. Every Tether instance there
also carries the node's check ``tether:alive``
(:mod:`tether.consulservice.nodecheck`), which the leader keeps passing. This
small process watches the operator's leader Lease and, once no replica has
renewed it for the Lease's duration plus a margin, sets that one check
critical — one catalog write, whatever the number of instances, and every
instance on the node stops being passing.

What it does, every ``interval`` (2 s):

1. GET the Lease (one call; no watch, no list, no per-object cost) and judge
   it (:class:`Judge`, pure). Silence is measured on this process's own
   monotonic clock, from when it last saw the Lease record *change* — never
   by comparing ``renewTime`` with the local clock — so a skewed clock can
   neither declare a live leader dead nor keep a dead one alive, as the
   candidates in :mod:`tether.leadership` do.
2. Dead: read the check (and the node), then **GET the Lease again**, and
   only if it is still dead write ``critical`` with check-and-set on the
   ModifyIndex it read (``/v1/txn``). A leader that comes back renews the
   Lease *before* it writes ``passing``: if its write came before our read,
   the second Lease read sees the renewal and we stop; if after, our guard
   fails and Consul rolls our write back. The one interleaving left (a
   leader renewing and writing between our second Lease read and our write,
   within milliseconds) loses the leader's passing to our critical; the
   leader's catalog watcher sees the check move and writes passing again
   (:mod:`tether.consulservice.alivekeeping`): a blip, never a lasting state.
3. It writes once per silence: after the write it waits for the Lease to
   change before it reads Consul again.

It never touches anything but that one check: it needs ``get`` on the one
Lease and Consul's ``node:write`` on the synthetic node. If it cannot read
the Lease (API server unreachable) it does nothing: it cannot tell a dead
leader from its own partition, and a false alarm would take every instance
out of service. "Scaled to 0", "crash-looping" and "SIGKILLed" look the same
from here: nobody renews.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tether import logs
from tether.clients.consul.client import Catalog, ConsulClient, ConsulContended, ConsulError
from tether.clients.kube import client as kube
from tether.clients.kube.http import KubeError, KubeHttp, KubeNotFound
from tether.consulservice import nodecheck
from tether.retrying import Retry
from tether.settings import Settings

log = logging.getLogger(__name__)

#: How often the Lease is read.
INTERVAL_SECONDS = 2.0
#: Silence allowed beyond the Lease's duration: a standby takes a released
#: Lease within about a second, and a renewal may be a retry period late.
MARGIN_SECONDS = 5.0
#: The duration assumed while the Lease does not exist (that of ``tether run``).
LEASE_SECONDS = 15.0
# Each call has a deadline well under what the switch promises (30 s).
_KUBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class LeaseView:
    """The parts of a Lease that move with each renewal or hand-over."""

    holder: str = ""
    renew_time: str = ""
    acquire_time: str = ""
    duration: float | None = None
    transitions: int = 0

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> LeaseView:
        spec = body.get("spec") or {}
        duration = spec.get("leaseDurationSeconds")
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            renew_time=str(spec.get("renewTime") or ""),
            acquire_time=str(spec.get("acquireTime") or ""),
            duration=float(duration) if isinstance(duration, int | float) and duration > 0 else None,
            transitions=int(spec.get("leaseTransitions") or 0),
        )


@dataclass(frozen=True)
class Verdict:
    dead: bool
    silent_for: float  # seconds since this process last saw the Lease change
    allowed: float  # the Lease's duration plus the margin
    holder: str

    def describe(self) -> str:
        who = f"last holder {self.holder!r}" if self.holder else "no holder"
        return f"not renewed for {self.silent_for:.1f} s (allowed {self.allowed:.1f} s; {who})"


_UNSEEN = object()


class Judge:
    """Pure: is a leader alive, from successive reads of its Lease and this process's clock.

    ``None`` stands for an absent Lease (a Tether with ``--leader-elect``
    creates it at once: absent for long means none runs). The first
    observation starts the count, so a freshly started deadman waits a whole
    duration plus margin before it may judge anyone dead.
    """

    def __init__(self, *, margin: float = MARGIN_SECONDS, default_duration: float = LEASE_SECONDS) -> None:
        if margin < 0 or default_duration <= 0:
            raise ValueError("need margin >= 0 and default_duration > 0")
        self.margin = margin
        self.default_duration = default_duration
        self._record: object = _UNSEEN
        #: The monotonic time at which the record was last seen to change.
        self.changed_at = 0.0

    def observe(self, lease: LeaseView | None, now: float) -> Verdict:
        if lease != self._record:
            self._record = lease
            self.changed_at = now
        # A released Lease (holder cleared) carries the short duration the
        # releasing leader set: the margin is then what a standby gets to take it.
        duration = (lease.duration if lease is not None else None) or self.default_duration
        allowed = duration + self.margin
        silent = now - self.changed_at
        return Verdict(silent > allowed, silent, allowed, lease.holder if lease is not None else "")


class DeadMan:
    """The loop: read the Lease, judge, and set ``tether:alive`` critical once per silence."""

    def __init__(
        self, *, read_lease: Callable[[], Any], catalog: Catalog, node: str, cluster: str, lease: str,
        judge: Judge | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read_lease = read_lease
        self.catalog = catalog
        self.node = node
        self.cluster = cluster
        self.lease = lease
        self.judge = judge or Judge()
        self._clock = clock
        #: ``judge.changed_at`` of the silence already handled (written or found critical).
        self._handled: float | None = None
        #: Catalog writes made (one per silence at most).
        self.writes = 0
        #: Monotonic time of the last completed tick, for the health endpoint.
        self.last_tick = clock()
        self._kube_retry = Retry(f"read of Lease {lease}", base=1.0, cap=1.0, logger=log)
        self._consul_retry = Retry(f"Consul check {nodecheck.CHECK_ID!r}", base=1.0, cap=1.0, logger=log)

    async def _verdict(self) -> Verdict | None:
        """Read and judge the Lease; None when it could not be read (judge nothing)."""
        try:
            body = await self._read_lease()
        except KubeNotFound:
            body = None
        except KubeError as exc:
            self._kube_retry.failed(exc)
            return None
        self._kube_retry.succeeded()
        return self.judge.observe(LeaseView.from_body(body) if body is not None else None, self._clock())

    async def tick(self) -> None:
        try:
            await self._tick()
        finally:
            self.last_tick = self._clock()

    async def _tick(self) -> None:
        verdict = await self._verdict()
        if verdict is None:
            return
        if not verdict.dead:
            if self._handled is not None:
                log.info("Lease %s renewed again (holder %r): the leader sets %r passing",
                         self.lease, verdict.holder, nodecheck.CHECK_ID)
            self._handled = None
            return
        silence = self.judge.changed_at
        if self._handled == silence:
            return  # written already; wait for the Lease to move
        try:
            _, node_entry, _ = await self.catalog.node_services(self.node, where='ID == ""')
            _, checks = await self.catalog.node_checks(self.node, where=f'CheckID == "{nodecheck.CHECK_ID}"')
        except ConsulError as exc:
            self._consul_retry.failed(exc)
            return
        self._consul_retry.succeeded()
        # The order matters: the check was read before this second look at the Lease.
        verdict = await self._verdict()
        if verdict is None or not verdict.dead:
            return
        output = f"no Tether replica renewed Lease {self.lease}: {verdict.describe()}"
        plan = nodecheck.expire(node_entry, checks, node=self.node, cluster=self.cluster, output=output)
        if plan.conflict:
            log.error("dead-man switch: %s", plan.conflict)
            self._handled = silence
            return
        if not plan.ops:
            log.info("no Tether leader (Lease %s %s); nothing to write: %s", self.lease, verdict.describe(),
                     plan.reason)
            self._handled = silence
            return
        try:
            await self.catalog.catalog_txn(list(plan.ops))
        except ConsulContended:
            # The check moved after our read: most likely a leader came back.
            log.info("check %r changed since it was read; judging again", nodecheck.CHECK_ID)
            return
        except ConsulError as exc:
            self._consul_retry.failed(exc)
            return
        self._consul_retry.succeeded()
        self.writes += 1
        self._handled = silence
        log.warning(
            "no Tether leader: Lease %s %s; set check %r on node %r critical (1 catalog write, %s): "
            "instances on the node are not passing until a leader returns",
            self.lease, verdict.describe(), nodecheck.CHECK_ID, self.node, plan.reason,
        )

    async def run(self, stop: asyncio.Event, *, interval: float = INTERVAL_SECONDS) -> None:
        log.info(
            "watching Lease %s every %.1f s; node %r, check %r (dead after the Lease's duration + %.1f s)",
            self.lease, interval, self.node, nodecheck.CHECK_ID, self.judge.margin,
        )
        while not stop.is_set():
            started = self._clock()
            await self.tick()
            # A steady cadence: the time a tick took counts towards the interval.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, interval - (self._clock() - started)))


def run(
    *, interval: float, margin: float, health_port: int, log_format: str, log_level: str,
) -> int:
    """``tether deadman``: until SIGTERM or SIGINT."""
    logs.configure(fmt=log_format, level=log_level)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    for warning in settings.consul.warnings():
        log.warning("INSECURE: %s", warning)
    kube.load_config()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(settings, interval=interval, margin=margin, health_port=health_port))
    return 0


async def _main(settings: Settings, *, interval: float, margin: float, health_port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http = KubeHttp(request_timeout=_KUBE_TIMEOUT)
    consul_client = ConsulClient(settings.consul)
    path = (f"apis/coordination.k8s.io/v1/namespaces/{settings.lease_namespace}"
            f"/leases/{settings.lease_name}")

    async def read_lease() -> Any:
        return await http.get(path, params={})

    deadman = DeadMan(
        read_lease=read_lease, catalog=consul_client, node=settings.consul_node, cluster=settings.cluster,
        lease=f"{settings.lease_namespace}/{settings.lease_name}", judge=Judge(margin=margin),
    )
    runner = await _serve_health(deadman, interval, health_port) if health_port else None
    try:
        await deadman.run(stop, interval=interval)
    finally:
        if runner is not None:
            await runner.cleanup()
        await consul_client.close()
        await http.close()


async def _serve_health(deadman: DeadMan, interval: float, port: int) -> web.AppRunner:
    """``/healthz``: 200 while the loop turns (each call is bounded, so a stuck loop is a bug)."""
    stuck_after = max(30.0, 5 * interval)

    async def healthz(_: web.Request) -> web.Response:
        age = time.monotonic() - deadman.last_tick
        if age > stuck_after:
            return web.json_response({"status": f"no tick for {age:.0f} s"}, status=503)
        return web.json_response({"status": "ok", "writes": deadman.writes})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()  # a probe port, in the Pod's network
    return runner
