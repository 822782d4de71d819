"""The ConsulConfig kind: the configuration engine with Consul KV as its store."""

from __future__ import annotations

from tether.api import configs as api
from tether.config import planner, sources
from tether.config.expectations import Expectations
from tether.config.reconciling import ConfigReconciler
from tether.config.stores.consulkv import ConsulKVStore


class ConsulConfigs(ConfigReconciler):
    """ConsulConfig: keys under a Consul KV path, ownership under ``tether/``."""

    def __init__(
        self, store: ConsulKVStore, kube: sources.Sources, *, cluster: str, ownership_prefix: str,
        expectations: Expectations, source_index: sources.SourceIndex,
    ) -> None:
        super().__init__(
            api.CONSUL, store, kube, cluster=cluster, layout=planner.Layout(ownership_prefix, rooted=False),
            expectations=expectations, source_index=source_index,
        )
