"""The EtcdConfig kind: the configuration engine with etcd as its store."""

from __future__ import annotations

from tether.api import configs as api
from tether.config import planner, sources
from tether.config.expectations import Expectations
from tether.config.reconciling import ConfigReconciler
from tether.config.stores.etcd import EtcdStore


class EtcdConfigs(ConfigReconciler):
    """EtcdConfig: keys under an absolute prefix, ownership under ``/tether/``."""

    def __init__(
        self, store: EtcdStore, kube: sources.Sources, *, cluster: str, ownership_prefix: str,
        expectations: Expectations, source_index: sources.SourceIndex,
    ) -> None:
        super().__init__(
            api.ETCD, store, kube, cluster=cluster, layout=planner.Layout(ownership_prefix, rooted=True),
            expectations=expectations, source_index=source_index,
        )
