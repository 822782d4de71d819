"""The benchmark's gated rollout against the operator it measures.

The bench plays the kubelet and the EndpointSlice controller for fake gated
Pods, and counts the gate patches Tether made from its log lines. Both only
measure something if they match what the operator reads and writes: these
tests tie them to ``tether.consulservice.gates`` and ``gating`` so that a
change there breaks here instead of making the bench count zero or time out.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from benchmarks import endpoints as bench
from tether.api import ObjectRef
from tether.clients.kube.client import KubeNotFound, KubeRejected
from tether.consulservice import gates
from tether.consulservice.gating import Decisions, Gating
from tether.consulservice.index import GateIndex


def _kubelet_pod(generation: int, s: int, e: int, uid: str) -> dict[str, Any]:
    pod = bench.pod_body(generation, s, e)
    pod["metadata"]["uid"] = uid
    return {**pod, **bench.kubelet_status(generation, s, e)}


def test_the_bench_pods_are_gated_and_containers_ready_for_the_operator() -> None:
    assert bench.GATE == gates.GATE
    view = gates.slim(_kubelet_pod(3, 7, 2, "u-1"))
    assert view is not None
    assert view.name == bench.pod_name(3, 7, 2) and view.uid == "u-1"
    assert view.containers_ready and view.condition is None
    # Endpoint health follows ContainersReady, although the slice says not ready.
    (ep,) = [e for e in bench.gated_endpoints_of(3, 7, 3, {
        bench.pod_name(3, 7, e): f"u-{e}" for e in range(3)
    }) if e["targetRef"]["name"] == view.name]
    assert ep["conditions"]["ready"] is False and ep["targetRef"]["uid"] == "u-2"
    assert ep["addresses"] == [bench.address(3, 7, 2)]
    assert gates.endpoint_health(view, ep["conditions"])[0] == "passing"


def test_gate_open_reads_only_the_gates_true() -> None:
    pod = _kubelet_pod(1, 0, 0, "u")
    assert not bench.gate_open(pod)
    pod["status"]["conditions"].append({"type": gates.GATE, "status": "False"})
    assert not bench.gate_open(pod)
    pod["status"]["conditions"][-1]["status"] = "True"
    assert bench.gate_open(pod)


class _Pods:
    def __init__(self, refuse: dict[str, type[Exception]]) -> None:
        self.refuse = refuse

    async def gated(self, namespace: str) -> dict[str, gates.Pod]:
        return {}

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        if name in self.refuse:
            raise self.refuse[name]("no", 404 if self.refuse[name] is KubeNotFound else 403)


async def test_gate_patches_counts_the_operators_own_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Each successful patch is counted once, by status; refused and vanished Pods are not."""
    gating = Gating(_Pods({"gone": KubeNotFound, "refused": KubeRejected}), GateIndex())
    opened = gates.Condition("True", gates.PASSING, "Consul reports instance x passing (really)", "t")
    closed = gates.Condition("False", gates.NOT_PASSING, "Consul reports instance y is not registered", "t")
    patches = [
        gates.Patch("a", "ua", opened), gates.Patch("b", "ub", closed), gates.Patch("c", "uc", opened),
        gates.Patch("gone", "ug", opened), gates.Patch("refused", "ur", closed),
    ]
    with caplog.at_level(logging.INFO, logger="tether.consulservice.gating"):
        failures = await gating.apply(Decisions(ObjectRef("consulservices", "bench-ep", "ep-0000"), patches))
    assert len(failures) == 1
    # The operator's JSON log format: one object per line, the message as a string.
    text = "\n".join(json.dumps({"level": "info", "message": r.getMessage()}) for r in caplog.records)
    text += "\n" + json.dumps({"message": "something else set to True (unrelated)"})
    assert bench.gate_patches(text) == {"total": 3, "to_true": 2, "to_false": 1}


def test_the_price_compares_the_two_rollouts_of_one_run_and_only_when_both_completed() -> None:
    ungated = {"endpoints_replaced": 100, "seconds": 0.5, "writes": {"consul": 5, "kubernetes": 0}}
    gated = {
        "endpoints_replaced": 100, "seconds": 3.75, "writes": {"consul": 8, "kubernetes": 202},
        "gate_patches": {"total": 200, "to_true": 100, "to_false": 100},
    }
    price = bench.gate_price(ungated, gated)
    assert price == {
        "endpoints": 100, "extra_seconds": 3.25, "seconds": {"ungated": 0.5, "gated": 3.75},
        "consul_writes": {"ungated": 5, "gated": 8}, "kubernetes_writes": {"ungated": 0, "gated": 202},
        "gate_patches": 200,
    }
    assert bench.gate_price(ungated, {**gated, "seconds": None}) is None
    assert bench.gate_price({}, gated) is None
    lines = bench.table({"rollout": ungated, "gated_rollout": gated, "gate_price": price})
    assert any("price of the gate: +3.25 s" in line and "202 vs 0" in line for line in lines)
