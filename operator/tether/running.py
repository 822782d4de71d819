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
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import kopf

from tether import handlers, logs, metricsserving
from tether.clients.consul.client import ConsulClient
from tether.clients.etcd.client import EtcdClient
from tether.clients.kube import client as kube
from tether.clients.kube.watching import WatchedReads
from tether.config.consulconfigs import ConsulConfigs
from tether.config.etcdconfigs import EtcdConfigs
from tether.config.expectations import Expectations
from tether.config.sources import SourceIndex
from tether.config.stores.consulkv import ConsulKVStore
from tether.config.stores.etcd import EtcdStore
from tether.config.watchers.consulkv import KVWatcher
from tether.config.watchers.etcd import EtcdWatcher
from tether.consulservice.agent import AgentServices
from tether.consulservice.agentwatching import ConsulWatcher
from tether.consulservice.catalog import CatalogServices
from tether.consulservice.catalogwatching import CatalogWatcher
from tether.consulservice.index import AgentIndex, CatalogIndex
from tether.consulservice.reconciling import ConsulServices
from tether.health import Health
from tether.leadership import LeaseElector
from tether.policing import Policies
from tether.reconciling import Controller
from tether.settings import Settings

log = logging.getLogger("tether")

# A stop (SIGTERM, SIGINT) at any moment — start-up, waiting for the Lease,
# work — ends the process within this many seconds: first gracefully (tasks
# cancelled, the Lease released), then, if something still hangs (a Kopf
# start-up step, a blocking client call in a thread), by a hard exit.
STOP_GRACE_SECONDS = 1.8
# Within it: cancelled tasks get this long to unwind before the Lease is
# released (itself bounded to 1 s by the elector).
_UNWIND_SECONDS = 0.5


def run(
    *, namespaces: list[str], metrics_port: int, health_port: int, log_format: str,
    leader_elect: bool, log_level: str = "info",
) -> int:
    logs.configure(fmt=log_format, level=log_level)
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
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            _main(
                settings, namespaces=namespaces, metrics_port=metrics_port, health_port=health_port,
                leader_elect=leader_elect,
            )
        )
    _exit_if_threads_linger()
    return 0


def _hard_exit(reason: str) -> None:
    """End the process now: flush what was logged, skip every join."""
    log.warning("%s; exiting now", reason)
    logging.shutdown()
    os._exit(0)


def _exit_if_threads_linger() -> None:
    """Python joins worker threads at exit; one stuck in a blocking call would hang it."""
    lingering = [
        t for t in threading.enumerate()
        if t is not threading.main_thread() and t.is_alive() and not t.daemon
    ]
    if lingering:
        _hard_exit(f"{len(lingering)} worker threads still alive after the stop (maybe in blocking calls)")


def _arm_stop_deadline() -> None:
    """From the first stop signal on, the process has STOP_GRACE_SECONDS to end."""
    timer = threading.Timer(
        STOP_GRACE_SECONDS, _hard_exit, args=(f"not stopped {STOP_GRACE_SECONDS}s after the signal",)
    )
    timer.daemon = True
    timer.start()


