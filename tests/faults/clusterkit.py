"""Instruments for the two-cluster run: who wrote what to Consul's catalog, and when.

Two Tether operators with different cluster names share one Consul. To prove
that neither ever writes to the other's instances, the run records writes
from both ends:

- :class:`WriteRecorder` — a forwarding HTTP proxy between one operator and
  the real Consul. Everything passes through unchanged; every request that is
  not a read is recorded with its body and Consul's answer. A catalog
  transaction's answer carries the ``ModifyIndex`` Consul gave each entry it
  set, so the recorder knows exactly which Raft indexes that operator produced.
  (The operator's own write counter resets when the process is killed; the
  recorder outlives it.)
- :class:`CatalogWatch` — blocking queries on one node's services and checks,
  keeping each entry's ``CreateIndex``/``ModifyIndex`` history as Consul
  reports it, for the whole run.
- :func:`snapshot` — one node's catalog entries, byte for byte (indexes
  included), to compare before and after another cluster's churn.

An index seen on cluster A's node that no write of A's produced is a write by
someone else; a write of B's that names A's node (or any node but B's own) is
one directly. Both are checked by the test.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tether_dev.harness.consul import Consul

#: Headers that belong to one connection, not to the request: never forwarded.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
}
#: Longer than any blocking query the operator makes (its wait plus jitter).
UPSTREAM_TIMEOUT = 900.0


@dataclass
class Write:
    """One request that was not a read, and Consul's answer."""

    at: float
    method: str
    path: str
    body: str
    status: int
    answer: str


@dataclass
class TxnSummary:
    """What one operator's recorded writes did, per the requests and Consul's answers."""

    requests: int = 0
    committed: int = 0  # answered 200
    ops: int = 0
    #: Raft indexes Consul gave entries this operator set (from the answers).
    indexes: set[int] = field(default_factory=set)
    #: Writes outside its own node or with another cluster's ownership meta.
    foreign: list[str] = field(default_factory=list)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A killed operator resets its connections: expected in a fault run, not worth a traceback.
        pass


class WriteRecorder:
    """A transparent HTTP proxy to ``upstream`` (Consul) that records every write."""

    def __init__(self, upstream: str, name: str) -> None:
        target = urllib.parse.urlsplit(upstream)
        self.host, self.port = target.hostname or "127.0.0.1", target.port or 8500
        self.name = name
        self.writes: list[Write] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as the operator's aiohttp client expects of Consul.
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the run's output is its report, not an access log

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream = http.client.HTTPConnection(recorder.host, recorder.port, timeout=UPSTREAM_TIMEOUT)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    answer = response.read()
                except OSError:
                    # Consul is down: the operator must see a broken connection,
                    # as it would without the proxy, not an answer.
                    self.close_connection = True
                    return
                finally:
                    upstream.close()
                if self.command != "GET":
                    # The operator's client asks for gzip; the record needs the JSON.
                    readable = answer
                    if (response.getheader("Content-Encoding") or "").lower() == "gzip":
                        readable = gzip.decompress(answer)
                    recorder._record(
                        Write(
                            time.monotonic(),
                            self.command,
                            self.path,
                            body.decode(errors="replace"),
                            response.status,
                            readable.decode(errors="replace"),
                        )
                    )
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the operator gave up waiting: fine
                    self.wfile.write(answer)

            do_GET = do_PUT = do_POST = do_DELETE = _forward

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"recorder-{name}", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _record(self, write: Write) -> None:
        with self._lock:
            self.writes.append(write)

    def recorded(self) -> list[Write]:
        with self._lock:
            return list(self.writes)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def summary(self, *, node: str, cluster: str) -> TxnSummary:
        """Every recorded write checked against ``node`` and ``cluster`` (its own)."""
        out = TxnSummary()
        for write in self.recorded():
            out.requests += 1
            path = urllib.parse.urlsplit(write.path).path
            if (write.method, path) != ("PUT", "/v1/txn"):
                out.foreign.append(f"{write.method} {write.path}: not a catalog transaction")
                continue
            try:
                ops = json.loads(write.body)
            except ValueError:
                out.foreign.append(f"unreadable transaction body {write.body[:100]!r}")
                continue
            out.ops += len(ops)
            for op in ops:
                problem = _foreign_op(op, node=node, cluster=cluster)
                if problem:
                    out.foreign.append(problem)
            if write.status == 200:
                out.committed += 1
                with contextlib.suppress(ValueError):
                    for result in (json.loads(write.answer) or {}).get("Results") or []:
                        for entry in result.values():
                            if isinstance(entry, dict) and entry.get("ModifyIndex"):
                                out.indexes.add(int(entry["ModifyIndex"]))
        return out


