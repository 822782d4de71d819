"""The fault suite's instruments: the stack it breaks, the operator it kills, the clients it reads with.

Everything here is synchronous and bounded: every HTTP call has a timeout, every
wait has a deadline, so a test that meets a hung Consul (SIGSTOP) or a dead API
server fails with a message instead of hanging CI.

- :class:`FaultStack` — a private dev stack (its own state directory, never the
  shared ``.tether/dev``) with ``kill`` / ``pause`` / ``resume`` / ``restart`` per
  component. ``restart`` is ``DevStack.up()``: it starts whatever is down on the
  same ports, as ``tether dev up`` does.
- :class:`Operator` — ``tether run -A`` as a subprocess with its own log, which
  can be SIGKILLed, SIGSTOPped and started again on the same ports.
- :class:`Kube`, :class:`Consul`, :class:`Etcd` — small clients for the three
  systems, as a user (or an auditor) would read them: the Kubernetes client,
  Consul's agent HTTP API, etcd's JSON gateway.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
from kubernetes.client.exceptions import ApiException

from tether.devstack import processes
from tether.devstack.stack import CONSUL, ETCD, KUBE_APISERVER, DevStack

T = TypeVar("T")

GROUP = "tether.dev"
VERSION = "v1alpha1"
FINALIZER = "tether.dev/cleanup"
#: The cluster name the operator writes into ownership markers (its default).
CLUSTER = "kubernetes"
#: Where the operator records etcd ownership (its default).
OWNERSHIP_PREFIX = "/tether/"

#: TETHER_FAULTS_REDUCED=1: the CI form, fewer operations and shorter pauses.
REDUCED = os.environ.get("TETHER_FAULTS_REDUCED", "") not in ("", "0")

#: Bound on one HTTP request of the test's own clients. Short, because a paused
#: Consul must cost a read a few seconds, not the whole test.
HTTP_TIMEOUT = 5.0


def log(message: str) -> None:
    """One timestamped line on stdout (the suite runs with ``-s``)."""
    print(f"[faults {time.strftime('%H:%M:%S')}] {message}", flush=True)


def wait_for(predicate: Callable[[], T], *, timeout: float, interval: float = 0.5, message: str) -> T:
    """Poll ``predicate`` until it returns something truthy; raise after ``timeout`` s.

    An exception from the predicate counts as "not yet": a server may be restarting.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message}: not true after {timeout:.0f} s (last: {last!r})")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ the stack


class FaultStack:
    """A private dev stack that a test may break.

    ``kill`` sends SIGKILL (no chance to flush or deregister, like a crash),
    ``pause``/``resume`` send SIGSTOP/SIGCONT (the process keeps its sockets, so
    requests hang instead of being refused), ``restart`` brings everything that
    is down back on the same ports.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.dev = DevStack(state_dir, progress=lambda msg: None)
        self._lock = threading.Lock()
        self.paused: set[str] = set()

    def up(self) -> float:
        started = time.monotonic()
        with self._lock:
            self.dev.up()
        return time.monotonic() - started

    @property
    def env(self) -> dict[str, str]:
        return self.dev.env()

    def pid(self, component: str) -> int:
        found = self.dev.components()[component]
        if found.pid is None or not found.running:
            raise AssertionError(f"{component} is not running")
        return found.pid

    def running(self, component: str) -> bool:
        return self.dev.components()[component].running

    def kill(self, component: str) -> int:
        """SIGKILL ``component`` and wait until it is gone; return its pid."""
        found = self.dev.components()[component]
        if found.pid is None or not found.running:
            raise AssertionError(f"cannot kill {component}: not running")
        os.kill(found.pid, signal.SIGKILL)
        wait_for(
            lambda: not processes.is_running(found.pid, found.argv),
            timeout=10,
            interval=0.05,
            message=f"{component} (pid {found.pid}) to die",
        )
        return found.pid

    def restart(self) -> float:
        """``tether dev up``: start whatever is down, wait until all answer; return seconds."""
        if self.paused:
            # up() would probe a stopped process until its own timeout.
            raise AssertionError(f"restart while {sorted(self.paused)} paused")
        return self.up()

    def ensure_up(self) -> None:
        """Restart only if something is down (``up`` also re-applies the CRDs: seconds)."""
        if not all(c.running for c in self.dev.components().values()):
            self.restart()

    def pause(self, component: str) -> int:
        pid = self.pid(component)
        os.kill(pid, signal.SIGSTOP)
        self.paused.add(component)
        return pid

    def resume(self, component: str) -> None:
        found = self.dev.components()[component]
        if found.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(found.pid, signal.SIGCONT)
        self.paused.discard(component)

    def resume_all(self) -> None:
        for component in list(self.paused):
            self.resume(component)

    def down(self) -> None:
        self.resume_all()
        self.dev.down()


# --------------------------------------------------------------- the operator


class Operator:
    """``tether run -A`` as a subprocess of this test, logging to ``log_path``.

    The ports are chosen once, so a restarted operator serves metrics where the
    killed one did. ``starts`` counts processes, for the report.
    """

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, timeout: float = 90.0) -> Operator:
        tether = Path(sys.executable).with_name("tether")
        with self.log_path.open("ab") as out:
            out.write(f"\n--- {time.strftime('%H:%M:%S')} starting the operator\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [
                    str(tether),
                    "run",
                    "-A",
                    "--metrics-port",
                    str(self.metrics_port),
                    "--health-port",
                    str(self.health_port),
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        wait_for(self._serving, timeout=timeout, interval=0.3, message=f"operator metrics\n{self.log_tail()}")
        return self

    def _serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            self.metrics()
        except OSError:
            return False
        return True

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no last status patch, like an OOM kill."""
        if self.proc is None:
            return
        self._signal(signal.SIGCONT)  # a stopped process cannot die until continued
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = float(value)
        return out

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no operator log)"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# ----------------------------------------------------------------- Kubernetes


