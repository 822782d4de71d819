"""The dead-man switch end to end: a SIGKILLed operator's instances stop passing, a new
leader brings them back.

An endpoints-mode ConsulService with 3 ready endpoints; ``tether run --leader-elect``
and ``tether deadman`` as two processes. Each try SIGKILLs the operator and times how
long until ``/v1/health/service/<name>?passing`` returns no instance (goal ≤ 30 s), counts
the deadman's catalog writes (exactly 1: its log, and the distinct ModifyIndex values of
the check seen by polling Consul), then starts an operator as a new Pod would (another
identity, so it waits out the Lease) and times how long after it leads until the 3 are
passing again (goal ≤ 10 s). On the dev stack "scaled to 0" is the same as killed: no
Pod, no process, nobody renews the Lease. A graceful stop (SIGTERM, what scaling a
Deployment to 0 sends) releases the Lease instead: timed once at the end.
"""

from __future__ import annotations

import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from test_consulservice_endpoints import endpoint_slice, own_namespace, ready, service

from tether_dev.harness.consul import Consul
from tether_dev.harness.deadman import DeadmanProcess
from tether_dev.harness.kube import apply, kubectl, resource, wait_condition
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

TRIES = 3
CHECK_ID = "tether:alive"


def passing(consul: Consul, name: str) -> int:
    return len(consul.call("GET", f"/v1/health/service/{name}?passing", timeout=5) or [])


def alive_check(consul: Consul, node: str) -> dict[str, Any]:
    checks = consul.call("GET", f"/v1/health/node/{node}", timeout=5) or []
    return next((c for c in checks if c["CheckID"] == CHECK_ID), {})


