"""``tether run``: the operator process (Kopf embedded).

Start-up order matters: settings are validated first (a bad variable is a
clear error, not a crash loop later), then leadership is acquired if asked
for, and only then do the controllers start writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn

import kopf

from tether import handlers, kopfing, logs, memory, metrics, metricsserving, tracing
from tether.api import GROUP, VERSION
from tether.clients.consul.client import ConsulClient
from tether.clients.etcd.client import EtcdClient
from tether.clients.kube import client as kube
from tether.clients.kube.client import KubeError
from tether.clients.kube.http import KubeHttp
from tether.config import wiring as config_wiring
from tether.consulservice import wiring as consulservice_wiring
from tether.families import Family, Provided
from tether.health import Health
from tether.leadership import LeaseElector
from tether.policing import Policies
from tether.queueing import Backoff
from tether.reconciling import Controller
from tether.retrying import Retry
from tether.settings import Settings

log = logging.getLogger("tether")

# The families of kinds, each wiring itself (its reconcilers, Controllers,
# backend watchers and per-namespace watches): a new family is its package
# and one line here.
FAMILIES: tuple[Callable[[Provided], Family], ...] = (consulservice_wiring.setup, config_wiring.setup)

# A stop (SIGTERM, SIGINT) at any moment — start-up, waiting for the Lease,
# work — ends the process within this many seconds: first gracefully (tasks
# cancelled, the Lease released), then, if something still hangs (a Kopf
# start-up step, a blocking client call in a thread), by a hard exit.
STOP_GRACE_SECONDS = 1.8
# Within it: cancelled tasks get this long to unwind before the Lease is
# released (itself bounded to 1 s by the elector).
_UNWIND_SECONDS = 0.5
# After a stop, worker threads still finishing (a pool told to shut down, a
# last call returning) get this long to end before they count as lingering.
_THREADS_JOIN_SECONDS = 0.5
# Waiting for the API server before Kopf starts: polled at most this far apart.
API_POLL_CAP_SECONDS = 5.0
# Every kind must be watched by Kopf within this long of its start; one that is
# not is looked up in discovery again this often until then.
SERVED_WITHIN_SECONDS = 30.0
REPAIR_EVERY_SECONDS = 3.0
# A namespace Tether sees but Kopf does not, this long after it appeared, is handed to Kopf.
KOPF_NAMESPACE_GRACE_SECONDS = 2.0


def run(
    *, namespaces: list[str], metrics_port: int, health_port: int, log_format: str,
    leader_elect: bool, log_level: str = "info",
) -> int:
    logs.configure(fmt=log_format, level=log_level)
    if tracing.configure():
        log.info("tracing on: spans go to the OTLP endpoint the OTEL_* variables name")
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    for warning in settings.warnings():
        log.warning("INSECURE: %s", warning)
    kube.load_config()
    # The Kubernetes client imports its API classes on first use, seconds of
    # synchronous work on a busy machine: done here, before the event loop
    # starts, it cannot hold up the loop (nor a stop) later.
    kube.preload()
    code = 0
    with contextlib.suppress(KeyboardInterrupt):
        code = asyncio.run(
            _main(
                settings, namespaces=namespaces, metrics_port=metrics_port, health_port=health_port,
                leader_elect=leader_elect,
            )
        )
    # The last spans (the stop's own reconciles), within a bound of their own.
    tracing.shutdown()
    _exit_if_threads_linger(code)
    return code


def _hard_exit(reason: str, code: int = 0) -> None:
    """End the process now: flush what was logged, skip every join."""
    log.warning("%s; exiting now", reason)
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once logs and output are flushed, without tearing down.

    After a stop nothing is left to release (the Lease, the spans and the last
    status patches are done by then), but the interpreter's own teardown frees
    every object module by module: 0.3 s over 2000 resources, most of a stop's
    time, during which a rolling upgrade's next replica waits for the Lease.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _exit_if_threads_linger(code: int = 0, *, join: float = _THREADS_JOIN_SECONDS) -> None:
    """Python joins worker threads at exit; one stuck in a blocking call would hang it.

    Threads that are merely finishing (the Lease pool was shut down without
    waiting, so as not to wait on a hung call) get ``join`` seconds first;
    only those still alive then are named and abandoned.
    """
    deadline = time.monotonic() + join
    lingering: list[threading.Thread] = []
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            lingering.append(thread)
    if lingering:
        names = ", ".join(t.name for t in lingering)
        _hard_exit(f"{len(lingering)} worker threads still alive after the stop ({names}; "
                   "maybe in blocking calls)", code)


def _arm_stop_deadline() -> None:
    """From the first stop signal on, the process has STOP_GRACE_SECONDS to end."""
    timer = threading.Timer(
        STOP_GRACE_SECONDS, _hard_exit, args=(f"not stopped {STOP_GRACE_SECONDS}s after the signal",)
    )
    timer.daemon = True
    timer.start()


async def _main(
    settings: Settings, *, namespaces: list[str], metrics_port: int, health_port: int, leader_elect: bool,
) -> int:
    if metrics_port:
        await metricsserving.serve(metrics_port)  # plain, or HTTPS as `tether run` configured it
    health = Health()
    health_runner = await health.serve(health_port) if health_port else None
    # Kopf installs its signal handlers only once it runs; until then (waiting
    # for the Lease) SIGTERM must still stop the process promptly. As PID 1 in a
    # container Python would otherwise ignore it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        health.ready, health.state = False, "stopping"
        stop.set()

    _keep_signal_handlers(loop, on_signal)
    elector: LeaseElector | None = None
    holder: asyncio.Task[None] | None = None
    if leader_elect:
        elector = LeaseElector(
            namespace=settings.lease_namespace,
            name=settings.lease_name,
            identity=settings.identity,
            on_lost=lambda: os._exit(1),
        )
        # A standby is doing its job: ready (controller-runtime's choice too).
        health.state, health.ready = "waiting for the leader Lease", True
        acquiring = asyncio.create_task(elector.acquire())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            acquiring.cancel()
            await asyncio.gather(acquiring, return_exceptions=True)
            # Won in the same instant as the stop: hand it straight back.
            await elector.release()
            elector.close()
            if health_runner is not None:
                await health_runner.cleanup()
            return 0
        stopping.cancel()
        health.state, health.ready = "starting as leader", False
        holder = asyncio.create_task(elector.hold(), name="lease-holder")

    # Events name this replica as their reporting instance (the Pod's name).
    kube_client = kube.KubeClient(instance=settings.identity)
    consul_client = ConsulClient(settings.consul)
    etcd_client = EtcdClient(settings.etcd)
    provided = Provided(
        settings=settings, kube=kube_client, consul=consul_client, etcd=etcd_client,
        controller=lambda reconciler: Controller(reconciler, kube_client, workers=settings.workers),
    )
    families = [setup(provided) for setup in FAMILIES]
    controllers = tuple(c for family in families for c in family.controllers)
    backend_watchers = {name: run for family in families for name, run in family.watchers.items()}
    around = [w for family in families for w in family.watches]
    kinds = {c.reconciler.plural: c.reconciler.kind for c in controllers}

    # --- TetherPolicy enforcement (issue 19): one cache, fed by two watches,
    # asked by every controller before it writes. ---------------------------
    policies = Policies(kube_client.http, default=settings.policy_default)
    for controller in controllers:
        controller.use_policies(policies)
    backend_watchers["policies"] = policies.run
    # --- end of TetherPolicy enforcement --------------------------------------

    registry = kopf.OperatorRegistry()
    handlers.register(registry, controllers=controllers)

    # A private registry does not carry Kopf's default login handlers. Every
    # handler is a coroutine: Kopf runs plain functions in a thread pool of its
    # own that is never shut down, whose idle threads outlived every stop.
    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info: kopf.ConnectionInfo | None = kopf.login_via_client(**kwargs)
        return info

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.peering.standalone = True
        settings.posting.enabled = False
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.networking.request_timeout = 60
        settings.persistence.diffbase_storage = kopfing.EventsOnlyDiffBase()

    watchers: list[asyncio.Task[None]] = []

    stopped: asyncio.Task[None] | None = None

    async def _stop_writers() -> None:
        # Everything is cancelled at once and given a bounded moment to unwind:
        # on a loaded machine a sequential stop ate the whole stop deadline
        # and the Lease was never released. A cancelled task writes nothing
        # more; the next leader polls about once a second anyway.
        tasks = [t for t in (holder, *watchers) if t is not None]
        for task in tasks:
            task.cancel()
        stops = [asyncio.create_task(c.stop()) for c in controllers]
        stops += [asyncio.create_task(w.stop()) for w in around]
        await asyncio.wait([*tasks, *stops], timeout=_UNWIND_SECONDS)
        if elector is not None:
            await elector.release()

    async def stop_writers() -> None:
        """Cancel every watcher and worker, then hand the Lease over: in that order,
        so that the next leader never overlaps a write of this one. Once, however
        many paths ask (the stop flag, Kopf's cleanup, the final clean-up)."""
        nonlocal stopped
        if stopped is None:
            stopped = asyncio.create_task(_stop_writers(), name="stop-writers")
        await asyncio.shield(stopped)

    async def stop_on_flag() -> None:
        # Tether's own tasks stop the moment the stop flag is set, not when
        # Kopf gets round to its cleanup: Kopf skips cleanup handlers when
        # stopped during its start-up, and may take longer than the stop
        # deadline to stop itself; the Lease is handed over either way.
        await stop.wait()
        await stop_writers()

    @kopf.on.cleanup(registry=registry)
    async def stop_tether(**_: Any) -> None:
        on_signal()
        await stop_writers()

    health.progress = lambda: (
        not all(c.queue.idle() for c in controllers),
        sum(c.processed for c in controllers),
    )
    # Kopf sets this once its start-up (login, startup handlers) is done and
    # the watches begin: from then on this replica does its job.
    kopf_ready = asyncio.Event()
    # What Kopf resolved from the API server's discovery: the kinds it watches.
    insights = kopfing.insights()
    exit_code = 0

    async def hand_kopf_missed_namespaces() -> None:
        # Kopf ignores the initial listing of its namespace watch, so a namespace
        # created between its first list and that watch (or while the watch
        # reconnects) is never watched: its resources silently never served
        # (seen in CI). Tether's own namespace watch sees every one; those Kopf
        # still lacks a moment later are handed to it (see tether.kopfing).
        await insights.ready_namespaces.wait()
        while True:
            await policies.namespaces_changed.wait()
            policies.namespaces_changed.clear()
            await asyncio.sleep(KOPF_NAMESPACE_GRACE_SECONDS)
            missed = await kopfing.add_missed_namespaces(insights, namespaces, policies.live_namespaces())
            if missed:
                metrics.NAMESPACES_HANDED_TO_KOPF.inc(len(missed))
                log.warning("Kopf did not watch namespace(s) %s %.0fs after they appeared; watching them now",
                            ", ".join(missed), KOPF_NAMESPACE_GRACE_SECONDS)

    if namespaces:
        backend_watchers["kopf-namespaces"] = hand_kopf_missed_namespaces
    # After a burst of reconciles, the freed memory goes back to the system.
    backend_watchers["memory-trim"] = lambda: memory.trim_after_bursts(health.progress)

    async def mark_ready() -> None:
        nonlocal exit_code
        await kopf_ready.wait()
        if stop.is_set():
            return
        health.state, health.ready = "ok", True
        served = await watch_served(
            lambda: kopfing.watched(insights), kinds, health, stop,
            repair=lambda: kopfing.rescan(kube_client.http, insights, registry),
        )
        if not served:
            # Kopf resolves the served kinds at its start and again only when
            # a CRD changes: a kind it missed (discovery partial while the API
            # server restarted) would stay unwatched, its resources silently
            # never reconciled. The discovery re-reads above did not bring it
            # back either. Restarting Kopf inside this process would replay
            # its start-up and our stop paths around state we cannot see
            # into; exiting (gracefully, the Lease handed over) lets the
            # kubelet restart the Pod with its back-off, and the next start
            # waits for discovery to serve every kind first. A restart count
            # is visible; a kind never watched was not.
            exit_code = 1
            on_signal()

    stopper: asyncio.Task[None] | None = None
    try:
        health.state = "starting"
        if not await wait_for_api(kube_client.http, kinds, stop, health):
            return 0
        health.state = "starting"
        for controller in controllers:
            controller.start()
        watchers += [
            asyncio.create_task(_supervise(name, run), name=name) for name, run in backend_watchers.items()
        ]
        watchers.append(asyncio.create_task(mark_ready(), name="readiness"))
        # Not among the watchers: stop_writers cancels those, and this calls it.
        stopper = asyncio.create_task(stop_on_flag(), name="stopper")
        await kopf.operator(
            registry=registry,
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=True,
            stop_flag=stop,
            ready_flag=kopf_ready,
            insights=insights,
        )
    finally:
        await stop_writers()
        if stopper is not None:
            stopper.cancel()
        if elector is not None:
            elector.close()
        await consul_client.close()
        await etcd_client.close()
        await kube_client.close()
        if health_runner is not None:
            await health_runner.cleanup()
    return exit_code


async def wait_for_api(
    http: KubeHttp, kinds: Mapping[str, str], stop: asyncio.Event, health: Health, *,
    backoff: Backoff[str] | None = None,
) -> bool:
    """Until the API server's discovery serves every one of ``kinds`` (plural → kind); False if stopped first.

    Kopf resolves the resources it watches once, at its start, and gives up
    (the process exits with a traceback) when the API server does not answer
    its discovery within about a minute; a kind missing from a partial answer
    (CRDs not yet served after a restart) would never be watched. So Kopf
    starts only once the API server answers with all of Tether's kinds.
    Bounded by the stop flag; polled with the capped backoff the reconciles use.
    """
    backoff = backoff or Backoff(base=0.5, cap=API_POLL_CAP_SECONDS)
    path = f"apis/{GROUP}/{VERSION}"
    since: float | None = None
    while not stop.is_set():
        try:
            listing = await http.get(path, params={})
            served = {r.get("name") for r in (listing or {}).get("resources") or []}
            missing = [kind for plural, kind in kinds.items() if plural not in served]
            why = f"{', '.join(missing)} not served yet" if missing else ""
        except KubeError as exc:
            why = str(exc)
        if not why:
            if since is not None:
                log.info("the API server serves every kind, after %.0fs; starting", time.monotonic() - since)
            return True
        if since is None:
            since = time.monotonic()
            health.state = "waiting for the API server"
            log.warning("waiting for the API server to serve %s/%s (%s)", GROUP, VERSION, why)
        else:
            log.debug("still waiting for the API server: %s", why)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff.next_delay(path))
    return False


