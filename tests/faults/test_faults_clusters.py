"""Two Tether clusters on one Consul, seeded churn on both, and an exact audit.

Two operators, ``red`` and ``green`` (different ``TETHER_CLUSTER_NAME``, so
different synthetic nodes ``tether-<cluster>``), run against one kube-apiserver
and one Consul, each scoped to namespaces of its own (``tether run -n``). The
dev stack has no EndpointSlice controller, so the workload writes Services and
EndpointSlices itself, as the controller would, next to endpoints-mode
ConsulServices that follow them. Per cluster, drawn from the seed: ConsulServices
created, updated (tags, meta, service name) and deleted; readiness flips
(ready, not ready, terminating); Pods replaced (an address swapped for a new
one); scaling up and down; a second EndpointSlice added and removed.

Collisions are deliberate: app *i* of both clusters uses the same Consul
service ID (``spec.id: shared-<i>``), the same service names and the same
endpoint addresses, so the instance IDs on the two nodes are identical, and
only the node and the ownership meta tell them apart.

Foreign entries, written by the test as "another tool" before the churn and
expected byte-identical (indexes included) at the end:

- a node of its own with two instances, one of them carrying red's full
  ownership meta (a node Tether does not own is never touched, whatever its
  instances claim);
- a node carrying another (absent) Tether cluster's node meta, with instances
  naming red's and green's namespaces and resources under that cluster;
- on each synthetic node, an instance owned by another cluster (on red's) or
  by nobody (on green's), with a check, under a service name the workload uses.

The run, in rounds:

1. both clusters churn at once, with faults meanwhile (operator SIGKILL and
   restart, both operators at once, Consul SIGSTOP/SIGCONT; in the full run
   also a kube-apiserver SIGKILL); then both converge and are audited exactly;
2. red is snapshotted (every entry on its node, byte for byte), green alone
   churns and converges, and red's node must be unchanged and red must have
   written nothing; then the same the other way round.

At the end every ConsulService is deleted and the audit repeated (nothing of
either cluster left on its node, the foreign entries unchanged). Throughout,
each operator's Consul traffic goes through a recording proxy
(:class:`clusterkit.WriteRecorder`): every operation of every transaction must
name its own node and cluster, and every ``ModifyIndex`` ever seen on a
cluster's node (blocking queries, :class:`clusterkit.CatalogWatch`) must be one
that cluster's own transactions produced.

Consul is paused, never killed: the dev stack's Consul keeps its catalog in
memory, and a restart would empty it, so every entry would be rewritten (by its
own operator, correctly) and the foreign entries and index histories would say
nothing any more. The Consul-restart cases are the random fault run's.

``TETHER_FAULTS_REDUCED=1``: one round with fewer operations (CI, about two
minutes); ``TETHER_FAULTS_SEED`` replays a run (the fault moments are seeded
as seconds into a phase, so they land near, not exactly at, the same operation).
(Over 500 lines on purpose: workload, expectation and the run are read together.)
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from audit import Anomaly, converge, split, without_defaults
from clusterkit import CatalogWatch, TxnSummary, WriteRecorder, diff, snapshot
from faultkit import CONSUL, KUBE_APISERVER, REDUCED, FaultStack, Kube, log
from kubernetes.client.exceptions import ApiException

from tether_dev.harness.consul import Consul
from tether_dev.harness.kube import is_ready
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

SERVICE_NAMES = ("web", "api", "cache")
TAGS = ("blue", "green", "canary", "v1", "v2")
CONDITIONS = {
    "ready": {"ready": True, "serving": True, "terminating": False},
    "not-ready": {"ready": False, "serving": False, "terminating": False},
    "draining": {"ready": False, "serving": True, "terminating": True},
}
#: Per cluster: how many apps (a Service, its slices, one or two ConsulServices).
APPS = 6 if REDUCED else 10


@dataclass
class Plan:
    rounds: int
    churn_ops: int  # per cluster, in the concurrent phase of a round
    solo_ops: int  # in each one-cluster phase
    faults: list[str]
    converge_timeout: float


def make_plan(reduced: bool) -> Plan:
    if reduced:
        return Plan(1, 50, 25, ["operator-kill", "consul-pause"], 60.0)
    return Plan(3, 150, 60, ["red-kill", "green-kill", "consul-pause", "both-kill", "apiserver-kill"], 120.0)


# ------------------------------------------------------------------ the workload


@dataclass
class App:
    """A Service with its EndpointSlices, as the workload last wrote them."""

    namespace: str
    name: str
    slot: int
    ports: list[tuple[str, int, int]]  # (name, port, targetPort)
    #: slice name -> address -> condition name
    slices: dict[str, dict[str, str]] = field(default_factory=dict)
    #: ConsulService name -> spec, for those that exist (or are believed to)
    csvcs: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_host: int = 1


class ClusterLoad:
    """One cluster's operator, namespaces and seeded stream of operations."""

    def __init__(self, color: str, run_id: str, kube: Kube, rng: random.Random) -> None:
        self.color = color
        self.cluster = f"{color}-{run_id}"
        self.node = f"tether-{self.cluster}"
        self.namespaces = [f"c{run_id}-{color}-{i}" for i in range(2)]
        self.kube = kube
        self.rng = rng
        self.apps: list[App] = []
        self.ops: list[str] = []
        self.failed: list[str] = []
        self.retried = 0
        self.busy = 0  # creates refused: the previous object of that name was still being deleted
        self.operator: OperatorProcess | None = None
        self.recorder: WriteRecorder | None = None

    # --- Kubernetes, with the bounded retry of a careful client ------------------------
    @property
    def discovery(self) -> Any:
        return kubernetes.client.DiscoveryV1Api(self.kube._api())

    def _call(self, what: str, fn: Callable[[], Any], *, ok: tuple[int, ...] = ()) -> bool:
        """``fn`` retried while the API server is away; False (recorded) if it failed for good."""
        self.ops.append(what)
        deadline = time.monotonic() + 120
        failures = 0
        while True:
            try:
                fn()
                self.retried += 1 if failures else 0
                return True
            except ApiException as exc:
                if exc.status in ok:
                    return True
                error: Exception = exc
            except Exception as exc:
                error = exc
            failures += 1
            self.kube._local.api = None  # a fresh pool: the old one may hold dead sockets
            if not Kube.transient(error) or time.monotonic() > deadline:
                self.failed.append(f"{what}: {str(error)[:160]}")
                return False
            time.sleep(min(2.0, 0.25 * failures))

    def _put_slice(self, app: App, slice_name: str) -> None:
        port_name, _, target = app.ports[0]
        # The second slice carries another target port number, as Pods of two
        # versions may: the instance takes the endpoint's own port.
        number = target if slice_name.endswith("-a") else target + 1
        body = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": slice_name,
                "namespace": app.namespace,
                "labels": {
                    "kubernetes.io/service-name": app.name,
                    "endpointslice.kubernetes.io/managed-by": "faults.tether.dev",
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": port_name, "port": number, "protocol": "TCP"}]
            + [{"name": n, "port": t, "protocol": "TCP"} for n, _, t in app.ports[1:]],
            "endpoints": [
                {"addresses": [addr], "conditions": CONDITIONS[cond]}
                for addr, cond in sorted(app.slices[slice_name].items())
            ],
        }

        def put() -> None:
            try:
                self.discovery.replace_namespaced_endpoint_slice(
                    slice_name, app.namespace, body, _request_timeout=15
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self.discovery.create_namespaced_endpoint_slice(app.namespace, body, _request_timeout=15)

        self._call(f"put slice {app.namespace}/{slice_name} ({len(app.slices[slice_name])} endpoints)", put)

    def _put_cs(self, app: App, name: str, spec: dict[str, Any], *, create: bool) -> None:
        if create:
            done = self._call(
                f"create cs {app.namespace}/{name}",
                lambda: self.kube.create("cs", app.namespace, name, spec),
                ok=(409,),
            )
            if done:
                # 409: a create whose answer was lost (ours, now present), or the
                # previous one of that name still held by its finalizer (then not
                # created: the workload tries again later).
                obj = self.kube.retrying(lambda: self.kube.get("cs", app.namespace, name))[0]
                done = (
                    bool(obj)
                    and not obj["metadata"].get("deletionTimestamp")
                    and without_defaults(obj["spec"]) == spec
                )
                if not done:
                    self.busy += 1
        else:
            done = self._call(
                f"update cs {app.namespace}/{name}",
                lambda: self.kube.replace_spec("cs", app.namespace, name, spec),
            )
        if done:
            app.csvcs[name] = spec

    # --- values ----------------------------------------------------------------------------
    def _address(self, app: App) -> str:
        """A fresh endpoint address of ``app``: the same sequence in both clusters."""
        host = app.next_host
        app.next_host = host % 250 + 1
        return f"10.77.{app.slot}.{host}"

    def _cs_spec(self, app: App, *, primary: bool) -> dict[str, Any]:
        r = self.rng
        port_name, port, _ = app.ports[0]
        # One port: by number or not at all; two: by name or by number.
        wanted: str | int | None = r.choice([None, port] if len(app.ports) == 1 else [port_name, port])
        endpoints: dict[str, Any] = {"service": app.name}
        if wanted is not None:
            endpoints["port"] = wanted
        spec: dict[str, Any] = {"endpoints": endpoints}
        if primary:
            spec["id"] = f"shared-{app.slot}"  # the same in both clusters
        if r.random() < 0.6:
            spec["name"] = r.choice(SERVICE_NAMES)
        tags = r.sample(TAGS, r.randint(0, 2))
        if tags:
            spec["tags"] = tags
        if r.random() < 0.5:
            spec["meta"] = {"team": r.choice(("shop", "search", "infra"))}
        return spec

    # --- operations -----------------------------------------------------------------------
    def prepare(self) -> None:
        for ns in self.namespaces:
            self.kube.retrying(lambda ns=ns: self.kube.ensure_namespace(ns), what="namespace")
        for slot in range(APPS):
            ns = self.namespaces[slot % 2]
            # Two ports (named) or one (unnamed), so every way of selecting a port is exercised.
            ports = [("http", 80, 8080), ("metrics", 9100, 9100)] if slot % 3 else [("", 80, 8080)]
            app = App(ns, f"app{slot}", slot, ports)
            body = {
                "metadata": {"name": app.name, "namespace": ns},
                "spec": {
                    "ports": [
                        {"name": n, "port": p, "targetPort": t, "protocol": "TCP"}
                        if n
                        else {"port": p, "targetPort": t, "protocol": "TCP"}
                        for n, p, t in ports
                    ]
                },
            }
            self._call(
                f"create service {ns}/{app.name}",
                lambda ns=ns, body=body: self.kube.core.create_namespaced_service(
                    ns, body, _request_timeout=15
                ),
                ok=(409,),
            )
            app.slices[f"{app.name}-a"] = {self._address(app): "ready" for _ in range(self.rng.randint(1, 5))}
            self._put_slice(app, f"{app.name}-a")
            self.apps.append(app)
        # Half the apps start with their ConsulService.
        for app in self.apps[::2]:
            self._put_cs(app, app.name, self._cs_spec(app, primary=True), create=True)

    def random_op(self) -> None:
        r = self.rng
        app = r.choice(self.apps)
        roll = r.random()
        if roll < 0.12:
            self._toggle_cs(app)
        elif roll < 0.22 and app.csvcs:
            name = r.choice(sorted(app.csvcs))
            spec = self._cs_spec(app, primary=name == app.name)
            # Keep the port selection: a change of it is its own, rarer, case.
            spec["endpoints"] = app.csvcs[name]["endpoints"] if r.random() < 0.8 else spec["endpoints"]
            self._put_cs(app, name, spec, create=False)
        elif roll < 0.27:
            # A second ConsulService following the same Service (its own ID).
            name = f"{app.name}-x"
            if name in app.csvcs:
                self._delete_cs(app, name)
            else:
                self._put_cs(app, name, self._cs_spec(app, primary=False), create=True)
        elif roll < 0.55:
            self._flip(app)
        elif roll < 0.72:
            self._replace_pod(app)
        elif roll < 0.9:
            self._scale(app)
        else:
            self._toggle_second_slice(app)

    def _toggle_cs(self, app: App) -> None:
        if app.name in app.csvcs:
            self._delete_cs(app, app.name)
        else:
            self._put_cs(app, app.name, self._cs_spec(app, primary=True), create=True)

    def _delete_cs(self, app: App, name: str) -> None:
        if self._call(
            f"delete cs {app.namespace}/{name}",
            lambda: self.kube.delete("cs", app.namespace, name),
            ok=(404,),
        ):
            app.csvcs.pop(name, None)

    def _pick(self, app: App) -> tuple[str, str] | None:
        live = sorted((s, a) for s, eps in app.slices.items() for a in eps)
        return self.rng.choice(live) if live else None

    def _flip(self, app: App) -> None:
        picked = self._pick(app)
        if picked is None:
            return
        slice_name, addr = picked
        current = app.slices[slice_name][addr]
        app.slices[slice_name][addr] = self.rng.choice([c for c in CONDITIONS if c != current])
        self._put_slice(app, slice_name)

    def _replace_pod(self, app: App) -> None:
        picked = self._pick(app)
        if picked is None:
            return
        slice_name, addr = picked
        del app.slices[slice_name][addr]
        fresh = self._address(app)
        if not any(fresh in eps for eps in app.slices.values()):
            app.slices[slice_name][fresh] = "ready"
        self._put_slice(app, slice_name)

    def _scale(self, app: App) -> None:
        slice_name = self.rng.choice(sorted(app.slices))
        eps = app.slices[slice_name]
        if eps and (len(eps) >= 8 or self.rng.random() < 0.4):
            del eps[self.rng.choice(sorted(eps))]
        else:
            fresh = self._address(app)
            if not any(fresh in e for e in app.slices.values()):
                eps[fresh] = self.rng.choice(["ready", "ready", "not-ready"])
        self._put_slice(app, slice_name)

    def _toggle_second_slice(self, app: App) -> None:
        name = f"{app.name}-b"
        if name in app.slices:
            if self._call(
                f"delete slice {app.namespace}/{name}",
                lambda: self.discovery.delete_namespaced_endpoint_slice(
                    name, app.namespace, _request_timeout=15
                ),
                ok=(404,),
            ):
                del app.slices[name]
            return
        app.slices[name] = {}
        for _ in range(self.rng.randint(1, 3)):
            fresh = self._address(app)
            if not any(fresh in e for e in app.slices.values()):
                app.slices[name][fresh] = "ready"
        self._put_slice(app, name)

    def stream(self, count: int, *, deadline: float) -> None:
        for _ in range(count):
            if time.monotonic() > deadline:
                self.failed.append(f"stream stopped at its deadline after {len(self.ops)} operations")
                return
            self.random_op()
            time.sleep(self.rng.uniform(0.02, 0.25))

    def delete_all(self) -> None:
        for app in self.apps:
            for name in sorted(app.csvcs):
                self._delete_cs(app, name)

    def summary(self) -> TxnSummary:
        assert self.recorder is not None
        return self.recorder.summary(node=self.node, cluster=self.cluster)


# ------------------------------------------------------------------ the audit


def expected_instances(load: ClusterLoad, kube: Kube) -> tuple[dict[str, dict[str, Any]], list[Anomaly]]:
    """What the cluster's node must hold, derived from Kubernetes by the contract (DESIGN.md §1).

    Instance ID ``<spec.id>-<address>-<port>``; the port is the endpoint's own
    number for the Service port ``spec.endpoints.port`` selects (by name, by
    number, or the only one); ``ready`` → passing, anything else → critical;
    an address in two slices counts once, the healthier view winning.
    """
    want: dict[str, dict[str, Any]] = {}
    found: list[Anomaly] = []
    for ns in load.namespaces:
        css = [o for o in kube.list("cs", {ns})]
        services = {
            s.metadata.name: s for s in kube.core.list_namespaced_service(ns, _request_timeout=15).items
        }
        slices = load.discovery.list_namespaced_endpoint_slice(ns, _request_timeout=15).items
        for obj in css:
            meta, spec = obj["metadata"], obj["spec"]
            subject = f"{load.color} cs {ns}/{meta['name']}"
            if meta.get("deletionTimestamp"):
                found.append(Anomaly("stuck-deleting", subject, "still has a deletionTimestamp"))
                continue
            ep = spec["endpoints"]
            svc = services[ep["service"]]
            ports = svc.spec.ports or []
            wanted = ep.get("port")
            if wanted is None:
                port_name = ports[0].name or ""
            else:
                port_name = next(
                    (p.name or "" for p in ports if p.name == wanted or p.port == wanted), "<none>"
                )
            sid = spec.get("id") or f"{ns}-{meta['name']}"
            owner = {
                "external-source": "kubernetes",
                "tether-cluster": load.cluster,
                "tether-namespace": ns,
                "tether-name": meta["name"],
            }
            best: dict[tuple[str, int], str] = {}
            for item in slices:
                if (item.metadata.labels or {}).get("kubernetes.io/service-name") != ep["service"]:
                    continue
                number = next((p.port for p in item.ports or [] if (p.name or "") == port_name), None)
                if number is None:
                    continue
                for endpoint in item.endpoints or []:
                    status = "critical" if endpoint.conditions.ready is False else "passing"
                    for addr in endpoint.addresses:
                        if best.get((addr, number)) != "passing":
                            best[(addr, number)] = status
            for (addr, number), status in best.items():
                want[f"{sid}-{addr}-{number}"] = {
                    "Service": spec.get("name") or meta["name"],
                    "Address": addr,
                    "Port": number,
                    "Tags": list(spec.get("tags") or []),
                    "Meta": {**(spec.get("meta") or {}), **owner},
                    "Status": status,
                }
            mine = sum(
                1
                for k, v in want.items()
                if v["Meta"]["tether-name"] == meta["name"] and v["Meta"]["tether-namespace"] == ns
            )
            st = obj.get("status") or {}
            if not is_ready(obj):
                found.append(Anomaly("not-ready", subject, f"conditions {st.get('conditions')}"))
            elif (st.get("instances") or {}).get("total") != mine:
                found.append(
                    Anomaly("wrong-status", subject, f"instances {st.get('instances')}, expected {mine}")
                )
    return want, found


class ClusterAuditor:
    """Both clusters' nodes against their ConsulServices, and the foreign entries against their snapshots."""

    def __init__(
        self, kube: Kube, consul: Consul, loads: list[ClusterLoad], foreign: dict[str, dict[str, str]]
    ):
        self.kube = kube
        self.consul = consul
        self.loads = loads
        self.foreign = foreign  # node -> snapshot of the planted entries (keys "service X"/"check X"/"node")

    def audit(self) -> list[Anomaly]:
        found: list[Anomaly] = []
        for load in self.loads:
            want, problems = expected_instances(load, self.kube)
            found += problems
            found += self._node(load, want)
        for node, planted in self.foreign.items():
            now = snapshot(self.consul, node)
            now = {k: v for k, v in now.items() if k in planted or not node.startswith("tether-")}
            for line in diff(planted, now):
                found.append(Anomaly("foreign-touched", f"node {node}", line))
        return found

    def _node(self, load: ClusterLoad, want: dict[str, dict[str, Any]]) -> list[Anomaly]:
        found = []
        got = self.consul.call("GET", f"/v1/catalog/node-services/{load.node}") or {}
        checks: dict[str, list[dict[str, Any]]] = {}
        for check in self.consul.call("GET", f"/v1/health/node/{load.node}") or []:
            checks.setdefault(str(check.get("ServiceID") or ""), []).append(check)
        have = {}
        for svc in got.get("Services") or []:
            cluster = (svc.get("Meta") or {}).get("tether-cluster")
            if cluster == load.cluster:
                have[svc["ID"]] = svc
            elif (
                cluster
                and cluster.startswith(("red-", "green-"))
                and f"service {svc['ID']}" not in self.foreign.get(load.node, {})
            ):
                found.append(
                    Anomaly("cross-cluster", f"node {load.node}", f"instance {svc['ID']} of {cluster}")
                )
        subject = f"{load.color} node {load.node}"
        for iid in sorted(set(want) - set(have)):
            found.append(Anomaly("missing", subject, f"instance {iid}"))
        for iid in sorted(set(have) - set(want)):
            found.append(Anomaly("orphan", subject, f"instance {iid} owned by {have[iid]['Meta']}"))
        for iid in sorted(set(want) & set(have)):
            w, h = want[iid], have[iid]
            for key in ("Service", "Address", "Port", "Tags", "Meta"):
                if h.get(key) != w[key] and not (key == "Tags" and not h.get(key) and not w[key]):
                    found.append(
                        Anomaly("wrong", f"{subject} {iid}", f"{key} {h.get(key)!r}, expected {w[key]!r}")
                    )
            own = checks.get(iid, [])
            statuses = [(c["CheckID"], c["Status"]) for c in own]
            if statuses != [(f"{iid}:endpoint", w["Status"])]:
                found.append(
                    Anomaly("wrong-check", f"{subject} {iid}", f"checks {statuses}, expected {w['Status']}")
                )
        if want and got.get("Node") and (got["Node"].get("Meta") or {}).get("tether-cluster") != load.cluster:
            found.append(Anomaly("wrong-node", subject, f"node meta {got['Node'].get('Meta')}"))
        return found


# ------------------------------------------------------------------ foreign entries


def plant_foreign(
    consul: Consul, run_id: str, red: ClusterLoad, green: ClusterLoad
) -> dict[str, dict[str, str]]:
    """Write what other tools and another cluster own; return each node's snapshot of it."""
    tool, blue = f"other-tool-{run_id}", f"tether-blue-{run_id}"
    red_app, green_app = red.apps[0], green.apps[0]

    def owner(cluster: str, ns: str, name: str) -> dict[str, str]:
        return {
            "external-source": "kubernetes",
            "tether-cluster": cluster,
            "tether-namespace": ns,
            "tether-name": name,
        }

    def register(node: str, meta: dict[str, str] | None, services: list[dict[str, Any]]) -> None:
        for svc in services:
            body: dict[str, Any] = {
                "Node": node,
                "Address": "127.0.0.9",
                "Service": svc,
                "Check": {
                    "CheckID": f"{svc['ID']}:probe",
                    "Name": "probe",
                    "Status": "passing",
                    "ServiceID": svc["ID"],
                },
            }
            if meta is not None:
                body["NodeMeta"] = meta
            consul.call("PUT", "/v1/catalog/register", body)

    # Same IDs, names and addresses as the clusters' own instances; only the node differs.
    register(
        tool,
        None,
        [
            {
                "ID": "shared-0-10.77.0.1-8080",
                "Service": "web",
                "Address": "10.77.0.1",
                "Port": 8080,
                "Meta": owner(red.cluster, red_app.namespace, red_app.name),
            },
            {"ID": "plain", "Service": "web", "Address": "10.78.0.1", "Port": 80},
        ],
    )
    register(
        blue,
        {"external-source": "kubernetes", "tether-cluster": f"blue-{run_id}"},
        [
            {
                "ID": "shared-0-10.77.0.2-8080",
                "Service": "api",
                "Address": "10.77.0.2",
                "Port": 8080,
                "Meta": owner(f"blue-{run_id}", red_app.namespace, red_app.name),
            },
            {
                "ID": "shared-0-10.77.0.3-8080",
                "Service": "api",
                "Address": "10.77.0.3",
                "Port": 8080,
                "Meta": owner(f"blue-{run_id}", green_app.namespace, green_app.name),
            },
        ],
    )
    # On the synthetic nodes, through a transaction: it leaves the node entry (and its meta) alone.
    for load, meta in (
        (red, owner(f"blue-{run_id}", red_app.namespace, red_app.name)),
        (green, {"external-source": "another-tool"}),
    ):
        sid = f"foreign-{load.color}"
        consul.call(
            "PUT",
            "/v1/txn",
            [
                {
                    "Service": {
                        "Verb": "set",
                        "Node": load.node,
                        "Service": {
                            "ID": sid,
                            "Service": "web",
                            "Address": "10.79.0.1",
                            "Port": 80,
                            "Meta": meta,
                        },
                    }
                },
                {
                    "Check": {
                        "Verb": "set",
                        "Check": {
                            "Node": load.node,
                            "CheckID": f"{sid}:probe",
                            "Name": "probe",
                            "Status": "critical",
                            "ServiceID": sid,
                            "ServiceName": "web",
                        },
                    }
                },
            ],
        )
    planted = {tool: snapshot(consul, tool), blue: snapshot(consul, blue)}
    for load in (red, green):
        snap = snapshot(consul, load.node)
        planted[load.node] = {
            k: v for k, v in snap.items() if k.startswith(("service foreign-", "check foreign-"))
        }
    return planted


# ------------------------------------------------------------------ the run


def settle_writes(recorders: list[WriteRecorder], *, quiet: float = 3.0, timeout: float = 60.0) -> None:
    """Wait until no recorder has seen a write for ``quiet`` seconds."""

    def still() -> bool:
        last = max((w.at for r in recorders for w in r.recorded()), default=0.0)
        return time.monotonic() - last >= quiet

    wait_for(still, timeout=timeout, interval=0.5, message="the operators' writes to settle")


@dataclass
class Injector:
    stack: FaultStack
    loads: list[ClusterLoad]
    rng: random.Random
    records: list[str] = field(default_factory=list)

    #: At least this long between the end of one fault and the start of the next, so
    #: that a restarted operator has found its kinds before the next fault hits. An
    #: operator whose Kopf start-up scan meets a restarting kube-apiserver never serves
    #: its kinds (a known start-up race, not this test's subject: see the report).
    GAP = 5.0

    def run(self, kinds: list[str], window: float) -> None:
        """Each fault in ``kinds`` at a seeded moment of its own slot of ``window`` seconds, in turn."""
        started = time.monotonic()
        width = window / max(1, len(kinds))
        moments = [(i + self.rng.uniform(0.1, 0.6)) * width for i in range(len(kinds))]
        ended = 0.0
        for kind, moment in zip(self.rng.sample(kinds, len(kinds)), moments, strict=True):
            time.sleep(max(0.0, started + moment - time.monotonic(), ended + self.GAP - time.monotonic()))
            self._inject(kind, round(time.monotonic() - started, 1))
            ended = time.monotonic()

    def _inject(self, kind: str, at: float) -> None:
        down = round(self.rng.uniform(1.0, 4.0), 1)
        try:
            if kind in ("operator-kill", "red-kill", "green-kill"):
                # operator-kill: either operator, drawn from the seed; red-kill, green-kill: that one.
                named = [x for x in self.loads if kind == f"{x.color}-kill"]
                load = named[0] if named else self.rng.choice(self.loads)
                assert load.operator is not None
                pid = load.operator.pid
                load.operator.kill()
                time.sleep(down)
                load.operator.start()
                detail = f"{load.color} operator pid {pid} SIGKILLed, down {down} s"
            elif kind == "both-kill":
                for load in self.loads:
                    assert load.operator is not None
                    load.operator.kill()
                time.sleep(down)
                for load in self.loads:
                    assert load.operator is not None
                    load.operator.start()
                detail = f"both operators SIGKILLed, down {down} s"
            elif kind == "consul-pause":
                pid = self.stack.pause(CONSUL)
                try:
                    time.sleep(down + 2)
                finally:
                    self.stack.resume(CONSUL)
                detail = f"consul pid {pid} SIGSTOPped for {down + 2:.1f} s"
            elif kind == "apiserver-kill":
                pid = self.stack.kill(KUBE_APISERVER)
                time.sleep(down)
                took = self.stack.restart()
                detail = f"kube-apiserver pid {pid} SIGKILLed, down {down} s, `up` took {took:.1f} s"
            else:
                raise AssertionError(f"unknown fault {kind}")
        except Exception as exc:
            self.stack.resume_all()
            detail = f"ERROR {type(exc).__name__}: {str(exc)[:200]}"
        self.records.append(f"+{at}s {kind}: {detail}")
        log(f"fault +{at}s {kind}: {detail}")


def churn(loads: list[ClusterLoad], count: int, *, deadline: float) -> None:
    """Each load's stream in a thread of its own, at once; bounded by ``deadline``."""
    threads = [
        threading.Thread(
            target=load.stream, args=(count,), kwargs={"deadline": deadline}, name=f"churn-{load.color}"
        )
        for load in loads
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic() + 30))