def test_instances_stop_passing_without_a_leader_and_come_back_with_one(
    dev_env: dict[str, str], tmp_path: Path
) -> None:
    consul = Consul.from_env(dev_env)
    tag = uuid.uuid4().hex[:6]
    cluster, name = f"dm-{tag}", f"dm-web-{tag}"
    node = f"tether-{cluster}"
    with own_namespace(dev_env, "x-dm") as ns:
        env = {"TETHER_CLUSTER_NAME": cluster, "POD_NAMESPACE": ns, "TETHER_LEASE_NAME": f"tether-{tag}"}

        def operator(identity: str) -> OperatorProcess:
            return OperatorProcess(
                dev_env, tmp_path / "operator.log", args=("-n", ns, "--leader-elect"),
                extra_env={**env, "POD_NAME": identity}, verbose=True,
            ).start()

        def leading(op: OperatorProcess) -> bool:
            return op.metrics(timeout=2).get("tether_leader", 0.0) == 1.0

        op = operator("tether-0")
        deadman = DeadmanProcess(dev_env, tmp_path / "deadman.log", extra_env=env).start()
        down: list[float] = []
        back: list[float] = []
        try:
            wait_for(lambda: leading(op), timeout=30, interval=0.1, message="the operator to lead")
            apply(dev_env, ns, service("web", [("http", 80, 8080)]))
            apply(dev_env, ns, endpoint_slice(
                "web-1", "web", [("http", 8080)], [ready(f"10.9.0.{i}") for i in (1, 2, 3)]))
            spec = {"name": name, "endpoints": {"service": "web"}}
            apply(dev_env, ns, resource("ConsulService", "web", spec))
            wait_condition(dev_env, ns, "consulservice", "web", op=op)
            wait_for(lambda: passing(consul, name) == 3
                     and alive_check(consul, node).get("Status") == "passing", timeout=20, interval=0.1,
                     message="3 instances passing and tether:alive passing")
            for attempt in range(TRIES):
                # -- every replica gone ----------------------------------------------------
                writes_before = deadman.writes()
                indexes: set[int] = {int(alive_check(consul, node).get("ModifyIndex") or 0)}
                killed = time.monotonic()
                op.kill()

                def none_passing(indexes: set[int] = indexes) -> bool:
                    indexes.add(int(alive_check(consul, node).get("ModifyIndex") or 0))
                    return passing(consul, name) == 0

                wait_for(none_passing, timeout=45, interval=0.1, message="no instance passing after the "
                         f"SIGKILL\n--- deadman log:\n{deadman.log_tail()}")
                down.append(time.monotonic() - killed)
                # Two more of the deadman's ticks: it must not write again.
                settle = time.monotonic() + 5
                while time.monotonic() < settle:
                    indexes.add(int(alive_check(consul, node).get("ModifyIndex") or 0))
                    time.sleep(0.2)
                made = deadman.writes() - writes_before
                check = alive_check(consul, node)
                assert check.get("Status") == "critical", check
                assert made == 1, f"the deadman made {made} catalog writes\n{deadman.log_tail()}"
                assert len(indexes) == 2, f"the check changed {len(indexes) - 1} times: {sorted(indexes)}"
                # The instances' own checks were not touched: O(1), not per instance.
                instance_checks = [
                    c for c in consul.call("GET", f"/v1/health/node/{node}") or [] if c.get("ServiceID")
                ]
                assert len(instance_checks) == 3 and all(c["Status"] == "passing" for c in instance_checks)

                # -- a new Pod comes up and leads ------------------------------------------
                # Every operator of this test logs to the same file.
                mark = f"set check '{CHECK_ID}' on node '{node}' passing"
                restored_before = op.log_text().count(mark)
                op = new = operator(f"tether-{attempt + 1}")
                wait_for(lambda new=new: leading(new), timeout=45, interval=0.05,
                         message="the new operator to lead")
                led = time.monotonic()
                wait_for(lambda: passing(consul, name) == 3, timeout=20, interval=0.05,
                         message=f"3 instances passing again\n--- operator log:\n{op.log_tail()}")
                back.append(time.monotonic() - led)
                # One write restores them all: the new leader's one line for the check.
                # Its log line follows the write by a moment; then no second write.
                wait_for(lambda new=new, m=mark, before=restored_before: new.log_text().count(m) > before,
                         timeout=5, interval=0.1,
                         message=f"the new leader's log of its write\n{op.log_tail()}")
                time.sleep(1)
                restores = op.log_text().count(mark) - restored_before
                assert restores == 1, f"{restores} writes of the check by the new leader\n{op.log_tail()}"
                print(f"try {attempt + 1}: none passing {down[-1]:.1f} s after the SIGKILL "
                      f"(deadman writes: {made}); all passing {back[-1]:.2f} s after the new leader led")
            # -- scaled to 0 on a cluster: SIGTERM, and the leader releases the Lease ----
            # (a released Lease carries a 1 s duration: the deadman waits 1 s + its margin).
            stopped = time.monotonic()
            op.stop(grace=20)
            wait_for(lambda: passing(consul, name) == 0, timeout=30, interval=0.1,
                     message=f"no instance passing after a graceful stop\n{deadman.log_tail()}")
            released = time.monotonic() - stopped
            print(f"graceful stop (Lease released): none passing {released:.1f} s after SIGTERM")
            assert released <= 30.0
            op = operator(f"tether-{TRIES + 1}")
            wait_for(lambda: passing(consul, name) == 3, timeout=45, interval=0.1,
                     message=f"3 instances passing after the restart\n{op.log_tail()}")
        finally:
            # The deadman first (the operator's stop must not be judged), then the
            # resource while an operator still releases it, then the operator.
            deadman.stop()
            if op.alive():
                kubectl(dev_env, "delete", "consulservice", "web", "-n", ns, "--timeout=30s", check=False)
            op.stop(grace=20)
        print(f"dead-man switch over {len(down)} tries: down p50 {statistics.median(down):.1f} s, "
              f"max {max(down):.1f} s; back p50 {statistics.median(back):.2f} s, max {max(back):.2f} s")
        assert max(down) <= 30.0, down
        assert max(back) <= 10.0, back
