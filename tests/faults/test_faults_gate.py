"""The readiness gate ``tether.dev/consul-passing`` under faults: never open on a not-passing instance.

A few ConsulServices in endpoints mode follow Services whose Pods list the
gate. The dev stack has no kubelet and no EndpointSlice controller, so the
test plays both, as the end-to-end test of the gate does: it creates the
Pods, writes their status (``ContainersReady``; ``Ready`` held false by the
gate) and the EndpointSlices with each endpoint's ``targetRef``. A flipper
thread turns each Pod's ``ContainersReady`` True and False at random times
(seeded), while the test breaks things in turn, one fault at a time:

- Consul SIGKILLed and restarted (it comes back empty: every instance gone);
- Consul paused with SIGSTOP for 10 s (requests hang);
- the operator SIGKILLed and started again.

Meanwhile :class:`gateaudit.GateSampler` reads every ~100 ms each Pod's gate
and Consul's view of its instance, and :func:`gateaudit.judge` holds Tether to
two rules (see that module): (a) a gate turns True only while Consul shows the
instance passing; (b) a gate True on an instance Consul does not show passing
is closed within :data:`CLOSE_WITHIN` seconds of Consul answering so. Samples
in which Consul did not answer are excluded from (b): while Consul is paused or
down nobody can know what it would say, so no gate can be closed on it.

The faults never overlap, so while the operator is down Consul is up and only
Tether writes to it: nothing can then turn an instance not passing behind a
gate that only the dead operator could close.

At the end, with the flipper stopped, every gate must agree with its Pod's
containers and Consul within a bound, and deleting the ConsulServices must
remove their instances. ``TETHER_FAULTS_REDUCED=1`` runs one round of the
three faults (about two to three minutes); the full form runs three, in a
seeded order.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from audit import Anomaly, split
from faultkit import CONSUL, REDUCED, FaultStack, Kube, log
from gateaudit import GATE, GateSampler, GateView, Sample, gate_views, judge, passing_in

from tether_dev.harness.consul import Consul
from tether_dev.harness.kube import is_ready
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

SERVICES = 3
PODS = 3
PORT = 8080

#: Rule (b)'s bound, from what Tether can do once Consul answers again: its
#: catalog watcher's blocking queries retry with a backoff capped at 3 s
#: (``catalogwatching._BACKOFF``), so after a restart it may take up to ~3 s to
#: see the emptied node; then one reconcile per resource (Kubernetes and Consul
#: reads, the catalog transaction, the Pod status patch) closes the gate,
#: under a second each on an idle machine, slower on this shared 2-core one.
#: A few seconds are therefore needed: 0.1 s (the sampler's period) would
#: only measure the watcher's backoff. 8 s still fails a gate left open until
#: some unrelated resync or a Pod flip happens to close it.
CLOSE_WITHIN = 8.0

#: The flipper's delay between two flips of one Pod (seconds): mostly short,
#: and now and then (``HOLD_SHARE``) longer than :data:`CLOSE_WITHIN`, so that a
#: gate left open on failed containers outlives the bound while faults run
#: (with short holds only, the next flip would end the stretch first and rule
#: (b) could fail only once the flipper stopped).
FLIP_EVERY = (1.0, 5.0)
HOLD = (CLOSE_WITHIN + 2.0, CLOSE_WITHIN + 6.0)
HOLD_SHARE = 0.25


def _pod(name: str, svc: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": svc}},
        "spec": {
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
            "readinessGates": [{"conditionType": GATE}],
        },
    }


def _kubelet(kube: Kube, namespace: str, name: str, ip: str, ready: bool) -> None:
    """What the kubelet would report: the containers' readiness; Ready false (the gate holds it).

    A strategic-merge patch: conditions merge by type, so the gate's is kept.
    """
    patch = {"status": {"phase": "Running", "podIP": ip, "conditions": [
        {"type": "ContainersReady", "status": "True" if ready else "False"},
        {"type": "Ready", "status": "False"},
    ]}}
    kube.core.patch_namespaced_pod_status(
        name, namespace, patch, _content_type="application/strategic-merge-patch+json", _request_timeout=10
    )


def _slice(svc: str, namespace: str, pods: list[tuple[str, str, str]]) -> dict[str, Any]:
    """The EndpointSlice: endpoints not ready (the gate holds them), targetRefs (address, Pod, UID)."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{svc}-a", "labels": {
            "kubernetes.io/service-name": svc, "endpointslice.kubernetes.io/managed-by": "faults.tether.dev",
        }},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [address], "conditions": {"ready": False, "serving": False, "terminating": False},
             "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod, "uid": uid}}
            for address, pod, uid in pods
        ],
    }