def watched_foreign_indexes(
    watch: CatalogWatch, load: ClusterLoad, own: TxnSummary, planted: set[str]
) -> list[Anomaly]:
    """Every index seen on the node is one its own cluster produced (or a planted entry's, unchanged)."""
    found = []
    with watch._lock:
        history = {k: list(v) for k, v in watch.history.items()}
    for key, seen in sorted(history.items()):
        if key in planted:
            if len({(s.create, s.modify) for s in seen}) != 1:
                found.append(Anomaly("foreign-touched", f"node {load.node}", f"{key} indexes {seen}"))
            continue
        for state in seen:
            if state.modify not in own.indexes:
                found.append(
                    Anomaly(
                        "written-by-another",
                        f"node {load.node}",
                        f"{key} at ModifyIndex {state.modify} (CreateIndex {state.create}, owner "
                        f"{state.cluster or 'none'}): no transaction of {load.cluster} produced it",
                    )
                )
    return found


@pytest.mark.timeout(600 if REDUCED else 2400)
def test_two_clusters_share_one_consul(
    stack: FaultStack,
    kube: Kube,
    consul: Consul,
    run_id: str,
    session_seed: int,
    seed: int,
    tmp_path: Path,
) -> None:
    plan = make_plan(REDUCED)
    started = time.monotonic()
    stack.resume_all()
    stack.ensure_up()
    loads = [
        ClusterLoad(color, run_id, Kube(kube.kubeconfig), random.Random(f"{seed}/{color}"))
        for color in ("red", "green")
    ]
    red, green = loads
    watches: list[CatalogWatch] = []
    injector = Injector(stack, loads, random.Random(f"{seed}/faults"))
    timings: dict[str, float] = {}
    report: list[str] = []
    try:
        for load in loads:
            load.recorder = WriteRecorder(stack.env["CONSUL_HTTP_ADDR"], load.color)
            args = [a for ns in load.namespaces for a in ("-n", ns)]
            load.operator = OperatorProcess(
                stack.env,
                tmp_path / f"{load.color}.log",
                args=args,
                extra_env={"TETHER_CLUSTER_NAME": load.cluster, "CONSUL_HTTP_ADDR": load.recorder.url},
            ).start()
            watches.append(CatalogWatch(stack.env["CONSUL_HTTP_ADDR"], load.node))
            log(
                f"{load.color}: cluster {load.cluster}, node {load.node}, namespaces {load.namespaces}, "
                f"operator pid {load.operator.pid}"
            )
        for load in loads:
            load.prepare()
        auditor = ClusterAuditor(kube, consul, loads, {})
        anomalies, timings["first-converge"] = converge(auditor, timeout=plan.converge_timeout)
        assert not split(anomalies)[0], explain(anomalies, loads, "after the first apply")
        auditor.foreign = plant_foreign(consul, run_id, red, green)
        log(f"foreign entries planted: { {n: len(s) for n, s in auditor.foreign.items()} }")

        isolation: list[str] = []
        for round_ in range(plan.rounds):
            # 1. Both at once, with faults.
            t = time.monotonic()
            window = plan.churn_ops * 0.25  # about the stream's length
            fault_thread = threading.Thread(
                target=injector.run, args=(plan.faults, window), name="faults", daemon=True
            )
            fault_thread.start()
            churn(loads, plan.churn_ops, deadline=t + 600)
            fault_thread.join(timeout=300)
            stack.resume_all()
            stack.ensure_up()
            for load in loads:
                assert load.operator is not None
                if not load.operator.alive():
                    report.append(f"{load.color} operator found dead after round {round_}: restarted")
                    load.operator.start()
            anomalies, _ = converge(auditor, timeout=plan.converge_timeout)
            timings[f"round{round_}-churn+converge"] = time.monotonic() - t
            assert not split(anomalies)[0], explain(
                anomalies, loads, f"after round {round_}'s concurrent churn"
            )
            # 2. One cluster churns, the other must see nothing change at all.
            for quiet, busy in ((red, green), (green, red)):
                settle_writes([r.recorder for r in loads if r.recorder])
                before = snapshot(consul, quiet.node)
                assert quiet.recorder is not None
                writes_before = len(quiet.recorder.recorded())
                t = time.monotonic()
                busy.stream(plan.solo_ops, deadline=t + 300)
                anomalies, _ = converge(auditor, timeout=plan.converge_timeout)
                assert not split(anomalies)[0], explain(anomalies, loads, f"after {busy.color}'s solo churn")
                settle_writes([r.recorder for r in loads if r.recorder])
                changed = diff(before, snapshot(consul, quiet.node))
                quiet_writes = len(quiet.recorder.recorded()) - writes_before
                isolation.append(
                    f"round {round_}: {busy.color} alone, {plan.solo_ops} operations: {quiet.color}'s "
                    f"{len(before)} entries changed {len(changed)}, {quiet.color} wrote {quiet_writes}"
                )
                assert not changed, (
                    f"{quiet.color}'s node changed while only {busy.color} worked:\n" + "\n".join(changed)
                )
                assert quiet_writes == 0, f"{quiet.color} wrote {quiet_writes} times while idle"

        # 3. Everything goes; the foreign entries stay.
        t = time.monotonic()
        for load in loads:
            load.delete_all()
        cleanup, _ = converge(auditor, timeout=plan.converge_timeout)
        timings["cleanup"] = time.monotonic() - t
        assert not split(cleanup)[0], explain(cleanup, loads, "after deleting everything")
        settle_writes([r.recorder for r in loads if r.recorder])
    finally:
        for watch in watches:
            watch.stop()
        for load in loads:
            if load.operator is not None:
                load.operator.stop(grace=20)
            if load.recorder is not None:
                load.recorder.close()
        stack.resume_all()

    # 4. Who wrote what: each operator only to its own node, as its own cluster;
    # every index ever seen on a node produced by that node's cluster.
    summaries = {load.color: load.summary() for load in loads}
    findings: list[Anomaly] = []
    for load, watch in zip(loads, watches, strict=True):
        own = summaries[load.color]
        findings += [Anomaly("foreign-write", f"{load.color} operator", f) for f in own.foreign]
        planted = set(auditor.foreign.get(load.node, {}))
        findings += watched_foreign_indexes(watch, load, own, planted)
    timings["total"] = time.monotonic() - started

    lines = [
        "=" * 78,
        f"TWO-CLUSTER RUN  seed {seed} (session seed {session_seed}: TETHER_FAULTS_SEED={session_seed})"
        f"  ({'reduced' if REDUCED else 'full'})",
        f"timings: { {k: round(v, 1) for k, v in timings.items()} }",
    ]
    for load, watch in zip(loads, watches, strict=True):
        s = summaries[load.color]
        assert load.operator is not None
        lines.append(
            f"{load.color} ({load.cluster}): {len(load.ops)} operations ({load.retried} retried, "
            f"{len(load.failed)} failed, {load.busy} creates refused while the old one was deleting); "
            f"operator processes {load.operator.starts}; Consul writes: "
            f"{s.requests} transactions ({s.committed} committed), {s.ops} operations, "
            f"{len(s.foreign)} outside its own node/cluster; index history: {watch.states()} states of "
            f"{len(watch.history)} entries over {watch.queries} blocking queries"
        )
        lines += [f"  failed op: {f}" for f in load.failed[:10]]
    lines.append(f"faults: {len(injector.records)}")
    lines += [f"  {r}" for r in injector.records]
    lines += [f"isolation: {line}" for line in isolation]
    lines += report
    lines.append(
        f"foreign entries unchanged: {sum(len(s) for s in auditor.foreign.values())} on "
        f"{len(auditor.foreign)} nodes"
    )
    lines.append(f"anomalies: {len(findings)}")
    lines += [f"  - {a}" for a in findings[:40]]
    lines.append("=" * 78)
    text = "\n".join(lines)
    print("\n" + text)
    (tmp_path / "report.txt").write_text(text + "\n")
    (tmp_path / "writes.json").write_text(
        json.dumps(
            {load.color: [w.__dict__ for w in load.recorder.recorded()] for load in loads if load.recorder},
            indent=1,
        )
    )
    assert not findings, text
    assert not [f for load in loads for f in load.failed], "operations failed for good (see the report)"


def explain(anomalies: list[Anomaly], loads: list[ClusterLoad], when: str) -> str:
    counted = split(anomalies)[0]
    lines = [f"{len(counted)} anomalies {when}:"] + [f"  - {a}" for a in counted[:40]]
    for load in loads:
        if load.operator is not None:
            lines.append(
                f"--- {load.color} operator log tail ({load.operator.log_path}):\n"
                + load.operator.log_tail(40)
            )
    return "\n".join(lines)
