"""Fault runs on the HA stack: leader kills, partitions and a slow member, then an exact audit.

The stack is ``tether dev up --ha`` (3 etcd members, 3 Consul servers and a
client agent, each on its own 127.0.0.x); the faults come from
:mod:`tether_dev.faults`. Each run keeps the suite's exact audit (every
declared key and registration present and correct, nothing owned left
undeclared, nothing foreign touched, every resource with an explaining
condition) and adds the per-key linearizability check of
:func:`hakit.check_linearizable` over etcd's own history of the run.

- ``test_ha_random_faults`` — the seeded run: the workload of
  ``test_faults_random`` with HA faults drawn from the same seed. Reduced mode
  (``TETHER_FAULTS_REDUCED=1``, CI) runs one short seed; full mode runs
  ``TETHER_FAULTS_HA_RUNS`` (default 5; in reduced mode 1).
- focused tests: time from an etcd leader kill to Tether's next write
  (p50/p99, next to etcd's own election time); the etcd leader partitioned
  with and without Tether; a Consul server partitioned; the Consul leader and
  the client agent killed (the agent losing its registrations).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from audit import Anomaly, split
from faultkit import REDUCED, Kube, log
from generator import Limits, Workload
from hakit import (
    DRIFT_VALUE,
    Acks,
    HaEtcd,
    HaFaultStack,
    History,
    LinearizabilityReport,
    RecordingKube,
    check_linearizable,
    polling,
    unknown_outcomes,
)
from scenario import Scenario, make_scenario
from test_faults_random import FaultRecord, Injector, Plan, render, report

from tether_dev import stack as devstack
from tether_dev.harness.consul import Consul
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

HA_FAULT_KINDS = (
    "etcd-leader-kill",
    "etcd-follower-kill",
    "consul-leader-kill",
    "consul-agent-kill",
    "etcd-leader-partition",
    "etcd-leader-partition+tether",
    "consul-server-partition",
    "etcd-slow",
    "operator-kill",
    "etcd-compact",
)
#: Seeds per session: TETHER_FAULTS_HA_RUNS, else one in reduced mode (CI) and five in full.
HA_RUNS = int(os.environ.get("TETHER_FAULTS_HA_RUNS") or (1 if REDUCED else 5))


def make_ha_plan(seed: int, *, reduced: bool) -> Plan:
    """The seeded plan of one HA run: the random run's shape with HA faults."""
    rng = random.Random(f"{seed}/ha-faults")
    if reduced:
        operations, rounds, ns = 160, 1, 2
        limits = Limits(max_live=20, min_live=5, max_keys=8, big_keys=0)
        stream_timeout, converge_timeout = 420.0, 90.0
    else:
        operations, rounds, ns = 600, 2, 3
        limits = Limits(max_live=40, min_live=8, max_keys=10, big_keys=150)
        stream_timeout, converge_timeout = 1800.0, 120.0
    kinds = [kind for _ in range(rounds) for kind in HA_FAULT_KINDS]
    rng.shuffle(kinds)
    first, last = int(operations * 0.10), int(operations * 0.95)
    width = (last - first) / len(kinds)
    faults = [
        {
            "after_op": int(first + i * width + rng.uniform(0, width * 0.5)),
            "kind": kind,
            # Kills: how long the member stays down. Partitions and slowdowns:
            # 10-30 s (10-15 s in reduced mode, to stay within CI's budget).
            "down_seconds": round(rng.uniform(1.0, 6.0), 1),
            "hold_seconds": round(rng.uniform(10.0, 15.0 if reduced else 30.0), 1),
        }
        for i, kind in enumerate(kinds)
    ]
    return Plan(
        seed=seed,
        operations=operations,
        pace=(0.1, 0.6),
        namespaces=ns,
        limits=limits,
        faults=faults,
        pause_seconds=0.0,
        stream_timeout=stream_timeout,
        converge_timeout=converge_timeout,
    )