class Flipper:
    """Turns each Pod's ``ContainersReady`` at random (seeded) times, in a thread, bounded."""

    def __init__(self, kube: Kube, namespace: str, ips: dict[str, str], rng: random.Random) -> None:
        self.kube = kube
        self.namespace = namespace
        self.ips = ips
        self.rng = rng
        self.ready = dict.fromkeys(ips, True)
        self.flips = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flipper", daemon=True)

    def start(self) -> Flipper:
        self._thread.start()
        return self

    def stop(self) -> dict[str, bool]:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the flipper did not stop"
        with self._lock:
            return dict(self.ready)

    def _run(self) -> None:
        now = time.monotonic()
        due = {pod: now + self._delay() for pod in sorted(self.ips)}
        for _ in range(10_000):  # bounded; stop() ends it long before
            pod = min(due, key=lambda p: due[p])
            if self._stop.wait(max(0.0, due[pod] - time.monotonic())):
                return
            with self._lock:
                want = not self.ready[pod]
                try:
                    _kubelet(self.kube, self.namespace, pod, self.ips[pod], want)
                    self.ready[pod] = want
                    self.flips += 1
                except Exception as exc:  # the API server stays up here; count and go on
                    self.failures += 1
                    log(f"flipper: {pod} not patched: {exc!r}"[:200])
            due[pod] = time.monotonic() + self._delay()

    def _delay(self) -> float:
        return self.rng.uniform(*(HOLD if self.rng.random() < HOLD_SHARE else FLIP_EVERY))


def _instances(consul: Consul, services: list[str]) -> set[str]:
    out: set[str] = set()
    for name in services:
        out |= passing_in(consul.call("GET", f"/v1/health/service/{name}", timeout=2) or [])
    return out


def _registered(consul: Consul, services: list[str]) -> int:
    return sum(len(consul.call("GET", f"/v1/catalog/service/{n}", timeout=2) or []) for n in services)


def test_the_audit_rules_can_fail() -> None:
    """The rules themselves, on planted samples: each names what it must (no stack needed)."""
    pods = {"p": "ns-s-10.0.0.1-8080"}
    closed, opened = GateView("False", "t0"), GateView("True", "t1")
    iid = pods["p"]
    # (a) an opening while Consul shows the instance critical (absent from passing), twice.
    bad_open = [Sample(0.0, {"p": closed}, frozenset()), Sample(0.1, {"p": opened}, frozenset())]
    found = judge(bad_open, pods, close_within=5).anomalies
    assert [a.category for a in found] == ["gate-opened-not-passing"], found
    # ... but an opening with Consul passing in the previous sample is fine.
    ok = [Sample(0.0, {"p": closed}, frozenset({iid})), Sample(0.1, {"p": opened}, frozenset())]
    assert judge(ok, pods, close_within=5).anomalies == []
    # ... and a close and reopen between two samples (a new lastTransitionTime) is an opening.
    reopened = [Sample(0.0, {"p": opened}, frozenset({iid})), Sample(0.1, {"p": opened}, frozenset()),
                Sample(0.2, {"p": GateView("True", "t2")}, frozenset())]
    assert [a.category for a in judge(reopened, pods, close_within=5).anomalies] == [
        "gate-opened-not-passing"]
    # (b) open on a lost instance for longer than the bound: one finding per stretch.
    stuck = [Sample(0.0, {"p": opened}, frozenset({iid}))] + [
        Sample(0.1 * k, {"p": opened}, frozenset()) for k in range(1, 80)
    ]
    verdict = judge(stuck, pods, close_within=5)
    assert [a.category for a in verdict.anomalies] == ["gate-open-not-passing"], verdict.anomalies
    # ... but not when Consul was silent for most of it (nobody could know).
    silent = [Sample(0.1 * k, {"p": opened}, frozenset() if k > 50 else None) for k in range(80)]
    assert judge(silent, pods, close_within=5).anomalies == []


