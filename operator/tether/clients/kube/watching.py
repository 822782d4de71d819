"""Watches of the objects around Tether's resources, proportional to what Tether manages.

ConfigMaps and Secrets named in ``spec.from``, the Services ConsulServices follow
and those Services' EndpointSlices must wake their resources within seconds, but a cluster holds tens of
thousands of such objects that have nothing to do with Tether. So:

* **per namespace, on demand**: a namespace is watched only while some resource
  in it depends on an object of that type (the indexes say so: ``wanted``); the
  first read of such an object starts the watch, and a watch whose namespace
  no longer matters ends at its next bookmark. Objects in other namespaces
  never reach the operator.
* **metadata only**: the API server converts every object to
  ``PartialObjectMetadata``; a Secret's data or a ConfigMap's values never
  travel on the watch. The data of a referenced object is read (one GET) by the
  reconcile that needs it — a Secret nobody references is never read.
* **no initial list**: a ``limit=1`` list gives the namespace's current
  resourceVersion, and the watch starts there. Whatever changes later arrives
  as an event; nothing that already exists is replayed (the reconciles that
  read those objects happen after the watch is established, see ``ensure``).
  When the watch's history is gone (410) every dependent in the namespace is
  enqueued once, as changes may have been missed.

The cost is one HTTP connection per watched (namespace, type), independent of
how many objects the cluster holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tether import metrics
from tether.clients.kube.client import KubeError, KubeGone
from tether.clients.kube.http import METADATA, METADATA_LIST, KubeHttp, kube_error
from tether.retrying import Retry

log = logging.getLogger(__name__)

# How long a reconcile waits for a new namespace's watch to answer before reading
# anyway (the watch then enqueues the namespace's dependents once when it starts).
ENSURE_SECONDS = 5.0
# The server ends every watch request after this long (plus jitter, so that a
# hundred namespaces do not reconnect in the same second).
WATCH_SECONDS = 290
_BACKOFF_MAX = 30.0

Changed = Callable[[str, Mapping[str, Any]], None]  # namespace, object metadata


@dataclass
class _Watch:
    task: asyncio.Task[None] | None = None
    established: asyncio.Event = field(default_factory=asyncio.Event)
    # A reader gave up waiting for the watch: enqueue the namespace once it starts.
    read_before: bool = False
    # Set once the first attempt to start it has an answer, success or failure
    # (API server down, a 403): readers wait for that, never for the retries.
    answered: asyncio.Event = field(default_factory=asyncio.Event)


class NamespaceWatches:
    """Metadata-only watches of one resource type, one per namespace that matters."""

    def __init__(
        self, http: KubeHttp, *, what: str, path: str, changed: Changed,
        wanted: Callable[[str], bool], resync: Callable[[str], None], label_selector: str = "",
    ) -> None:
        """``path`` has a ``{namespace}`` field; ``changed`` gets every event's metadata,
        ``resync`` a namespace whose events may have been missed, ``wanted`` says
        whether a namespace still matters."""
        self.http = http
        self.what = what
        self.path = path
        self.changed = changed
        self.wanted = wanted
        self.resync = resync
        self.label_selector = label_selector
        self._watches: dict[str, _Watch] = {}

    def namespaces(self) -> list[str]:
        """The namespaces watched now."""
        return sorted(ns for ns, w in self._watches.items() if w.task is not None and not w.task.done())

    async def ensure(self, namespace: str) -> None:
        """Watch ``namespace`` (if not yet), and wait until the watch is established.

        Called before a reconcile reads an object of this type: a change made
        after that read then always arrives as an event. If the watch's first
        start fails (or takes over ``ENSURE_SECONDS``), the reader goes on at
        once and the watch enqueues the namespace's dependents when it is up.
        """
        watch = self._watches.get(namespace)
        if watch is None or watch.task is None or watch.task.done():
            watch = _Watch()
            self._watches[namespace] = watch
            name = f"watch-{self.what}-{namespace}"
            watch.task = asyncio.create_task(self._run(namespace, watch), name=name)
            metrics.WATCHED_NAMESPACES.labels(resource=self.what).set(len(self._watches))
        if watch.established.is_set():
            return
        if not watch.answered.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(watch.answered.wait()), ENSURE_SECONDS)
        if not watch.established.is_set():
            # Read anyway; the watch enqueues the namespace's dependents once it is up.
            watch.read_before = True

    async def stop(self) -> None:
        tasks = [w.task for w in self._watches.values() if w.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watches.clear()

    def _params(self) -> dict[str, str]:
        return {"labelSelector": self.label_selector} if self.label_selector else {}

    async def _run(self, namespace: str, watch: _Watch) -> None:
        path = self.path.format(namespace=namespace)
        version: str | None = None
        retry = Retry(
            f"watch of {self.what} in {namespace}", base=1.0, cap=_BACKOFF_MAX, jitter=0.2, logger=log
        )
        try:
            while True:
                try:
                    if version is None:
                        listing = await self.http.get(
                            path, params={**self._params(), "limit": "1"}, accept=METADATA_LIST
                        )
                        version = str((listing.get("metadata") or {}).get("resourceVersion", ""))
                        if watch.established.is_set() or watch.read_before:
                            # A relist after lost history, or a reader that did not wait.
                            watch.read_before = False
                            self.resync(namespace)
                        watch.established.set()
                        watch.answered.set()
                    version = await self._follow(namespace, path, version, retry)
                    retry.succeeded()
                    if version is not None and not self.wanted(namespace):
                        log.debug("no longer watching %s in %s", self.what, namespace)
                        return
                except KubeGone:
                    version = None
                    continue
                except KubeError as exc:
                    watch.answered.set()
                    await retry.pause(exc)
        finally:
            if self._watches.get(namespace) is watch:
                del self._watches[namespace]
                metrics.WATCHED_NAMESPACES.labels(resource=self.what).set(len(self._watches))

    async def _follow(self, namespace: str, path: str, version: str, retry: Retry) -> str | None:
        """One watch request from ``version``; the version to go on from (None: relist).

        Any event but an error (a bookmark included) proves the watch works again: ``retry``
        hears of it at once, not when the request ends minutes later.
        """
        params = {**self._params(), "resourceVersion": version, "allowWatchBookmarks": "true"}
        seconds = WATCH_SECONDS + random.randint(0, 20)
        async for event in self.http.watch(path, params=params, accept=METADATA, timeout_seconds=seconds):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                error = kube_error(f"watch of {self.what} in {namespace}", int(obj.get("code") or 0), obj)
                if isinstance(error, KubeGone):
                    return None  # history compacted: relist, and resync this namespace
                raise error
            retry.succeeded()
            meta = obj.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            if kind == "BOOKMARK":
                if not self.wanted(namespace):
                    return version
                continue
            metrics.WATCH_EVENTS.labels(resource=self.what).inc()
            self.changed(namespace, meta)
        return version

