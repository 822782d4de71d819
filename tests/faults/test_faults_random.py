"""The seeded fault run: a stream of operations, faults at random moments, an exact audit.

One run is:

1. a workload of creates, updates and deletes of ConsulServices and EtcdConfigs
   (plus ConfigMap edits) in a few namespaces, drawn from the seed;
2. meanwhile, faults drawn from the same seed, one at a time, each triggered when
   the stream reaches a given operation (so a replay interleaves them the same
   way): Consul, config etcd and kube-apiserver SIGKILLed then restarted with
   ``tether dev up``; the operator SIGKILLed then restarted; Consul paused with
   SIGSTOP then continued; etcd compacted to its current revision right after a
   managed key was changed behind the operator's back; and in the same stream,
   TetherPolicies created, edited and deleted and the namespaces relabelled at
   random, while a recorder notes every write that reaches Consul or etcd
   (:mod:`allowlist`);
3. once both are done, the run's policies and labels are removed (everything
   is allowed again, so the exact audit applies as it is), a bounded
   convergence window, then the audit (:mod:`audit`): exact comparison of
   Consul and etcd with the resources; and :mod:`allowlist`'s: no write seen
   outside what the policies allowed at that moment (its docstring defines the
   moment and the grace precisely);
4. then every resource is deleted and the audit repeated: nothing may be left.

The report (seed, faults with times, operations and what was in flight at each
fault, anomalies) is printed and written next to the test's temporary files.
``TETHER_FAULTS_RUNS`` runs several seeds (seed, seed+1, ...).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from allowlist import WriteRecorder, outside_allow_list, summarise
from audit import Anomaly, split
from faultkit import CONSUL, ETCD, KUBE_APISERVER, REDUCED, FaultStack, Kube, log
from generator import Limits, Workload
from scenario import Scenario, make_scenario

from tether_dev.harness.consul import Consul
from tether_dev.harness.etcd import Etcd
from tether_dev.harness.kube import is_ready
from tether_dev.harness.operator import OperatorProcess

FAULT_KINDS = (
    "consul-kill",
    "etcd-kill",
    "apiserver-kill",
    "operator-kill",
    "consul-pause",
    "etcd-compact",
    # A node failure takes a backend and the operator down together; the operator
    # comes back first and must start up against a backend that is not there.
    "consul+operator-kill",
    "etcd+operator-kill",
)
#: Seeds per session: TETHER_FAULTS_RUNS, else one in reduced mode and two in full.
RUNS = int(os.environ.get("TETHER_FAULTS_RUNS") or (1 if REDUCED else 2))
#: Share of the stream's operations that edit a TetherPolicy or relabel a namespace.
POLICY_SHARE = 0.08


@dataclass
class Plan:
    """Everything a run does, drawn from its seed before it starts."""

    seed: int
    operations: int
    pace: tuple[float, float]
    namespaces: int
    limits: Limits
    faults: list[dict[str, Any]]  # {"after_op", "kind", "down_seconds"}
    pause_seconds: float
    stream_timeout: float
    converge_timeout: float


def make_plan(seed: int, *, reduced: bool) -> Plan:
    rng = random.Random(f"{seed}/faults")
    # About 0.45 s per operation on average: a slot between two faults holds
    # 15-30 s of stream, enough for a fault (a 10 s or 30 s pause included) to
    # finish before the next is due, with operations landing all the while.
    if reduced:
        operations, rounds, pause, ns = 320, 2, 10.0, 2
        limits = Limits(max_live=25, min_live=5, max_keys=8, big_keys=0, policy_share=POLICY_SHARE)
    else:
        operations, rounds, pause, ns = 1000, 3, 30.0, 3
        limits = Limits(max_live=60, min_live=8, max_keys=10, big_keys=150, policy_share=POLICY_SHARE)
    kinds = [kind for _ in range(rounds) for kind in FAULT_KINDS]
    rng.shuffle(kinds)
    # Faults spread over the middle of the stream, one per slot, jittered inside it;
    # the first comes only once some resources exist, the last close to the end, so
    # that the convergence window also has to absorb a fault's aftermath.
    first, last = int(operations * 0.10), int(operations * 0.97)
    width = (last - first) / len(kinds)
    faults = [
        {
            "after_op": int(first + i * width + rng.uniform(0, width * 0.5)),
            "kind": kind,
            "down_seconds": round(rng.uniform(1.0, 6.0), 1),
        }
        for i, kind in enumerate(kinds)
    ]
    return Plan(
        seed=seed,
        operations=operations,
        pace=(0.1, 0.7),
        namespaces=ns,
        limits=limits,
        faults=faults,
        pause_seconds=pause,
        stream_timeout=420.0 if reduced else 1800.0,
        converge_timeout=90.0 if reduced else 120.0,
    )


@dataclass
class FaultRecord:
    kind: str
    at: float  # seconds since the run started
    after_op: int
    detail: str = ""
    in_flight: str = ""
    took: float = 0.0
    error: str = ""


@dataclass
class Injector:
    """Runs the plan's faults in order, in its own thread, while the stream runs."""

    plan: Plan
    scenario: Scenario
    t0: float
    rng: random.Random
    records: list[FaultRecord] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            for fault in self.plan.faults:
                if not self._wait_for_op(fault["after_op"]):
                    break
                self._inject(fault)
        finally:
            self.done.set()

    def gate(self, index: int) -> None:
        """Hold the stream before fault j's burst until faults 0..j-1 are done (bounded).

        Faults then happen at their planned place in the stream, whatever the
        machine's speed, instead of piling up after a slow one.
        """
        due = [j for j, f in enumerate(self.plan.faults) if f["after_op"] - 3 <= index]
        if not due:
            return
        deadline = time.monotonic() + 180
        while len(self.records) < max(due) and not self.done.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _wait_for_op(self, index: int) -> bool:
        deadline = self.t0 + self.plan.stream_timeout
        while len(self.scenario.workload.ops) < index:
            if time.monotonic() > deadline:
                log(f"fault injector: stream never reached operation {index}")
                return False
            time.sleep(0.05)
        return True

    def _in_flight(self) -> str:
        """What the fault hits: the latest operation and the resources not yet settled."""
        wl = self.scenario.workload
        current = wl.current or (wl.ops[-1] if wl.ops else None)
        latest = f"{current.what} ({'under way' if current.finished is None else 'done'})" if current else "-"
        try:
            objs = [
                o for kind in ("cs", "ec") for o in self.scenario.kube.list(kind, set(wl.model.namespaces))
            ]
            unsettled = [o for o in objs if not is_ready(o) or o["metadata"].get("deletionTimestamp")]
            deleting = sum(1 for o in objs if o["metadata"].get("deletionTimestamp"))
            counts = f"{len(unsettled)} of {len(objs)} resources not settled ({deleting} deleting)"
        except Exception as exc:
            counts = f"resources unknown ({type(exc).__name__})"
        return f"op #{len(wl.ops)} '{latest}'; {counts}"

    def _inject(self, fault: dict[str, Any]) -> None:
        sc, kind = self.scenario, fault["kind"]
        rec = FaultRecord(kind, round(time.monotonic() - self.t0, 1), len(sc.workload.ops))
        rec.in_flight = self._in_flight()
        started = time.monotonic()
        down = float(fault["down_seconds"])
        try:
            if kind in ("consul-kill", "etcd-kill", "apiserver-kill"):
                component = {"consul-kill": CONSUL, "etcd-kill": ETCD, "apiserver-kill": KUBE_APISERVER}[kind]
                pid = sc.stack.kill(component)
                time.sleep(down)
                up = sc.stack.restart()
                rec.detail = f"{component} pid {pid} SIGKILLed, down {down:.1f} s, `up` took {up:.1f} s"
            elif kind == "operator-kill":
                pid = sc.operator.pid
                sc.operator.kill()
                time.sleep(down)
                sc.operator.start()
                rec.detail = f"operator pid {pid} SIGKILLed, down {down:.1f} s, new pid {sc.operator.pid}"
            elif kind in ("consul+operator-kill", "etcd+operator-kill"):
                component = CONSUL if kind.startswith("consul") else ETCD
                op_pid = sc.operator.pid
                sc.operator.kill()
                pid = sc.stack.kill(component)
                time.sleep(down / 2)
                sc.operator.start()
                time.sleep(down / 2 + 2.0)
                up = sc.stack.restart()
                rec.detail = (
                    f"operator pid {op_pid} and {component} pid {pid} SIGKILLed; operator back first "
                    f"(pid {sc.operator.pid}), {component} {down + 2:.1f} s later, `up` took {up:.1f} s"
                )
            elif kind == "consul-pause":
                pid = sc.stack.pause(CONSUL)
                try:
                    time.sleep(self.plan.pause_seconds)
                finally:
                    sc.stack.resume(CONSUL)
                rec.detail = f"consul pid {pid} SIGSTOPped for {self.plan.pause_seconds:.0f} s, then SIGCONT"
            elif kind == "etcd-compact":
                rec.detail = self._drift_and_compact()
        except Exception as exc:
            rec.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(f"fault {kind} failed: {rec.error}")
            sc.stack.resume_all()
        rec.took = round(time.monotonic() - started, 1)
        self.records.append(rec)
        log(
            f"fault at +{rec.at}s after op #{rec.after_op}: {kind}: {rec.detail} [in flight: {rec.in_flight}]"
        )

    def _drift_and_compact(self) -> str:
        """Change a managed key behind the operator's back, then compact past that change.

        The watch sees the change, or - if it is behind - finds its revision
        compacted and must list again; either way the key must be restored.
        """
        sc = self.scenario
        candidates = sorted(
            (d for d in sc.model.live("ec") if not Workload.invalid(d) and d.spec.get("data")),
            key=lambda d: d.name,
        )
        drift = "no EtcdConfig to drift"
        if candidates:
            decl = self.rng.choice(candidates)
            rel = self.rng.choice(sorted(decl.spec["data"]))
            key = decl.spec["prefix"].rstrip("/") + "/" + rel
            # Drift only a key the operator already manages (written and
            # claimed): writing one it has not written yet would plant a
            # pre-existing foreign key, which Tether rightly refuses to take.
            if sc.etcd.put_if_present(key, "drifted-by-fault-injector", guard=f"/tether/keys{key}"):
                drift = f"drifted {key} ({decl})"
            else:
                drift = f"{key} ({decl}) not written by the operator yet: not drifted"
        revision = sc.etcd.compact()
        return f"{drift}; compacted to revision {revision}"


