"""One test's world: its namespaces, workload, model and auditor, plus the waits tests share."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

from audit import Anomaly, Auditor, converge, split
from faultkit import FaultStack, Kube, log
from generator import Decl, Limits, Model, Workload

from tether_dev.harness.consul import Consul
from tether_dev.harness.etcd import Etcd
from tether_dev.harness.kube import condition, is_ready
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for


@dataclass
class Scenario:
    stack: FaultStack
    operator: OperatorProcess
    kube: Kube
    consul: Consul
    etcd: Etcd
    model: Model
    workload: Workload
    auditor: Auditor

    def converge(self, timeout: float) -> tuple[list[Anomaly], float]:
        return converge(self.auditor, timeout=timeout)

    def assert_converged(self, timeout: float, when: str) -> float:
        anomalies, took = self.converge(timeout)
        counted, known = split(anomalies)
        for anomaly in known:
            log(f"known bug seen {when}: {anomaly}")
        assert not counted, self.explain(counted, when)
        return took

    def explain(self, anomalies: list[Anomaly], when: str) -> str:
        lines = [f"{len(anomalies)} anomalies {when}:"] + [f"  - {a}" for a in anomalies[:40]]
        if len(anomalies) > 40:
            lines.append(f"  ... and {len(anomalies) - 40} more")
        lines.append(f"--- operator log tail ({self.operator.log_path}):\n{self.operator.log_tail(60)}")
        return "\n".join(lines)

    def get(self, decl: Decl) -> dict | None:  # type: ignore[type-arg]
        return self.kube.get(decl.kind, decl.namespace, decl.name)

    def wait_ready(self, decls: Iterable[Decl], *, timeout: float, what: str = "Ready") -> float:
        """Wait until every one of ``decls`` is Ready=True at its generation; return seconds."""
        started = time.monotonic()
        pending = list(decls)

        def check() -> bool:
            pending[:] = [d for d in pending if not is_ready(self.get(d))]
            return not pending

        try:
            wait_for(check, timeout=timeout, interval=0.5, message=what)
        except AssertionError:
            detail = "\n".join(f"  {d}: {condition(self.get(d))}" for d in pending[:10])
            raise AssertionError(
                f"{len(pending)} resources not {what} after {timeout:.0f} s:\n{detail}\n"
                f"--- operator log tail:\n{self.operator.log_tail(60)}"
            ) from None
        return time.monotonic() - started

    def delete_all(self) -> None:
        for decl in self.model.live():
            self.workload.delete(decl)


def make_scenario(
    stack: FaultStack,
    operator: OperatorProcess,
    kube: Kube,
    consul: Consul,
    etcd: Etcd,
    *,
    run_id: str,
    seed: int,
    namespaces: int = 2,
    limits: Limits | None = None,
) -> Scenario:
    model = Model(run_id, [f"f{run_id}-{i}" for i in range(namespaces)])
    workload = Workload(kube, etcd, model, random.Random(f"{seed}/workload"), limits=limits)
    workload.prepare()
    log(f"namespaces {model.namespaces}, etcd root {model.root}")
    return Scenario(stack, operator, kube, consul, etcd, model, workload, Auditor(kube, consul, etcd, model))
