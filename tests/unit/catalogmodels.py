"""An in-memory model of Consul's catalog, for unit tests of ConsulService endpoints mode.

In the spirit of :mod:`kvmodels`: the model keeps what endpoints mode relies
on and nothing more, and runs the real ``/v1/txn`` bodies the planner
(:mod:`tether.consulservice.endpoints`) builds, so the tests check outcomes —
what the catalog holds afterwards:

* nodes, services on a node, checks on a node, each with a ``ModifyIndex``;
  every write moves one catalog-wide raft index, and everything one
  transaction writes carries the same new index;
* ``/v1/txn`` catalog verbs ``cas`` and ``delete-cas`` on nodes, services
  and checks: ``ModifyIndex`` 0 means "only if absent", anything else must
  equal the entry's; all or nothing (Consul's 409, raised as
  :class:`~tether.clients.consul.client.ConsulContended`). A service or
  check needs its node (a check with a ``ServiceID``, its service too);
  deleting a service deletes its checks, deleting a node everything on it.
  Any other verb fails the test: Tether only sends guarded operations;
* the ``filter`` expressions Tether sends (``==`` on a field or a
  ``Meta["key"]``, ``and``, ``or``, parentheses), evaluated here, so a wrong
  filter shows as a wrong read.

:class:`FakeCatalog` puts the model behind the
:class:`~tether.clients.consul.client.Catalog` protocol.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from tether.clients.consul.client import ConsulContended, ConsulRejected


class CatalogModel:
    """Consul's catalog, as much of it as endpoints mode touches."""

    def __init__(self) -> None:
        self.index = 1
        self.txns = 0  # transactions that committed
        self.nodes: dict[str, dict[str, Any]] = {}
        self.services: dict[str, dict[str, dict[str, Any]]] = {}  # node → ID → service
        self.checks: dict[str, dict[str, dict[str, Any]]] = {}  # node → CheckID → check

    # -- what someone else than Tether writes (another cluster, another tool) ---------
    def plant_node(self, node: str, meta: Mapping[str, str] | None = None) -> None:
        self.index += 1
        self.nodes[node] = {"Node": node, "Address": "127.0.0.1", "Meta": dict(meta or {}),
                            "CreateIndex": self.index, "ModifyIndex": self.index}
        self.services.setdefault(node, {})
        self.checks.setdefault(node, {})

    def plant_service(self, node: str, body: Mapping[str, Any], *, status: str = "passing") -> None:
        """A service (with one check) registered outside Tether."""
        self.index += 1
        svc = {"ID": "", "Service": "", "Address": "", "Port": 0, "Tags": [], "Meta": {}, **body}
        svc.update(CreateIndex=self.index, ModifyIndex=self.index)
        self.services[node][str(svc["ID"])] = svc
        cid = f"{svc['ID']}:external"
        self.checks[node][cid] = {
            "Node": node, "CheckID": cid, "Name": "external", "Status": status, "Output": "",
            "ServiceID": svc["ID"], "ServiceName": svc["Service"],
            "CreateIndex": self.index, "ModifyIndex": self.index,
        }

    # -- reads ------------------------------------------------------------------------
    def instances(self, node: str) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self.services.get(node, {}))

    def check_status(self, node: str) -> dict[str, str]:
        """Service ID → the status of its checks (joined when several)."""
        out: dict[str, list[str]] = {}
        for check in self.checks.get(node, {}).values():
            out.setdefault(str(check.get("ServiceID") or ""), []).append(str(check["Status"]))
        return {sid: ",".join(sorted(states)) for sid, states in out.items()}

    # -- /v1/txn ------------------------------------------------------------------------
    def txn(self, ops: list[dict[str, Any]]) -> bool:
        """Apply every operation or none; False when a guard failed (Consul's 409)."""
        nodes = copy.deepcopy(self.nodes)
        services = copy.deepcopy(self.services)
        checks = copy.deepcopy(self.checks)
        stamp = self.index + 1
        for op in ops:
            ((what, body),) = op.items()
            verb = body["Verb"]
            if verb not in ("cas", "delete-cas"):
                raise AssertionError(f"Tether must not send the catalog verb {verb!r} (only guarded ops)")
            if what == "Node":
                entry = body["Node"]
                name, index = entry["Node"], int(entry["ModifyIndex"])
                existing = nodes.get(name)
                if not _guard(existing, index, verb):
                    return False
                if verb == "cas":
                    nodes[name] = {**entry, "CreateIndex": existing["CreateIndex"] if existing else stamp,
                                   "ModifyIndex": stamp}
                    services.setdefault(name, {})
                    checks.setdefault(name, {})
                else:
                    del nodes[name]
                    services.pop(name, None)
                    checks.pop(name, None)
            elif what == "Service":
                node, entry = body["Node"], body["Service"]
                if node not in nodes:
                    return False
                sid, index = str(entry["ID"]), int(entry["ModifyIndex"])
                assert entry.get("Service"), "Consul validates a service op's body: the name is required"
                existing = services[node].get(sid)
                if not _guard(existing, index, verb):
                    return False
                if verb == "cas":
                    services[node][sid] = {
                        "ID": sid, "Service": entry["Service"], "Address": entry.get("Address", ""),
                        "Port": entry.get("Port", 0), "Tags": list(entry.get("Tags") or []),
                        "Meta": dict(entry.get("Meta") or {}),
                        "CreateIndex": existing["CreateIndex"] if existing else stamp, "ModifyIndex": stamp,
                    }
                else:
                    del services[node][sid]
                    for cid in [c for c, chk in checks[node].items() if chk.get("ServiceID") == sid]:
                        del checks[node][cid]
            elif what == "Check":
                entry = body["Check"]
                node, cid, index = entry["Node"], str(entry["CheckID"]), int(entry["ModifyIndex"])
                if node not in nodes:
                    return False
                existing = checks[node].get(cid)
                if not _guard(existing, index, verb):
                    return False
                if verb == "cas":
                    sid = str(entry.get("ServiceID") or "")
                    if sid and sid not in services[node]:
                        return False
                    checks[node][cid] = {
                        **{k: v for k, v in entry.items() if k != "ModifyIndex"},
                        "CreateIndex": existing["CreateIndex"] if existing else stamp, "ModifyIndex": stamp,
                    }
                else:
                    del checks[node][cid]
            else:
                raise AssertionError(f"unexpected catalog operation {what!r}")
        self.nodes, self.services, self.checks = nodes, services, checks
        self.index = stamp
        self.txns += 1
        return True


