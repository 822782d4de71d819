"""The readiness gate's audit: a gate never opens on an instance Consul does not show passing.

The gate ``tether.dev/consul-passing`` on a Pod is a promise: "Consul reports
this Pod's instance passing". A sampler (:class:`GateSampler`) reads, every
~100 ms, each gated Pod's gate condition from the API server and then each
instance's health from Consul (``/v1/health/service/<name>``, Consul's own
view: an instance is passing when it is listed and every one of its checks,
node-level checks included, is ``passing``). :func:`judge` then applies two
rules to the samples, written out here from the contract rather than taken
from the operator's code:

(a) **opened only on passing** — every transition of a gate to ``True`` (seen
    as ``True`` after a sample that was not, or ``True`` with a new
    ``lastTransitionTime``: it closed and reopened between two samples) must
    coincide with the instance passing in Consul in the same sample or the one
    before it. The Pods are read before Consul within a sample, so a gate
    opened after Consul showed passing is seen with Consul still passing
    (unless the instance failed within those few milliseconds: hence the
    previous sample too).
(b) **closed within a bound** — a gate that is ``True`` while its instance is
    not passing (Consul lost it when it restarted empty, the Pod's containers
    failed) must be closed within ``close_within`` seconds of the first
    sample that shows it. Samples in which Consul did not answer (killed,
    paused with SIGSTOP, restarting) are no evidence either way, and the
    stretch restarts at the first answer after them: while Consul does not
    answer nobody can know what it would say, and a gate cannot be closed on
    information nobody has.

Findings are :class:`audit.Anomaly` values, so the fault tests report them as
the rest of the suite does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from audit import Anomaly
from faultkit import Kube, log

from tether_dev.harness.consul import Consul

GATE = "tether.dev/consul-passing"


@dataclass(frozen=True)
class GateView:
    """A Pod's gate condition as read: its status (None while absent) and ``lastTransitionTime``."""

    status: str | None
    since: str = ""


@dataclass(frozen=True)
class Sample:
    """One reading: gates by Pod name, then Consul's passing instances.

    ``gates`` is None when the API server did not answer, ``passing`` when
    Consul did not (for any of the services: a partial answer is no answer).
    """

    at: float
    gates: Mapping[str, GateView] | None
    passing: frozenset[str] | None


@dataclass
class Verdict:
    """What :func:`judge` found and how much it had to judge (so that "no anomaly" means something)."""

    anomalies: list[Anomaly] = field(default_factory=list)
    openings: int = 0  # transitions to True judged against Consul
    unjudged: int = 0  # transitions to True with no Consul answer around them
    unknown_samples: int = 0  # samples in which Consul did not answer
    stretches: int = 0  # runs of samples with a gate True on a not-passing instance
    longest: float = 0.0  # the longest such run, seconds

    def summary(self) -> str:
        return (
            f"{self.openings} openings judged ({self.unjudged} with Consul silent, not judged), "
            f"{self.unknown_samples} samples without Consul, {self.stretches} stretches of a gate "
            f"True on a not-passing instance, longest {self.longest:.2f} s; {len(self.anomalies)} anomalies"
        )