@dataclass
class HaInjector(Injector):
    """The random run's injector with the HA stack's faults."""

    history: History | None = None
    elections: list[float] = field(default_factory=list)

    @property
    def stack(self) -> HaFaultStack:
        assert isinstance(self.scenario.stack, HaFaultStack)
        return self.scenario.stack

    def _inject(self, fault: dict[str, Any]) -> None:
        kind = fault["kind"]
        if kind == "operator-kill":
            super()._inject(fault)
            return
        sc = self.scenario
        rec = FaultRecord(kind, round(time.monotonic() - self.t0, 1), len(sc.workload.ops))
        rec.in_flight = self._in_flight()
        started = time.monotonic()
        try:
            rec.detail = self._ha_fault(kind, fault)
        except Exception as exc:
            rec.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(f"fault {kind} failed: {rec.error}")
            with_heal()
            sc.stack.resume_all()
        rec.took = round(time.monotonic() - started, 1)
        self.records.append(rec)
        log(f"fault at +{rec.at}s after op #{rec.after_op}: {kind}: {rec.detail} "
            f"[in flight: {rec.in_flight}]")

    def _ha_fault(self, kind: str, fault: dict[str, Any]) -> str:
        st, faults = self.stack, self.stack.faults
        down, hold = float(fault["down_seconds"]), float(fault["hold_seconds"])
        if kind in ("etcd-leader-kill", "etcd-follower-kill", "consul-leader-kill", "consul-agent-kill"):
            if kind == "etcd-leader-kill":
                victim = faults.etcd_leader()
            elif kind == "etcd-follower-kill":
                victim = self.rng.choice(faults.etcd_followers())
            elif kind == "consul-leader-kill":
                victim = faults.consul_leader()
            else:
                victim = devstack.CONSUL_AGENT
            killed_at = time.monotonic()
            pid = faults.kill(victim)
            extra = ""
            if kind == "etcd-leader-kill":
                faults.etcd_leader(exclude=victim)
                self.elections.append(time.monotonic() - killed_at)
                extra = f", new leader after {self.elections[-1]:.2f} s"
            if kind == "consul-agent-kill":
                # The agent comes back without its registrations (as a rebuilt
                # node does); Tether must register them again.
                for sub in ("services", "checks"):
                    path = st.state_dir / devstack.CONSUL_AGENT / sub
                    if path.is_dir():
                        for item in path.iterdir():
                            item.unlink()
                extra = ", its registrations wiped"
            time.sleep(down)
            took = st.restart()
            return f"{victim} pid {pid} SIGKILLed{extra}, down {down:.1f} s, `up --ha` took {took:.1f} s"
        if kind in ("etcd-leader-partition", "etcd-leader-partition+tether"):
            leader = faults.etcd_leader()
            others = [m for m in devstack.ETCD_MEMBERS if m != leader]
            clients = kind.endswith("+tether")
            with faults.partition([leader], others, clients=clients, limit=hold + 5):
                time.sleep(hold)
            new = faults.etcd_leader(timeout=60)
            return (
                f"{leader} cut from {'+'.join(others)}{' and from Tether' if clients else ''} "
                f"for {hold:.1f} s; leader after healing: {new}"
            )
        if kind == "consul-server-partition":
            server = self.rng.choice(devstack.CONSUL_SERVERS)
            role = faults.consul_roles().get(server)
            others = [m for m in (*devstack.CONSUL_SERVERS, devstack.CONSUL_AGENT) if m != server]
            with faults.partition([server], others, clients=False, limit=hold + 5):
                time.sleep(hold)
            new = faults.consul_leader(timeout=60)
            return f"{server} ({role}) cut from the datacenter for {hold:.1f} s; leader after: {new}"
        if kind == "etcd-slow":
            member = self.rng.choice(devstack.ETCD_MEMBERS)
            role = faults.etcd_roles().get(member)
            with faults.slow(member, rate="64kbit", limit=hold + 5):
                time.sleep(hold)
            return f"{member} ({role}) throttled to 64 kbit/s for {hold:.1f} s"
        if kind == "etcd-compact":
            return self._drift_and_compact()
        raise AssertionError(f"unknown fault {kind}")

    def _drift_and_compact(self) -> str:
        """As in the random run, but compacting only what the history watcher has seen."""
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
            if sc.etcd.put_if_present(key, DRIFT_VALUE, guard=f"/tether/keys{key}"):
                drift = f"drifted {key} ({decl})"
            else:
                drift = f"{key} ({decl}) not written by the operator yet: not drifted"
        assert self.history is not None
        # Compact only what the history watcher has seen, so that it never has a
        # gap (the operator's own watch may well be behind: that is the fault).
        seen = self.history.mark(sc.etcd, timeout=10)
        revision = sc.etcd.compact(min(seen, max(self.history.last_revision, 1)))
        return f"{drift}; compacted to revision {revision}"