async def watch_served(
    watched: Callable[[], set[str]], kinds: Mapping[str, str], health: Health, stop: asyncio.Event, *,
    repair: Callable[[], Awaitable[None]] | None = None, within: float = SERVED_WITHIN_SECONDS,
    repair_every: float = REPAIR_EVERY_SECONDS, poll: float = 0.5,
) -> bool:
    """Whether Kopf watches every one of ``kinds`` (plural → kind) within ``within`` seconds.

    ``watched`` gives the plurals Kopf watches (its insights). A kind missing
    ``repair_every`` seconds in is repaired (``repair``: Kopf's discovery read
    again, as on a CRD change), every ``repair_every`` seconds; one still missing
    at the bound is reported: ``/readyz`` names it, ``tether_kinds_unserved{kind}``
    is 1, and an ERROR line says so.
    """
    started = time.monotonic()
    deadline, next_repair = started + within, started + repair_every
    missing = list(kinds.values())
    while not stop.is_set():
        served = watched()
        missing = [kind for plural, kind in kinds.items() if plural not in served]
        now = time.monotonic()
        if not missing or now >= deadline:
            break
        if repair is not None and now >= next_repair:
            next_repair = now + repair_every
            log.warning("%s not watched %.0fs after Kopf's start; reading the API server's discovery again",
                        ", ".join(missing), now - started)
            try:
                await repair()
            except KubeError as exc:
                log.info("could not read the API server's discovery: %s", exc)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll)
    if stop.is_set():
        return True
    for kind in kinds.values():
        metrics.KINDS_UNSERVED.labels(kind=kind).set(1 if kind in missing else 0)
    if not missing:
        return True
    health.unserved = missing
    log.error("%s not served: Kopf does not watch them %.0fs after its start (the API server's discovery "
              "did not list them, or Kopf never learnt the namespaces); exiting to be restarted",
              ", ".join(missing), within)
    return False