def judge(samples: list[Sample], instances: Mapping[str, str], *, close_within: float) -> Verdict:
    """Rules (a) and (b) over ``samples``; ``instances`` maps each gated Pod to its instance ID."""
    verdict = Verdict(unknown_samples=sum(1 for s in samples if s.passing is None))
    # (a): compare each sample's gates with the last sample whose gates were read;
    # Consul's answers in between (both ends included) are the evidence.
    last: int | None = None
    for i, sample in enumerate(samples):
        if sample.gates is None:
            continue
        if last is not None:
            before = samples[last].gates
            assert before is not None
            views = [s.passing for s in samples[last : i + 1] if s.passing is not None]
            for pod, iid in sorted(instances.items()):
                now, old = sample.gates.get(pod), before.get(pod)
                if now is None or now.status != "True":
                    continue
                if old is not None and old.status == "True" and old.since == now.since:
                    continue  # still open, no transition
                if not views:
                    verdict.unjudged += 1
                    continue
                verdict.openings += 1
                if not any(iid in view for view in views):
                    verdict.anomalies.append(Anomaly(
                        "gate-opened-not-passing", f"Pod {pod}",
                        f"gate {GATE} turned True (lastTransitionTime {now.since}, seen at "
                        f"{sample.at:.2f} s, previous read at {samples[last].at:.2f} s) while Consul "
                        f"did not show instance {iid} passing",
                    ))
        last = i
    # (b): stretches of "gate True, instance not passing" over samples where Consul answered.
    for pod, iid in sorted(instances.items()):
        start: float | None = None
        reported = False
        for sample in samples:
            if sample.passing is None:
                start, reported = None, False  # nobody knows: the stretch restarts with the next answer
                continue
            if sample.gates is None:
                continue
            gate = sample.gates.get(pod)
            bad = gate is not None and gate.status == "True" and iid not in sample.passing
            if not bad:
                start, reported = None, False
                continue
            if start is None:
                start = sample.at
                verdict.stretches += 1
            verdict.longest = max(verdict.longest, sample.at - start)
            if sample.at - start > close_within and not reported:
                reported = True
                verdict.anomalies.append(Anomaly(
                    "gate-open-not-passing", f"Pod {pod}",
                    f"gate {GATE} True (lastTransitionTime {gate.since if gate else ''}) while Consul "
                    f"showed instance {iid} not passing from {start:.2f} s to at least {sample.at:.2f} s "
                    f"(bound {close_within:.1f} s)",
                ))
    return verdict


def passing_in(entries: Any) -> set[str]:
    """Instance IDs that ``/v1/health/service/<name>`` shows passing: every check, node ones included."""
    out = set()
    for entry in entries or []:
        checks = entry.get("Checks") or []
        if all(c.get("Status") == "passing" for c in checks):
            out.add(str((entry.get("Service") or {}).get("ID")))
    return out


def gate_views(pods: Any) -> dict[str, GateView]:
    """Pod name → its gate condition, from a Pod list of the official client."""
    out = {}
    for pod in pods.items:
        found = next((c for c in (pod.status.conditions or []) if c.type == GATE), None)
        if found is None:
            out[pod.metadata.name] = GateView(None)
            continue
        since = found.last_transition_time
        out[pod.metadata.name] = GateView(found.status, "" if since is None else since.isoformat())
    return out


class GateSampler:
    """Reads the gates of ``namespace``'s Pods, then Consul's view of ``services``, every ``interval``.

    A thread, bounded in time (``max_seconds``) and count; each read has a
    short timeout, so that a paused Consul costs a sample, not the sampler.
    """

    def __init__(
        self, kube: Kube, consul: Consul, namespace: str, services: list[str], *,
        interval: float = 0.1, max_seconds: float = 900.0, timeout: float = 1.0,
    ) -> None:
        self.kube = kube
        self.consul = consul
        self.namespace = namespace
        self.services = services
        self.interval = interval
        self.max_seconds = max_seconds
        self.timeout = timeout
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gate-sampler", daemon=True)

    def start(self) -> GateSampler:
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the gate sampler did not stop"
        return list(self.samples)

    def _read(self, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except Exception:  # an answer missing is what the sample records
            return None

    def _run(self) -> None:
        started = time.monotonic()
        limit = int(self.max_seconds / self.interval) + 1
        for _ in range(limit):
            if self._stop.is_set() or time.monotonic() - started > self.max_seconds:
                break
            at = time.monotonic()
            pods = self._read(lambda: self.kube.core.list_namespaced_pod(
                self.namespace, _request_timeout=self.timeout * 2
            ))
            passing: set[str] | None = set()
            for name in self.services:
                entries = self._read(lambda name=name: self.consul.call(
                    "GET", f"/v1/health/service/{name}", timeout=self.timeout
                ) or [])
                if entries is None:
                    passing = None
                    break
                assert passing is not None
                passing |= passing_in(entries)
            self.samples.append(Sample(
                at - started, None if pods is None else gate_views(pods),
                None if passing is None else frozenset(passing),
            ))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - at)))
        else:
            log(f"gate sampler: stopped at its bound of {limit} samples")
