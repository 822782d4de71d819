"""Focused faults on the backends and the API server, each with its own assertions.

- Consul SIGKILLed while resources are created and deleted (it restarts empty);
- config etcd SIGKILLed in the middle of work (resources report BackendUnavailable
  while it is down);
- Consul paused with SIGSTOP, so requests hang: resources report
  BackendUnavailable instead of hanging, other work goes on, all recovers after
  SIGCONT;
- etcd compacted during the operator's watch, also while the watch is behind:
  drift is still repaired;
- kube-apiserver SIGKILLed and restarted: drift is repaired meanwhile, and the
  operator resumes (a resource created after the restart becomes Ready).

Every test ends with the exact audit, then deletes everything and audits again.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.request
from collections import Counter

from faultkit import CONSUL, ETCD, KUBE_APISERVER, REDUCED, FaultStack, Kube, log
from generator import Decl, Limits
from scenario import Scenario, make_scenario

from tether_dev.harness.consul import Consul
from tether_dev.harness.etcd import Etcd
from tether_dev.harness.kube import condition, is_ready
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

CLEAN = Limits(orphan_share=0.0, invalid_share=0.0)
CONVERGE = 90.0


def _finish(sc: Scenario, what: str) -> None:
    """The common ending: exact audit, delete everything, nothing left."""
    took = sc.assert_converged(CONVERGE, f"after {what}")
    log(f"converged {took:.1f} s after {what}")
    sc.delete_all()
    took = sc.assert_converged(CONVERGE, f"after deleting everything ({what})")
    log(f"all deleted and cleaned up in {took:.1f} s")


def _churn(
    sc: Scenario,
    ns: str,
    kind: str,
    deletions: list[Decl],
    creations: int,
    out: list[Decl],
    updates: list[Decl] | None = None,
) -> threading.Thread:
    """Creates, updates and deletes interleaved, in a thread, while the test breaks things."""

    def run() -> None:
        todo = [("delete", d) for d in deletions] + [("update", d) for d in updates or []]
        for i in range(max(creations, len(todo))):
            if i < creations:
                out.append(sc.workload.create(kind, ns))
            if i < len(todo):
                action, decl = todo[i]
                if action == "delete":
                    sc.workload.delete(decl)
                else:
                    sc.workload.update(decl)
            time.sleep(0.15)

    thread = threading.Thread(target=run, name="churn", daemon=True)
    thread.start()
    return thread


def test_consul_killed_while_resources_come_and_go(
    stack: FaultStack, operator: OperatorProcess, kube: Kube, consul: Consul, etcd: Etcd,
    run_id: str, seed: int,
) -> None:
    rng = random.Random(seed)
    sc = make_scenario(
        stack, operator, kube, consul, etcd, run_id=run_id, seed=seed, namespaces=1, limits=CLEAN
    )
    ns = sc.model.namespaces[0]
    n = 10 if REDUCED else 30
    first = [sc.workload.create("cs", ns) for _ in range(n)]
    sc.wait_ready(first, timeout=60)

    created: list[Decl] = []
    churn = _churn(
        sc, ns, "cs", deletions=first[: n // 2], creations=n, out=created, updates=first[n // 2 :][:3]
    )
    time.sleep(rng.uniform(0.3, 1.5))
    pid = stack.kill(CONSUL)
    down = rng.uniform(2.0, 5.0)
    log(f"Consul pid {pid} SIGKILLed mid-churn; down for {down:.1f} s")
    time.sleep(down)
    took = stack.restart()
    log(f"Consul restarted (empty) in {took:.1f} s")
    churn.join(timeout=120)
    assert not churn.is_alive(), "the workload thread did not finish"

    _assert_no_duplicates(sc)
    _finish(sc, "Consul was killed and restarted empty")
    _assert_no_duplicates(sc)


def _assert_no_duplicates(sc: Scenario) -> None:
    """At most one registration per owning resource (a rename must not leave two)."""
    wait_for(lambda: sc.consul.services() is not None, timeout=30, message="Consul answers")
    owners = Counter(
        (m.get("tether-namespace"), m.get("tether-name"))
        for svc in sc.consul.services().values()
        if (m := svc.get("Meta") or {}).get("tether-namespace") in sc.model.namespaces
    )
    dupes = {k: v for k, v in owners.items() if v > 1}
    assert not dupes, f"resources registered more than once: {dupes}"


def test_etcd_killed_mid_work(
    stack: FaultStack, operator: OperatorProcess, kube: Kube, consul: Consul, etcd: Etcd,
    run_id: str, seed: int,
) -> None:
    rng = random.Random(seed)
    sc = make_scenario(
        stack, operator, kube, consul, etcd, run_id=run_id, seed=seed, namespaces=1, limits=CLEAN
    )
    ns = sc.model.namespaces[0]
    n = 8 if REDUCED else 24
    first = [sc.workload.create("ec", ns) for _ in range(n)]
    sc.wait_ready(first, timeout=60)

    created: list[Decl] = []
    churn = _churn(
        sc, ns, "ec", deletions=first[:3], creations=n // 2, out=created, updates=first[3 : n // 2 + 3]
    )
    time.sleep(rng.uniform(0.3, 1.2))
    pid = stack.kill(ETCD)
    log(f"etcd pid {pid} SIGKILLed mid-churn")
    # While etcd is down, the resources created meanwhile must say why they wait.
    # etcd stays down until that is seen (bounded), so the check cannot race the restart.
    extra = sc.workload.create("ec", ns)
    try:
        seen = wait_for(
            lambda: (c := condition(sc.get(extra))).get("reason") == "BackendUnavailable" and c,
            timeout=45,
            interval=0.5,
            message=f"{extra} to report BackendUnavailable while etcd is down",
        )
        log(f"while etcd was down: {extra} said {seen.get('reason')}: {seen.get('message')!r}")
    finally:
        churn.join(timeout=120)
        took = stack.restart()
        log(f"etcd restarted in {took:.1f} s (data kept)")
    assert not churn.is_alive(), "the workload thread did not finish"
    sc.wait_ready([extra, *created], timeout=CONVERGE, what="Ready after etcd came back")
    _finish(sc, "etcd was killed and restarted")


def test_consul_paused_reports_backend_unavailable(
    stack: FaultStack, operator: OperatorProcess, kube: Kube, consul: Consul, etcd: Etcd,
    run_id: str, seed: int,
) -> None:
    pause = 12.0 if REDUCED else 30.0
    sc = make_scenario(
        stack, operator, kube, consul, etcd, run_id=run_id, seed=seed, namespaces=1, limits=CLEAN
    )
    ns = sc.model.namespaces[0]
    base = [sc.workload.create("cs", ns) for _ in range(4)]
    sc.wait_ready(base, timeout=60)

    pid = stack.pause(CONSUL)
    paused_at = time.monotonic()
    log(f"Consul pid {pid} SIGSTOPped for {pause:.0f} s")
    try:
        new = [sc.workload.create("cs", ns) for _ in range(3)]
        sc.workload.update(base[0])
        sc.workload.delete(base[1])
        cfg = sc.workload.create("ec", ns)
        # Work that does not need Consul goes on while its requests hang.
        sc.wait_ready([cfg], timeout=pause - 1, what="Ready (EtcdConfig, while Consul hangs)")

        def unavailable() -> bool:
            return all(
                condition(o).get("reason") == "BackendUnavailable"
                and (o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"]
                for o in (sc.get(d) for d in (*new, base[0]))
            )

        remaining = pause - (time.monotonic() - paused_at)
        wait_for(
            unavailable,
            timeout=max(1.0, remaining - 0.5),
            interval=0.3,
            message="new and updated ConsulServices to report BackendUnavailable while Consul hangs",
        )
        said = condition(sc.get(new[0]))
        log(
            f"during the pause: {new[0]} said {said.get('reason')}: {said.get('message')!r} "
            f"{time.monotonic() - paused_at:.1f} s in"
        )
        # The deletion waits behind the finalizer: the resource must still be there.
        held = sc.get(base[1])
        assert held is not None and held["metadata"].get("deletionTimestamp"), (
            f"{base[1]} should wait behind its finalizer while Consul hangs: {held}"
        )
        # And the operator itself stays responsive (liveness probe answers).
        with urllib.request.urlopen(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=5) as r:
            assert r.status == 200
        time.sleep(max(0.0, pause - (time.monotonic() - paused_at)))
    finally:
        stack.resume(CONSUL)
    log("Consul continued (SIGCONT)")
    took = sc.wait_ready([*new, base[0]], timeout=CONVERGE, what="Ready after SIGCONT")
    log(f"all Ready {took:.1f} s after SIGCONT")
    wait_for(lambda: sc.get(base[1]) is None, timeout=CONVERGE, message=f"{base[1]} deleted after SIGCONT")
    _finish(sc, "Consul was paused and continued")


def _data_key(decl: Decl, rel: str) -> str:
    return decl.spec["prefix"].rstrip("/") + "/" + rel


def _wait_repaired(sc: Scenario, decl: Decl, keys: dict[str, str], timeout: float, what: str) -> float:
    started = time.monotonic()
    wait_for(
        lambda: all(sc.etcd.keys(k).get(k) == v for k, v in keys.items()),
        timeout=timeout,
        interval=0.25,
        message=f"drift on {decl} repaired {what}",
    )
    took = time.monotonic() - started
    log(f"drift repaired {took:.1f} s {what}")
    return took


def test_etcd_compaction_during_watch(
    stack: FaultStack, operator: OperatorProcess, kube: Kube, consul: Consul, etcd: Etcd,
    run_id: str, seed: int,
) -> None:
    sc = make_scenario(
        stack, operator, kube, consul, etcd, run_id=run_id, seed=seed, namespaces=1, limits=CLEAN
    )
    ns = sc.model.namespaces[0]
    cfgs = [
        sc.workload.create(
            "ec",
            ns,
            spec={
                "prefix": f"{sc.model.root}/{ns}/cmp{i}",
                "data": {"a": f"one-{i}", "b/c": f"two-{i}", "d": f"three-{i}"},
            },
        )
        for i in range(3)
    ]
    sc.wait_ready(cfgs, timeout=60)

    # 1. A live watch: change and delete managed keys, then compact past the changes.
    want = {_data_key(cfgs[0], "a"): "one-0", _data_key(cfgs[0], "d"): "three-0"}
    etcd.put(_data_key(cfgs[0], "a"), "drifted")
    etcd.delete(_data_key(cfgs[0], "d"))
    rev = etcd.compact()
    log(f"drifted {cfgs[0]} and compacted to {rev} under a live watch")
    _wait_repaired(sc, cfgs[0], want, 15, "under a live watch")

    # 2. A watch that is behind: the operator is stopped while etcd moves on and is
    # compacted, so the revisions the watch has yet to deliver are gone.
    operator.pause()
    try:
        flood = 150 if REDUCED else 400
        filler = "x" * 4096
        for i in range(flood):  # fills the server's send buffers for the stalled stream
            key = f"{sc.model.root}/flood/{i}"
            etcd.put(key, filler)
            sc.model.foreign[key] = filler
        want = {_data_key(cfgs[1], "a"): "one-1", _data_key(cfgs[1], "b/c"): "two-1"}
        etcd.put(_data_key(cfgs[1], "a"), "drifted")
        etcd.delete(_data_key(cfgs[1], "b/c"))
        rev = etcd.compact()
        log(f"operator stopped; {flood} puts, drift on {cfgs[1]}, compacted to {rev}")
    finally:
        operator.resume()
    _wait_repaired(sc, cfgs[1], want, 30, "after the stalled watch resumed past a compaction")

    # 3. A watch that must reconnect from a compacted revision: the operator is
    # stopped, etcd killed and restarted (the stream breaks), etcd drifts and is
    # compacted, then the operator continues and resumes its watch.
    operator.pause()
    try:
        stack.kill(ETCD)
        stack.restart()
        want = {_data_key(cfgs[2], "d"): "three-2"}
        etcd.put(_data_key(cfgs[2], "d"), "drifted")
        for i in range(20):
            etcd.put(f"{sc.model.root}/churn", str(i))
            sc.model.foreign[f"{sc.model.root}/churn"] = str(i)
        rev = etcd.compact()
        log(f"operator stopped; etcd restarted, drift on {cfgs[2]}, compacted to {rev}")
    finally:
        operator.resume()
    _wait_repaired(sc, cfgs[2], want, 30, "after the watch reconnected past a compaction")
    assert operator.alive(), "the operator exited"
    _finish(sc, "etcd compactions during the watch")


def test_apiserver_restart_operator_resumes(
    stack: FaultStack, operator: OperatorProcess, kube: Kube, consul: Consul, etcd: Etcd,
    run_id: str, seed: int,
) -> None:
    rng = random.Random(seed)
    sc = make_scenario(
        stack, operator, kube, consul, etcd, run_id=run_id, seed=seed, namespaces=1, limits=CLEAN
    )
    ns = sc.model.namespaces[0]
    before = [sc.workload.create(kind, ns) for kind in ("cs", "cs")]
    for i in range(2):
        # Inline data only: keys drawn from a ConfigMap cannot be resolved while
        # the API server is away, so those resources wait for it (and say so).
        spec = sc.workload.ec_spec(ns, f"inline-{i}")
        spec.pop("from", None)
        before.append(sc.workload.create("ec", ns, spec=spec, name=f"inline-{i}"))
    sc.wait_ready(before, timeout=60)
    operator_pid = operator.pid

    pid = stack.kill(KUBE_APISERVER)
    log(f"kube-apiserver pid {pid} SIGKILLed")
    try:
        # Drift repair does not need the API server: the operator holds the specs.
        sid = before[0].spec.get("id") or f"{ns}-{before[0].name}"
        consul.deregister(sid)
        key = _data_key(before[2], sorted(before[2].spec["data"])[0])
        value = before[2].spec["data"][sorted(before[2].spec["data"])[0]]
        etcd.delete(key)
        wait_for(
            lambda: sid in consul.services(),
            timeout=20,
            message=f"Consul {sid} restored while the API server is down",
        )
        wait_for(
            lambda: etcd.keys(key).get(key) == value,
            timeout=20,
            message=f"etcd {key} restored while the API server is down",
        )
        log("drift repaired while the API server was down")
        time.sleep(rng.uniform(0.5, 3.0))
    finally:
        took = stack.restart()
    log(f"kube-apiserver restarted in {took:.1f} s")

    after = [sc.workload.create(kind, ns) for kind in ("cs", "ec")]
    sc.workload.update(before[1])
    sc.workload.update(before[3])
    sc.workload.delete(before[0])
    took = sc.wait_ready(
        [*after, before[1], before[3]], timeout=60, what="Ready after the API server restart"
    )
    log(f"created/updated after the restart: Ready in {took:.1f} s")
    wait_for(lambda: sc.get(before[0]) is None, timeout=60, message=f"{before[0]} deleted after the restart")
    assert operator.alive() and operator.pid == operator_pid, "the operator should ride out the restart"
    assert all(is_ready(sc.get(d)) for d in (before[2],))
    _finish(sc, "the API server was killed and restarted")


def test_status_revision_after_lost_status_patch(
    stack: FaultStack, operator: OperatorProcess, kube: Kube, consul: Consul, etcd: Etcd,
    run_id: str, seed: int,
) -> None:
    """A drift repair made while the API server is down must still reach status.revision.

    The contract: ``status.revision`` is "the etcd revision of the last write
    Tether made for this resource". The repair's own status patch fails (no API
    server); the reconcile that retries it finds etcd in order and writes
    nothing, so the repair's revision must come from what etcd shows.
    """
    sc = make_scenario(
        stack, operator, kube, consul, etcd, run_id=run_id, seed=seed, namespaces=1, limits=CLEAN
    )
    ns = sc.model.namespaces[0]
    prefix = f"{sc.model.root}/{ns}/rev"
    decl = sc.workload.create(
        "ec", ns, spec={"prefix": prefix, "data": {"a": "1", "b": "2"}}, name="rev", plant_foreign=False
    )
    sc.wait_ready([decl], timeout=60)
    key = f"{prefix}/a"
    stack.kill(KUBE_APISERVER)
    try:
        etcd.delete(key)
        wait_for(lambda: etcd.keys(key).get(key) == "1", timeout=20, message=f"{key} restored")
        repaired_at = etcd.range(key)[1][key][1]
    finally:
        stack.restart()
    try:
        wait_for(
            lambda: int(((sc.get(decl) or {}).get("status") or {}).get("revision") or 0) >= repaired_at,
            timeout=30,
            message=f"status.revision to reach the repair's revision {repaired_at}",
        )
    finally:
        log(f"status after the repair at revision {repaired_at}: {(sc.get(decl) or {}).get('status')}")
        sc.delete_all()
        sc.converge(CONVERGE)
