"""The Consul agent's HTTP API, as a test reads and tampers with it.

Plain ``urllib`` with a timeout on every request: a paused agent (SIGSTOP) must cost
a read seconds, not the whole test, and nothing here shares code with the
operator's own Consul adapter, so a bug there cannot hide itself in the check.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any


class Consul:
    """One agent at ``addr`` (``http://host:port``); ``token`` is sent with every call."""

    def __init__(self, addr: str, *, token: str | None = None, timeout: float = 10.0) -> None:
        self.addr = addr.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_env(cls, env: Mapping[str, str], **kwargs: Any) -> Consul:
        """The agent a dev stack's env names in ``CONSUL_HTTP_ADDR``."""
        return cls(env["CONSUL_HTTP_ADDR"], **kwargs)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """``method path`` with ``body`` as JSON; the decoded answer, or None on 404 or empty."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.addr + path, data=data, method=method)
        if token or self.token:
            req.add_header("X-Consul-Token", token or self.token or "")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            # Absent is an answer tests ask for ("is it deregistered?"), not an error.
            if exc.code == 404:
                return None
            raise
        return json.loads(text) if text.strip() else None

    def services(self) -> dict[str, dict[str, Any]]:
        """Every service registered with this agent, by ID."""
        result: dict[str, dict[str, Any]] = self.call("GET", "/v1/agent/services") or {}
        return result

    def service(self, service_id: str) -> dict[str, Any] | None:
        """One registration as the agent holds it, or None."""
        result: dict[str, Any] | None = self.call("GET", f"/v1/agent/service/{service_id}")
        return result

    def checks(self, service_id: str | None = None) -> dict[str, dict[str, Any]]:
        """The agent's checks by check ID; only ``service_id``'s if given."""
        checks: dict[str, dict[str, Any]] = self.call("GET", "/v1/agent/checks") or {}
        if service_id is None:
            return checks
        return {k: v for k, v in checks.items() if v.get("ServiceID") == service_id}

    def register(self, body: Mapping[str, Any]) -> None:
        self.call("PUT", "/v1/agent/service/register", dict(body))

    def deregister(self, service_id: str) -> None:
        self.call("PUT", f"/v1/agent/service/deregister/{service_id}")
