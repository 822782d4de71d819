"""Tracing: off costs nothing (no import), on gives one trace per reconcile with child
spans for backend calls, and JSON log lines carry the trace ID."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tether import tracing
from tether.api import FINALIZER, ObjectRef
from tether.clients.consul.client import ConsulClient, ConsulUnavailable
from tether.clients.consul.connection import ConsulConnection
from tether.clients.etcd.client import EtcdClient
from tether.clients.etcd.connection import EtcdConnection
from tether.clients.etcd.errors import EtcdUnavailable
from tether.logs import JsonFormatter
from tether.reconciling import Controller, Outcome, Resource

# ------------------------------------------------------------------------------ off


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "tether"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console, OTLP"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, False),
    ],
)
def test_only_the_standard_variables_turn_tracing_on(env: dict[str, str], on: bool) -> None:
    assert tracing.wanted(env) is on


# Imports every module of the operator, runs the tracing helpers the way the
# operator does (a reconcile's span, a decorated backend call, a JSON log line),
# then prints whether anything from opentelemetry was loaded.
_PROBE = textwrap.dedent(
    """
    import asyncio, importlib, logging, pkgutil, sys
    import tether
    for module in pkgutil.walk_packages(tether.__path__, "tether."):
        importlib.import_module(module.name)
    from tether import logs, tracing

    on = tracing.configure()

    @tracing.traced(lambda n: ("call", {"n": n}))
    async def call(n: int) -> int:
        return n + 1

    async def reconcile() -> int:
        with tracing.span("reconcile things", kind="Thing", name="a"):
            tracing.annotate(result="ready")
            async with tracing.child("inner"):
                return await call(1)

    assert asyncio.run(reconcile()) == 2
    line = logs.JsonFormatter().format(logging.LogRecord("t", 20, "probe", 1, "m", None, None))
    assert ("trace_id" in line) is False
    print(on, "opentelemetry" in sys.modules, any(m.startswith("opentelemetry") for m in sys.modules))
    """
)


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_off_imports_nothing_from_opentelemetry() -> None:
    assert _probe() == "False False False"


def test_the_probe_would_see_opentelemetry_when_on() -> None:
    # The same probe with tracing on loads the SDK: the check above can fail.
    # (Nothing listens on port 9; the exporter only queues, and drops at exit.)
    assert _probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9") == "True True True"


# ------------------------------------------------------------------------------- on


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure(exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()
    assert not tracing.enabled()


def _by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


async def test_children_link_to_their_root_and_attributes_are_kept(spans: InMemorySpanExporter) -> None:
    @tracing.traced(lambda key, **_: (f"get {key}", {"key": key}))
    async def backend_get(key: str, *, fail: bool = False) -> str:
        if fail:
            raise EtcdUnavailable("down")
        return key.upper()

    with tracing.span("reconcile things", kind="Thing", namespace="ns", name="a") as root:
        assert await backend_get("x") == "X"
        with pytest.raises(EtcdUnavailable):
            await backend_get("y", fail=True)
        root.set("generation", 3)
        tracing.annotate(result="ready")
    found = _by_name(spans)
    assert set(found) == {"reconcile things", "get x", "get y"}
    top = found["reconcile things"]
    assert top.parent is None
    assert dict(top.attributes or {}) == {
        "kind": "Thing", "namespace": "ns", "name": "a", "generation": 3, "result": "ready",
    }
    for name in ("get x", "get y"):
        child = found[name]
        assert child.parent is not None and child.parent.span_id == top.context.span_id
        assert child.context.trace_id == top.context.trace_id
    failed = found["get y"]
    assert failed.status.status_code is StatusCode.ERROR
    assert (failed.attributes or {})["error.type"] == "EtcdUnavailable"
    assert found["get x"].status.status_code is not StatusCode.ERROR


async def test_backend_calls_outside_a_reconcile_make_no_trace(spans: InMemorySpanExporter) -> None:
    # The watchers' long polls belong to no reconcile: they must not flood the
    # receiver with one-span traces.
    @tracing.traced(lambda: ("poll", {}))
    async def poll() -> None:
        return None

    await poll()
    with tracing.child("inner"):
        tracing.annotate(result="x")
    assert tracing.current_ids() is None
    assert spans.get_finished_spans() == ()


async def test_concurrent_reconciles_are_separate_traces(spans: InMemorySpanExporter) -> None:
    @tracing.traced(lambda who: (f"call {who}", {}))
    async def call(who: str) -> None:
        await asyncio.sleep(0.01)

    async def reconcile(who: str) -> None:
        with tracing.span(f"reconcile {who}"):
            await call(who)

    await asyncio.gather(reconcile("a"), reconcile("b"))
    found = _by_name(spans)
    for who in ("a", "b"):
        parent = found[f"call {who}"].parent
        assert parent is not None and parent.span_id == found[f"reconcile {who}"].context.span_id


def test_json_lines_carry_the_ids_of_the_current_span(spans: InMemorySpanExporter) -> None:
    formatter = JsonFormatter()

    def line() -> dict[str, Any]:
        record = logging.LogRecord("tether", logging.INFO, __file__, 1, "hello %s", ("x",), None)
        return dict(json.loads(formatter.format(record)))

    assert "trace_id" not in line()
    with tracing.span("reconcile things"):
        ids = tracing.current_ids()
        inside = line()
    assert ids is not None
    assert (inside["trace_id"], inside["span_id"]) == ids
    assert len(inside["trace_id"]) == 32 and len(inside["span_id"]) == 16
    (root,) = spans.get_finished_spans()
    assert int(inside["trace_id"], 16) == root.context.trace_id
    assert inside["message"] == "hello x"


async def test_a_consul_call_is_a_child_span_named_without_its_arguments(
    spans: InMemorySpanExporter,
) -> None:
    client = ConsulClient(ConsulConnection(port=9, timeout=0.5))
    try:
        with tracing.span("reconcile consulservices"), pytest.raises(ConsulUnavailable):
            await client.service("web-1")
    finally:
        await client.close()
    found = _by_name(spans)
    call = found["consul read of service"]
    assert (call.attributes or {})["tether.call"] == "read of service 'web-1'"
    assert call.parent is not None
    assert call.parent.span_id == found["reconcile consulservices"].context.span_id


async def test_an_etcd_call_is_a_child_span_per_rpc(spans: InMemorySpanExporter) -> None:
    client = EtcdClient(EtcdConnection(endpoints=("http://127.0.0.1:9",), timeout=0.5))
    try:
        with tracing.span("reconcile etcdconfigs"), pytest.raises(EtcdUnavailable):
            await client.get(b"/k")
    finally:
        await client.close()
    call = _by_name(spans)["etcd kv.Range"]
    assert dict(call.attributes or {}) | {"error.type": ""} == {
        "rpc.system": "grpc", "rpc.service": "kv", "rpc.method": "Range", "error.type": "",
    }
    assert call.status.status_code is StatusCode.ERROR


class _Kube:
    """The Kubernetes writes of one reconcile, each a traced call as KubeHttp's are."""

    def __init__(self) -> None:
        self.rv = 10

    @tracing.traced(lambda _self, ref, *_, **__: ("kubernetes PATCH consulservices/status", {}))
    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        meta = {"namespace": ref.namespace, "name": ref.name, "resourceVersion": str(self.rv),
                "generation": 7, "finalizers": [FINALIZER]}
        return {"metadata": meta, "status": status}

    async def event(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Ready:
    kind = "ConsulService"
    plural = "consulservices"

    async def apply(self, res: Resource) -> Outcome:
        return Outcome("True", "Reconciled", "ok")

    async def release(self, res: Resource) -> Outcome:
        raise AssertionError("not deleting")

    def forget(self, ref: ObjectRef) -> None:
        pass


async def test_a_controller_worker_makes_one_trace_per_reconcile(spans: InMemorySpanExporter) -> None:
    ctl = Controller(_Ready(), _Kube(), workers=1)  # type: ignore[arg-type]
    meta = {"namespace": "ns", "name": "web", "resourceVersion": "5", "generation": 7,
            "finalizers": [FINALIZER]}
    ctl.observe("ADDED", {"metadata": meta, "spec": {}})
    ctl.start()
    try:
        for _ in range(200):
            if ctl.processed:
                break
            await asyncio.sleep(0.01)
    finally:
        await ctl.stop()
    assert ctl.processed == 1
    found = _by_name(spans)
    root = found["reconcile consulservices"]
    assert root.parent is None
    assert dict(root.attributes or {}) == {
        "kind": "ConsulService", "namespace": "ns", "name": "web", "generation": 7, "result": "ready",
    }
    patch = found["kubernetes PATCH consulservices/status"]
    assert patch.parent is not None and patch.parent.span_id == root.context.span_id


@pytest.mark.parametrize(
    ("what", "name"),
    [
        ("registration of 'web-1'", "consul registration"),
        ("read of checks of 'a b'", "consul read of checks"),
        ("deregistration of ['a', 'b']", "consul deregistration"),
        ("KV transaction of 12 operations", "consul KV transaction of operations"),
        ("list of KV keys under '/app/'", "consul list of KV keys"),
        ("read of the agent's own configuration", "consul read of the agent's own configuration"),
    ],
)
def test_consul_span_names_leave_out_names_and_counts(what: str, name: str) -> None:
    # One span name per kind of call, as tracing back ends group by it; the
    # call with its names stays in an attribute.
    from tether.clients.consul.client import _span_of

    assert _span_of(what, "http://127.0.0.1:8500") == (
        name, {"tether.call": what, "server.address": "http://127.0.0.1:8500"},
    )
