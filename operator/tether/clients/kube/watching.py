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
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

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
class Stream:
    """What every per-namespace stream keeps: its task, and whether its first start has answered."""

    task: asyncio.Task[None] | None = None
    # Set once the first attempt to start it has an answer, success or failure
    # (API server down, a 403): readers wait for that, never for the retries.
    answered: asyncio.Event = field(default_factory=asyncio.Event)


S = TypeVar("S", bound=Stream)


class NamespaceStreams(ABC, Generic[S]):
    """The mechanics shared by every per-namespace stream of one resource type.

    One task per namespace that matters: read the namespace (``_list``, which
    gives the resourceVersion to watch from), then follow watch requests from
    there, each event handed to ``_event``; a 410 lists again, any other error
    retries with backoff (one :class:`Retry`, so an outage warns once); the task
    ends at the first bookmark (or request end) after ``wanted`` stops saying the
    namespace matters. Subclasses say what a list and an event mean.
    """

    role = "watch"  # names the tasks ("watch-secrets-team-a") and the retry's logs ("watch of ...")
    accept = METADATA  # the watch's media type
    logger = log

    def __init__(self, http: KubeHttp, *, what: str, path: str, wanted: Callable[[str], bool]) -> None:
        self.http = http
        self.what = what
        self.path = path
        self.wanted = wanted
        self._streams: dict[str, S] = {}

    def namespaces(self) -> list[str]:
        """The namespaces watched now."""
        return sorted(ns for ns, s in self._streams.items() if s.task is not None and not s.task.done())

    async def stop(self) -> None:
        tasks = [s.task for s in self._streams.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._streams.clear()

    @abstractmethod
    def _new(self) -> S:
        """A fresh stream state for one namespace."""

    @abstractmethod
    async def _list(self, namespace: str, stream: S, path: str) -> str:
        """Read the namespace (first start, or after lost history); the version to watch from."""

    @abstractmethod
    def _event(self, namespace: str, stream: S, kind: str, obj: dict[str, Any], meta: dict[str, Any]) -> None:
        """One ADDED/MODIFIED/DELETED event (``meta`` is ``obj``'s metadata)."""

    def _params(self) -> dict[str, str]:
        """Query parameters of both the list and the watch (e.g. a label selector)."""
        return {}

    async def _open(self, namespace: str) -> S:
        """The stream of ``namespace``, started if it is not running, once its first start
        has answered (waiting ``ENSURE_SECONDS`` at most)."""
        stream = self._streams.get(namespace)
        if stream is None or stream.task is None or stream.task.done():
            stream = self._new()
            self._streams[namespace] = stream
            name = f"{self.role}-{self.what}-{namespace}"
            stream.task = asyncio.create_task(self._run(namespace, stream), name=name)
            metrics.WATCHED_NAMESPACES.labels(resource=self.what).set(len(self._streams))
        if not stream.answered.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stream.answered.wait()), ENSURE_SECONDS)
        return stream

    async def _run(self, namespace: str, stream: S) -> None:
        path = self.path.format(namespace=namespace)
        version: str | None = None
        retry = Retry(
            f"{self.role} of {self.what} in {namespace}", base=1.0, cap=_BACKOFF_MAX, jitter=0.2,
            logger=self.logger,
        )
        try:
            while True:
                try:
                    if version is None:
                        version = await self._list(namespace, stream, path)
                        stream.answered.set()
                    version = await self._follow(namespace, stream, path, version, retry)
                    retry.succeeded()
                    if version is not None and not self.wanted(namespace):
                        self.logger.debug("no longer watching %s in %s", self.what, namespace)
                        return
                except KubeGone:
                    version = None
                except KubeError as exc:
                    stream.answered.set()
                    await retry.pause(exc)
        finally:
            if self._streams.get(namespace) is stream:
                del self._streams[namespace]
                metrics.WATCHED_NAMESPACES.labels(resource=self.what).set(len(self._streams))

    async def _follow(self, namespace: str, stream: S, path: str, version: str, retry: Retry) -> str | None:
        """One watch request from ``version``; the version to go on from (None: list again).

        Any event but an error (a bookmark included) proves the watch works again: ``retry``
        hears of it at once, not when the request ends minutes later.
        """
        params = {**self._params(), "resourceVersion": version, "allowWatchBookmarks": "true"}
        seconds = WATCH_SECONDS + random.randint(0, 20)
        async for event in self.http.watch(path, params=params, accept=self.accept, timeout_seconds=seconds):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                error = kube_error(f"watch of {self.what} in {namespace}", int(obj.get("code") or 0), obj)
                if isinstance(error, KubeGone):
                    return None  # history compacted: list again (and resync, for metadata watches)
                raise error
            retry.succeeded()
            meta = obj.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            if kind == "BOOKMARK":
                if not self.wanted(namespace):
                    return version
                continue
            metrics.WATCH_EVENTS.labels(resource=self.what).inc()
            self._event(namespace, stream, str(kind), obj, meta)
        return version


@dataclass
class _Watch(Stream):
    established: asyncio.Event = field(default_factory=asyncio.Event)
    # A reader gave up waiting for the watch: enqueue the namespace once it starts.
    read_before: bool = False


class NamespaceWatches(NamespaceStreams[_Watch]):
    """Metadata-only watches of one resource type, one per namespace that matters."""

    def __init__(
        self, http: KubeHttp, *, what: str, path: str, changed: Changed,
        wanted: Callable[[str], bool], resync: Callable[[str], None], label_selector: str = "",
    ) -> None:
        """``path`` has a ``{namespace}`` field; ``changed`` gets every event's metadata,
        ``resync`` a namespace whose events may have been missed, ``wanted`` says
        whether a namespace still matters."""
        super().__init__(http, what=what, path=path, wanted=wanted)
        self.changed = changed
        self.resync = resync
        self.label_selector = label_selector

    async def ensure(self, namespace: str) -> None:
        """Watch ``namespace`` (if not yet), and wait until the watch is established.

        Called before a reconcile reads an object of this type: a change made
        after that read then always arrives as an event. If the watch's first
        start fails (or takes over ``ENSURE_SECONDS``), the reader goes on at
        once and the watch enqueues the namespace's dependents when it is up.
        """
        watch = await self._open(namespace)
        if not watch.established.is_set():
            # Read anyway; the watch enqueues the namespace's dependents once it is up.
            watch.read_before = True

    def _new(self) -> _Watch:
        return _Watch()

    def _params(self) -> dict[str, str]:
        return {"labelSelector": self.label_selector} if self.label_selector else {}

    async def _list(self, namespace: str, stream: _Watch, path: str) -> str:
        """No objects, only the namespace's current version (``limit=1``)."""
        listing = await self.http.get(path, params={**self._params(), "limit": "1"}, accept=METADATA_LIST)
        version = str((listing.get("metadata") or {}).get("resourceVersion", ""))
        if stream.established.is_set() or stream.read_before:
            # A relist after lost history, or a reader that did not wait.
            stream.read_before = False
            self.resync(namespace)
        stream.established.set()
        return version

    def _event(
        self, namespace: str, stream: _Watch, kind: str, obj: dict[str, Any], meta: dict[str, Any]
    ) -> None:
        self.changed(namespace, meta)
