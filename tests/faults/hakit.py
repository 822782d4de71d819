"""The fault suite's instruments for the HA stack (``tether dev up --ha``).

- :class:`HaFaultStack` — the suite's :class:`~faultkit.FaultStack` in HA mode,
  with :class:`tether_dev.faults.HaFaults` for leader kills, partitions and
  slowdowns.
- :class:`HaEtcd` — the auditor's etcd reader, failing over between the three
  members (a partitioned member must not blind the audit).
- :class:`History` — every change under a prefix as etcd itself ordered it (a
  watch through etcd's JSON gateway that resumes on another member when one
  goes quiet), plus the wall-clock time each change was seen.
- :class:`Acks` — what Tether *acknowledged* for each EtcdConfig: ``Ready=True``
  at ``observedGeneration`` g with ``status.revision`` r, polled from Kubernetes,
  and what each generation declared (recorded from the API server's answers).
- :func:`check_linearizable` — the per-key history check over those two.
- :func:`unknown_outcomes` — transactions whose outcome Tether's etcd client
  did not know, counted from the operator's log.

Everything is bounded in time; threads stop when asked and are daemons.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faultkit import FaultStack, Kube

from tether_dev import faults as devfaults
from tether_dev.harness.etcd import Etcd, prefix_end

#: The value the fault injector writes when it drifts a managed key.
DRIFT_VALUE = "drifted-by-fault-injector"
#: The client's log line for a transaction whose outcome is unknown
#: (tether.clients.etcd.client); the count of repeated writes comes from it.
UNKNOWN_OUTCOME = re.compile(r"etcd transaction outcome unknown")


class HaFaultStack(FaultStack):
    """A private HA dev stack a test may break; ``faults`` aims at its members."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self._faults: devfaults.HaFaults | None = None

    def up(self) -> float:
        started = time.monotonic()
        with self._lock:
            self.dev.up(ha=True)
        return time.monotonic() - started

    @property
    def faults(self) -> devfaults.HaFaults:
        if self._faults is None:
            self._faults = devfaults.HaFaults(self.dev)
        return self._faults

    def url(self, name: str) -> str:
        return self.dev.components()[name].url

    def settle(self, *, timeout: float = 60.0) -> tuple[str, str]:
        """Wait until every member runs and both clusters have one leader; return them."""
        self.ensure_up()
        deadline = time.monotonic() + timeout
        etcd = self.faults.etcd_leader(timeout=timeout)
        consul = self.faults.consul_leader(timeout=max(1.0, deadline - time.monotonic()))
        return etcd, consul


# ----------------------------------------------------------------------- etcd reads


