"""Liveness at ``/healthz`` on ``--health-port``, served from the first second.

A standby replica waiting for the leader Lease is alive and must say so, or the
kubelet would restart it forever; so this endpoint does not depend on Kopf
having started. It answers 500 when reconcile workers have keys waiting and
have made no progress for a while, and not at all when the event loop is stuck
(the probe's timeout then fails it).
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
        self.wedged_after = wedged_after
        # Returns (keys waiting?, reconciles finished so far).
        self.progress: Callable[[], tuple[bool, int]] = lambda: (False, 0)
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

    async def serve(self, port: int) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/healthz", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", port).start()
        return runner