def test_gates_follow_consul_through_faults(
    stack: FaultStack, operator: OperatorProcess, kube: Kube, consul: Consul, run_id: str, seed: int,
) -> None:
    rng = random.Random(seed)
    ns = f"g{run_id}"
    kube.retrying(lambda: kube.ensure_namespace(ns), what="namespace")
    services = [f"g{run_id}-{i}" for i in range(SERVICES)]
    ips: dict[str, str] = {}
    instances: dict[str, str] = {}  # Pod → instance ID, as endpoints mode names it: <ns>-<name>-<ip>-<port>
    for i, svc in enumerate(services):
        kube.core.create_namespaced_service(ns, {
            "metadata": {"name": svc},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": PORT}]},
        }, _request_timeout=15)
        refs = []
        for j in range(PODS):
            name, ip = f"{svc}-{j}", f"10.77.{i}.{j + 1}"
            created = kube.core.create_namespaced_pod(ns, _pod(name, svc), _request_timeout=15)
            _kubelet(kube, ns, name, ip, True)
            ips[name] = ip
            instances[name] = f"{ns}-{svc}-{ip}-{PORT}"
            refs.append((ip, name, created.metadata.uid))
        kube.discovery.create_namespaced_endpoint_slice(ns, _slice(svc, ns, refs), _request_timeout=15)
        kube.create("cs", ns, svc, {"endpoints": {"service": svc}})
    wait_for(lambda: all(is_ready(kube.get("cs", ns, s)) for s in services), timeout=60, interval=0.5,
             message="the ConsulServices Ready")

    def gates() -> dict[str, GateView]:
        return gate_views(kube.core.list_namespaced_pod(ns, _request_timeout=10))

    wait_for(lambda: all(g.status == "True" for g in gates().values()) and len(gates()) == len(ips),
             timeout=60, interval=0.25, message="every gate True at the start")
    log(f"{len(ips)} gated Pods behind {SERVICES} ConsulServices in {ns}: all gates True")

    rounds = 1 if REDUCED else 3
    settle = (12.0, 20.0) if REDUCED else (12.0, 30.0)
    sampler = GateSampler(kube, consul, ns, services, max_seconds=240 if REDUCED else 720).start()
    flipper = Flipper(kube, ns, ips, random.Random(f"{seed}/flips")).start()
    try:
        for r in range(rounds):
            faults = ["consul-kill", "consul-pause", "operator-kill"]
            rng.shuffle(faults)
            for fault in faults:
                time.sleep(rng.uniform(*settle))
                if fault == "consul-kill":
                    pid = stack.kill(CONSUL)
                    down = rng.uniform(1.0, 4.0)
                    log(f"round {r + 1}: Consul pid {pid} SIGKILLed; down for {down:.1f} s")
                    time.sleep(down)
                    took = stack.restart()
                    log(f"Consul restarted (empty) in {took:.1f} s")
                elif fault == "consul-pause":
                    pid = stack.pause(CONSUL)
                    log(f"round {r + 1}: Consul pid {pid} SIGSTOPped for 10 s")
                    try:
                        time.sleep(10.0)
                    finally:
                        stack.resume(CONSUL)
                    log("Consul continued (SIGCONT)")
                else:
                    operator.kill()
                    down = rng.uniform(1.0, 4.0)
                    log(f"round {r + 1}: operator SIGKILLed; down for {down:.1f} s")
                    time.sleep(down)
                    operator.start()
                    log(f"operator restarted (pid {operator.pid})")
        time.sleep(rng.uniform(*settle))
    finally:
        ready = flipper.stop()
        stack.resume_all()
    log(f"flipper: {flipper.flips} flips, {flipper.failures} failed patches")

    # Converged: every gate says what its containers and Consul say.
    def agreed() -> bool:
        seen, passing = gates(), _instances(consul, services)
        return all(
            (seen[p].status == "True") == ready[p] == (instances[p] in passing) for p in instances
        )

    unconverged: AssertionError | None = None
    try:
        wait_for(agreed, timeout=60, interval=0.5, message="every gate to agree with its Pod and Consul")
    except AssertionError as exc:
        unconverged = exc  # reported after the audit, which explains more
    finally:
        samples = sampler.stop()
    verdict = judge(samples, instances, close_within=CLOSE_WITHIN)
    log(f"gate audit over {len(samples)} samples ({samples[-1].at:.0f} s): {verdict.summary()}")
    counted, known = split(verdict.anomalies)
    for anomaly in known:
        log(f"known bug seen: {anomaly}")
    assert not counted, _explain(counted, operator)
    if unconverged is not None:
        seen, passing = gates(), _instances(consul, services)
        detail = "\n".join(
            f"  {p}: containers ready {ready[p]}, gate {seen[p]}, passing in Consul {instances[p] in passing}"
            for p in sorted(instances)
        )
        raise AssertionError(f"{unconverged}\n{detail}\n{_explain([], operator)}")
    # The rules had something to judge: the flips opened gates many times.
    assert verdict.openings >= len(instances), verdict.summary()

    for svc in services:
        kube.delete("cs", ns, svc)
    wait_for(lambda: all(kube.get("cs", ns, s) is None for s in services)
             and _registered(consul, services) == 0,
             timeout=60, interval=0.5, message="the ConsulServices gone and their instances removed")
    for svc in services:
        kube.core.delete_namespaced_service(svc, ns, _request_timeout=15)
        kube.discovery.delete_namespaced_endpoint_slice(f"{svc}-a", ns, _request_timeout=15)
    for pod in instances:
        kube.core.delete_namespaced_pod(pod, ns, grace_period_seconds=0, _request_timeout=15)


def _explain(anomalies: list[Anomaly], operator: OperatorProcess) -> str:
    lines = [f"{len(anomalies)} gate anomalies:"] + [f"  - {a}" for a in anomalies[:40]]
    lines.append(f"--- operator log tail ({operator.log_path}):\n{operator.log_tail(60)}")
    return "\n".join(lines)
