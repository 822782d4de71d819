"""The configuration family wires itself: EtcdConfig and ConsulConfig on one engine.

Each kind is the engine over its store, with its own backend watcher (etcd's
watch, Consul KV's blocking query) and its own index of ``spec.from`` sources.
The ConfigMap and Secret watches are shared: one watch per namespace and type
serves both kinds, and each event wakes the dependents of either kind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tether.api import configs as api
from tether.clients.kube.client import KubeClient
from tether.clients.kube.http import KubeHttp
from tether.clients.kube.watching import NamespaceWatches
from tether.config.consulconfigs import ConsulConfigs
from tether.config.etcdconfigs import EtcdConfigs
from tether.config.expectations import Expectations
from tether.config.sources import SourceIndex
from tether.config.stores.consulkv import ConsulKVStore
from tether.config.stores.etcd import EtcdStore
from tether.config.watchers.consulkv import KVWatcher
from tether.config.watchers.etcd import EtcdWatcher
from tether.families import Enqueue, Family, Provided, Router


def setup(provided: Provided) -> Family:
    """EtcdConfig and ConsulConfig, ready for the process to run."""
    settings = provided.settings
    cluster = settings.cluster
    route = Router()
    etcd_sources, kv_sources = SourceIndex(), SourceIndex()
    config_maps, secrets = source_watches(provided.kube.http, (etcd_sources, kv_sources), route.enqueue)
    reads = SourceReads(provided.kube, config_maps=config_maps, secrets=secrets)
    etcd_expect, kv_expect = Expectations(), Expectations()
    etcd_configs = EtcdConfigs(
        EtcdStore(provided.etcd, max_txn_ops=settings.etcd_max_txn_ops), reads, cluster=cluster,
        ownership_prefix=settings.etcd_ownership_prefix, expectations=etcd_expect, source_index=etcd_sources,
    )
    kv_store = ConsulKVStore(
        provided.consul, ownership_prefix=settings.consul_ownership_prefix,
        tombstone_seconds=settings.consul_tombstone_seconds,
    )
    consul_configs = ConsulConfigs(
        kv_store, reads, cluster=cluster,
        ownership_prefix=settings.consul_ownership_prefix, expectations=kv_expect, source_index=kv_sources,
    )
    etcd_ctl = route.add(provided.controller(etcd_configs))
    kv_ctl = route.add(provided.controller(consul_configs))
    watchers = {
        "etcd-watch": EtcdWatcher(
            provided.etcd, etcd_expect, etcd_ctl.enqueue, ownership_prefix=settings.etcd_ownership_prefix
        ).run,
        "consul-kv-watch": KVWatcher(
            provided.consul, kv_expect, kv_ctl.enqueue, ownership_prefix=settings.consul_ownership_prefix
        ).run,
        # Index tombstones of released ConsulConfigs, removed once their lifetime is over.
        "consul-kv-tombstones": kv_store.sweeper.run,
    }
    return Family(controllers=(etcd_ctl, kv_ctl), watchers=watchers, watches=(config_maps, secrets))


def source_watches(
    http: KubeHttp, indexes: Sequence[SourceIndex], enqueue: Enqueue,
) -> tuple[NamespaceWatches, NamespaceWatches]:
    """The ConfigMap and Secret watches, waking the resources whose ``spec.from`` names the object.

    One watch per namespace and type for every kind: ``indexes`` holds each
    kind's sources, and the keys they name carry their kind (``enqueue`` routes them).
    """

    def for_kind(kind: api.SourceKind, plural: str) -> NamespaceWatches:
        def changed(namespace: str, meta: Mapping[str, Any]) -> None:
            for index in indexes:
                for ref in index.dependents(kind, namespace, meta.get("name", "")):
                    enqueue(ref)

        def resync(namespace: str) -> None:
            for index in indexes:
                for ref in index.dependents_in(kind, namespace):
                    enqueue(ref)

        return NamespaceWatches(
            http, what=plural, path=f"api/v1/namespaces/{{namespace}}/{plural}", changed=changed,
            wanted=lambda ns: any(index.dependents_in(kind, ns) for index in indexes), resync=resync,
        )

    return for_kind("configMap", "configmaps"), for_kind("secret", "secrets")


class SourceReads:
    """Where ``spec.from`` is read (the ``Sources`` protocol): each read behind its namespace's watch."""

    def __init__(self, kube: KubeClient, *, config_maps: NamespaceWatches, secrets: NamespaceWatches) -> None:
        self.kube = kube
        self.config_maps = config_maps
        self.secrets = secrets

    async def read_config_map(self, namespace: str, name: str) -> dict[str, bytes] | None:
        await self.config_maps.ensure(namespace)
        return await self.kube.read_config_map(namespace, name)

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        await self.secrets.ensure(namespace)
        return await self.kube.read_secret(namespace, name)
