"""The dead-man switch on kind: real Pods, the component as a user installs it.

``manifests/components/deadman/`` is applied through an overlay of its own that
lists it under ``components`` (the Tether install is already in the cluster),
with an ``images:`` rewrite to the image the installed operator runs, so it runs
the image just loaded (``tether:e2e`` from ``scripts/kind/overlay``, the same build
tagged as the release's ``tether:<version>`` when the install came from
``install.yaml``; either contains ``tether deadman``). The
Consul of ``scripts/kind/consul.yaml`` runs in dev mode with ACLs off, so the
optional Secret ``tether-deadman-credentials`` is not created: the deadman
writes without a token, as the operator does here.

A Deployment of 3 Pods and an endpoints-mode ConsulService: 3 instances passing in
``/v1/health/service/<name>?passing``. Then, ``TRIES`` times each (5; 2 with
``TETHER_KIND_REDUCED=1``, as CI runs it):

(a) the operator Deployment scaled to 0 (SIGTERM: the leader releases the Lease,
    which then carries a 1 s duration) → time until no instance passes; scaled
    back to its replicas → time until all 3 pass again;
(b) scaled to 0 and, as soon as the ReplicaSet has marked them for deletion,
    every operator Pod force-deleted (``--grace-period=0 --force``): the closest
    kind comes to SIGKILLing every replica. Even so the kubelet sends SIGTERM
    first and SIGKILL only after its minimum grace of 2 s, within which a
    stopping leader may release the Lease. A force-delete alone (no scale) is
    observed once before these tries and printed, not timed: the Deployment
    recreates the Pods at once and one of them leads within seconds, so it may
    not trip the switch at all; asserted there only that the deadman wrote at
    most once, that a new Pod leads and that all instances pass afterwards.

For each outage: exactly one write by the deadman (one WARNING line in its log
per write, and the check's ``ModifyIndex`` seen to change once), the check
critical, the instances' own checks untouched. Bounds are loose (60 s both
ways) on this shared machine; the goal (≤ 30 s to none passing) and the
p50/max of the times are printed.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kind_support import (
    OPERATOR_DEPLOYMENT,
    OPERATOR_NAMESPACE,
    OPERATOR_SELECTOR,
    REPO,
    Consul,
    KindCluster,
    Manifest,
    _http,
    kustomize_image,
    wait_for,
)
from test_kind_endpoints import APP, NODE, _settled_pods, _workload

pytestmark = pytest.mark.kind

COMPONENT = REPO / "manifests" / "components" / "deadman"
DEADMAN = "tether-deadman"
CHECK_ID = "tether:alive"
#: In the deadman's one WARNING line per catalog write (operator/tether/deadman.py).
WRITE_MARK = "critical (1 catalog write"
# TETHER_KIND_REDUCED=1 (CI): 2 tries of each way instead of 5, the same assertions.
TRIES = 2 if os.environ.get("TETHER_KIND_REDUCED") == "1" else 5
PODS = 3
#: Loose bounds for a shared machine; the goal is 30 s to "none passing".
DOWN_BOUND = 60.0
BACK_BOUND = 60.0
GOAL = 30.0
#: The deadman reads the Lease every 2 s: two more reads must not write again.
SETTLE_SECONDS = 5.0
#: How long the force-delete-only observation watches for an outage.
OBSERVE_SECONDS = 45.0


@pytest.fixture
def deadman(kind_cluster: KindCluster, tmp_path: Path) -> Iterator[None]:
    """The component applied through an overlay of its own; deleted afterwards."""
    overlay = tmp_path / "deadman-overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"components:\n  - {os.path.relpath(COMPONENT, overlay)}\n"
        # The operator's own image, loaded into the cluster: never a registry, and
        # whichever way the base install was made (overlay or install.yaml).
        "images:\n" + kustomize_image(kind_cluster.operator_image())
    )
    kind_cluster.kubectl("apply", "-k", str(overlay))
    try:
        kind_cluster.kubectl("rollout", "status", f"deployment/{DEADMAN}", "-n", OPERATOR_NAMESPACE,
                             "--timeout=180s", timeout=200)
        yield
    finally:
        kind_cluster.kubectl("delete", "-k", str(overlay), "--ignore-not-found", "--timeout=60s",
                             check=False, timeout=90)


def _consul_service(namespace: str, name: str) -> Manifest:
    return {
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "ConsulService",
        "metadata": {"name": APP, "namespace": namespace},
        # A Consul name of this test's own: no other test's instances are counted.
        "spec": {"name": name, "endpoints": {"service": APP, "port": "http"}},
    }


def _passing(consul: Consul, name: str) -> int:
    status, body = _http("GET", f"{consul.url}/v1/health/service/{name}?passing")
    assert status == 200, f"GET /v1/health/service/{name}?passing: {status} {body}"
    return len(body or [])


def _node_checks(consul: Consul) -> list[dict[str, Any]]:
    status, body = _http("GET", f"{consul.url}/v1/health/node/{NODE}")
    assert status == 200, f"GET /v1/health/node/{NODE}: {status} {body}"
    return list(body or [])


def _alive(consul: Consul) -> dict[str, Any]:
    return next((c for c in _node_checks(consul) if c.get("CheckID") == CHECK_ID), {})


def _deadman_writes(kind_cluster: KindCluster) -> int:
    logs = kind_cluster.kubectl("logs", f"deployment/{DEADMAN}", "-n", OPERATOR_NAMESPACE,
                                "--tail=-1", timeout=60).stdout
    return logs.count(WRITE_MARK)


def _deadman_log(kind_cluster: KindCluster) -> str:
    proc = kind_cluster.kubectl("logs", f"deployment/{DEADMAN}", "-n", OPERATOR_NAMESPACE,
                                "--tail=30", check=False, timeout=60)
    return proc.stdout + proc.stderr


def _replicas(kind_cluster: KindCluster) -> int:
    deployment = kind_cluster.get_json("deployment", OPERATOR_DEPLOYMENT, "-n", OPERATOR_NAMESPACE)
    return int(deployment["spec"]["replicas"])


def _scale(kind_cluster: KindCluster, replicas: int) -> None:
    kind_cluster.kubectl("scale", f"deployment/{OPERATOR_DEPLOYMENT}", "-n", OPERATOR_NAMESPACE,
                         f"--replicas={replicas}")


def _force_delete_operator_pods(kind_cluster: KindCluster) -> None:
    # Every Pod of the operator, terminating ones included: a force-delete of a
    # Pod already in its grace period cuts that period short.
    kind_cluster.kubectl("delete", "pods", "-n", OPERATOR_NAMESPACE, "-l", OPERATOR_SELECTOR,
                         "--grace-period=0", "--force", "--wait=false", timeout=60)


def _operator_settled(kind_cluster: KindCluster, replicas: int) -> None:
    kind_cluster.kubectl("rollout", "status", f"deployment/{OPERATOR_DEPLOYMENT}", "-n",
                         OPERATOR_NAMESPACE, "--timeout=180s", timeout=200)
    wait_for(lambda: len(kind_cluster.operator_pods()) == replicas, timeout=120, interval=1,
             message=f"{replicas} operator Pods, none terminating")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


class Outages:
    """Runs one outage at a time and keeps its times."""

    def __init__(self, kind_cluster: KindCluster, consul: Consul, name: str, replicas: int) -> None:
        self.kind_cluster = kind_cluster
        self.consul = consul
        self.name = name
        self.replicas = replicas
        self.down: list[float] = []
        self.back: list[float] = []

    def run(self, label: str, stop: Callable[[], None]) -> None:
        writes_before = _deadman_writes(self.kind_cluster)
        indexes = {int(_alive(self.consul).get("ModifyIndex") or 0)}
        stopped = time.monotonic()
        stop()

        def none_passing() -> bool:
            indexes.add(int(_alive(self.consul).get("ModifyIndex") or 0))
            return _passing(self.consul, self.name) == 0

        wait_for(none_passing, timeout=DOWN_BOUND, interval=0.25,
                 message=f"{label}: no instance passing\n--- deadman log:\n"
                 f"{_deadman_log(self.kind_cluster)}")
        self.down.append(time.monotonic() - stopped)
        # Two more of the deadman's reads: it must not write again.
        settle = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < settle:
            indexes.add(int(_alive(self.consul).get("ModifyIndex") or 0))
            time.sleep(0.25)
        made = _deadman_writes(self.kind_cluster) - writes_before
        check = _alive(self.consul)
        assert check.get("Status") == "critical", check
        assert made == 1, f"{label}: the deadman made {made} catalog writes\n" \
            f"{_deadman_log(self.kind_cluster)}"
        assert len(indexes) == 2, f"{label}: the check changed {len(indexes) - 1} times: {sorted(indexes)}"
        # O(1): the instances' own checks were not touched.
        own = [c for c in _node_checks(self.consul) if c.get("ServiceID")
               and c.get("ServiceName") == self.name]
        assert len(own) == PODS and all(c["Status"] == "passing" for c in own), own

        restarted = time.monotonic()
        _scale(self.kind_cluster, self.replicas)
        wait_for(lambda: _passing(self.consul, self.name) == PODS, timeout=BACK_BOUND, interval=0.25,
                 message=f"{label}: all {PODS} instances passing again\n"
                 f"{self.kind_cluster.describe(OPERATOR_NAMESPACE)}")
        self.back.append(time.monotonic() - restarted)
        print(f"{label}: none passing {self.down[-1]:.1f} s after the stop (deadman writes: {made}); "
              f"all {PODS} passing {self.back[-1]:.1f} s after scaling back to {self.replicas}")
        # Both replicas up (a standby as well) before the next outage.
        _operator_settled(self.kind_cluster, self.replicas)
        assert _alive(self.consul).get("Status") == "passing"


def _observe_force_delete(kind_cluster: KindCluster, consul: Consul, name: str, replicas: int) -> None:
    """Force-delete every operator Pod, nothing else: printed, asserted only loosely."""
    writes_before = _deadman_writes(kind_cluster)
    holder_before = kind_cluster.lease_holder()
    deleted = time.monotonic()
    _force_delete_operator_pods(kind_cluster)
    lowest, zero_at = PODS, None
    deadline = deleted + OBSERVE_SECONDS
    while time.monotonic() < deadline:
        count = _passing(consul, name)
        if count < lowest:
            lowest = count
        if count == 0 and zero_at is None:
            zero_at = time.monotonic() - deleted
        time.sleep(0.25)
    _operator_settled(kind_cluster, replicas)
    wait_for(lambda: _passing(consul, name) == PODS, timeout=BACK_BOUND, interval=0.25,
             message="all instances passing after the force-delete")
    made = _deadman_writes(kind_cluster) - writes_before
    # A new Pod leads (at once after a release, else once the Lease runs out).
    holder = wait_for(lambda: kind_cluster.lease_holder() in kind_cluster.operator_pods()
                      and kind_cluster.lease_holder(), timeout=60, interval=1,
                      message="one of the new operator Pods to hold the Lease")
    tripped = f"none passing after {zero_at:.1f} s" if zero_at is not None else "never none passing"
    print(f"force-delete only: {tripped} (lowest {lowest} of {PODS} in {OBSERVE_SECONDS:.0f} s); "
          f"deadman writes {made}; Lease holder {holder_before} -> {holder}")
    assert made <= 1, f"the deadman wrote {made} times for one outage\n{_deadman_log(kind_cluster)}"
    assert holder != holder_before, "the force-deleted leader still holds the Lease"


def test_instances_stop_passing_when_the_operator_is_gone(
    kind_cluster: KindCluster, consul: Consul, namespace: str, deadman: None
) -> None:
    name = f"dm-{namespace}"
    replicas = _replicas(kind_cluster)
    assert replicas >= 1, "the operator Deployment is scaled to 0 already"
    kind_cluster.apply(*_workload(namespace, replicas=PODS))
    _settled_pods(kind_cluster, namespace, PODS)
    kind_cluster.apply(_consul_service(namespace, name))
    kind_cluster.wait_ready("consulservice", APP, namespace)
    wait_for(lambda: _passing(consul, name) == PODS and _alive(consul).get("Status") == "passing",
             timeout=60, interval=0.25, message=f"{PODS} instances passing and {CHECK_ID} passing")

    outages = Outages(kind_cluster, consul, name, replicas)

    def scale_to_zero() -> None:
        _scale(kind_cluster, 0)

    def scale_to_zero_and_force_delete() -> None:
        _scale(kind_cluster, 0)
        # Once the ReplicaSet has marked every Pod for deletion (before that, a
        # force-deleted Pod would be replaced), cut their grace period to nothing.
        wait_for(lambda: not kind_cluster.operator_pods(), timeout=30, interval=0.1,
                 message="every operator Pod terminating")
        _force_delete_operator_pods(kind_cluster)

    try:
        for attempt in range(TRIES):
            outages.run(f"(a) scaled to 0, try {attempt + 1}", scale_to_zero)
        scaled_down = list(outages.down)
        _observe_force_delete(kind_cluster, consul, name, replicas)
        for attempt in range(TRIES):
            outages.run(f"(b) scaled to 0 + force-deleted, try {attempt + 1}",
                        scale_to_zero_and_force_delete)
    finally:
        # Whatever failed: the operator back at its replicas, so the namespace's
        # finalizers are released and the next test finds it as it was.
        _scale(kind_cluster, replicas)
        _operator_settled(kind_cluster, replicas)

    forced = outages.down[len(scaled_down):]
    for label, times in (("(a) scale to 0", scaled_down), ("(b) scale to 0 + force-delete", forced),
                         ("back after scaling up", outages.back)):
        print(f"{label}: {len(times)} tries, p50 {statistics.median(times):.1f} s, "
              f"max {max(times):.1f} s")
    print(f"load average: {_loadavg()}; goal: none passing within {GOAL:.0f} s")
    assert max(outages.down) <= DOWN_BOUND, outages.down
    assert max(outages.back) <= BACK_BOUND, outages.back
