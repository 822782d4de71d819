"""The fault suite's own instruments: the stack it breaks and the Kubernetes client it retries with.

Everything here is synchronous and bounded: every call has a timeout, every wait
has a deadline, so a test that meets a hung Consul (SIGSTOP) or a dead API server
fails with a message instead of hanging CI.

- :class:`FaultStack` — a private dev stack (its own state directory, never the
  shared ``.tether/dev``) with ``kill`` / ``pause`` / ``resume`` / ``restart`` per
  component. ``restart`` is ``DevStack.up()``: it starts whatever is down on the
  same ports, as ``tether dev up`` does.
- :class:`Kube` — the Kubernetes client with the bounded retry a careful client
  uses while the API server restarts.

The operator process (``OperatorProcess``: SIGKILL, SIGSTOP, restart on the same
ports), the Consul and etcd readers and ``wait_for`` are ``tether_dev.harness``'s, shared
with the end-to-end suite and the benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
from kubernetes.client.exceptions import ApiException

from tether_dev import processes
from tether_dev.harness.waiting import wait_for
from tether_dev.stack import CONSUL, ETCD, KUBE_APISERVER, DevStack

T = TypeVar("T")

GROUP = "tether.dev"
VERSION = "v1alpha1"
FINALIZER = "tether.dev/cleanup"
POLICIES = "tetherpolicies"
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


# ----------------------------------------------------------------- Kubernetes


class Kube:
    """The Kubernetes API through the official client; one ApiClient per thread.

    Calls raise as the client does; :meth:`retrying` wraps one in the bounded
    retry a careful client uses while the API server restarts.
    """

    PLURALS = {"cs": "consulservices", "ec": "etcdconfigs", "cc": "consulconfigs"}
    KINDS = {"cs": "ConsulService", "ec": "EtcdConfig", "cc": "ConsulConfig"}

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

    @property
    def discovery(self) -> Any:
        return kubernetes.client.DiscoveryV1Api(self._api())

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

    # --- TetherPolicy (cluster-scoped) ---------------------------------------
    def put_policy(self, name: str, spec: Mapping[str, Any]) -> None:
        """Create TetherPolicy ``name`` or replace its spec."""
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TetherPolicy",
                "metadata": {"name": name}, "spec": dict(spec)}
        try:
            self.custom.create_cluster_custom_object(GROUP, VERSION, POLICIES, body, _request_timeout=15)
        except ApiException as exc:
            if exc.status != 409:
                raise
            patch = [{"op": "replace", "path": "/spec", "value": dict(spec)}]
            self.custom.patch_cluster_custom_object(
                GROUP, VERSION, POLICIES, name, patch,
                _content_type="application/json-patch+json", _request_timeout=15,
            )

    def delete_policy(self, name: str) -> None:
        try:
            self.custom.delete_cluster_custom_object(GROUP, VERSION, POLICIES, name, _request_timeout=15)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def label_namespace(self, name: str, key: str, value: str | None) -> None:
        """Set (or with None remove) one label of namespace ``name``."""
        patch = {"metadata": {"labels": {key: value}}}
        self.core.patch_namespace(name, patch, _request_timeout=15)

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


__all__ = [
    "CLUSTER",
    "CONSUL",
    "ETCD",
    "FINALIZER",
    "HTTP_TIMEOUT",
    "KUBE_APISERVER",
    "OWNERSHIP_PREFIX",
    "REDUCED",
    "FaultStack",
    "Kube",
    "log",
]