def _guard(existing: Mapping[str, Any] | None, index: int, verb: str) -> bool:
    if verb == "cas" and index == 0:
        return existing is None
    return existing is not None and int(existing["ModifyIndex"]) == index


# -- Consul's filter expressions, the part Tether uses ------------------------------------

_TOKEN = re.compile(r'\s*(?:(==)|(\()|(\))|(\[)|(\])|"((?:[^"\\]|\\.)*)"|([A-Za-z_][A-Za-z0-9_.]*))')


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise AssertionError(f"filter the model cannot read: {text[pos:]!r}")
        pos = m.end()
        eq, lp, rp, lb, rb, string, word = m.groups()
        if string is not None:
            out.append(("str", re.sub(r"\\(.)", r"\1", string)))
        elif word is not None:
            out.append(("word", word))
        else:
            out.append(("sym", eq or lp or rp or lb or rb))
    return out


def matches(expression: str, item: Mapping[str, Any]) -> bool:
    """Whether ``item`` passes the Consul filter ``expression``."""
    tokens = _tokens(expression)
    pos = 0

    def peek() -> tuple[str, str] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take(kind: str, value: str | None = None) -> str:
        nonlocal pos
        tok = peek()
        assert tok is not None and tok[0] == kind and (value is None or tok[1] == value), (tok, kind, value)
        pos += 1
        return tok[1]

    def disjunction() -> bool:
        result = conjunction()
        while peek() == ("word", "or"):
            take("word", "or")
            right = conjunction()
            result = result or right
        return result

    def conjunction() -> bool:
        result = atom()
        while peek() == ("word", "and"):
            take("word", "and")
            right = atom()
            result = result and right
        return result

    def atom() -> bool:
        if peek() == ("sym", "("):
            take("sym", "(")
            result = disjunction()
            take("sym", ")")
            return result
        field = take("word")
        value: Any = item.get(field)
        if peek() == ("sym", "["):
            take("sym", "[")
            key = take("str")
            take("sym", "]")
            value = (value or {}).get(key)
        take("sym", "==")
        literal = take("str")
        return value is not None and str(value) == literal

    result = disjunction()
    assert pos == len(tokens), f"trailing tokens in filter {expression!r}"
    return result


class FakeCatalog:
    """The :class:`tether.clients.consul.client.Catalog` protocol over a :class:`CatalogModel`."""

    def __init__(self, model: CatalogModel) -> None:
        self.model = model
        self.failure: Exception | None = None  # raised by every call while set
        self.reads = 0

    def _call(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def node_services(
        self, node: str, *, where: str | None = None, index: int = 0, wait: str = ""
    ) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]]]:
        self._call()
        self.reads += 1
        found = self.model.nodes.get(node)
        if found is None:
            return self.model.index, None, []
        services = [copy.deepcopy(s) for s in self.model.services[node].values()]
        if where is not None:
            services = [s for s in services if matches(where, s)]
        return self.model.index, copy.deepcopy(found), services

    async def node_checks(
        self, node: str, *, where: str | None = None, index: int = 0, wait: str = ""
    ) -> tuple[int, list[dict[str, Any]]]:
        self._call()
        self.reads += 1
        checks = [copy.deepcopy(c) for c in self.model.checks.get(node, {}).values()]
        if where is not None:
            checks = [c for c in checks if matches(where, c)]
        return self.model.index, checks

    async def catalog_txn(self, ops: list[dict[str, Any]]) -> None:
        self._call()
        if len(ops) > 128:
            raise ConsulRejected(f"too many operations in one transaction ({len(ops)})")
        if not self.model.txn(ops):
            raise ConsulContended("Consul rolled the catalog transaction back: index is stale")



NODE = "tether-kubernetes"


class NoCluster:
    """Kubernetes reads for endpoints mode when a test has no Service (every read finds nothing)."""

    async def read_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
        return []

    async def get(self, ref: Any) -> dict[str, Any] | None:
        return None


def consul_services(
    agent: Any, agent_index: Any, *, cluster: str = "kubernetes", agent_url: str = "",
    model: CatalogModel | None = None, kube: Any = None,
) -> Any:
    """The ConsulService reconciler with both modes: ``agent`` for fixed instances, and
    endpoints mode on ``model`` (an empty catalog unless given)."""
    from tether.consulservice.agent import AgentServices
    from tether.consulservice.catalog import CatalogServices
    from tether.consulservice.index import CatalogIndex
    from tether.consulservice.reconciling import ConsulServices

    catalog = CatalogServices(
        FakeCatalog(model or CatalogModel()), kube or NoCluster(),
        CatalogIndex(cluster=cluster, plural="consulservices"), cluster=cluster, node=NODE,
    )
    return ConsulServices(
        AgentServices(agent, agent_index, cluster=cluster, agent_url=agent_url), catalog, kube or NoCluster()
    )
