"""Plumbing for the kind end-to-end tests: the cluster, port-forwards, Consul and etcd.

The tests run against a kind cluster that ``scripts/e2e-kind.sh`` (``make e2e-kind``)
created and installed: Tether as a Deployment from ``manifests/`` (through the overlay
in ``scripts/kind/overlay/``, or from the release's ``install.yaml`` with
``TETHER_KIND_INSTALL=release``), and a throwaway Consul and etcd from ``scripts/kind/``.
They talk to Kubernetes with ``kubectl`` and to Consul and etcd over their plain HTTP
APIs (etcd's JSON gateway) through ``kubectl port-forward``, so they need nothing but
the standard library, ``kubectl`` and the cluster.

The module name is unique on purpose: ``tests/kind`` is not a package, and pytest puts
its folder on ``sys.path``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

#: The names scripts/e2e-kind.sh and the manifests use.
DEFAULT_CLUSTER = "tether-e2e"
OPERATOR_NAMESPACE = "tether-system"
OPERATOR_DEPLOYMENT = "tether"
OPERATOR_SELECTOR = "app.kubernetes.io/name=tether,app.kubernetes.io/component=operator"
LEASE_NAME = "tether-leader"
CLUSTER_MARKER = "kind-tether-e2e"  # TETHER_CLUSTER_NAME in scripts/kind/overlay/config.yaml
#: The operator image scripts/e2e-kind.sh loads; it has Python, so tests also use it
#: for a small HTTP server (nothing can be pulled on a machine without a registry).
OPERATOR_IMAGE = "tether:e2e"
#: The overlay scripts/e2e-kind.sh installs with `kubectl apply -k` (TETHER_KIND_INSTALL=overlay).
OVERLAY = REPO / "scripts" / "kind" / "overlay"
#: The release's install.yaml when scripts/e2e-kind.sh installed with `kubectl apply -f`
#: (TETHER_KIND_INSTALL=release), else None: what the uninstall test deletes.
INSTALL_FILE = Path(os.environ["TETHER_KIND_INSTALL_FILE"]) \
    if os.environ.get("TETHER_KIND_INSTALL_FILE") else None

Manifest = dict[str, Any]


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.5, message: str
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``message``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
        except Exception as exc:  # a transient error counts as "not yet"
            last_error = exc
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:.0f}s: {message}{detail}")
        time.sleep(interval)


def _run(
    args: list[str], *, timeout: float = 60.0, input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, input=input, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def unavailable_reason(cluster: str) -> str | None:
    """Why the kind tests cannot run here, or None when they can.

    Every missing tool is named at once, so one run tells a person all there is to
    install; the cluster is checked only once the tools are there.
    """
    missing = []
    if shutil.which("docker") is None:
        missing.append("Docker is not installed (no `docker` on PATH)")
    else:
        try:
            info = _run(["docker", "info"], timeout=30)
        except subprocess.TimeoutExpired:
            missing.append("the Docker engine is not reachable (`docker info` timed out)")
        else:
            if info.returncode != 0:
                last = (info.stderr.strip().splitlines() or ["no output"])[-1]
                missing.append(f"the Docker engine is not reachable (`docker info` failed: {last})")
    if shutil.which("kind") is None:
        missing.append("kind is not installed (no `kind` on PATH; v0.31.0 or newer is needed)")
    if shutil.which("kubectl") is None:
        missing.append("kubectl is not installed (no `kubectl` on PATH)")
    if missing:
        return "Docker/kind unavailable, kind end-to-end tests cannot run: " + "; ".join(missing)
    clusters = _run(["kind", "get", "clusters"], timeout=30)
    if cluster not in clusters.stdout.split():
        return (
            f"no kind cluster named {cluster!r}: run `make e2e-kind` (scripts/e2e-kind.sh), "
            "which creates it, installs Tether and runs these tests"
        )
    return None


@dataclass
class KindCluster:
    """A kind cluster with Tether installed, driven with kubectl."""

    name: str
    kubeconfig: Path
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    @classmethod
    def connect(cls, name: str) -> KindCluster:
        """Use ``TETHER_KIND_KUBECONFIG`` if set, else ask kind for a kubeconfig."""
        given = os.environ.get("TETHER_KIND_KUBECONFIG")
        if given:
            return cls(name=name, kubeconfig=Path(given))
        out = _run(["kind", "get", "kubeconfig", "--name", name], timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"kind get kubeconfig --name {name}: {out.stderr.strip()}")
        handle, path = tempfile.mkstemp(prefix=f"kind-{name}-", suffix=".kubeconfig")
        with os.fdopen(handle, "w") as fh:
            fh.write(out.stdout)
        return cls(name=name, kubeconfig=Path(path))

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        proc = _run(["kubectl", *args], input=input, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr.strip()}"
            )
        return proc

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, *manifests: Manifest) -> None:
        body = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(manifests)})
        self.kubectl("apply", "-f", "-", input=body)

    def condition(self, kind: str, name: str, namespace: str, type_: str) -> dict[str, Any]:
        obj = self.get_json(kind, name, "-n", namespace)
        for cond in obj.get("status", {}).get("conditions", []):
            if cond.get("type") == type_:
                return dict(cond)
        return {}

    def wait_ready(self, kind: str, name: str, namespace: str, timeout: float = 60.0) -> None:
        proc = self.kubectl(
            "wait", f"{kind}/{name}", "-n", namespace, "--for=condition=Ready",
            f"--timeout={int(timeout)}s", check=False, timeout=timeout + 30,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"{kind}/{name} in {namespace} did not become Ready within {timeout:.0f}s:\n"
                f"{proc.stderr.strip()}\n{self.describe(namespace)}"
            )

    def operator_pods(self) -> list[str]:
        pods = self.get_json("pods", "-n", OPERATOR_NAMESPACE, "-l", OPERATOR_SELECTOR)
        return [
            p["metadata"]["name"]
            for p in pods["items"]
            if not p["metadata"].get("deletionTimestamp")
        ]

    def operator_image(self) -> str:
        """The image the installed operator Deployment runs (``tether:e2e`` from the
        overlay, the release's ``tether:<version>`` from install.yaml)."""
        deployment = self.get_json("deployment", OPERATOR_DEPLOYMENT, "-n", OPERATOR_NAMESPACE)
        return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])

    def lease_holder(self) -> str:
        lease = self.get_json("lease", LEASE_NAME, "-n", OPERATOR_NAMESPACE)
        return str(lease.get("spec", {}).get("holderIdentity") or "")

    def pod_metrics(self, pod: str, namespace: str = OPERATOR_NAMESPACE) -> dict[str, float]:
        """A pod's Prometheus samples (``name{labels}`` -> value), via the API server proxy."""
        raw = self.kubectl(
            "get", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod}:8080/proxy/metrics",
            timeout=30,
        ).stdout
        samples: dict[str, float] = {}
        for line in raw.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def describe(self, namespace: str) -> str:
        """What a person needs when a test fails: resources, events, operator logs."""
        parts = []
        for title, args in (
            ("tether resources", ["get", "consulservices,etcdconfigs", "-n", namespace,
                                  "-o", "yaml"]),
            ("events", ["get", "events", "-n", namespace, "--sort-by=.metadata.creationTimestamp"]),
            ("operator pods", ["get", "pods", "-n", OPERATOR_NAMESPACE, "-o", "wide"]),
            ("leader lease", ["get", "lease", LEASE_NAME, "-n", OPERATOR_NAMESPACE,
                              "-o", "yaml"]),
            ("operator log tail", ["logs", "-n", OPERATOR_NAMESPACE, "-l", OPERATOR_SELECTOR,
                                   "--tail=60", "--prefix", "--all-containers"]),
        ):
            proc = self.kubectl(*args, check=False, timeout=60)
            parts.append(f"--- {title} ---\n{proc.stdout.strip()}{proc.stderr.strip()}")
        return "\n".join(parts)


