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

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tether import metrics
from tether.clients.kube.client import KubeError, KubeGone
from tether.clients.kube.http import KubeHttp, kube_error
from tether.clients.kube.watching import ENSURE_SECONDS, WATCH_SECONDS
from tether.retrying import Retry

log = logging.getLogger(__name__)

T = TypeVar("T")
_BACKOFF_MAX = 30.0
_PAGE = 500


@dataclass
class _Cache(Generic[T]):
    items: dict[str, T] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    listed: asyncio.Event = field(default_factory=asyncio.Event)
    # The first list's answer, success or failure: readers wait for that, never for the retries.
    answered: asyncio.Event = field(default_factory=asyncio.Event)


class NamespaceCaches(Generic[T]):
    """List-then-watch of one resource type per namespace that matters, keeping slim views by name."""

    def __init__(
        self, http: KubeHttp, *, what: str, path: str, slim: Callable[[dict[str, Any]], T | None],
        changed: Callable[[str, str], None], wanted: Callable[[str], bool],
    ) -> None:
        """``path`` has a ``{namespace}`` field; ``changed(namespace, name)`` hears of every kept
        view that changed (not of objects ``slim`` drops, unless a kept one became one)."""
        self.http = http
        self.what = what
        self.path = path
        self.slim = slim
        self.changed = changed
        self.wanted = wanted
        self._caches: dict[str, _Cache[T]] = {}

    def namespaces(self) -> list[str]:
        return sorted(ns for ns, c in self._caches.items() if c.task is not None and not c.task.done())

    async def items(self, namespace: str) -> dict[str, T]:
        """The kept views of ``namespace`` by name, listed on first use (waiting at most
        ``ENSURE_SECONDS`` for the first list; empty if it is not there by then)."""
        cache = self._caches.get(namespace)
        if cache is None or cache.task is None or cache.task.done():
            cache = _Cache()
            self._caches[namespace] = cache
            name = f"cache-{self.what}-{namespace}"
            cache.task = asyncio.create_task(self._run(namespace, cache), name=name)
            metrics.WATCHED_NAMESPACES.labels(resource=self.what).set(len(self._caches))
        if not cache.answered.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(cache.answered.wait()), ENSURE_SECONDS)
        return dict(cache.items)

    async def stop(self) -> None:
        tasks = [c.task for c in self._caches.values() if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._caches.clear()

    def _put(self, namespace: str, cache: _Cache[T], name: str, view: T | None) -> None:
        old = cache.items.get(name)
        if view is None:
            cache.items.pop(name, None)
        else:
            cache.items[name] = view
        if old != view:
            self.changed(namespace, name)

    async def _list(self, namespace: str, cache: _Cache[T], path: str) -> str:
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
        for name in sorted(set(cache.items) | set(fresh)):  # a stable order for listeners and tests
            self._put(namespace, cache, name, fresh.get(name))
        return version

    async def _run(self, namespace: str, cache: _Cache[T]) -> None:
        path = self.path.format(namespace=namespace)
        version: str | None = None
        retry = Retry(
            f"cache of {self.what} in {namespace}", base=1.0, cap=_BACKOFF_MAX, jitter=0.2, logger=log
        )
        try:
            while True:
                try:
                    if version is None:
                        version = await self._list(namespace, cache, path)
                        cache.listed.set()
                        cache.answered.set()
                    version = await self._follow(namespace, cache, path, version, retry)
                    retry.succeeded()
                    if version is not None and not self.wanted(namespace):
                        return
                except KubeGone:
                    version = None
                except KubeError as exc:
                    cache.answered.set()
                    await retry.pause(exc)
        finally:
            if self._caches.get(namespace) is cache:
                del self._caches[namespace]
                metrics.WATCHED_NAMESPACES.labels(resource=self.what).set(len(self._caches))

    async def _follow(
        self, namespace: str, cache: _Cache[T], path: str, version: str, retry: Retry
    ) -> str | None:
        params = {"resourceVersion": version, "allowWatchBookmarks": "true"}
        seconds = WATCH_SECONDS + random.randint(0, 20)
        async for event in self.http.watch(path, params=params, accept="application/json",
                                           timeout_seconds=seconds):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                error = kube_error(f"watch of {self.what} in {namespace}", int(obj.get("code") or 0), obj)
                if isinstance(error, KubeGone):
                    return None  # history compacted: list again
                raise error
            retry.succeeded()
            meta = obj.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            if kind == "BOOKMARK":
                if not self.wanted(namespace):
                    return version
                continue
            metrics.WATCH_EVENTS.labels(resource=self.what).inc()
            name = str(meta.get("name") or "")
            self._put(namespace, cache, name, None if kind == "DELETED" else self.slim(obj))
        return version