class Kube:
    """The Kubernetes API through the official client; one ApiClient per thread.

    Calls raise as the client does; :meth:`retrying` wraps one in the bounded
    retry a careful client uses while the API server restarts.
    """

    PLURALS = {"cs": "consulservices", "ec": "etcdconfigs"}
    KINDS = {"cs": "ConsulService", "ec": "EtcdConfig"}

    def __init__(self, kubeconfig: str) -> None:
        self.kubeconfig = kubeconfig
        self._local = threading.local()

    def _api(self) -> Any:
        api = getattr(self._local, "api", None)
        if api is None:
            api = kubernetes.config.new_client_from_config(config_file=self.kubeconfig)
            self._local.api = api
        return api

    @property
    def custom(self) -> Any:
        return kubernetes.client.CustomObjectsApi(self._api())

    @property
    def core(self) -> Any:
        return kubernetes.client.CoreV1Api(self._api())

    @staticmethod
    def transient(exc: BaseException) -> bool:
        """Worth retrying: the server is away or overloaded, not saying no."""
        if isinstance(exc, ApiException):
            return exc.status in (0, 429, 500, 502, 503, 504)
        return isinstance(exc, OSError) or type(exc).__module__.startswith("urllib3")

    def retrying(self, fn: Callable[[], T], *, timeout: float = 120.0, what: str = "call") -> tuple[T, int]:
        """Run ``fn`` until it succeeds or fails for a reason a retry will not fix.

        Returns its result and how many attempts failed transiently first.
        """
        deadline = time.monotonic() + timeout
        failures = 0
        while True:
            try:
                return fn(), failures
            except Exception as exc:
                if not self.transient(exc) or time.monotonic() >= deadline:
                    raise
                failures += 1
                # A fresh connection pool: the old one may hold sockets to the killed server.
                self._local.api = None
                time.sleep(min(2.0, 0.25 * failures))

    # --- custom resources --------------------------------------------------
    def create(self, kind: str, namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": self.KINDS[kind],
            "metadata": {"name": name, "namespace": namespace},
            "spec": dict(spec),
        }
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, self.PLURALS[kind], body, _request_timeout=15
        )
        return result

    def replace_spec(self, kind: str, namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        # A JSON patch of /spec alone: finalizers, status and other fields stay as they are.
        patch = [{"op": "replace", "path": "/spec", "value": dict(spec)}]
        result: dict[str, Any] = self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            self.PLURALS[kind],
            name,
            patch,
            _content_type="application/json-patch+json",
            _request_timeout=15,
        )
        return result

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, self.PLURALS[kind], name, _request_timeout=15
        )

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, self.PLURALS[kind], name, _request_timeout=15
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def list(self, kind: str, namespaces: set[str] | None = None) -> list[dict[str, Any]]:
        result = self.custom.list_cluster_custom_object(
            GROUP, VERSION, self.PLURALS[kind], _request_timeout=30
        )
        items: list[dict[str, Any]] = result.get("items", [])
        if namespaces is None:
            return items
        return [i for i in items if i["metadata"]["namespace"] in namespaces]

    # --- core ----------------------------------------------------------------
    def ensure_namespace(self, name: str) -> None:
        try:
            self.core.create_namespace({"metadata": {"name": name}}, _request_timeout=15)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def put_config_map(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        body = {"metadata": {"name": name, "namespace": namespace}, "data": dict(data)}
        try:
            self.core.replace_namespaced_config_map(name, namespace, body, _request_timeout=15)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.core.create_namespaced_config_map(namespace, body, _request_timeout=15)

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            cm = self.core.read_namespaced_config_map(name, namespace, _request_timeout=15)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(cm.data or {})

    def events(self, namespace: str, name: str) -> list[str]:
        found = self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}", _request_timeout=15
        )
        return [f"{e.type} {e.reason}: {e.message}" for e in found.items]


