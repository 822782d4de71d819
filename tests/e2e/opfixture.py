"""The operator as a real process, plus what e2e tests share: namespaces, Consul, etcd.

Import the fixtures into a test module with
``from opfixture import operator, namespace  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import kubectl, wait_for

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """``tether run`` in a subprocess, logging to a file."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        args: tuple[str, ...] = ("-A",),
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.env = {**os.environ, **env, **(extra_env or {})}
        self.log_path = log_path
        self.args = args
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        tether = Path(sys.executable).with_name("tether")
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                str(tether),
                "run",
                *self.args,
                "--metrics-port",
                str(self.metrics_port),
                "--health-port",
                str(self.health_port),
                "--verbose",
            ],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        wait_for(self._metrics_up, timeout=60, interval=0.3, message=f"operator metrics ({self.log_tail()})")
        return self

    def _metrics_up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            self.metrics()
            return True
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def metrics(self) -> dict[str, float]:
        """Prometheus text as {'name{labels}': value}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = float(value)
        return out

    def writes(self) -> dict[str, float]:
        m = self.metrics()
        return {
            system: m.get(f'tether_backend_writes_total{{system="{system}"}}', 0.0)
            for system in ("consul", "etcd", "kubernetes")
        }

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def operator(dev_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    # The shared operator serves the per-test namespaces ("t-…") only, so tests
    # that run their own operator (ACL, RBAC, leader election) use other names.
    proc = OperatorProcess(dev_env, log, args=("-n", "t-*")).start()
    yield proc
    proc.stop()


@pytest.fixture
def namespace(dev_env: dict[str, str]) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (the operator releases finalizers)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl(dev_env, "create", "namespace", name)
    yield name
    # The dev stack runs no namespace controller, so a namespace's contents are
    # never deleted with it: delete Tether's resources first, so their Consul
    # registrations and etcd keys are cleaned up by the operator.
    kubectl(
        dev_env, "delete", "consulservices,etcdconfigs", "--all", "-n", name, "--timeout=60s", check=False
    )
    kubectl(dev_env, "delete", "namespace", name, "--wait=false", check=False)


# -- Kubernetes -------------------------------------------------------------


def apply(env: Mapping[str, str], namespace: str, obj: dict[str, Any]) -> None:
    obj.setdefault("metadata", {})["namespace"] = namespace
    kubectl(dict(env), "apply", "-f", "-", input=yaml.safe_dump(obj))


def get(env: Mapping[str, str], namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    done = kubectl(dict(env), "get", kind, name, "-n", namespace, "-o", "json", check=False)
    if done.returncode != 0:
        return None
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def condition(obj: Mapping[str, Any] | None, type_: str = "Ready") -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def events(env: Mapping[str, str], namespace: str, name: str) -> list[dict[str, Any]]:
    done = kubectl(
        dict(env),
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.name={name}",
        "-o",
        "json",
    )
    items: list[dict[str, Any]] = json.loads(done.stdout)["items"]
    return items


def diagnose(env: Mapping[str, str], namespace: str, kind: str, name: str, op: OperatorProcess | None) -> str:
    """What a person needs when a wait fails: status, events, operator log tail."""
    obj = get(env, namespace, kind, name)
    evs = [f"{e.get('reason')}: {e.get('message')}" for e in events(env, namespace, name)][-10:]
    return (
        f"\n--- {kind}/{name} status:\n{json.dumps((obj or {}).get('status'), indent=1)}"
        f"\n--- events:\n" + "\n".join(evs) + (f"\n--- operator log:\n{op.log_tail()}" if op else "")
    )


def wait_condition(
    env: Mapping[str, str],
    namespace: str,
    kind: str,
    name: str,
    *,
    status: str = "True",
    reason: str | None = None,
    type_: str = "Ready",
    timeout: float = 30,
    op: OperatorProcess | None = None,
) -> dict[str, Any]:
    """Wait until a condition has ``status`` (and ``reason``) at the current generation."""
    last: dict[str, Any] = {}

    def check() -> bool:
        obj = get(env, namespace, kind, name)
        if obj is None:
            return False
        last.clear()
        last.update(obj)
        cond = condition(obj, type_)
        return (
            cond.get("status") == status
            and (reason is None or cond.get("reason") == reason)
            and (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]
        )

    try:
        wait_for(
            check, timeout=timeout, interval=0.2, message=f"{kind}/{name} {type_}={status} {reason or ''}"
        )
    except Exception as exc:
        raise AssertionError(f"{exc}{diagnose(env, namespace, kind, name, op)}") from None
    return last


def wait_gone(env: Mapping[str, str], namespace: str, kind: str, name: str, timeout: float = 30) -> None:
    wait_for(
        lambda: get(env, namespace, kind, name) is None,
        timeout=timeout,
        interval=0.2,
        message=f"{kind}/{name} to be deleted",
    )


# -- Consul -------------------------------------------------------------------


def consul(env: Mapping[str, str], method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    url = env["CONSUL_HTTP_ADDR"].rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    return json.loads(text) if text.strip() else None


def consul_service(env: Mapping[str, str], service_id: str) -> dict[str, Any] | None:
    result: dict[str, Any] | None = consul(env, "GET", f"/v1/agent/service/{service_id}")
    return result


def consul_checks(env: Mapping[str, str], service_id: str) -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = consul(env, "GET", "/v1/agent/checks") or {}
    return {k: v for k, v in checks.items() if v.get("ServiceID") == service_id}
