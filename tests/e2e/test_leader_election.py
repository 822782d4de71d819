"""Leader election: two operator processes, one Lease, no double work."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tether_dev.harness.kube import apply, get, kubectl, resource, wait_condition
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for


def _resources(count: int, prefix: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(count):
        out.append(resource("ConsulService", f"svc-{i}", {"port": 1000 + i}))
        out.append(resource("EtcdConfig", f"cfg-{i}", {"prefix": f"{prefix}/{i}", "data": {"k": str(i)}}))
    return out


def _leader(op: OperatorProcess) -> float:
    return op.metrics().get("tether_leader", 0.0)


def test_one_leader_reconciles_and_the_other_takes_over(dev_env: dict[str, str], tmp_path: Path) -> None:
    ns = f"x-le-{uuid.uuid4().hex[:6]}"
    kubectl(dev_env, "create", "namespace", ns)
    lease = f"tether-leader-{uuid.uuid4().hex[:6]}"

    def operator(name: str, lease_name: str = lease) -> OperatorProcess:
        return OperatorProcess(
            dev_env,
            tmp_path / f"{name}.log",
            args=("-n", ns, "--leader-elect"),
            extra_env={"POD_NAME": name, "POD_NAMESPACE": ns, "TETHER_LEASE_NAME": lease_name},
            verbose=True,
        ).start()

    first = operator("first")
    wait_for(lambda: _leader(first) == 1.0, timeout=20, interval=0.2, message="first to lead")
    second = operator("second")
    try:
        prefix = f"/le/{uuid.uuid4().hex[:8]}"
        for obj in _resources(5, prefix):
            apply(dev_env, ns, obj)
        for i in range(5):
            wait_condition(dev_env, ns, "consulservice", f"svc-{i}", op=first)
            wait_condition(dev_env, ns, "etcdconfig", f"cfg-{i}", op=first)
        time.sleep(2)
        assert _leader(second) == 0.0
        # The standby is alive (a kubelet must not restart it) and says what it waits for.
        with urllib.request.urlopen(f"http://127.0.0.1:{second.health_port}/healthz", timeout=5) as r:
            assert r.status == 200 and "waiting" in json.loads(r.read())["status"]
        assert second.writes() == {"consul": 0.0, "etcd": 0.0, "kubernetes": 0.0}, "the follower wrote"
        assert first.writes()["consul"] >= 5 and first.writes()["etcd"] >= 5

        # SIGKILL the leader: the follower takes over once the lease expires.
        killed = time.monotonic()
        first.kill()
        wait_for(lambda: _leader(second) == 1.0, timeout=25, interval=0.2, message="second to lead")
        takeover = time.monotonic() - killed
        apply(
            dev_env,
            ns,
            resource("ConsulService", "after", {"port": 2000}),
        )
        wait_condition(dev_env, ns, "consulservice", "after", timeout=20, op=second)
        print(f"failover: follower led {takeover:.1f}s after the leader was SIGKILLed")
        assert takeover <= 20.0

        # A leader that loses its lease (someone else holds it) stops at once.
        # Read-modify-replace races the leader's renewals (409): try again.
        for _ in range(10):
            holder = json.loads(kubectl(dev_env, "get", "lease", lease, "-n", ns, "-o", "json").stdout)
            holder["spec"]["holderIdentity"] = "usurper"
            holder["spec"]["renewTime"] = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
            holder["spec"]["leaseDurationSeconds"] = 60
            if kubectl(dev_env, "replace", "-f", "-", input=json.dumps(holder), check=False).returncode == 0:
                break
        lost = time.monotonic()
        assert second.proc is not None
        wait_for(
            lambda: second.proc is not None and second.proc.poll() is not None,
            timeout=10,
            interval=0.1,
            message="the deposed leader to stop",
        )
        print(f"deposed leader stopped {time.monotonic() - lost:.1f}s after losing its lease")
        assert "lost the leader Lease" in second.log_tail(200)
    finally:
        first.stop()
        second.stop()
    # A standby stops promptly on SIGTERM, although Kopf is not running yet.
    # (A fresh Lease: the usurper above holds the first one for a minute.)
    standby = operator("standby-a", f"{lease}-2")
    leader = operator("standby-b", f"{lease}-2")
    try:
        wait_for(
            lambda: _leader(standby) + _leader(leader) == 1.0, timeout=30, interval=0.2, message="a leader"
        )
        waiting = standby if _leader(standby) == 0.0 else leader
        assert waiting.proc is not None
        started = time.monotonic()
        waiting.stop()
        assert waiting.proc.returncode == 0 and time.monotonic() - started < 5
    finally:
        standby.stop()
        leader.stop()
    # Clean up with a plain operator so finalizers are released.
    cleaner = OperatorProcess(dev_env, tmp_path / "cleaner.log", args=("-n", ns), verbose=True).start()
    try:
        kubectl(dev_env, "delete", "consulservices,etcdconfigs", "--all", "-n", ns, "--timeout=60s")
        assert get(dev_env, ns, "consulservice", "after") is None
    finally:
        cleaner.stop()