def condition(obj: Mapping[str, Any] | None, type_: str) -> dict[str, Any]:
    """The condition ``type_`` of ``obj`` ({} if none)."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def ready(obj: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Ready condition of ``obj`` ({} if none)."""
    return condition(obj, "Ready")


def is_ready(obj: Mapping[str, Any] | None) -> bool:
    """Ready=True at the current generation: the contract's meaning of done."""
    if not obj:
        return False
    status = obj.get("status") or {}
    return ready(obj).get("status") == "True" and status.get("observedGeneration") == obj["metadata"].get(
        "generation"
    )


# --------------------------------------------------------------------- Consul


class Consul:
    """The Consul agent's HTTP API, with short timeouts (a paused agent hangs)."""

    def __init__(self, addr: str) -> None:
        self.addr = addr.rstrip("/")

    def call(self, method: str, path: str, body: Any = None, *, timeout: float = HTTP_TIMEOUT) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.addr + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return json.loads(text) if text.strip() else None

    def services(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = self.call("GET", "/v1/agent/services") or {}
        return result

    def checks(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = self.call("GET", "/v1/agent/checks") or {}
        return result

    def deregister(self, service_id: str) -> None:
        self.call("PUT", f"/v1/agent/service/deregister/{service_id}")

    def register(self, body: Mapping[str, Any]) -> None:
        self.call("PUT", "/v1/agent/service/register", dict(body))


# ----------------------------------------------------------------------- etcd


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: str) -> bytes:
    """The range end that makes [prefix, end) "every key starting with prefix"."""
    key = bytearray(prefix.encode())
    while key:
        if key[-1] < 0xFF:
            key[-1] += 1
            return bytes(key)
        key.pop()
    return b"\0"


class Etcd:
    """etcd's JSON gateway (the server's own HTTP mapping of the v3 KV API)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint.split(",")[0].rstrip("/")

    def call(self, path: str, body: Mapping[str, Any], *, timeout: float = HTTP_TIMEOUT) -> dict[str, Any]:
        req = urllib.request.Request(self.endpoint + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            result: dict[str, Any] = json.loads(r.read())
        return result

    def range(self, prefix: str) -> tuple[int, dict[str, tuple[str, int]]]:
        """(store revision, {key: (value, mod_revision)}) for every key under ``prefix``."""
        out = self.call("/v3/kv/range", {"key": _b64(prefix.encode()), "range_end": _b64(prefix_end(prefix))})
        kvs = {
            base64.b64decode(kv["key"]).decode(): (
                base64.b64decode(kv.get("value", "")).decode(errors="replace"),
                int(kv["mod_revision"]),
            )
            for kv in out.get("kvs", [])
        }
        return int(out["header"]["revision"]), kvs

    def keys(self, prefix: str) -> dict[str, str]:
        return {k: v for k, (v, _) in self.range(prefix)[1].items()}

    def count(self, prefix: str) -> int:
        out = self.call(
            "/v3/kv/range",
            {"key": _b64(prefix.encode()), "range_end": _b64(prefix_end(prefix)), "count_only": True},
        )
        return int(out.get("count", 0))

    def revision(self) -> int:
        return self.range("\0")[0]

    def put(self, key: str, value: str) -> int:
        out = self.call("/v3/kv/put", {"key": _b64(key.encode()), "value": _b64(value.encode())})
        return int(out["header"]["revision"])

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": _b64(key.encode())})

    def put_if_present(self, key: str, value: str, *, guard: str) -> bool:
        """Put ``key`` only while both it and ``guard`` exist (one transaction)."""
        compare = [
            {"key": _b64(k.encode()), "target": "VERSION", "result": "GREATER", "version": "0"}
            for k in (key, guard)
        ]
        put = {"request_put": {"key": _b64(key.encode()), "value": _b64(value.encode())}}
        out = self.call("/v3/kv/txn", {"compare": compare, "success": [put]})
        return bool(out.get("succeeded"))

    def compact(self, revision: int | None = None) -> int:
        """Compact history up to ``revision`` (default: the current one); return it."""
        rev = revision or self.revision()
        try:
            self.call("/v3/kv/compaction", {"revision": rev}, timeout=30)
        except urllib.error.HTTPError as exc:
            # Already compacted at or past it: the history is gone either way.
            if "compacted" not in exc.read().decode(errors="replace"):
                raise
        return rev


__all__ = [
    "CLUSTER",
    "CONSUL",
    "ETCD",
    "FINALIZER",
    "KUBE_APISERVER",
    "OWNERSHIP_PREFIX",
    "REDUCED",
    "Consul",
    "Etcd",
    "FaultStack",
    "Kube",
    "Operator",
    "condition",
    "is_ready",
    "log",
    "ready",
    "wait_for",
]
