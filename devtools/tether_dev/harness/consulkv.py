"""Consul's KV store, as a test reads and tampers with it.

Plain ``urllib`` with a timeout on every request, sharing no code with the
operator's own Consul client, so a bug there cannot hide itself in the check.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any


class ConsulKV:
    """The KV store of the agent at ``addr`` (``http://host:port``)."""

    def __init__(self, addr: str, *, token: str | None = None, timeout: float = 10.0) -> None:
        self.addr = addr.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_env(cls, env: Mapping[str, str], **kwargs: Any) -> ConsulKV:
        return cls(env["CONSUL_HTTP_ADDR"], **kwargs)

    def _request(self, method: str, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.addr + path, data=data, method=method)
        if self.token:
            req.add_header("X-Consul-Token", self.token)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return 404, b""
            raise

    @staticmethod
    def _path(key: str) -> str:
        return "/v1/kv/" + urllib.parse.quote(key, safe="/")

    def entries(self, prefix: str) -> dict[str, tuple[str, int]]:
        """``{key: (value, ModifyIndex)}`` of every key under ``prefix``."""
        status, body = self._request("GET", self._path(prefix) + "?recurse=true")
        if status == 404:
            return {}
        return {
            e["Key"]: (base64.b64decode(e["Value"]).decode() if e.get("Value") else "", int(e["ModifyIndex"]))
            for e in json.loads(body)
        }

    def values(self, prefix: str) -> dict[str, str]:
        return {k: v for k, (v, _) in self.entries(prefix).items()}

    def get(self, key: str) -> str | None:
        status, body = self._request("GET", self._path(key) + "?raw=true")
        return None if status == 404 else body.decode()

    def put(self, key: str, value: str) -> None:
        status, body = self._request("PUT", self._path(key), value.encode())
        assert status == 200 and body.strip() == b"true", (status, body)

    def delete(self, key: str) -> None:
        self._request("DELETE", self._path(key))