class HaEtcd(Etcd):
    """etcd's JSON gateway on every member, failing over on errors and timeouts.

    Reads are linearizable (the gateway's default), so whichever member answers,
    the answer is as fresh as the leader's. A member that is cut off answers
    nothing (or an error); the next one is tried, each with a short timeout.
    """

    def __init__(self, endpoints: str, *, attempt_timeout: float = 2.5) -> None:
        super().__init__(endpoints, timeout=attempt_timeout)
        self.endpoints = [e.rstrip("/") for e in endpoints.split(",") if e]
        self.attempt_timeout = attempt_timeout
        self._current = 0
        self._lock = threading.Lock()

    def call(self, path: str, body: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        last: Exception | None = None
        with self._lock:
            start = self._current
        for i in range(len(self.endpoints)):
            index = (start + i) % len(self.endpoints)
            request = urllib.request.Request(
                self.endpoints[index] + path, data=json.dumps(body).encode(), method="POST"
            )
            try:
                # A compaction may take long; everything else gets the short attempt timeout.
                attempt = max(timeout or 0.0, self.attempt_timeout)
                with urllib.request.urlopen(request, timeout=attempt) as response:
                    result: dict[str, Any] = json.loads(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    raise
                last = exc
                continue
            except (OSError, ValueError) as exc:
                last = exc
                continue
            with self._lock:
                self._current = index
            return result
        assert last is not None
        raise last


# ----------------------------------------------------------------------- history


@dataclass(frozen=True)
class Event:
    """One change of one key, as etcd ordered it."""

    revision: int
    key: str
    value: str | None  # None: deleted
    seen: float  # time.monotonic() when the watcher received it


@dataclass
class History:
    """Every event under ``prefix`` from ``start_revision`` on, from an etcd watch.

    The watch goes through the JSON gateway with ``hasleader`` set, so a member
    that has lost its leader ends the stream rather than going silent; a stream
    silent for ``quiet`` seconds is reopened on the next member, from the last
    revision seen + 1, so no event is missed or seen twice. ``gaps`` records a
    resumption refused because the revision had been compacted (the check then
    says it cannot vouch for that stretch).
    """

    endpoints: list[str]
    prefix: str
    start_revision: int
    quiet: float = 3.0
    events: list[Event] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    last_revision: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> History:
        self.last_revision = self.start_revision - 1
        self._thread = threading.Thread(target=self._run, name="etcd-history", daemon=True)
        self._thread.start()
        return self

    def catch_up(self, etcd: Etcd, *, timeout: float = 30.0) -> None:
        """Stop once the watcher has seen everything written so far.

        A watch on a prefix only learns revisions of that prefix, so the end is
        marked by a sentinel write of our own just beside the run's keys
        (``<prefix>~history-end``: under the watched prefix, outside the
        ``<prefix>/`` the audit and the resources use), then removed.
        """
        try:
            self.mark(etcd, timeout=timeout)
        finally:
            self.stop()
            with contextlib.suppress(Exception):
                etcd.delete(self.sentinel)

    @property
    def sentinel(self) -> str:
        return f"{self.prefix}~history-end"

    def mark(self, etcd: Etcd, *, timeout: float = 30.0) -> int:
        """Write the sentinel and wait (bounded) until the watcher has seen it; its revision."""
        revision = etcd.put(self.sentinel, str(time.time()))
        deadline = time.monotonic() + timeout
        while self.last_revision < revision:
            if time.monotonic() > deadline:
                self.gaps.append(f"watch did not catch up to {revision} (at {self.last_revision})")
                break
            time.sleep(0.05)
        return revision

    def stop(self, *, catch_up_to: int | None = None, timeout: float = 30.0) -> None:
        """Stop, after the watcher has seen ``catch_up_to`` (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while catch_up_to is not None and self.last_revision < catch_up_to:
            if time.monotonic() > deadline:
                self.gaps.append(f"watch did not catch up to {catch_up_to} (at {self.last_revision})")
                break
            time.sleep(0.1)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.quiet + 5)

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    def _run(self) -> None:
        member = 0
        # Bounded by the stop flag; each pass is bounded by `quiet` of silence.
        while not self._stop.is_set():
            endpoint = self.endpoints[member % len(self.endpoints)]
            member += 1
            with contextlib.suppress(OSError, ValueError):
                self._watch(endpoint)
            if not self._stop.is_set():
                time.sleep(0.05)

    def _watch(self, endpoint: str) -> None:
        key = self.prefix.encode()
        body = {
            "create_request": {
                "key": base64.b64encode(key).decode(),
                "range_end": base64.b64encode(prefix_end(self.prefix)).decode(),
                "start_revision": str(self.last_revision + 1),
            }
        }
        request = urllib.request.Request(
            f"{endpoint}/v3/watch",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Grpc-Metadata-hasleader": "true"},
        )
        with urllib.request.urlopen(request, timeout=self.quiet) as response:
            while not self._stop.is_set():
                line = response.readline()
                if not line:
                    return
                message = json.loads(line)
                result = message.get("result", {})
                if "error" in message:
                    return
                if result.get("canceled"):
                    compact = int(result.get("compact_revision", 0) or 0)
                    if compact:
                        self.gaps.append(
                            f"revisions {self.last_revision + 1}..{compact - 1} compacted before seen"
                        )
                        self.last_revision = compact - 1
                    return
                now = time.monotonic()
                batch = [
                    Event(
                        revision=int(e["kv"]["mod_revision"]),
                        key=base64.b64decode(e["kv"]["key"]).decode(),
                        value=None
                        if e.get("type") == "DELETE"
                        else base64.b64decode(e["kv"].get("value", "")).decode(errors="replace"),
                        seen=now,
                    )
                    for e in result.get("events", [])
                ]
                if batch:
                    with self._lock:
                        self.events.extend(batch)
                        self.last_revision = max(self.last_revision, batch[-1].revision)


# ----------------------------------------------------------------------- acknowledgements


@dataclass(frozen=True)
class Ack:
    """Tether said: at ``revision``, etcd holds generation ``generation`` of this resource."""

    resource: tuple[str, str, str]  # namespace, name, uid (a name may be re-created)
    generation: int
    revision: int


@dataclass
class Acks:
    """Declarations (per generation) and acknowledgements of EtcdConfigs.

    ``declared`` is filled from the API server's answers to creates and updates
    (the generation it assigned to each spec); ``poll`` reads every EtcdConfig's
    status and keeps each distinct acknowledgement.
    """

    declared: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = field(default_factory=dict)
    deleted: set[tuple[str, str]] = field(default_factory=set)
    acks: set[Ack] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, obj: Mapping[str, Any] | None) -> None:
        if not obj or obj.get("kind") != "EtcdConfig":
            return
        meta = obj["metadata"]
        with self.lock:
            self.declared.setdefault((meta["namespace"], meta["name"], meta["uid"]), {})[
                int(meta["generation"])
            ] = json.loads(json.dumps(obj.get("spec", {})))

    def poll(self, kube: Kube, namespaces: set[str]) -> None:
        for obj in kube.list("ec", namespaces):
            status = obj.get("status") or {}
            ready = next(
                (c for c in status.get("conditions", []) if c.get("type") == "Ready"), None
            )
            if not ready or ready.get("status") != "True" or not status.get("revision"):
                continue
            generation = int(ready.get("observedGeneration") or status.get("observedGeneration") or 0)
            meta = obj["metadata"]
            # The spec of the generation Kubernetes holds now, in case the test
            # never saw the answer to the update that made it.
            self.record(obj)
            with self.lock:
                self.acks.add(
                    Ack((meta["namespace"], meta["name"], meta["uid"]), generation, int(status["revision"]))
                )


class RecordingKube(Kube):
    """:class:`Kube` that records every EtcdConfig spec the API server accepted."""

    def __init__(self, kubeconfig: str, acks: Acks) -> None:
        super().__init__(kubeconfig)
        self.acks_record = acks

    def create(self, kind: str, namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        obj = super().create(kind, namespace, name, spec)
        self.acks_record.record(obj)
        return obj

    def replace_spec(self, kind: str, namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        obj = super().replace_spec(kind, namespace, name, spec)
        self.acks_record.record(obj)
        return obj

    def delete(self, kind: str, namespace: str, name: str) -> None:
        if kind == "ec":
            with self.acks_record.lock:
                self.acks_record.deleted.add((namespace, name))
        super().delete(kind, namespace, name)


@contextlib.contextmanager
def polling(acks: Acks, kube: Kube, namespaces: set[str], *, interval: float = 0.5) -> Iterator[None]:
    """Poll acknowledgements in a thread while the block runs."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(Exception):  # the API server may be down: next time
                acks.poll(kube, namespaces)

    thread = threading.Thread(target=run, name="ack-poller", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        with contextlib.suppress(Exception):
            acks.poll(kube, namespaces)


# ----------------------------------------------------------------------- the check


@dataclass
class LinearizabilityReport:
    checked_acks: int = 0
    checked_keys: int = 0
    unverifiable_acks: int = 0
    anomalies: list[str] = field(default_factory=list)


def _key(prefix: str, relative: str) -> str:
    return f"{prefix.rstrip('/')}/{relative}"


def check_linearizable(history: list[Event], acks: Acks, *, gaps: list[str]) -> LinearizabilityReport:
    """Check every acknowledged EtcdConfig write against etcd's own history, key by key.

    What it proves. etcd's watch gives the complete, totally ordered history of
    every key under the run's prefix (each event with its revision). Tether's
    acknowledgement of generation g at revision r ("Ready=True, observedGeneration
    g, status.revision r") claims that its transaction(s) for g had been applied
    by revision r. For each such acknowledgement and each key k that generation
    declares through ``spec.data`` (ConfigMap-sourced values change without a
    generation and are left out; a key that ``data`` overrode and a newer
    generation leaves to its ConfigMap may take the ConfigMap's value):

    1. **not lost / not false** — the last event on k at or before r puts exactly
       the value generation g declares. An acknowledgement without that write
       (a success reported for a transaction that did not apply, say after an
       unknown outcome) fails here.
    2. **never goes back** — every later event on k is explained by a
       declaration at least as new: a put of a value declared by a generation
       >= g (or the fault injector's drift, which Tether must then repair), or a
       delete once a generation >= g no longer declares k at that prefix, or
       the resource is deleted. A put of a value only an *older* generation
       declared — a delayed or repeated transaction landing after a newer one
       was acknowledged — fails here, as does a delete nobody asked for.

    Because the events come from etcd (not from Tether's log) and every key of
    a run has exactly one possible owner (the generator gives each create and
    move a fresh prefix), this is a per-key register check: together with the
    audit's final-state comparison it shows that no acknowledged write was lost
    and no key ever moved backwards. It does not check reads Tether made, nor
    the order of writes of different keys (each resource's keys land in one
    transaction, which the audit's shared mod_revision check covers).
    """
    report = LinearizabilityReport()
    report.anomalies += [f"history gap: {gap}" for gap in gaps]
    by_key: dict[str, list[Event]] = {}
    for event in sorted(history, key=lambda e: e.revision):
        by_key.setdefault(event.key, []).append(event)
    with acks.lock:
        declared = {res: dict(gens) for res, gens in acks.declared.items()}
        ack_list = sorted(acks.acks, key=lambda a: (a.resource, a.generation, a.revision))
    # Only the earliest acknowledgement of a generation matters: later ones at
    # higher revisions restate it (a no-op reconcile reports where it stands).
    first: dict[tuple[tuple[str, str, str], int], Ack] = {}
    for ack in ack_list:
        if (ack.resource, ack.generation) not in first:
            first[(ack.resource, ack.generation)] = ack
    for (resource, generation), ack in sorted(first.items()):
        spec = declared.get(resource, {}).get(generation)
        if spec is None:
            report.unverifiable_acks += 1  # an update whose answer the test never saw
            continue
        report.checked_acks += 1
        newer = {g: s for g, s in declared[resource].items() if g >= generation}
        for relative, value in sorted((spec.get("data") or {}).items()):
            key = _key(spec["prefix"], relative)
            report.checked_keys += 1
            events = by_key.get(key, [])
            before = [e for e in events if e.revision <= ack.revision]
            if not before or before[-1].value != value:
                got = (
                    "nothing" if not before
                    else "a delete" if before[-1].value is None
                    else "another value"
                )
                report.anomalies.append(
                    f"{resource[0]}/{resource[1]} gen {generation} acknowledged at revision "
                    f"{ack.revision}, but {key} held {got} there (last event "
                    f"{before[-1].revision if before else '-'})"
                )
                continue
            for event in (e for e in events if e.revision > ack.revision):
                if event.value == DRIFT_VALUE:
                    continue
                if event.value is None:
                    explained = any(
                        relative not in (s.get("data") or {}) or _key(s["prefix"], relative) != key
                        for s in newer.values()
                    ) or resource[:2] in acks.deleted
                else:
                    explained = any(
                        (s.get("data") or {}).get(relative) == event.value
                        and _key(s["prefix"], relative) == key
                        for s in newer.values()
                    ) or any(
                        # A newer generation no longer overrides the key in data
                        # but reads it from a ConfigMap: the ConfigMap's value.
                        s.get("from") and relative not in (s.get("data") or {})
                        for s in newer.values()
                    )
                unseen = set(range(generation, max(declared[resource]) + 1)) - set(declared[resource])
                if not explained and unseen:
                    # A generation in between was never seen (an update whose answer
                    # was lost): its value may be the explanation.
                    report.unverifiable_acks += 1
                    continue
                if not explained:
                    what = "deleted" if event.value is None else "set to a value no newer generation declares"
                    older = [
                        g for g, s in declared[resource].items()
                        if g < generation and (s.get("data") or {}).get(relative) == event.value
                    ]
                    report.anomalies.append(
                        f"{key} {what} at revision {event.revision} after {resource[0]}/{resource[1]} "
                        f"gen {generation} was acknowledged at {ack.revision}"
                        + (f" (the value of gen {older}: went back)" if older else "")
                    )
    return report


def unknown_outcomes(operator_log: str) -> int:
    """Transactions the operator's etcd client sent without learning their outcome."""
    return len(UNKNOWN_OUTCOME.findall(operator_log))