def _keep_signal_handlers(
    loop: asyncio.AbstractEventLoop, handler: Callable[[], None], *,
    on_first: Callable[[], None] = _arm_stop_deadline,
) -> None:
    """SIGTERM and SIGINT call ``handler`` in the loop, for the whole life of the process.

    Kopf installs its own handlers when it starts; a signal caught by those
    (while Kopf still logs in, say) stopped Kopf without setting our stop flag,
    and Kopf then waited 5 s for its waiter on that flag as a hung task. Ours
    set the very flag Kopf watches (``stop_flag``), so Kopf stops the same way;
    later loop registrations for these two signals are therefore ignored.

    The handler is a plain Python one, not the loop's: it runs as soon as the
    main thread executes Python again, even while the loop is busy with
    synchronous work, and arms the hard stop deadline (``on_first``) at once.
    """
    mine = (signal.SIGTERM, signal.SIGINT)
    first = True

    def on_os_signal(signum: int, frame: object) -> None:
        nonlocal first
        if first:
            first = False
            on_first()
        loop.call_soon_threadsafe(handler)

    for sig in mine:
        signal.signal(sig, on_os_signal)
    original = loop.add_signal_handler

    def add_signal_handler(sig: int, callback: Callable[..., object], *args: Any) -> None:
        if sig in mine:
            log.debug("keeping Tether's handler for %s", signal.Signals(sig).name)
            return
        original(sig, callback, *args)

    loop.add_signal_handler = add_signal_handler  # type: ignore[method-assign,assignment]


async def _supervise(name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Keep a watcher alive: a bug in one must not take the operator down.

    The shared retry policy: 1 s doubling to 30 s, started over once the task
    ran for a minute; the first crash of an incident is logged with its
    traceback, its repeats quietly, its recovery once.
    """
    retry = Retry(f"background task {name}", base=1.0, cap=30.0, jitter=0.0, reset_after=60.0, logger=log)
    while True:
        retry.started()
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await retry.pause(f"crashed: {exc!r}; restarting", exc_info=True)
            continue
        await retry.pause("returned; restarting")