def with_heal() -> None:
    from tether_dev import faults
    faults.heal_all()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def ha_clients(ha_stack: HaFaultStack, acks: Acks) -> tuple[RecordingKube, Consul, HaEtcd]:
    env = ha_stack.env
    return (
        RecordingKube(env["KUBECONFIG"], acks),
        Consul(env["CONSUL_HTTP_ADDR"], timeout=5.0),
        HaEtcd(env["ETCD_ENDPOINTS"]),
    )


# ----------------------------------------------------------------------- the seeded run


@pytest.mark.timeout(900 if REDUCED else 3000)
@pytest.mark.parametrize("run", range(HA_RUNS))
def test_ha_random_faults(
    run: int,
    session_seed: int,
    ha_stack: HaFaultStack,
    ha_operator: OperatorProcess,
    run_id: str,
    tmp_path: Path,
) -> None:
    seed = session_seed + run
    plan = make_ha_plan(seed, reduced=REDUCED)
    log(
        f"HA fault run {run}: seed {seed}, {plan.operations} operations, "
        f"{len(plan.faults)} faults: {[(f['after_op'], f['kind']) for f in plan.faults]}"
    )
    acks = Acks()
    kube, consul, etcd = ha_clients(ha_stack, acks)
    root = f"/faults/{run_id}"
    history = History(etcd.endpoints, root, start_revision=etcd.revision() + 1).start()
    sc = make_scenario(
        ha_stack, ha_operator, kube, consul, etcd,
        run_id=run_id, seed=seed, namespaces=plan.namespaces, limits=plan.limits,
    )
    assert sc.model.root == root
    t0 = time.monotonic()
    injector = HaInjector(plan, sc, t0, random.Random(f"{seed}/ha-drift"), history=history)
    thread = threading.Thread(target=injector.run, name="ha-fault-injector", daemon=True)
    timings: dict[str, float] = {}
    with polling(acks, kube, set(sc.model.namespaces)):
        thread.start()
        try:
            hot = {i for f in plan.faults for i in range(f["after_op"] - 3, f["after_op"] + 8)}
            sc.workload.stream(
                plan.operations, pace=plan.pace, deadline=t0 + plan.stream_timeout, hot=hot,
                gate=injector.gate,
            )
            timings["stream"] = time.monotonic() - t0
            thread.join(timeout=plan.stream_timeout)
            timings["faults_done"] = time.monotonic() - t0
        finally:
            with_heal()
            ha_stack.resume_all()
        operator_died = not ha_operator.alive()
        ha_stack.ensure_up()
        if operator_died:
            ha_operator.start()
        anomalies, timings["converge"] = sc.converge(plan.converge_timeout)
    if operator_died:
        anomalies.append(Anomaly("operator-crash", "operator", "exited on its own during the run"))
    anomalies += [Anomaly("fault-error", r.kind, r.error) for r in injector.records if r.error]
    if len(injector.records) < len(plan.faults):
        anomalies.append(
            Anomaly("fault-error", "injector", f"only {len(injector.records)} of {len(plan.faults)} faults")
        )
    history.catch_up(etcd)
    lin = check_linearizable(history.snapshot(), acks, gaps=history.gaps)
    anomalies += [Anomaly("linearizability", "etcd", a) for a in lin.anomalies]
    unknown = unknown_outcomes(ha_operator.log_text())

    started = time.monotonic()
    operations = sc.workload.summary()
    sc.delete_all()
    cleanup, _ = sc.converge(plan.converge_timeout)
    timings["cleanup"] = time.monotonic() - started
    timings["total"] = time.monotonic() - t0

    rep = report(plan, sc, operations, injector.records, anomalies, cleanup, timings)
    rep["mode"] = "ha-reduced" if REDUCED else "ha-full"
    rep["replay"] = (
        f"TETHER_FAULTS_SEED={seed}{' TETHER_FAULTS_REDUCED=1' if REDUCED else ''} "
        "make test-faults PYTEST_ARGS='-k ha_random'"
    )
    rep["linearizability"] = summary(lin, history)
    rep["unknown_outcomes"] = unknown
    rep["etcd_elections_s"] = [round(e, 2) for e in injector.elections]
    text = render(rep) + (
        f"\nlinearizability: {rep['linearizability']}"
        f"\ntransactions with an unknown outcome (re-read, then repeated if not applied): {unknown}"
        f"\netcd elections after leader kills (s): {rep['etcd_elections_s']}"
    )
    print("\n" + text)
    (tmp_path / "report.json").write_text(json.dumps(rep, indent=2))
    (tmp_path / "report.txt").write_text(text + "\n")
    log(f"report written to {tmp_path / 'report.txt'}")
    counted = split(anomalies)[0] + split(cleanup)[0]
    assert lin.checked_acks > 0, "the linearizability check saw no acknowledged write"
    assert not counted, sc.explain(counted, f"in the HA run with seed {seed}")


