"""What a family of kinds is given by the process, and what it hands back.

A family (the ConsulService kinds; the configuration engine's EtcdConfig and
ConsulConfig) wires itself in one ``setup(provided) -> Family`` function, as a
controller-runtime reconciler does in ``SetupWithManager``: it builds its
reconcilers, its Controllers (with :attr:`Provided.controller`), its backend
watchers and its per-namespace watches of the objects around its resources.
The process (:mod:`tether.running`) only runs what the families return: it
starts and stops them, and knows no kind.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tether.api import ObjectRef
from tether.clients.consul.client import ConsulClient
from tether.clients.etcd.client import EtcdClient
from tether.clients.kube.caching import NamespaceCaches
from tether.clients.kube.client import KubeClient
from tether.clients.kube.watching import NamespaceWatches
from tether.reconciling import Controller, Reconciler
from tether.settings import Settings

Enqueue = Callable[[ObjectRef], None]
#: A backend watcher: a coroutine that runs until cancelled (the process restarts it if it fails).
Watcher = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Provided:
    """What the process gives every family: settings, clients, and how a Controller is made."""

    settings: Settings
    kube: KubeClient
    consul: ConsulClient
    etcd: EtcdClient
    controller: Callable[[Reconciler], Controller]


@dataclass(frozen=True)
class Family:
    """What a family hands the process to run."""

    controllers: tuple[Controller, ...]
    #: Backend watchers by name (the name is the task's and the log's).
    watchers: Mapping[str, Watcher]
    #: Per-namespace watches of the objects around the resources; each maps its
    #: events to the resource keys it enqueues.
    #: (A cache lists and watches full objects and keeps slim views: Pods for the readiness gate.)
    watches: tuple[NamespaceWatches | NamespaceCaches[Any], ...]


class Router:
    """Enqueues a key on its kind's Controller, found by the key's plural.

    A family's watches and reconcilers exist before its Controllers (a
    Controller needs its reconciler, which reads through the watches); the
    watches are given :meth:`enqueue` and the Controllers are added once made.
    A watch only starts when a reconcile reads through it, so no event comes
    before the Controllers are there.
    """

    def __init__(self) -> None:
        self._controllers: dict[str, Controller] = {}

    def add(self, controller: Controller) -> Controller:
        self._controllers[controller.reconciler.plural] = controller
        return controller

    def enqueue(self, ref: ObjectRef) -> None:
        controller = self._controllers.get(ref.plural)
        if controller is not None:
            controller.enqueue(ref)
