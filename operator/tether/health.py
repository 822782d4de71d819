"""Liveness at ``/healthz`` and readiness at ``/readyz`` on ``--health-port``.

Both are served from the first second.

Liveness: a standby replica waiting for the leader Lease is alive and must say
so, or the kubelet would restart it forever; so ``/healthz`` does not depend on
Kopf having started. It answers 500 when reconcile workers have keys waiting
and have made no progress for a while, and not at all when the event loop is
stuck (the probe's timeout then fails it).

Readiness: ``/readyz`` answers 200 only while the replica is doing its job —
a standby waiting for the Lease, or a leader whose controllers run and whose
Kopf watches have started — and 503 while starting (and while waiting for the
API server to serve Tether's kinds), once stopping, when wedged, and when a
kind is not served (watched) after start, naming it. An outage of Consul or
etcd does not make it unready: that is the resources' ``BackendUnavailable``,
and an unready operator would only be taken out of its Service and
PodDisruptionBudget for no gain.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from aiohttp import web

WEDGED_AFTER_SECONDS = 120.0


class Health:
    """What /healthz reports; the operator updates ``state`` and ``busy``."""

    def __init__(self, *, wedged_after: float = WEDGED_AFTER_SECONDS) -> None:
        self.state = "starting"
        # Set by the operator: True while standing by or working, False while
        # starting and once stopping.
        self.ready = False
        self.wedged_after = wedged_after
        # Returns (keys waiting?, reconciles finished so far).
        self.progress: Callable[[], tuple[bool, int]] = lambda: (False, 0)
        # Kinds Kopf does not watch a bound after start: their resources would
        # never be reconciled, so the replica is not ready whatever else holds.
        self.unserved: list[str] = []
        self._last_count = -1
        self._last_change = time.monotonic()

    def problem(self) -> str | None:
        """Why the operator is not healthy, or None."""
        waiting, count = self.progress()
        now = time.monotonic()
        if count != self._last_count or not waiting:
            self._last_count = count
            self._last_change = now
            return None
        if now - self._last_change > self.wedged_after:
            return f"reconcile workers made no progress for {now - self._last_change:.0f}s with keys waiting"
        return None

    async def _handle(self, request: web.Request) -> web.Response:
        problem = self.problem()
        body = {"status": "wedged" if problem else self.state}
        if problem:
            body["problem"] = problem
        return web.Response(status=500 if problem else 200, text=json.dumps(body),
                            content_type="application/json")

    def unready(self) -> str | None:
        """Why the replica is not ready, or None."""
        problem = self.problem()
        if problem:
            return problem
        if self.unserved:
            return f"not served by the API server: {', '.join(self.unserved)}"
        if not self.ready:
            return self.state
        return None

    async def _handle_ready(self, request: web.Request) -> web.Response:
        why = self.unready()
        body = {"status": "ready" if why is None else "not ready", "state": self.state}
        if why is not None:
            body["reason"] = why
        return web.Response(status=503 if why else 200, text=json.dumps(body),
                            content_type="application/json")

    async def serve(self, port: int) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/healthz", self._handle)
        app.router.add_get("/readyz", self._handle_ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", port).start()
        return runner
