"""Metrics, liveness and JSON logs of a running operator."""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

from tether_dev.harness.kube import apply, kubectl, resource, wait_condition
from tether_dev.harness.operator import OperatorProcess


def test_metrics_and_healthz(dev_env: dict[str, str], operator: OperatorProcess, namespace: str) -> None:
    apply(
        dev_env,
        namespace,
        resource("ConsulService", "m", {"port": 80}),
    )
    wait_condition(dev_env, namespace, "consulservice", "m", op=operator)
    metrics = operator.metrics()
    assert metrics['tether_reconciles_total{kind="ConsulService",result="ready"}'] >= 1
    assert metrics['tether_reconcile_duration_seconds_count{kind="ConsulService"}'] >= 1
    assert metrics['tether_backend_up{backend="consul"}'] == 1.0
    assert metrics['tether_managed_objects{kind="ConsulService"}'] >= 1
    assert metrics['tether_backend_writes_total{system="consul"}'] >= 1
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=5) as r:
        assert r.status == 200
        assert json.loads(r.read())["status"] == "ok"
    # Readiness apart from liveness (issue 14): ready once Kopf's watches run.
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.health_port}/readyz", timeout=5) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ready"


def test_json_logs_name_the_resource(dev_env: dict[str, str], tmp_path: Path) -> None:
    ns = f"x-log-{uuid.uuid4().hex[:6]}"
    kubectl(dev_env, "create", "namespace", ns)
    log = tmp_path / "op.log"
    op = OperatorProcess(dev_env, log, args=("-n", ns, "--log-format", "json"), verbose=True).start()
    try:
        apply(
            dev_env,
            ns,
            resource("ConsulService", "logged", {"port": 80}),
        )
        wait_condition(dev_env, ns, "consulservice", "logged", op=op)
        kubectl(dev_env, "delete", "consulservice", "logged", "-n", ns, "--timeout=30s")
    finally:
        op.stop()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) >= len(lines) - 2, "every log line must be JSON"
    about = [r for r in records if "logged" in r.get("message", "")]
    assert about, "no log line about the resource"
    assert all(r.get("namespace") == ns and r.get("name") == "logged" for r in about), about
    # python-json-logger's lines (issue 14): ISO 8601 time with its zone, and a level.
    ours = [r for r in records if r.get("logger", "").startswith("tether")]
    assert ours and all("+00:00" in r["time"] and "T" in r["time"] for r in ours)
    assert all(r.get("level") in ("debug", "info", "warning", "error", "critical") for r in about)
