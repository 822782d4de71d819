"""etcd read and written through its JSON gateway, as a test or an auditor would.

The gateway is the server's own HTTP mapping of the v3 KV API (keys and values
base64 in JSON), so a test needs no gRPC client, and none of the operator's client
code sits between the test and what etcd really holds.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: str) -> bytes:
    """The range end that makes [prefix, end) "every key starting with prefix"."""
    key = bytearray(prefix.encode())
    while key:
        if key[-1] < 0xFF:
            key[-1] += 1
            return bytes(key)
        key.pop()
    return b"\0"


class Etcd:
    """The first of ``endpoints`` (a comma-separated list, as in ``ETCD_ENDPOINTS``)."""

    def __init__(self, endpoints: str, *, timeout: float = 10.0) -> None:
        self.endpoint = endpoints.split(",")[0].rstrip("/")
        self.timeout = timeout

    @classmethod
    def from_env(cls, env: Mapping[str, str], **kwargs: Any) -> Etcd:
        """The etcd a dev stack's env names in ``ETCD_ENDPOINTS``."""
        return cls(env["ETCD_ENDPOINTS"], **kwargs)

    def call(self, path: str, body: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """POST ``body`` to the gateway's ``path`` (``/v3/kv/range`` ...); the decoded answer."""
        req = urllib.request.Request(self.endpoint + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
            result: dict[str, Any] = json.loads(resp.read())
        return result

    def range(self, prefix: str) -> tuple[int, dict[str, tuple[str, int]]]:
        """(store revision, {key: (value, mod_revision)}) for every key under ``prefix``."""
        out = self.call("/v3/kv/range", {"key": _b64(prefix.encode()), "range_end": _b64(prefix_end(prefix))})
        kvs = {
            base64.b64decode(kv["key"]).decode(): (
                base64.b64decode(kv.get("value", "")).decode(errors="replace"),
                int(kv["mod_revision"]),
            )
            for kv in out.get("kvs", [])
        }
        return int(out["header"]["revision"]), kvs

    def entries(self, prefix: str) -> dict[str, tuple[str, int]]:
        """{key: (value, mod_revision)} for every key under ``prefix``."""
        return self.range(prefix)[1]

    def keys(self, prefix: str) -> dict[str, str]:
        """{key: value} for every key under ``prefix``."""
        return {k: v for k, (v, _) in self.entries(prefix).items()}

    def get(self, key: str) -> str | None:
        """The value of exactly ``key``, or None."""
        kvs = self.call("/v3/kv/range", {"key": _b64(key.encode())}).get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")).decode(errors="replace") if kvs else None

    def count(self, prefix: str) -> int:
        out = self.call(
            "/v3/kv/range",
            {"key": _b64(prefix.encode()), "range_end": _b64(prefix_end(prefix)), "count_only": True},
        )
        return int(out.get("count", 0))

    def revision(self) -> int:
        return self.range("\0")[0]

    def put(self, key: str, value: str) -> int:
        """Write ``key``; the store revision of the write."""
        out = self.call("/v3/kv/put", {"key": _b64(key.encode()), "value": _b64(value.encode())})
        return int(out["header"]["revision"])

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": _b64(key.encode())})

    def put_if_present(self, key: str, value: str, *, guard: str) -> bool:
        """Put ``key`` only while both it and ``guard`` exist (one transaction)."""
        compare = [
            {"key": _b64(k.encode()), "target": "VERSION", "result": "GREATER", "version": "0"}
            for k in (key, guard)
        ]
        put = {"request_put": {"key": _b64(key.encode()), "value": _b64(value.encode())}}
        out = self.call("/v3/kv/txn", {"compare": compare, "success": [put]})
        return bool(out.get("succeeded"))

    def compact(self, revision: int | None = None) -> int:
        """Compact history up to ``revision`` (default: the current one); return it."""
        rev = revision or self.revision()
        try:
            self.call("/v3/kv/compaction", {"revision": rev}, timeout=30)
        except urllib.error.HTTPError as exc:
            # Already compacted at or past it: the history is gone either way.
            if "compacted" not in exc.read().decode(errors="replace"):
                raise
        return rev