async def _main(
    settings: Settings, *, namespaces: list[str], metrics_port: int, health_port: int, leader_elect: bool,
) -> None:
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
            return
        stopping.cancel()
        health.state, health.ready = "starting as leader", False
        holder = asyncio.create_task(elector.hold(), name="lease-holder")

    # Events name this replica as their reporting instance (the Pod's name).
    kube_client = kube.KubeClient(instance=settings.identity)
    kube_http = kube_client.http
    consul_client = ConsulClient(settings.consul)
    etcd_client = EtcdClient(settings.etcd)
    cluster = settings.cluster

    # Each kind: a reconciler and what it shares with its backend's watcher.
    agent_index = AgentIndex(cluster=cluster, plural="consulservices")
    catalog_index = CatalogIndex(cluster=cluster, plural="consulservices")
    etcd_sources, kv_sources = SourceIndex(), SourceIndex()
    # The objects around the resources, watched per namespace that matters and
    # metadata only; the controllers they wake are created below.
    config_maps, secrets = handlers.source_watches(kube_http, (
        (etcd_sources, lambda ref: etcd_ctl.enqueue(ref)), (kv_sources, lambda ref: kv_ctl.enqueue(ref)),
    ))
    slices = handlers.slice_watches(kube_http, catalog_index, lambda ref: consul_ctl.enqueue(ref))
    around = (config_maps, secrets, slices)
    reads = WatchedReads(kube_client, config_maps=config_maps, secrets=secrets, slices=slices)
    catalog_services = CatalogServices(
        consul_client, reads, catalog_index, cluster=cluster, node=settings.consul_node,
        max_txn_ops=settings.consul_max_txn_ops,
    )
    services = ConsulServices(
        AgentServices(consul_client, agent_index, cluster=cluster, agent_url=settings.consul.url),
        catalog_services,
    )
    etcd_expect, kv_expect = Expectations(), Expectations()
    etcd_configs = EtcdConfigs(
        EtcdStore(etcd_client, max_txn_ops=settings.etcd_max_txn_ops), reads, cluster=cluster,
        ownership_prefix=settings.etcd_ownership_prefix, expectations=etcd_expect, source_index=etcd_sources,
    )
    kv_store = ConsulKVStore(
        consul_client, ownership_prefix=settings.consul_ownership_prefix,
        tombstone_seconds=settings.consul_tombstone_seconds,
    )
    consul_configs = ConsulConfigs(
        kv_store, reads, cluster=cluster,
        ownership_prefix=settings.consul_ownership_prefix, expectations=kv_expect, source_index=kv_sources,
    )
    consul_ctl = Controller(services, kube_client, workers=settings.workers)
    etcd_ctl = Controller(etcd_configs, kube_client, workers=settings.workers)
    kv_ctl = Controller(consul_configs, kube_client, workers=settings.workers)
    controllers = (consul_ctl, etcd_ctl, kv_ctl)
    backend_watchers = {
        "consul-watch": ConsulWatcher(consul_client, agent_index, consul_ctl.enqueue).run,
        "consul-catalog-watch": CatalogWatcher(
            consul_client, catalog_index, settings.consul_node, consul_ctl.enqueue, consul_ctl.enqueue_orphan
        ).run,
        "etcd-watch": EtcdWatcher(
            etcd_client, etcd_expect, etcd_ctl.enqueue, ownership_prefix=settings.etcd_ownership_prefix
        ).run,
        "consul-kv-watch": KVWatcher(
            consul_client, kv_expect, kv_ctl.enqueue, ownership_prefix=settings.consul_ownership_prefix
        ).run,
        "consul-kv-tombstones": kv_store.sweeper.run,
    }

    # --- TetherPolicy enforcement (issue 19): one cache, fed by two watches,
    # asked by every controller before it writes. ---------------------------
    policies = Policies(kube_http, default=settings.policy_default)
    for controller in controllers:
        controller.use_policies(policies)
    backend_watchers["policies"] = policies.run
    # --- end of TetherPolicy enforcement --------------------------------------

    registry = kopf.OperatorRegistry()
    handlers.register(registry, controllers=controllers)

    # A private registry does not carry Kopf's default login handlers.
    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info: kopf.ConnectionInfo | None = kopf.login_via_client(**kwargs)
        return info

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.peering.standalone = True
        settings.posting.enabled = False
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.networking.request_timeout = 60

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
    health.state = "starting"
    # Kopf sets this once its start-up (login, startup handlers) is done and
    # the watches begin: from then on this replica does its job.
    kopf_ready = asyncio.Event()

    async def mark_ready() -> None:
        await kopf_ready.wait()
        if not stop.is_set():
            health.state, health.ready = "ok", True

    for controller in controllers:
        controller.start()
    watchers += [
        asyncio.create_task(_supervise(name, run), name=name) for name, run in backend_watchers.items()
    ]
    watchers.append(asyncio.create_task(mark_ready(), name="readiness"))
    # Not among the watchers: stop_writers cancels those, and this calls it.
    stopper = asyncio.create_task(stop_on_flag(), name="stopper")
    try:
        await kopf.operator(
            registry=registry,
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=True,
            stop_flag=stop,
            ready_flag=kopf_ready,
        )
    finally:
        await stop_writers()
        stopper.cancel()
        if elector is not None:
            elector.close()
        await consul_client.close()
        await etcd_client.close()
        await kube_client.close()
        if health_runner is not None:
            await health_runner.cleanup()


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
    """Keep a watcher alive: a bug in one must not take the operator down."""
    delay = 1.0
    while True:
        started = time.monotonic()
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s crashed; restarting in %.0fs", name, delay)
        if time.monotonic() - started > 60:
            delay = 1.0
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)