def report(
    plan: Plan,
    sc: Scenario,
    operations: dict[str, Any],
    records: list[FaultRecord],
    anomalies: list[Anomaly],
    cleanup: list[Anomaly],
    timings: dict[str, float],
    policy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's record; ``policy`` is the allow-list audit's summary, for runs with policy edits."""
    return {
        "seed": plan.seed,
        "mode": "reduced" if REDUCED else "full",
        "replay": f"TETHER_FAULTS_SEED={plan.seed}{' TETHER_FAULTS_REDUCED=1' if REDUCED else ''} "
        "make test-faults PYTEST_ARGS='-k random'",
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "operations": operations,
        "cleanup_operations": len(sc.workload.ops) - operations["total"],
        "operator_starts": sc.operator.starts,
        "faults": [asdict(r) for r in records],
        "policy": policy or {},
        "anomalies": [str(a) for a in split(anomalies)[0]],
        "cleanup_anomalies": [str(a) for a in split(cleanup)[0]],
        "known_bugs": sorted({str(a) for a in split(anomalies)[1] + split(cleanup)[1]}),
    }


def render(rep: dict[str, Any]) -> str:
    ops = rep["operations"]
    lines = [
        "=" * 78,
        f"FAULT RUN  seed {rep['seed']}  ({rep['mode']})",
        f"timings: {rep['timings']}",
        f"operations: {ops['total']} {ops['by_kind']}; retried while a server was down: {ops['retried']}; "
        f"failed: {len(ops['failed'])}; live at end: {ops['live']}; "
        f"foreign keys planted: {ops['foreign_keys']}",
        f"operator processes: {rep['operator_starts']}",
        f"faults injected: {len(rep['faults'])}",
    ]
    for f in rep["faults"]:
        lines.append(
            f"  +{f['at']:>6}s after op #{f['after_op']:<4} {f['kind']:<15} {f['detail']}"
            + (f"  ERROR {f['error']}" if f["error"] else "")
        )
        lines.append(f"  {'':>8}in flight: {f['in_flight']}")
    lines += [f"  failed op: {x}" for x in ops["failed"]]
    pol = rep["policy"]
    if pol:  # runs without policy edits (the HA runs) have no allow-list audit
        lines.append(
            f"TetherPolicy: {pol['edits']} policy edits and relabels; backend writes seen: {pol['writes']} "
            f"({pol['by_backend']}; recorder reads failed: {pol['read_errors']}); "
            f"writes outside the allow-list: {len(pol['outside'])}"
        )
        lines += [f"  - {w}" for w in pol["outside"][:30]]
    lines.append(f"anomalies after convergence: {len(rep['anomalies'])}")
    lines += [f"  - {a}" for a in rep["anomalies"][:60]]
    lines.append(
        f"anomalies after deleting everything ({rep['cleanup_operations']} deletes): "
        f"{len(rep['cleanup_anomalies'])}"
    )
    lines += [f"  - {a}" for a in rep["cleanup_anomalies"][:60]]
    if rep["known_bugs"]:
        lines.append(f"known operator bugs seen (not counted): {len(rep['known_bugs'])}")
        lines += [f"  - {a}" for a in rep["known_bugs"][:20]]
    lines.append("=" * 78)
    return "\n".join(lines)


@pytest.mark.timeout(900 if REDUCED else 3000)
@pytest.mark.parametrize("run", range(RUNS))
def test_random_faults(
    run: int,
    session_seed: int,
    stack: FaultStack,
    operator: OperatorProcess,
    kube: Kube,
    consul: Consul,
    etcd: Etcd,
    run_id: str,
    tmp_path: Path,
) -> None:
    seed = session_seed + run
    plan = make_plan(seed, reduced=REDUCED)
    log(
        f"random fault run {run}: seed {seed}, {plan.operations} operations, "
        f"{len(plan.faults)} faults: {[(f['after_op'], f['kind']) for f in plan.faults]}"
    )
    sc = make_scenario(
        stack,
        operator,
        kube,
        consul,
        etcd,
        run_id=run_id,
        seed=seed,
        namespaces=plan.namespaces,
        limits=plan.limits,
    )
    recorder = WriteRecorder(consul, etcd, sc.model).start()
    try:
        t0 = time.monotonic()
        injector = Injector(plan, sc, t0, random.Random(f"{seed}/drift"))
        thread = threading.Thread(target=injector.run, name="fault-injector", daemon=True)
        thread.start()
        timings: dict[str, float] = {}
        try:
            hot = {i for f in plan.faults for i in range(f["after_op"] - 3, f["after_op"] + 8)}
            sc.workload.stream(
                plan.operations,
                pace=plan.pace,
                deadline=t0 + plan.stream_timeout,
                hot=hot,
                gate=injector.gate,
            )
            timings["stream"] = time.monotonic() - t0
            # Bounded: every fault is itself bounded (kills, `up`, the pause).
            thread.join(timeout=plan.stream_timeout)
            timings["faults_done"] = time.monotonic() - t0
        finally:
            stack.resume_all()
        operator_died = not operator.alive()
        stack.ensure_up()
        if operator_died:
            operator.start()
        # Everything allowed again: the exact audit then expects every resource as declared.
        sc.workload.allow_all()
        anomalies, timings["converge"] = sc.converge(plan.converge_timeout)
        if operator_died:
            anomalies.append(Anomaly("operator-crash", "operator", "exited on its own during the run"))
        anomalies += [Anomaly("fault-error", r.kind, r.error) for r in injector.records if r.error]
        if len(injector.records) < len(plan.faults):
            anomalies.append(
                Anomaly(
                    "fault-error",
                    "injector",
                    f"only {len(injector.records)} of {len(plan.faults)} faults injected",
                )
            )

        # Then everything goes: deletion after all those faults must leave nothing behind.
        started = time.monotonic()
        operations = sc.workload.summary()
        sc.delete_all()
        cleanup, _ = sc.converge(plan.converge_timeout)
        timings["cleanup"] = time.monotonic() - started
        timings["total"] = time.monotonic() - t0
        recorder.stop()

        # Each fault's window, from injection to the stack (or operator) back; a
        # tenth of a second wider each side, as the records are rounded.
        blind = [(t0 + r.at - 0.1, t0 + r.at + r.took + 0.1) for r in injector.records]
        outside = summarise(outside_allow_list(recorder.writes, sc.model, blind), t0)
        anomalies += [Anomaly("outside-allow-list", "TetherPolicy", line) for line in outside]
        policy = {
            "edits": len(sc.model.policy_history) - 1,
            "writes": len(recorder.writes),
            "by_backend": dict(Counter(w.backend for w in recorder.writes)),
            "read_errors": recorder.errors,
            "outside": outside,
        }
        rep = report(plan, sc, operations, injector.records, anomalies, cleanup, timings, policy)
        text = render(rep)
        print("\n" + text)
        (tmp_path / "report.json").write_text(json.dumps(rep, indent=2))
        (tmp_path / "report.txt").write_text(text + "\n")
        log(f"report written to {tmp_path / 'report.txt'}")
        counted = split(anomalies)[0] + split(cleanup)[0]
        assert not counted, sc.explain(counted, f"in the run with seed {seed}")
    finally:
        # Never leave this run's policies to the next: they reserve service names cluster-wide.
        recorder.stop()
        sc.workload.allow_all()
