"""The audit's TetherPolicy part: no backend write outside what the policies allowed at that moment.

While a run's stream edits TetherPolicies and relabels namespaces
(:meth:`generator.Workload.policy_op`, each edit recorded as a
:class:`generator.PolicyState` with the start and end of its API call), a
:class:`WriteRecorder` thread observes every write of the operator's that
lands in a backend, and :func:`outside_allow_list` judges each one against
the policies as they were at that moment.

What counts as a write, and for which (namespace, subject):

- Consul: a registration on the agent, read every :data:`POLL` seconds
  (``/v1/agent/services``), that is new or whose name, address, port, tags or
  meta changed since the previous successful read. Its namespace is its
  ``tether-namespace`` meta and its subject the service name. A registration
  without ownership meta (one released by ``deletionPolicy: Orphan``) claims
  nothing and is not judged. A backend restart that brings back exactly what
  was there is no write.
- etcd: a key under the run's root whose ``mod_revision`` is new or changed
  since the previous read. The generator's prefixes are
  ``<root>/<namespace>/<name>/p<n>``, so the key names its namespace and its
  resource's prefix, the subject. The keys the test itself writes (foreign
  keys, the fault injector's drift) are not the operator's and are skipped.
  Deletions (withdrawals, prunes, deletes) are never judged: the contract only
  forbids writing.

Reads are polls, so a write undone within one interval can go unseen; a
write is never invented. The recorder's time of a write is when it saw it:
at most one interval plus one read after the write.

When a write is allowed — written out here from DESIGN.md's rules, not
imported, so that the audit checks the operator rather than echoes it —, with
the run's default ``TETHER_POLICY_DEFAULT=allow``:

1. allowed when a policy selecting the namespace allows it;
2. else refused when any policy selects the namespace, or when a policy that
   does not select it allows the subject (for a prefix: one equal, above or
   below, on ``/`` boundaries);
3. else allowed.

When ("at that moment"): state *k* of the history was possibly in force from
the start of the call that made it to the end of the call that replaced it
(an edit whose outcome stayed unknown counts both ways). The contract gives
the operator :data:`ENFORCEMENT` seconds to enforce a change, and the writes
are seen up to :data:`OBSERVER_LAG` late. A write seen at ``t`` is within the
allow-list when some state possibly in force during the window before ``t``
allowed it, the window holding :data:`ENFORCEMENT` + :data:`OBSERVER_LAG`
seconds of *fault-free* time: the duration of every injected fault (from its
injection until the stack or operator is back) that overlaps the window is
added to it, since during a fault the operator can neither see a change nor
complete a write it had started. Everything else is a write outside the
allow-list, and the run must have none.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from generator import FOREIGN_MARK, TEAM_LABEL, Model, PolicyState

from tether_dev.harness.consul import Consul
from tether_dev.harness.etcd import Etcd

#: Seconds between two reads of each backend.
POLL = 0.25
#: The contract: a policy or namespace-label change is enforced within 10 s.
ENFORCEMENT = 10.0
#: How late the recorder may see a write: one poll interval and a read.
OBSERVER_LAG = 1.0
#: What the fault injector writes over a managed key (not an operator write).
DRIFT_VALUE = "drifted-by-fault-injector"


@dataclass(frozen=True)
class Write:
    at: float  # time.monotonic() when the recorder saw it
    backend: str  # "consul" | "etcd"
    namespace: str
    subject: str  # "service" | "etcd"
    value: str  # the service name or the resource's etcd prefix
    detail: str  # the registration ID or the key

    def __str__(self) -> str:
        return f"{self.backend} {self.detail} ({self.subject} {self.value!r} of namespace {self.namespace})"


@dataclass
class WriteRecorder:
    """Polls Consul's agent and the run's etcd root until stopped; keeps every write it sees."""

    consul: Consul
    etcd: Etcd
    model: Model
    writes: list[Write] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> WriteRecorder:
        self._thread = threading.Thread(target=self._run, name="write-recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        registrations: dict[str, tuple[Any, ...]] = {}
        revisions: dict[str, int] = {}
        namespaces = set(self.model.namespaces)
        prefix_of = re.compile(re.escape(self.model.root) + r"/([^/]+)/([^/]+)/(p\d+)/")
        while not self._stop.wait(POLL):
            try:
                services = self.consul.services()
            except Exception:  # a backend down or paused: the next read catches up
                self.errors += 1
            else:
                now = time.monotonic()
                seen: dict[str, tuple[Any, ...]] = {}
                for sid, svc in services.items():
                    meta = svc.get("Meta") or {}
                    if meta.get("tether-namespace") not in namespaces:
                        continue
                    content = (
                        svc.get("Service"), svc.get("Address"), svc.get("Port"),
                        tuple(sorted(svc.get("Tags") or [])), tuple(sorted(meta.items())),
                    )
                    seen[sid] = content
                    if registrations.get(sid) != content:
                        ns, name = str(meta["tether-namespace"]), str(svc.get("Service"))
                        self.writes.append(Write(now, "consul", ns, "service", name, sid))
                registrations = seen
            try:
                _, ranged = self.etcd.range(self.model.root + "/")
            except Exception:
                self.errors += 1
                continue
            now = time.monotonic()
            current: dict[str, int] = {}
            for key, (value, mod_revision) in ranged.items():
                current[key] = mod_revision
                if revisions.get(key) == mod_revision or FOREIGN_MARK in key or value == DRIFT_VALUE:
                    continue
                match = prefix_of.match(key)
                if match is None or match.group(1) not in namespaces:
                    continue
                prefix = f"{self.model.root}/{match.group(1)}/{match.group(2)}/{match.group(3)}"
                self.writes.append(Write(now, "etcd", match.group(1), "etcd", prefix, key))
            revisions = current


# -- the rules, independently of the operator's code ----------------------------------------------


def _selects(spec: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """The generator's selectors are ``matchLabels`` only."""
    match = spec["namespaceSelector"].get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in match.items())


