"""TetherPolicy enforcement: the policy cache every kind's skeleton asks before it writes.

The rules themselves are pure (:mod:`tether.api.policies`); this module feeds
them and acts on their answers:

* **two watches, no per-resource calls**: every TetherPolicy (cluster-scoped,
  full objects: the spec matters) and every Namespace (metadata only: the
  labels are all that matter). :meth:`Policies.check` answers from memory.
  Until both lists have been read once, ``check`` waits (a few seconds) and
  then answers "not known yet": the skeleton reports ``Reconciling`` and
  retries — nothing is written on a guess. A cluster without the CRD
  (404) has no policies.
* **re-enqueue what changed**: each resource's last claims and decision are
  kept; after a policy change every remembered claim is decided again, after
  a namespace's labels change those of that namespace, and only the
  resources whose decision changed are enqueued. Enforcement therefore
  follows a policy edit within a watch event's latency, at the cost of a
  pure computation, not of a reconcile of every resource.
* **status, only on change**: ``Ready`` (every selector term and pattern is
  valid), ``namespaces`` (how many it selects) and ``forbidden`` (how many
  resources it refuses now), patched by one writer after a short debounce and
  only when they differ from what the policy shows (idle means idle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tether import conditions
from tether.api import GROUP, VERSION, ObjectRef
from tether.api import policies as api
from tether.api.policies import Claims, Decision
from tether.clients.kube.http import METADATA, METADATA_LIST, KubeError, KubeHttp
from tether.conditions import Condition

log = logging.getLogger(__name__)

POLICIES_PATH = f"apis/{GROUP}/{VERSION}/{api.PLURAL}"
NAMESPACES_PATH = "api/v1/namespaces"
# How long a reconcile waits for the first lists before answering "not known yet".
SYNC_SECONDS = 5.0
# Status writes wait this long after a change, so a burst of decisions is one patch.
STATUS_DEBOUNCE_SECONDS = 0.5
# Without the CRD installed: look again this often (a later install is picked up).
ABSENT_RETRY_SECONDS = 30.0
WATCH_SECONDS = 290
_BACKOFF_MAX = 30.0

VALID = "Valid"


@dataclass(frozen=True)
class _Stored:
    """One policy as the watch delivered it."""

    policy: api.Policy
    spec: Mapping[str, Any]
    generation: int
    status: Mapping[str, Any]


class Policies:
    """The policy cache: policies, namespace labels, and the decisions made from them."""

    def __init__(self, http: KubeHttp, *, default: api.Default = "allow") -> None:
        self.http = http
        self.default: api.Default = default
        self._stored: dict[str, _Stored] = {}
        self._rules: tuple[api.Policy, ...] = ()
        self._labels: dict[str, dict[str, str]] = {}
        # Namespaces that exist and are not being deleted; ``namespaces_changed``
        # is set whenever this set changes (the operator hands Kopf the ones it
        # missed, see ``tether.kopfing``).
        self._live: set[str] = set()
        self.namespaces_changed = asyncio.Event()
        self._decisions: dict[ObjectRef, tuple[Claims, Decision]] = {}
        self._enqueue: dict[str, Callable[[ObjectRef], None]] = {}
        self._policies_listed = asyncio.Event()
        self._namespaces_listed = asyncio.Event()
        self._dirty = asyncio.Event()

    # -- what the skeleton asks ----------------------------------------------------

    def subscribe(self, plural: str, enqueue: Callable[[ObjectRef], None]) -> None:
        self._enqueue[plural] = enqueue

    async def check(self, ref: ObjectRef, claims: Claims) -> Decision | None:
        """The decision for ``claims`` of ``ref``; None while policies or labels are unknown."""
        if not await self._synced():
            return None
        labels = self._labels.get(ref.namespace)
        if labels is None:
            return None  # a namespace newer than our last event of it: retried shortly
        decision = api.decide(self._rules, ref.namespace, labels, claims, default=self.default)
        before = self._decisions.get(ref)
        self._decisions[ref] = (claims, decision)
        # Only a change of the refusing policies moves a policy's status (its
        # ``forbidden`` count): a new resource that is allowed changes none, and
        # marking it would recount every decision each debounce while thousands
        # of resources start.
        if (before[1].policies if before is not None else ()) != decision.policies:
            self._dirty.set()
        return decision

    def forget(self, ref: ObjectRef) -> None:
        before = self._decisions.pop(ref, None)
        if before is not None and before[1].policies:
            self._dirty.set()

    def decide(self, namespace: str, claims: Claims) -> Decision | None:
        """The decision now, without recording it (None: namespace unknown)."""
        labels = self._labels.get(namespace)
        if labels is None:
            return None
        return api.decide(self._rules, namespace, labels, claims, default=self.default)

    def live_namespaces(self) -> set[str]:
        """The namespaces that exist and are not being deleted, as last seen."""
        return set(self._live)

    def _set_live(self, name: str, live: bool) -> None:
        if live != (name in self._live):
            if live:
                self._live.add(name)
            else:
                self._live.discard(name)
            self.namespaces_changed.set()

    async def _synced(self) -> bool:
        if self._policies_listed.is_set() and self._namespaces_listed.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(self._policies_listed.wait(), self._namespaces_listed.wait()), SYNC_SECONDS
            )
        return self._policies_listed.is_set() and self._namespaces_listed.is_set()

    # -- reacting to changes -------------------------------------------------------

    def _recheck(self, namespace: str | None = None) -> None:
        """Enqueue every remembered resource (of ``namespace``, or all) whose decision changed."""
        for ref, (claims, decision) in list(self._decisions.items()):
            if namespace is not None and ref.namespace != namespace:
                continue
            now = self.decide(ref.namespace, claims)
            if now != decision:
                enqueue = self._enqueue.get(ref.plural)
                if enqueue is not None:
                    enqueue(ref)
        self._dirty.set()

    def _set_policy(self, body: Mapping[str, Any]) -> bool:
        """Store one policy; True when its spec changed (decisions may change)."""
        meta = body.get("metadata") or {}
        name = str(meta.get("name") or "")
        spec = body.get("spec") or {}
        before = self._stored.get(name)
        self._stored[name] = _Stored(
            api.parse(name, spec), spec, int(meta.get("generation") or 0), body.get("status") or {}
        )
        return before is None or before.spec != spec

    def _policies_changed(self) -> None:
        self._rules = tuple(s.policy for _, s in sorted(self._stored.items()))
        self._recheck()

    def _set_labels(self, meta: Mapping[str, Any]) -> bool:
        name = str(meta.get("name") or "")
        labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        if self._labels.get(name) == labels:
            return False
        self._labels[name] = labels
        return True

    # -- the watches and the status writer (one supervised task) ------------------------

    async def run(self) -> None:
        """Follow policies and namespaces and keep the policies' status; until cancelled."""
        tasks = [
            asyncio.create_task(self._follow_policies(), name="tetherpolicies-watch"),
            asyncio.create_task(self._follow_namespaces(), name="namespaces-watch"),
            asyncio.create_task(self._write_statuses(), name="tetherpolicies-status"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a crash: the supervisor restarts the whole of it
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow_policies(self) -> None:
        version: str | None = None
        delay = 1.0
        while True:
            try:
                if version is None:
                    try:
                        listing = await self.http.get(POLICIES_PATH, params={})
                    except KubeError as exc:
                        if exc.status != 404:
                            raise
                        # No CRD, so no policies: decide on that, and look again later.
                        self._replace_policies([])
                        self._policies_listed.set()
                        await asyncio.sleep(ABSENT_RETRY_SECONDS)
                        continue
                    self._replace_policies(listing.get("items") or [])
                    self._policies_listed.set()
                    version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                version = await self._watch(POLICIES_PATH, version, "application/json", self._policy_event)
                delay = 1.0
            except KubeError as exc:
                log.info("watch of TetherPolicies failed (%s); again in %.0fs", exc, delay)
                version = None
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, _BACKOFF_MAX)

    def _replace_policies(self, items: list[Mapping[str, Any]]) -> None:
        names = {str((i.get("metadata") or {}).get("name") or "") for i in items}
        changed = bool(set(self._stored) - names)
        for name in set(self._stored) - names:
            del self._stored[name]
        for item in items:
            changed = self._set_policy(item) or changed
        if changed or not self._policies_listed.is_set():
            self._policies_changed()

    def _policy_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        name = str((obj.get("metadata") or {}).get("name") or "")
        if kind == "DELETED":
            if self._stored.pop(name, None) is not None:
                self._policies_changed()
            return
        if self._set_policy(obj):
            self._policies_changed()

    async def _follow_namespaces(self) -> None:
        version: str | None = None
        delay = 1.0
        while True:
            try:
                if version is None:
                    listing = await self.http.get(NAMESPACES_PATH, params={}, accept=METADATA_LIST)
                    items = listing.get("items") or []
                    fresh = {
                        str((i.get("metadata") or {}).get("name") or ""): {
                            str(k): str(v) for k, v in ((i.get("metadata") or {}).get("labels") or {}).items()
                        }
                        for i in items
                    }
                    changed = {
                        ns for ns in set(fresh) | set(self._labels) if fresh.get(ns) != self._labels.get(ns)
                    }
                    self._labels = fresh
                    live = {
                        str((i.get("metadata") or {}).get("name") or "")
                        for i in items if not (i.get("metadata") or {}).get("deletionTimestamp")
                    }
                    if live != self._live:
                        self._live = live
                        self.namespaces_changed.set()
                    self._namespaces_listed.set()
                    for ns in sorted(changed):
                        self._recheck(ns)
                    self._dirty.set()
                    version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                version = await self._watch(NAMESPACES_PATH, version, METADATA, self._namespace_event)
                delay = 1.0
            except KubeError as exc:
                log.info("watch of namespaces failed (%s); again in %.0fs", exc, delay)
                version = None
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, _BACKOFF_MAX)

    def _namespace_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name") or "")
        self._set_live(name, kind != "DELETED" and not meta.get("deletionTimestamp"))
        if kind == "DELETED":
            if self._labels.pop(name, None) is not None:
                self._dirty.set()
            return
        if self._set_labels(meta):
            self._recheck(name)

    async def _watch(
        self, path: str, version: str, accept: str, handle: Callable[[str, Mapping[str, Any]], None]
    ) -> str | None:
        """One watch request from ``version``; the version to go on from (None: relist)."""
        params = {"resourceVersion": version, "allowWatchBookmarks": "true"}
        seconds = WATCH_SECONDS + random.randint(0, 20)
        async for event in self.http.watch(path, params=params, accept=accept, timeout_seconds=seconds):
            kind, obj = str(event.get("type")), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    return None
                raise KubeError(f"watch {path}: {obj.get('message')}", int(obj.get("code") or 0))
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if kind != "BOOKMARK":
                handle(kind, obj)
        return version

    # -- status ----------------------------------------------------------------------

    def statuses(self) -> dict[str, dict[str, Any]]:
        """Each policy's status as it should be now (timestamps kept where nothing flipped)."""
        forbidden: dict[str, int] = {}
        for _, decision in self._decisions.values():
            for name in decision.policies:
                forbidden[name] = forbidden.get(name, 0) + 1
        out: dict[str, dict[str, Any]] = {}
        for name, stored in self._stored.items():
            policy = stored.policy
            if policy.valid:
                ready = Condition(conditions.READY, "True", VALID, "every selector term and pattern is valid")
            else:
                ready = Condition(
                    conditions.READY, "False", conditions.INVALID_SPEC,
                    "left out, as invalid: " + "; ".join(policy.problems),
                )
            status = {k: v for k, v in stored.status.items() if k not in ("conditions", "observedGeneration")}
            status.update({
                "observedGeneration": stored.generation,
                "conditions": conditions.merge(
                    stored.status.get("conditions"), (ready,), generation=stored.generation,
                    timestamp=conditions.now(),
                ),
                "namespaces": sum(1 for labels in self._labels.values() if policy.selects(labels)),
                "forbidden": forbidden.get(name, 0),
            })
            out[name] = status
        return out

    async def _write_statuses(self) -> None:
        failures = 0
        while True:
            await self._dirty.wait()
            # After failed writes, wait longer: an API server that refuses must not be hammered.
            await asyncio.sleep(STATUS_DEBOUNCE_SECONDS if not failures else min(2.0**failures, _BACKOFF_MAX))
            self._dirty.clear()
            failures = min(failures + 1, 8) if await self._write_once() else 0

    async def _write_once(self) -> bool:
        """Patch every policy whose status differs; True when a write failed."""
        failed = False
        if not (self._policies_listed.is_set() and self._namespaces_listed.is_set()):
            return False
        for name, status in sorted(self.statuses().items()):
            stored = self._stored.get(name)
            if stored is None or status == dict(stored.status):
                continue
            try:
                body = await self.http.request(
                    "PATCH", f"{POLICIES_PATH}/{name}/status", body={"status": status},
                    content_type="application/merge-patch+json", what=f"patch status of TetherPolicy {name}",
                )
            except KubeError as exc:
                if exc.status != 404:
                    log.info("could not update the status of TetherPolicy %s: %s", name, exc)
                    self._dirty.set()  # again, after a backoff
                    failed = True
                continue
            current = self._stored.get(name)
            if current is not None and isinstance(body, Mapping):
                self._stored[name] = _Stored(
                    current.policy, current.spec, current.generation, body.get("status") or {}
                )
        return failed