def kustomize_image(reference: str) -> str:
    """An ``images:`` entry of a kustomization that rewrites the manifests' image
    (``ghcr.io/tether-dev/tether``) to ``reference`` (``name:tag`` or ``name@sha256:...``)."""
    name, at, digest = reference.partition("@")
    tag = ""
    if not at:
        # The tag follows the last colon after the last slash (a registry may have a port).
        slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > slash:
            name, tag = name[:colon], name[colon + 1:]
    entry = f"  - name: ghcr.io/tether-dev/tether\n    newName: {name}\n"
    if at:
        return entry + f'    digest: "{digest}"\n'
    return entry + (f'    newTag: "{tag}"\n' if tag else "")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortForward:
    """``kubectl port-forward`` to a Service, on a free loopback port."""

    def __init__(self, cluster: KindCluster, namespace: str, service: str, port: int) -> None:
        self.local_port = _free_port()
        self.url = f"http://127.0.0.1:{self.local_port}"
        # Lives as long as the port-forward; closed in close().
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self._proc = subprocess.Popen(
            ["kubectl", "port-forward", "-n", namespace, f"svc/{service}",
             f"{self.local_port}:{port}", "--address", "127.0.0.1"],
            env=cluster.env, stdout=subprocess.DEVNULL, stderr=self._log,
        )
        try:
            wait_for(self._listening, timeout=30, interval=0.2,
                     message=f"port-forward to {namespace}/{service}:{port}")
        except AssertionError:
            self.close()
            raise

    def _listening(self) -> bool:
        if self._proc.poll() is not None:
            self._log.seek(0)
            raise RuntimeError(f"kubectl port-forward exited: {self._log.read().strip()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", self.local_port)) == 0

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()


