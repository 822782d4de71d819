"""Tracing against a real OTLP receiver: Jaeger's all-in-one, queried for the spans.

The operator runs with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at a Jaeger the test
starts (built from the pinned module ``devbin/jaeger``; the conftest builds it before
any test's timeout starts, and this test is skipped, saying why, only if that build
failed). What a person would check in Jaeger's UI is checked through its query API:
each reconcile is one trace whose root is ``reconcile <plural>`` with the resource's
kind, namespace, name, generation and result, its Kubernetes, Consul and etcd calls
are child spans of that root, the backend watchers' long polls make no traces, and a
trace ID read from a JSON log line leads to its trace.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether_dev.harness.jaeger import Jaeger, spans_by_id
from tether_dev.harness.kube import apply, kubectl, resource, wait_condition
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

pytestmark = pytest.mark.jaeger

SERVICE = "tether"


@pytest.fixture
def jaeger(jaeger_binary: Path, tmp_path: Path) -> Iterator[Jaeger]:
    receiver = Jaeger(jaeger_binary, tmp_path / "jaeger.log").start(timeout=60)
    try:
        yield receiver
    finally:
        receiver.stop()


def _roots(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in spans_by_id(trace).values() if s["parent"] is None]


def _reconcile(
    jaeger: Jaeger, plural: str, namespace: str, name: str, backend: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """A trace of a reconcile of ``name`` that ended Ready and called ``backend`` and Kubernetes."""
    for trace in jaeger.traces(SERVICE):
        spans = spans_by_id(trace)
        for root in _roots(trace):
            tags = root["tags"]
            if root["operationName"] != f"reconcile {plural}" or tags.get("name") != name:
                continue
            if tags.get("namespace") != namespace or tags.get("result") != "ready":
                continue
            children = [s for s in spans.values() if s["parent"] == root["spanID"]]
            names = [c["operationName"] for c in children]
            if any(n.startswith("kubernetes ") for n in names) and any(
                n.startswith(f"{backend} ") for n in names
            ):
                return root, spans
    return None


def test_each_reconcile_is_one_trace_with_its_backend_calls(
    dev_env: dict[str, str], jaeger: Jaeger, tmp_path: Path
) -> None:
    ns = f"x-trace-{uuid.uuid4().hex[:6]}"
    kubectl(dev_env, "create", "namespace", ns)
    log = tmp_path / "operator.log"
    op = OperatorProcess(
        dev_env, log, args=("-n", ns, "--log-format", "json"), verbose=True,
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_endpoint,
            "OTEL_SERVICE_NAME": SERVICE,
            # Batches leave every 0.5 s instead of 5 s: the test waits less.
            "OTEL_BSP_SCHEDULE_DELAY": "500",
        },
    ).start()
    try:
        apply(dev_env, ns, resource("ConsulService", "traced", {"port": 80}))
        prefix = f"/e2e/{uuid.uuid4().hex[:10]}/"
        apply(dev_env, ns, resource("EtcdConfig", "traced-cfg", {"prefix": prefix, "data": {"a": "1"}}))
        service = wait_condition(dev_env, ns, "consulservice", "traced", op=op)
        config = wait_condition(dev_env, ns, "etcdconfig", "traced-cfg", op=op)

        found_service = wait_for(
            lambda: _reconcile(jaeger, "consulservices", ns, "traced", "consul"),
            timeout=30, interval=0.5, message="a ConsulService reconcile trace in Jaeger",
        )
        found_config = wait_for(
            lambda: _reconcile(jaeger, "etcdconfigs", ns, "traced-cfg", "etcd"),
            timeout=30, interval=0.5, message="an EtcdConfig reconcile trace in Jaeger",
        )
        for (root, spans), kind, obj in (
            (found_service, "ConsulService", service),
            (found_config, "EtcdConfig", config),
        ):
            assert root["tags"]["kind"] == kind
            assert root["tags"]["generation"] == obj["metadata"]["generation"]
            # Every span of the trace descends from this one root.
            for span in spans.values():
                assert span["traceID"] == root["traceID"]
                assert span["parent"] is None or span["parent"] in spans, span["operationName"]
            assert [s for s in spans.values() if s["parent"] is None] == [root]

        # One trace per reconcile, and nothing but reconciles: the watchers'
        # blocking queries and watches make no traces of their own. (Waited for:
        # a root ends after its children and may come in the next batch.)
        def one_root_each() -> int:
            traces = jaeger.traces(SERVICE)
            for trace in traces:
                roots = [r["operationName"] for r in _roots(trace)]
                if len(roots) != 1 or not roots[0].startswith("reconcile "):
                    names = sorted(s["operationName"] for s in spans_by_id(trace).values())
                    raise AssertionError(f"trace {trace['traceID']}: roots {roots}, spans {names}")
            return len(traces)

        assert wait_for(one_root_each, timeout=20, interval=1.0, message="one reconcile root per trace") >= 2

        # A trace ID from a JSON log line leads to its trace in Jaeger.
        records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        traced = [r for r in records if r.get("trace_id") and r.get("namespace") == ns]
        assert traced, "no JSON log line carries a trace_id"
        record = traced[0]
        trace = wait_for(
            lambda: jaeger.trace(record["trace_id"]), timeout=30, interval=0.5,
            message=f"trace {record['trace_id']} of a log line in Jaeger",
        )
        assert record["span_id"] in spans_by_id(trace)
        (root,) = _roots(trace)
        assert root["operationName"].startswith("reconcile ")
        assert root["tags"]["name"] == record["name"]
    finally:
        kubectl(dev_env, "delete", "consulservices,etcdconfigs", "--all", "-n", ns, "--timeout=60s",
                check=False)
        op.stop()
        kubectl(dev_env, "delete", "namespace", ns, "--wait=false", check=False)
