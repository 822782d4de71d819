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
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import kopf

from tether import handlers, kube, logs, metrics, settings
from tether.consul.adapter import ConsulAgent
from tether.consul.reconciling import ConsulServices, ConsulWatcher
from tether.etcd.client import EtcdClient, EtcdConnection
from tether.etcd.reconciling import EtcdConfigs, EtcdWatcher
from tether.health import Health
from tether.leadership import LeaseElector
from tether.reconciling import Controller

log = logging.getLogger("tether")


def run(
    *, namespaces: list[str], metrics_port: int, health_port: int, log_format: str,
    leader_elect: bool, verbose: bool,
) -> int:
    logs.configure(fmt=log_format, verbose=verbose)
    try:
        consul_conn = settings.ConsulConnection.from_env()
        etcd_conn = EtcdConnection.from_env(os.environ)
        cluster = settings.cluster_name()
        ownership_prefix = settings.etcd_ownership_prefix()
    except ValueError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    kube.load_config()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            _main(
                namespaces=namespaces, metrics_port=metrics_port, health_port=health_port,
                leader_elect=leader_elect, consul_conn=consul_conn, etcd_conn=etcd_conn,
                cluster=cluster, ownership_prefix=ownership_prefix,
            )
        )
    return 0


async def _main(
    *, namespaces: list[str], metrics_port: int, health_port: int, leader_elect: bool,
    consul_conn: settings.ConsulConnection, etcd_conn: EtcdConnection, cluster: str,
    ownership_prefix: str,
) -> None:
    if metrics_port:
        metrics.serve(metrics_port)
    health = Health()
    health_runner = await health.serve(health_port) if health_port else None
    # Kopf installs its signal handlers only once it runs; until then (waiting
    # for the Lease) SIGTERM must still stop the process promptly. As PID 1 in a
    # container Python would otherwise ignore it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if leader_elect:
        identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
        elector = LeaseElector(
            namespace=os.environ.get("POD_NAMESPACE") or "tether-system",
            name=os.environ.get("TETHER_LEASE_NAME") or "tether-leader",
            identity=identity,
            on_lost=lambda: os._exit(1),
        )
        health.state = "waiting for the leader Lease"
        acquiring = asyncio.create_task(elector.acquire())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            acquiring.cancel()
            if health_runner is not None:
                await health_runner.cleanup()
            return
        stopping.cancel()
        holder = asyncio.create_task(elector.hold(), name="lease-holder")
    else:
        holder = None

    kube_client = kube.KubeClient()
    agent = ConsulAgent(consul_conn)
    etcd_client = EtcdClient(etcd_conn)
    consul_kind = ConsulServices(agent, cluster=cluster, agent_url=consul_conn.url)
    etcd_kind = EtcdConfigs(
        etcd_client, kube_client, cluster=cluster, ownership_prefix=ownership_prefix,
        max_txn_ops=int(os.environ.get("TETHER_ETCD_MAX_TXN_OPS", "128")),
    )
    workers = int(os.environ.get("TETHER_WORKERS", "16"))
    consul_ctl = Controller(consul_kind, kube_client, workers=workers)
    etcd_ctl = Controller(etcd_kind, kube_client, workers=workers)

    registry = kopf.OperatorRegistry()
    handlers.register(registry, consul=consul_ctl, etcd=etcd_ctl, etcd_sources=etcd_kind)

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

    # Stopping Tether's own tasks in Kopf's cleanup phase lets SIGTERM finish
    # at once instead of after Kopf's grace period for leftover tasks.
    @kopf.on.cleanup(registry=registry)
    async def stop_tether(**_: Any) -> None:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await consul_ctl.stop()
        await etcd_ctl.stop()
        # Kopf replaced our signal handlers; its waiter on our stop flag would
        # otherwise count as a hung task and delay the exit.
        stop.set()

    health.progress = lambda: (
        not (consul_ctl.queue.idle() and etcd_ctl.queue.idle()),
        consul_ctl.processed + etcd_ctl.processed,
    )
    health.state = "ok"

    consul_ctl.start()
    etcd_ctl.start()
    consul_watch = ConsulWatcher(agent, consul_kind, consul_ctl.enqueue)
    etcd_watch = EtcdWatcher(etcd_client, etcd_kind, etcd_ctl.enqueue)
    watchers += [
        asyncio.create_task(_supervise("consul-watch", consul_watch.run), name="consul-watch"),
        asyncio.create_task(_supervise("etcd-watch", etcd_watch.run), name="etcd-watch"),
    ]
    try:
        await kopf.operator(
            registry=registry,
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=True,
            stop_flag=stop,
        )
    finally:
        for task in watchers:
            task.cancel()
        if holder is not None:
            holder.cancel()
        await consul_ctl.stop()
        await etcd_ctl.stop()
        await asyncio.gather(*watchers, return_exceptions=True)
        await agent.close()
        await etcd_client.close()
        kube_client.close()
        if health_runner is not None:
            await health_runner.cleanup()


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