def _http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        # Consul answers 429/503 with a JSON body for warning/critical health.
        raw, status = exc.read(), int(exc.code)
    try:
        return status, json.loads(raw) if raw.strip() else None
    except ValueError:
        return status, raw.decode(errors="replace")


@dataclass
class Consul:
    """The in-cluster Consul agent's HTTP API, through a port-forward."""

    url: str

    def services(self) -> dict[str, Any]:
        status, body = _http("GET", f"{self.url}/v1/agent/services")
        assert status == 200, f"GET /v1/agent/services: {status} {body}"
        return dict(body)

    def service(self, service_id: str) -> dict[str, Any] | None:
        return self.services().get(service_id)

    def health(self, service_id: str) -> str:
        """Consul's aggregate status of one instance's checks."""
        status, body = _http("GET", f"{self.url}/v1/agent/health/service/id/{service_id}")
        if status == 404:
            return "missing"
        if isinstance(body, dict):
            return str(body.get("AggregatedStatus", "unknown"))
        return f"unexpected answer {status}: {body}"

    def catalog_indexes(self, service_name: str) -> dict[str, int]:
        """ModifyIndex of each catalog entry of a service: moves on every write to it."""
        status, body = _http("GET", f"{self.url}/v1/catalog/service/{service_name}")
        assert status == 200, f"GET /v1/catalog/service/{service_name}: {status} {body}"
        return {str(entry["ServiceID"]): int(entry["ModifyIndex"]) for entry in body}

    def checks(self, service_id: str) -> dict[str, str]:
        """The status of each check of one service instance on the agent."""
        status, body = _http("GET", f"{self.url}/v1/agent/checks")
        assert status == 200, f"GET /v1/agent/checks: {status} {body}"
        return {
            str(check["Name"]): str(check["Status"])
            for check in body.values() if check.get("ServiceID") == service_id
        }

    def deregister(self, service_id: str) -> None:
        status, body = _http("PUT", f"{self.url}/v1/agent/service/deregister/{service_id}")
        assert status == 200, f"deregister {service_id}: {status} {body}"

    def node_instances(self, node: str) -> dict[str, tuple[dict[str, Any], str]]:
        """Each service instance in the catalog on ``node`` (endpoints mode's synthetic
        node), by ID, with the status of its check (``none`` without one)."""
        status, body = _http("GET", f"{self.url}/v1/catalog/node-services/{node}")
        if status == 404 or not body:
            return {}
        assert status == 200, f"GET /v1/catalog/node-services/{node}: {status} {body}"
        status, checks = _http("GET", f"{self.url}/v1/health/node/{node}")
        assert status == 200, f"GET /v1/health/node/{node}: {status} {checks}"
        by_service = {str(c.get("ServiceID")): str(c["Status"]) for c in checks or []}
        return {
            str(svc["ID"]): (svc, by_service.get(str(svc["ID"]), "none"))
            for svc in body.get("Services") or []
        }


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    """The etcd range_end that covers every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


@dataclass(frozen=True)
class KeyValue:
    value: str
    mod_revision: int


@dataclass
class Etcd:
    """The in-cluster etcd through its JSON gateway (/v3/kv/*), via a port-forward."""

    url: str

    def range(self, prefix: str) -> dict[str, KeyValue]:
        status, body = _http(
            "POST", f"{self.url}/v3/kv/range",
            {"key": _b64(prefix), "range_end": _prefix_end(prefix)},
        )
        assert status == 200, f"range {prefix}: {status} {body}"
        return {
            base64.b64decode(kv["key"]).decode(): KeyValue(
                value=base64.b64decode(kv.get("value", "")).decode(),
                mod_revision=int(kv["mod_revision"]),
            )
            for kv in body.get("kvs", [])
        }

    def revision(self) -> int:
        """The store's revision: it moves on every write, whoever makes it."""
        status, body = _http("POST", f"{self.url}/v3/kv/range", {"key": _b64("/")})
        assert status == 200, f"range /: {status} {body}"
        return int(body["header"]["revision"])

    def put(self, key: str, value: str) -> None:
        status, body = _http("POST", f"{self.url}/v3/kv/put",
                             {"key": _b64(key), "value": _b64(value)})
        assert status == 200, f"put {key}: {status} {body}"

    def delete(self, key: str) -> None:
        status, body = _http("POST", f"{self.url}/v3/kv/deleterange", {"key": _b64(key)})
        assert status == 200, f"delete {key}: {status} {body}"