def _foreign_op(op: dict[str, Any], *, node: str, cluster: str) -> str | None:
    """Why one transaction operation touches something not ``cluster``'s, or None."""
    if "Service" in op:
        target = op["Service"].get("Node")
        meta = (op["Service"].get("Service") or {}).get("Meta")
        if target != node:
            return f"service op on node {target!r}: {json.dumps(op)[:200]}"
        # A delete names only ID and service name; a set carries the full meta.
        if meta is not None and meta.get("tether-cluster") != cluster:
            return f"service op with ownership meta {meta}: {json.dumps(op)[:200]}"
        return None
    if "Check" in op:
        target = (op["Check"].get("Check") or {}).get("Node")
        return None if target == node else f"check op on node {target!r}: {json.dumps(op)[:200]}"
    if "Node" in op:
        body = op["Node"].get("Node") or {}
        if body.get("Node") != node:
            return f"node op on node {body.get('Node')!r}"
        meta = body.get("Meta")
        if meta is not None and meta.get("tether-cluster") != cluster:
            return f"node op with meta {meta}"
        return None
    return f"operation outside the catalog: {json.dumps(op)[:200]}"


# ------------------------------------------------------------------ reading the catalog


def snapshot(consul: Consul, node: str) -> dict[str, str]:
    """Every entry on ``node`` (the node, each service, each check) as canonical JSON, indexes included."""
    out: dict[str, str] = {}
    got = consul.call("GET", f"/v1/catalog/node-services/{node}")
    if got and got.get("Node"):
        out["node"] = json.dumps(got["Node"], sort_keys=True)
        for svc in got.get("Services") or []:
            out[f"service {svc['ID']}"] = json.dumps(svc, sort_keys=True)
    for check in consul.call("GET", f"/v1/health/node/{node}") or []:
        out[f"check {check['CheckID']}"] = json.dumps(check, sort_keys=True)
    return out


def diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What changed between two snapshots, one line per entry."""
    lines = []
    for key in sorted(set(before) | set(after)):
        if key not in after:
            lines.append(f"{key} removed")
        elif key not in before:
            lines.append(f"{key} added")
        elif before[key] != after[key]:
            old, new = json.loads(before[key]), json.loads(after[key])
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            lines.append(
                f"{key} changed: {', '.join(f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in changed)}"
            )
    return lines


@dataclass
class Seen:
    """One state of one entry, as a blocking query returned it."""

    create: int
    modify: int
    cluster: str  # the entry's tether-cluster meta (checks: their service's), "" if none


class CatalogWatch:
    """Blocking queries on ``node``'s services and checks until :meth:`stop`; each entry's index history."""

    def __init__(self, consul_addr: str, node: str, *, wait: str = "2s") -> None:
        # A client of its own, with a timeout above the blocking wait.
        self.consul = Consul(consul_addr, timeout=10.0)
        self.node = node
        self.wait = wait
        self.history: dict[str, list[Seen]] = {}
        self.queries = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._owners: dict[str, str] = {}  # service ID -> its tether-cluster meta
        self._threads = [
            threading.Thread(target=self._loop, args=(kind,), name=f"watch-{node}-{kind}", daemon=True)
            for kind in ("services", "checks")
        ]
        for thread in self._threads:
            thread.start()

    def _loop(self, kind: str) -> None:
        index = 0
        path = (
            f"/v1/catalog/node-services/{self.node}" if kind == "services" else f"/v1/health/node/{self.node}"
        )
        while not self._stop.is_set():
            try:
                query = f"?index={index}&wait={self.wait}" if index else ""
                got, index = self._get(path + query)
                self.queries += 1
            except Exception:
                # Consul paused or restarting: try again, from the start.
                self.errors += 1
                index = 0
                self._stop.wait(0.5)
                continue
            if kind == "services":
                self._services(got)
            else:
                self._checks(got or [])

    def _get(self, path: str) -> tuple[Any, int]:
        req = urllib.request.Request(self.consul.addr + path)
        with urllib.request.urlopen(req, timeout=self.consul.timeout) as resp:
            index = int(resp.headers.get("X-Consul-Index") or 0)
            text = resp.read().decode()
        return (json.loads(text) if text.strip() else None), index

    def _note(self, key: str, entry: dict[str, Any], cluster: str) -> None:
        seen = Seen(int(entry.get("CreateIndex") or 0), int(entry.get("ModifyIndex") or 0), cluster)
        with self._lock:
            history = self.history.setdefault(key, [])
            if not history or (history[-1].create, history[-1].modify) != (seen.create, seen.modify):
                history.append(seen)

    def _services(self, got: dict[str, Any] | None) -> None:
        if not got or not got.get("Node"):
            return
        node = got["Node"]
        self._note("node", node, str((node.get("Meta") or {}).get("tether-cluster", "")))
        for svc in got.get("Services") or []:
            cluster = str((svc.get("Meta") or {}).get("tether-cluster", ""))
            with self._lock:
                self._owners[str(svc["ID"])] = cluster
            self._note(f"service {svc['ID']}", svc, cluster)

    def _checks(self, checks: list[dict[str, Any]]) -> None:
        for check in checks:
            with self._lock:
                cluster = self._owners.get(str(check.get("ServiceID") or ""), "")
            self._note(f"check {check['CheckID']}", check, cluster)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def states(self) -> int:
        with self._lock:
            return sum(len(h) for h in self.history.values())
