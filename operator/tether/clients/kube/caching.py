"""Per-namespace caches of full objects, for the few reads a metadata watch cannot answer.

:mod:`tether.clients.kube.watching` watches metadata only, and a reconcile
GETs the one object it needs. Some answers live in ``status`` and are needed
for many objects at once (a Pod's conditions, for every endpoint of a
Service): for those, :class:`NamespaceCaches` lists and then watches the
objects of a namespace, *full* objects, but keeps only what a ``slim``
function returns (None: not kept at all), so memory follows what Tether
needs, not the namespace's size. As with the metadata watches, a namespace
is cached only while ``wanted`` says it matters (the first read starts it; a
bookmark after it stops mattering ends it), and ``changed`` hears of every
kept view that changed, appeared or went away.

A 403 (no RBAC for the type, e.g. a Role without Pod reads) is not an
outage: :meth:`NamespaceCaches.items` answers an empty mapping and the
cache retries with backoff, so the feature that needs it is off until the
permission is granted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tether.clients.kube.http import KubeHttp
from tether.clients.kube.watching import NamespaceStreams, Stream

log = logging.getLogger(__name__)

T = TypeVar("T")
_PAGE = 500


@dataclass
class _Cache(Stream, Generic[T]):
    items: dict[str, T] = field(default_factory=dict)


class NamespaceCaches(NamespaceStreams[_Cache[T]]):
    """List-then-watch of one resource type per namespace that matters, keeping slim views by name."""

    role = "cache"
    accept = "application/json"
    logger = log

    def __init__(
        self, http: KubeHttp, *, what: str, path: str, slim: Callable[[dict[str, Any]], T | None],
        changed: Callable[[str, str], None], wanted: Callable[[str], bool],
    ) -> None:
        """``path`` has a ``{namespace}`` field; ``changed(namespace, name)`` hears of every kept
        view that changed (not of objects ``slim`` drops, unless a kept one became one)."""
        super().__init__(http, what=what, path=path, wanted=wanted)
        self.slim = slim
        self.changed = changed

    async def items(self, namespace: str) -> dict[str, T]:
        """The kept views of ``namespace`` by name, listed on first use (waiting at most
        ``ENSURE_SECONDS`` for the first list; empty if it is not there by then)."""
        return dict((await self._open(namespace)).items)

    def _new(self) -> _Cache[T]:
        return _Cache()

    def _put(self, namespace: str, cache: _Cache[T], name: str, view: T | None) -> None:
        old = cache.items.get(name)
        if view is None:
            cache.items.pop(name, None)
        else:
            cache.items[name] = view
        if old != view:
            self.changed(namespace, name)

    async def _list(self, namespace: str, stream: _Cache[T], path: str) -> str:
        """Every object of the namespace (paged), replacing the cache; the list's version."""
        fresh: dict[str, T] = {}
        params: dict[str, str] = {"limit": str(_PAGE)}
        version = ""
        for _ in range(100_000 // _PAGE):  # bounded: 100k objects in one namespace at most
            listing = await self.http.get(path, params=params)
            for item in listing.get("items") or []:
                view = self.slim(item)
                if view is not None:
                    fresh[str((item.get("metadata") or {}).get("name") or "")] = view
            meta = listing.get("metadata") or {}
            version = str(meta.get("resourceVersion") or "")
            if not meta.get("continue"):
                break
            params = {"limit": str(_PAGE), "continue": str(meta["continue"])}
        for name in sorted(set(stream.items) | set(fresh)):  # a stable order for listeners and tests
            self._put(namespace, stream, name, fresh.get(name))
        return version

    def _event(
        self, namespace: str, stream: _Cache[T], kind: str, obj: dict[str, Any], meta: dict[str, Any]
    ) -> None:
        name = str(meta.get("name") or "")
        self._put(namespace, stream, name, None if kind == "DELETED" else self.slim(obj))