def summary(lin: LinearizabilityReport, history: History) -> dict[str, Any]:
    return {
        "events": len(history.events),
        "acks_checked": lin.checked_acks,
        "keys_checked": lin.checked_keys,
        "acks_unverifiable": lin.unverifiable_acks,
        "anomalies": len(lin.anomalies),
    }


# ----------------------------------------------------------------------- focused tests


@dataclass
class Writer:
    """One EtcdConfig whose value changes every ``period`` s, and a poller of etcd.

    The poller reads the key through the failover reader every 20 ms and notes
    when its mod_revision changes: that is when one of Tether's writes landed.
    """

    kube: Kube
    etcd: HaEtcd
    namespace: str
    name: str
    prefix: str
    period: float = 0.2
    landed: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, *, max_seconds: float) -> Writer:
        self.kube.ensure_namespace(self.namespace)
        self.kube.create("ec", self.namespace, self.name, {"prefix": self.prefix, "data": {"k": "v0"}})
        stop_at = time.monotonic() + max_seconds
        self._threads = [
            threading.Thread(target=self._update, args=(stop_at,), daemon=True),
            threading.Thread(target=self._poll, args=(stop_at,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def _update(self, stop_at: float) -> None:
        i = 0
        while not self._stop.wait(self.period) and time.monotonic() < stop_at:
            i += 1
            try:
                self.kube.replace_spec(
                    "ec", self.namespace, self.name, {"prefix": self.prefix, "data": {"k": f"v{i}"}}
                )
            except Exception as exc:  # the API server is not under test here; go on
                log(f"writer: update {i} failed: {exc!r}"[:200])

    def _poll(self, stop_at: float) -> None:
        last = 0
        while not self._stop.wait(0.02) and time.monotonic() < stop_at:
            try:
                _, kvs = self.etcd.range(self.prefix + "/")
            except Exception:
                continue
            revision = kvs.get(f"{self.prefix}/k", ("", 0))[1]
            if revision > last:
                last = revision
                self.landed.append((time.monotonic(), revision))

    def next_write_after(self, moment: float, *, timeout: float) -> float:
        """Seconds from ``moment`` to the first write that landed after it."""
        found = wait_for(
            lambda: next((t for t, _ in self.landed if t > moment), None),
            timeout=timeout, interval=0.02, message="Tether's next etcd write",
        )
        return float(found) - moment


@pytest.mark.timeout(900)
def test_etcd_leader_kill_to_tethers_next_write(
    ha_stack: HaFaultStack, ha_operator: OperatorProcess, run_id: str
) -> None:
    """Kill the etcd leader under a steady stream of EtcdConfig updates, several times.

    Reports (and prints) the time from the kill to etcd's new leader and to the
    first write of Tether's that lands after the kill, p50 and p99; asserts
    only a loose bound (the measured goal is <= 2 s beyond the election).
    """
    kills = 5 if REDUCED else 12
    acks = Acks()
    kube, _, etcd = ha_clients(ha_stack, acks)
    prefix = f"/faults/{run_id}/latency"
    writer = Writer(kube, etcd, f"fha-{run_id}", "latency", prefix).start(max_seconds=kills * 60)
    elections: list[float] = []
    writes: list[float] = []
    try:
        wait_for(lambda: len(writer.landed) >= 3, timeout=60, message="the first writes")
        for i in range(kills):
            leader = ha_stack.faults.etcd_leader()
            killed_at = time.monotonic()
            ha_stack.faults.kill(leader)
            ha_stack.faults.etcd_leader(exclude=leader)
            elections.append(time.monotonic() - killed_at)
            writes.append(writer.next_write_after(killed_at, timeout=60))
            log(f"kill {i + 1}/{kills}: {leader}; new leader after {elections[-1]:.2f} s, "
                f"Tether's next write after {writes[-1]:.2f} s")
            ha_stack.restart()
            ha_stack.settle()
            time.sleep(1.0)
    finally:
        writer.stop()
        kube.delete("ec", writer.namespace, writer.name)
    unknown = unknown_outcomes(ha_operator.log_text())
    log(
        f"etcd leader kill x{kills}: election p50 {percentile(elections, 50):.2f} s "
        f"p99 {percentile(elections, 99):.2f} s; Tether's next write p50 {percentile(writes, 50):.2f} s "
        f"p99 {percentile(writes, 99):.2f} s; beyond the election p50 "
        f"{statistics.median(w - e for w, e in zip(writes, elections, strict=True)):.2f} s; "
        f"transactions with an unknown outcome: {unknown}"
    )
    assert max(writes) <= 20.0, f"a write took {max(writes):.1f} s after a leader kill: {writes}"


def _steady_scenario(
    ha_stack: HaFaultStack, operator: OperatorProcess, run_id: str, seed: int, acks: Acks
) -> tuple[Scenario, History]:
    kube, consul, etcd = ha_clients(ha_stack, acks)
    root = f"/faults/{run_id}"
    history = History(etcd.endpoints, root, start_revision=etcd.revision() + 1).start()
    sc = make_scenario(
        ha_stack, operator, kube, consul, etcd, run_id=run_id, seed=seed, namespaces=1,
        limits=Limits(max_live=12, min_live=4, max_keys=6, big_keys=0),
    )
    return sc, history


def _finish(sc: Scenario, history: History, acks: Acks, when: str) -> LinearizabilityReport:
    sc.assert_converged(90, when)
    history.catch_up(sc.etcd)
    lin = check_linearizable(history.snapshot(), acks, gaps=history.gaps)
    log(f"{when}: linearizability {lin.checked_acks} acks / {lin.checked_keys} keys checked, "
        f"{lin.unverifiable_acks} unverifiable, anomalies {lin.anomalies}")
    assert not lin.anomalies, lin.anomalies
    sc.delete_all()
    sc.assert_converged(90, f"{when}, after deleting everything")
    return lin


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tether_too", [False, True], ids=["peers-only", "peers-and-tether"])
def test_etcd_leader_partitioned(
    ha_stack: HaFaultStack, ha_operator: OperatorProcess, run_id: str, seed: int, tether_too: bool
) -> None:
    """The etcd leader loses its peers (and Tether) for 15 s while work goes on."""
    acks = Acks()
    sc, history = _steady_scenario(ha_stack, ha_operator, run_id, seed, acks)
    with polling(acks, sc.kube, set(sc.model.namespaces)):
        sc.workload.stream(15, pace=(0.05, 0.2), deadline=time.monotonic() + 120)
        leader = ha_stack.faults.etcd_leader()
        others = [m for m in devstack.ETCD_MEMBERS if m != leader]
        with ha_stack.faults.partition([leader], others, clients=tether_too, limit=30) as fault:
            sc.workload.stream(40, pace=(0.1, 0.3), deadline=time.monotonic() + 15)
            time.sleep(max(0.0, 15 - (time.monotonic() - fault.started)))
        log(f"{fault.description} healed after {time.monotonic() - fault.started:.1f} s")
        _finish(sc, history, acks, f"after {fault.description}")
    log(f"unknown transaction outcomes: {unknown_outcomes(ha_operator.log_text())}")


@pytest.mark.timeout(600)
def test_consul_server_partitioned_and_leader_killed(
    ha_stack: HaFaultStack, ha_operator: OperatorProcess, run_id: str, seed: int
) -> None:
    """A Consul server (the leader) is cut off for 15 s, then the new leader is killed."""
    acks = Acks()
    sc, history = _steady_scenario(ha_stack, ha_operator, run_id, seed, acks)
    faults = ha_stack.faults
    with polling(acks, sc.kube, set(sc.model.namespaces)):
        sc.workload.stream(15, pace=(0.05, 0.2), deadline=time.monotonic() + 120)
        leader = faults.consul_leader()
        others = [m for m in (*devstack.CONSUL_SERVERS, devstack.CONSUL_AGENT) if m != leader]
        with faults.partition([leader], others, limit=30) as fault:
            sc.workload.stream(30, pace=(0.1, 0.3), deadline=time.monotonic() + 15)
            time.sleep(max(0.0, 15 - (time.monotonic() - fault.started)))
        new = faults.consul_leader(timeout=60)
        log(f"{fault.description} healed; Consul leader now {new}; killing it")
        faults.kill(new)
        sc.workload.stream(15, pace=(0.1, 0.3), deadline=time.monotonic() + 60)
        ha_stack.restart()
        _finish(sc, history, acks, "after a Consul server partition and a leader kill")


@pytest.mark.timeout(600)
def test_consul_agent_killed_loses_registrations_and_tether_restores_them(
    ha_stack: HaFaultStack, ha_operator: OperatorProcess, run_id: str, seed: int
) -> None:
    acks = Acks()
    sc, history = _steady_scenario(ha_stack, ha_operator, run_id, seed, acks)
    with polling(acks, sc.kube, set(sc.model.namespaces)):
        sc.workload.stream(20, pace=(0.05, 0.2), deadline=time.monotonic() + 120)
        sc.assert_converged(90, "before killing the agent")
        ha_stack.faults.kill(devstack.CONSUL_AGENT)
        for sub in ("services", "checks"):
            path = ha_stack.state_dir / devstack.CONSUL_AGENT / sub
            if path.is_dir():
                for item in path.iterdir():
                    item.unlink()
        ha_stack.restart()
        gone = time.monotonic()
        took = sc.assert_converged(60, "after the client agent came back without its registrations")
        log(f"registrations restored {took:.1f} s after the agent answered again "
            f"({time.monotonic() - gone:.1f} s)")
        _finish(sc, history, acks, "after the client agent lost its registrations")


@pytest.mark.timeout(600)
def test_slow_etcd_member(
    ha_stack: HaFaultStack, ha_operator: OperatorProcess, run_id: str, seed: int
) -> None:
    """One member (the leader: every write goes through it) throttled to 64 kbit/s for 15 s."""
    acks = Acks()
    sc, history = _steady_scenario(ha_stack, ha_operator, run_id, seed, acks)
    with polling(acks, sc.kube, set(sc.model.namespaces)):
        sc.workload.stream(10, pace=(0.05, 0.2), deadline=time.monotonic() + 120)
        member = ha_stack.faults.etcd_leader()
        with ha_stack.faults.slow(member, limit=30) as fault:
            sc.workload.stream(30, pace=(0.1, 0.3), deadline=time.monotonic() + 15)
            time.sleep(max(0.0, 15 - (time.monotonic() - fault.started)))
        _finish(sc, history, acks, f"after {fault.description}")


def test_network_faults_are_always_healed(ha_stack: HaFaultStack) -> None:
    """A partition is removed at exit, when its block raises, and by its watchdog."""
    from tether_dev import faults
    members = list(devstack.ETCD_MEMBERS)
    # Only this session's rules: another fault session may be running beside it.
    mine = f"tether-fault:{os.getpid()}:"
    with ha_stack.faults.partition(members[:1], members[1:], limit=30):
        assert faults.leftovers()
    assert not [line for line in faults.leftovers() if mine in line]

    with pytest.raises(RuntimeError), ha_stack.faults.partition(members[:1], members[1:], limit=30):
        raise RuntimeError("a failing test")
    assert not [line for line in faults.leftovers() if mine in line]

    with ha_stack.faults.partition(members[:1], members[1:], limit=1.0):
        wait_for(
            lambda: not [line for line in faults.leftovers() if mine in line],
            timeout=10, interval=0.1, message="the watchdog to heal the partition",
        )
    with ha_stack.faults.slow(members[0], limit=30):
        assert any(line.startswith("tc:") for line in faults.leftovers())
    assert not any(line.startswith("tc:") for line in faults.leftovers())
    ha_stack.settle()


def test_ha_plan_is_a_function_of_its_seed() -> None:
    """The HA plan is a function of its seed (a replay injects the same faults)."""
    a, b = make_ha_plan(7, reduced=True), make_ha_plan(7, reduced=True)
    assert asdict(a) == asdict(b)
    assert {f["kind"] for f in a.faults} == set(HA_FAULT_KINDS)
    assert all(10.0 <= f["hold_seconds"] <= 30.0 for f in make_ha_plan(8, reduced=False).faults)
