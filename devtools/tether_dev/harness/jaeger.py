"""Jaeger's all-in-one as a child process: a real OTLP receiver the tracing test queries.

Optional, never started by ``tether dev up``: the test that needs it starts one
(:meth:`Jaeger.start`), points the operator's ``OTEL_EXPORTER_OTLP_ENDPOINT`` at
:attr:`Jaeger.otlp_endpoint` and reads the traces back through Jaeger's query API
(``GET /api/traces?service=…``, ``GET /api/traces/<id>``), as a person would in its UI.
Spans are kept in memory only. Every listener is on a free loopback port, so
several test runs on one machine do not meet. The program comes from the pinned
build module ``devbin/jaeger`` (:func:`tether_dev.binaries.ensure_optional`).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tether_dev import processes
from tether_dev.harness import waiting
from tether_dev.harness.ports import free_port

PROGRAM = "jaeger-all-in-one"
#: Bound on one query API call.
QUERY_TIMEOUT = 5.0

# Every listener of the v1 all-in-one (collector, OTLP, query, admin), each moved
# off its default port.
_LISTENERS = (
    "collector.otlp.http.host-port",
    "collector.otlp.grpc.host-port",
    "collector.http-server.host-port",
    "collector.grpc-server.host-port",
    "query.http-server.host-port",
    "query.grpc-server.host-port",
    "admin.http.host-port",
)


class Jaeger:
    """One all-in-one process with in-memory storage, logging to ``log_path``."""

    def __init__(self, binary: Path, log_path: Path) -> None:
        self.binary = binary
        self.log_path = log_path
        self.ports = {flag: free_port() for flag in _LISTENERS}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def otlp_endpoint(self) -> str:
        """The value for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (OTLP over HTTP/protobuf)."""
        return f"http://127.0.0.1:{self.ports['collector.otlp.http.host-port']}"

    @property
    def query_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['query.http-server.host-port']}"

    def argv(self) -> list[str]:
        return [str(self.binary), *(f"--{flag}=127.0.0.1:{port}" for flag, port in self.ports.items())]

    def start(self, *, timeout: float = 60.0) -> Jaeger:
        """Start it; return once the query API answers."""
        env = {**os.environ, "SPAN_STORAGE_TYPE": "memory"}
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv(), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        waiting.wait_for(self._serving, timeout=timeout, interval=0.2, message="Jaeger's query API")
        return self

    def _serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise waiting.GiveUp(f"Jaeger exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            self._get("/api/services")
        except OSError:
            return False
        return True

    def _get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.query_url}{path}{query}", timeout=QUERY_TIMEOUT) as resp:
            return json.loads(resp.read())

    def traces(self, service: str, *, limit: int = 200, lookback: str = "1h") -> list[dict[str, Any]]:
        """The traces of ``service`` Jaeger holds (its query API's ``data``)."""
        return list(self._get("/api/traces", service=service, limit=str(limit), lookback=lookback)["data"])

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """One trace by its hex ID; None when Jaeger does not know it."""
        try:
            data = self._get(f"/api/traces/{trace_id}")["data"]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return dict(data[0]) if data else None

    def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        processes.stop_child(self.proc, grace=grace)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no Jaeger log)"
        return "\n".join(text.splitlines()[-lines:])


def spans_by_id(trace: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A Jaeger trace's spans by span ID, each with ``tags`` as a plain dict and ``parent``."""
    out: dict[str, dict[str, Any]] = {}
    for span in trace.get("spans") or []:
        parents = [r["spanID"] for r in span.get("references") or [] if r.get("refType") == "CHILD_OF"]
        out[span["spanID"]] = {
            **span,
            "tags": {t["key"]: t["value"] for t in span.get("tags") or []},
            "parent": parents[0] if parents else None,
        }
    return out