def _name_matches(pattern: str, name: str) -> bool:
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), name) is not None


def _covers(above: str, prefix: str) -> bool:
    return prefix == above or prefix.startswith(above.rstrip("/") + "/")


def _grants(spec: Mapping[str, Any], subject: str, value: str) -> bool:
    if subject == "service":
        return any(_name_matches(p, value) for p in spec.get("consulServiceNames") or [])
    return any(_covers(p, value) for p in spec.get("etcdPrefixes") or [])


def _reserves(spec: Mapping[str, Any], subject: str, value: str) -> bool:
    if subject == "service":
        return _grants(spec, subject, value)
    return any(_covers(p, value) or _covers(value, p) for p in spec.get("etcdPrefixes") or [])


def allowed(state: PolicyState, model: Model, namespace: str, subject: str, value: str) -> bool:
    team = state.teams.get(namespace)
    labels = {TEAM_LABEL: model.team_value(team)} if team else {}
    selecting = [s for s in state.policies.values() if _selects(s, labels)]
    if any(_grants(s, subject, value) for s in selecting):
        return True
    if selecting:
        return False  # restrict
    return not any(_reserves(s, subject, value) for s in state.policies.values())


# -- the judgement --------------------------------------------------------------------------------


def window_start(at: float, faults: list[tuple[float, float]]) -> float:
    """The start of the window before ``at`` that holds the grace in fault-free time."""
    merged: list[list[float]] = []
    for begin, end in sorted(faults):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    remaining, cursor = ENFORCEMENT + OBSERVER_LAG, at
    for begin, end in reversed(merged):
        if begin >= cursor:
            continue
        free = cursor - min(end, cursor)
        if free >= remaining:
            break
        remaining -= free
        cursor = begin
    return cursor - remaining


def in_force(history: list[PolicyState], begin: float, end: float) -> list[PolicyState]:
    """The states possibly in force at some moment of [begin, end]."""
    found = []
    for k, state in enumerate(history):
        until = history[k + 1].finished if k + 1 < len(history) else float("inf")
        since = state.started if k else float("-inf")
        if since <= end and until >= begin:
            found.append(state)
    return found


def outside_allow_list(
    writes: Iterable[Write], model: Model, faults: list[tuple[float, float]]
) -> list[tuple[Write, list[str]]]:
    """Every write no state in force during its window allowed, with the states that refused it."""
    history = list(model.policy_history)
    outside = []
    for write in writes:
        states = in_force(history, window_start(write.at, faults), write.at)
        if not any(allowed(s, model, write.namespace, write.subject, write.value) for s in states):
            outside.append((write, [s.what for s in states]))
    return outside


def summarise(outside: list[tuple[Write, list[str]]], t0: float) -> list[str]:
    return [
        f"+{w.at - t0:.1f}s {w}: refused by every state in force since the grace began: {states[-3:]}"
        for w, states in outside
    ]


__all__ = ["Write", "WriteRecorder", "allowed", "outside_allow_list", "summarise", "window_start"]
