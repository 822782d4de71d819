"""The operator SIGKILLed in the middle of work, then started again.

- during a 300-key EtcdConfig's create, update and delete (several guarded
  transactions each, since 300 keys and their ownership claims exceed one
  transaction): afterwards no key is lost, duplicated or orphaned, and ownership
  records match exactly;
- during a burst of 50 creates (ConsulServices and EtcdConfigs at once), and
  again during the burst of their deletions.

The kill is triggered by what the test sees in etcd or Kubernetes (the first
sign of progress), so it lands inside the work rather than before or after it;
how much had landed at the moment of the kill is printed.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from faultkit import CONSUL, REDUCED, FaultStack, Kube, log
from generator import Decl, Limits
from scenario import Scenario, make_scenario

from tether_dev.harness.consul import Consul
from tether_dev.harness.etcd import Etcd
from tether_dev.harness.kube import is_ready
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

CLEAN = Limits(orphan_share=0.0, invalid_share=0.0)
CONVERGE = 90.0
BIG = 300


def _kill_on_progress(
    sc: Scenario, prefix: str, change: Callable[[], object], *, timeout: float = 10.0
) -> tuple[int, str]:
    """Make ``change`` in Kubernetes, SIGKILL the operator as soon as etcd's revision moves.

    The baseline revision is read before the change is made, and nothing else
    writes to etcd meanwhile, so the first new revision is the operator's first
    transaction for this change. Returns the number of keys under ``prefix``
    right after the kill and what triggered it (``timeout`` bounds the wait).
    """
    baseline = sc.etcd.revision()
    worker = threading.Thread(target=change, name="change", daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout
    trigger = f"timeout {timeout:.0f} s"
    while time.monotonic() < deadline:
        revision = sc.etcd.revision()
        if revision != baseline:
            trigger = f"etcd revision {baseline} -> {revision}"
            break
        time.sleep(0.002)
    sc.operator.kill()
    worker.join(timeout=150)
    assert not worker.is_alive(), "the Kubernetes change did not finish"
    count = len(sc.etcd.range(prefix)[1])
    return count, trigger


def _restart(sc: Scenario, rng: random.Random) -> None:
    down = rng.uniform(0.5, 3.0)
    time.sleep(down)
    sc.operator.start()
    log(f"operator restarted after {down:.1f} s (pid {sc.operator.pid})")


def _assert_big(sc: Scenario, decl: Decl) -> None:
    """Exactly the declared keys, each once, each claimed by this resource."""
    obj = sc.get(decl)
    assert obj is not None and is_ready(obj), f"{decl} not Ready: {obj and obj.get('status')}"
    prefix = decl.spec["prefix"].rstrip("/") + "/"
    have = sc.etcd.keys(prefix)
    want = {prefix + k: v for k, v in decl.spec["data"].items()}
    foreign = {k: v for k, v in sc.model.foreign.items() if k.startswith(prefix)}
    assert have == {**want, **foreign}, (
        f"{decl}: {len(set(want) - set(have))} keys lost, {len(set(have) - set(want) - set(foreign))} extra, "
        f"{sum(1 for k in want if k in have and have[k] != want[k])} wrong"
    )
    assert obj["status"].get("keys") == len(want), obj["status"]


def test_operator_killed_during_large_write(
    stack: FaultStack, operator: OperatorProcess, kube: Kube, consul: Consul, etcd: Etcd,
    run_id: str, seed: int,
) -> None:
    rng = random.Random(seed)
    # Small transactions (a server limit the operator is told about, as
    # TETHER_ETCD_MAX_TXN_OPS allows) turn one write of 300 keys and their
    # claims into dozens of guarded chunks, so the kill lands between chunks.
    operator.stop()
    operator.env["TETHER_ETCD_MAX_TXN_OPS"] = "16"
    operator.start()
    sc = make_scenario(
        stack, operator, kube, consul, etcd, run_id=run_id, seed=seed, namespaces=1, limits=CLEAN
    )
    ns = sc.model.namespaces[0]
    prefix = f"{sc.model.root}/{ns}/big"
    data = {f"group{i % 10}/key{i:03d}": f"v{i}-{rng.randrange(10**6)}" for i in range(BIG)}
    foreign_key = f"{prefix}/unowned"
    etcd.put(foreign_key, "not tether's")
    sc.model.foreign[foreign_key] = "not tether's"

    # create
    spec = {"prefix": prefix, "data": data}
    made: list[Decl] = []
    landed, trigger = _kill_on_progress(
        sc,
        prefix + "/",
        lambda: made.append(sc.workload.create("ec", ns, spec=spec, name="big", plant_foreign=False)),
    )
    big = made[0]
    log(f"create: operator SIGKILLed on {trigger}; {landed - 1} of {BIG} keys had landed")
    _restart(sc, rng)
    sc.wait_ready([big], timeout=CONVERGE)
    _assert_big(sc, big)
    sc.assert_converged(CONVERGE, "after the operator was killed during a 300-key create")

    # update: a third of the values change, 50 keys go, 50 new ones come
    new = dict(data)
    for k in rng.sample(sorted(new), 100):
        new[k] = f"changed-{rng.randrange(10**6)}"
    for k in rng.sample(sorted(new), 50):
        del new[k]
    new.update({f"added/key{i:03d}": f"a{i}" for i in range(50)})
    landed, trigger = _kill_on_progress(
        sc, prefix + "/", lambda: sc.workload.update(big, {"prefix": prefix, "data": new}, "300-key rewrite")
    )
    log(f"update: operator SIGKILLed on {trigger}; {landed - 1} keys under the prefix at the kill")
    _restart(sc, rng)
    sc.wait_ready([big], timeout=CONVERGE)
    _assert_big(sc, big)
    sc.assert_converged(CONVERGE, "after the operator was killed during a 300-key update")

    # move: all keys to a new prefix; the old one must end up with only the unowned key
    moved = f"{sc.model.root}/{ns}/moved"
    landed, trigger = _kill_on_progress(
        sc, prefix + "/", lambda: sc.workload.update(big, {"prefix": moved, "data": new}, "prefix move")
    )
    log(f"move: operator SIGKILLed on {trigger}; {landed - 1} keys left under the old prefix at the kill")
    _restart(sc, rng)
    sc.wait_ready([big], timeout=CONVERGE)
    _assert_big(sc, big)
    assert etcd.keys(prefix + "/") == {foreign_key: "not tether's"}, "keys left under the old prefix"
    sc.assert_converged(CONVERGE, "after the operator was killed during a 300-key prefix move")

    # delete
    landed, trigger = _kill_on_progress(sc, moved + "/", lambda: sc.workload.delete(big))
    log(f"delete: operator SIGKILLed on {trigger}; {landed} of {len(new)} keys left at the kill")
    _restart(sc, rng)
    wait_for(lambda: sc.get(big) is None, timeout=CONVERGE, message=f"{big} deleted")
    assert etcd.keys(moved + "/") == {}, "keys left behind"
    assert etcd.keys(prefix + "/") == {foreign_key: "not tether's"}, "the unowned key was touched"
    sc.assert_converged(CONVERGE, "after the operator was killed during a 300-key delete")

    # A write cut short, then the resource deleted while no operator runs: the
    # restarted operator must find every key the half-done write left (its
    # ownership index must cover them all) and remove them.
    other = f"{sc.model.root}/{ns}/cut"
    made.clear()
    landed, trigger = _kill_on_progress(
        sc,
        other + "/",
        lambda: made.append(
            sc.workload.create(
                "ec", ns, spec={"prefix": other, "data": data}, name="cut", plant_foreign=False
            )
        ),
    )
    log(f"cut-short create: operator SIGKILLed on {trigger}; {landed} of {BIG} keys had landed")
    sc.workload.delete(made[0])
    _restart(sc, rng)
    wait_for(lambda: sc.get(made[0]) is None, timeout=CONVERGE, message=f"{made[0]} deleted")
    assert etcd.keys(other + "/") == {}, "keys of a write cut short were left behind after deletion"
    sc.assert_converged(CONVERGE, "after a cut-short write was deleted while the operator was down")


def test_operator_killed_during_consul_rename(
    stack: FaultStack, operator: OperatorProcess, kube: Kube, consul: Consul, etcd: Etcd,
    run_id: str, seed: int,
) -> None:
    """Killed between registering a service's new ID and recording it; renamed again meanwhile.

    Each round: ``spec.id`` a -> b, the operator SIGKILLed as soon as b is
    registered (before its status names b), ``spec.id`` b -> c while no operator
    runs, then the operator started again while Consul is slow to answer (paused
    until the operator has the resources in its cache, a few seconds, less than
    its request timeout). The restarted operator must leave only c: b is owned by
    this resource (its meta says so) although no status ever named it.
    """
    rng = random.Random(seed)
    sc = make_scenario(
        stack, operator, kube, consul, etcd, run_id=run_id, seed=seed, namespaces=1, limits=CLEAN
    )
    ns = sc.model.namespaces[0]
    rounds = 3 if REDUCED else 6
    decls = [
        sc.workload.create("cs", ns, spec={"id": f"{ns}-svc{i}-a", "port": 8000 + i}, name=f"svc{i}")
        for i in range(rounds)
    ]
    sc.wait_ready(decls, timeout=60)
    exercised = 0
    for i, decl in enumerate(decls):
        second, third = f"{ns}-svc{i}-b", f"{ns}-svc{i}-c"
        sc.workload.update(decl, {"id": second, "port": 8000 + i}, "id a -> b")
        wait_for(
            lambda sid=second: consul.call("GET", f"/v1/agent/service/{sid}", timeout=2),
            timeout=30,
            interval=0.002,
            message=f"{second} registered",
        )
        operator.kill()
        recorded = ((sc.get(decl) or {}).get("status") or {}).get("serviceID")
        held = sorted(sid for sid in consul.services() if sid.startswith(f"{ns}-svc{i}-"))
        exercised += recorded != second
        sc.workload.update(decl, {"id": third, "port": 8000 + i}, "id b -> c while the operator is down")
        log(
            f"{decl}: operator SIGKILLed after {second} was registered; Consul held {held}, status {recorded}"
        )
        stack.pause(CONSUL)
        try:
            operator.start()
            wait_for(
                lambda: operator.metrics().get('tether_managed_objects{kind="ConsulService"}', 0) >= rounds,
                timeout=20,
                interval=0.05,
                message="the restarted operator to cache the resources",
            )
            time.sleep(0.5)
        finally:
            stack.resume(CONSUL)
        sc.wait_ready([decl], timeout=CONVERGE)
        time.sleep(rng.uniform(1.0, 3.0))  # the watcher's scans have happened by now
        left = sorted(sid for sid in consul.services() if sid.startswith(f"{ns}-svc{i}-"))
        log(f"{decl}: after the restart Consul holds {left}")
        assert left == [third], f"{decl}: registrations {left} left, expected only {third}"
    assert exercised, "no round killed the operator before it recorded the new ID"
    sc.assert_converged(CONVERGE, "after renames around operator kills")
    sc.delete_all()
    sc.assert_converged(CONVERGE, "after deleting everything")


def test_operator_killed_during_burst(
    stack: FaultStack, operator: OperatorProcess, kube: Kube, consul: Consul, etcd: Etcd,
    run_id: str, seed: int,
) -> None:
    rng = random.Random(seed)
    sc = make_scenario(
        stack, operator, kube, consul, etcd, run_id=run_id, seed=seed, namespaces=2, limits=CLEAN
    )
    wl = sc.workload
    # Specs drawn up front, in order, so the burst is the same for a seed however threads interleave.
    plan = []
    for i in range(50):
        kind = "cs" if i % 2 == 0 else "ec"
        ns = sc.model.namespaces[i % len(sc.model.namespaces)]
        name = f"burst-{kind}-{i}"
        spec = wl.cs_spec(ns, name) if kind == "cs" else wl.ec_spec(ns, name)
        plan.append((kind, ns, name, spec))
    kill_after = rng.randint(3, 15)  # resources Ready when the operator dies

    def ready_count() -> int:
        objs = [o for kind in ("cs", "ec") for o in kube.list(kind, set(sc.model.namespaces))]
        return sum(1 for o in objs if is_ready(o))

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [
            pool.submit(wl.create, kind, ns, spec=spec, name=name, plant_foreign=False)
            for kind, ns, name, spec in plan
        ]
        seen = wait_for(
            lambda: (n := ready_count()) >= kill_after and n,
            timeout=60,
            interval=0.1,
            message=f"{kill_after} resources Ready",
        )
        operator.kill()
        decls = [f.result(timeout=120) for f in futures]
    log(f"burst of 50 creates: operator SIGKILLed with {seen} Ready; {ready_count()} Ready after the kill")
    _restart(sc, rng)
    took = sc.wait_ready(decls, timeout=CONVERGE)
    log(f"all 50 Ready {took:.1f} s after the restart")
    sc.assert_converged(CONVERGE, "after the operator was killed during a burst of 50 creates")

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(wl.delete, d) for d in decls]
        gone_before = rng.randint(1, 20)
        left = wait_for(
            lambda: (
                (
                    n := sum(
                        1
                        for o in (kube.list("cs") + kube.list("ec"))
                        if o["metadata"]["namespace"] in sc.model.namespaces
                    )
                )
                <= 50 - gone_before
                and n + 1
            ),
            timeout=60,
            interval=0.1,
            message=f"{gone_before} deletions to complete",
        )
        operator.kill()
        for f in futures:
            f.result(timeout=120)
    log(f"burst of 50 deletes: operator SIGKILLed with {left - 1} resources left")
    _restart(sc, rng)
    sc.assert_converged(CONVERGE, "after the operator was killed during a burst of 50 deletes")
    assert not [
        o for o in kube.list("cs") + kube.list("ec") if o["metadata"]["namespace"] in sc.model.namespaces
    ]
