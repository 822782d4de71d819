"""A small asyncio Kubernetes client for the benchmark driver (aiohttp, kubeconfig).

The driver creates thousands of objects and watches them on a two-core
machine that also runs the API server and the operator, so its own cost must
stay small: the official client spends a thread and a model round-trip per
call, while plain JSON over one aiohttp session costs a fraction of that and
never blocks the event loop the latency timestamps are taken on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml

GROUP = "tether.dev"
VERSION = "v1alpha1"


class KubeError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def _material(entry: Mapping[str, Any], key: str, base: Path, scratch: Path) -> str | None:
    """A kubeconfig credential (``<key>`` path or ``<key>-data``) as a file path."""
    data = entry.get(f"{key}-data")
    if data:
        target = scratch / key
        target.write_bytes(base64.b64decode(data))
        return str(target)
    path = entry.get(key)
    if path:
        return str((base / str(path)).resolve())
    return None


class KubeApi:
    """Just the calls the benchmarks need, against the kubeconfig's current context."""

    def __init__(self, kubeconfig: Path, *, connections: int = 64) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        context_name = config.get("current-context")
        context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        self.server = str(cluster["server"]).rstrip("/")
        # ssl.load_cert_chain wants files; the material lives only as long as the client.
        self._scratch = tempfile.TemporaryDirectory(prefix="tether-bench-kube-")
        scratch = Path(self._scratch.name)
        base = kubeconfig.parent
        ca = _material(cluster, "certificate-authority", base, scratch)
        self._ssl = ssl.create_default_context(cafile=ca)
        cert = _material(user, "client-certificate", base, scratch)
        key = _material(user, "client-key", base, scratch)
        if cert and key:
            self._ssl.load_cert_chain(cert, key)
        self._headers = {"Content-Type": "application/json"}
        if user.get("token"):
            self._headers["Authorization"] = f"Bearer {user['token']}"
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeApi:
        connector = aiohttp.TCPConnector(limit=self._connections, ssl=self._ssl)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, timeout=aiohttp.ClientTimeout(total=60)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        self._scratch.cleanup()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use KubeApi as an async context manager"
        return self._session

    @staticmethod
    def path(plural: str, namespace: str, name: str = "", sub: str = "") -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    async def request(
        self, method: str, path: str, body: Any = None, *, content_type: str | None = None,
        params: Mapping[str, str] | None = None, ok_missing: bool = False,
    ) -> dict[str, Any]:
        headers = {"Content-Type": content_type} if content_type else None
        data = json.dumps(body) if body is not None else None
        async with self.session.request(
            method, self.server + path, data=data, headers=headers, params=params
        ) as resp:
            text = await resp.text()
            if resp.status == 404 and ok_missing:
                return {}
            if resp.status >= 400:
                raise KubeError(resp.status, text[:300])
            result: dict[str, Any] = json.loads(text) if text else {}
            return result

    async def ensure_namespace(self, name: str) -> None:
        try:
            await self.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
        except KubeError as exc:
            if exc.status != 409:
                raise

    async def create(self, plural: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", self.path(plural, namespace), body)

    async def merge_patch(
        self, plural: str, namespace: str, name: str, patch: Mapping[str, Any], *, sub: str = ""
    ) -> dict[str, Any]:
        return await self.request(
            "PATCH", self.path(plural, namespace, name, sub), patch,
            content_type="application/merge-patch+json",
        )

    async def delete(self, plural: str, namespace: str, name: str) -> None:
        await self.request("DELETE", self.path(plural, namespace, name), ok_missing=True)

    async def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        """The object, or ``{}`` when it does not exist."""
        return await self.request("GET", self.path(plural, namespace, name), ok_missing=True)

    async def list(self, plural: str, namespace: str) -> dict[str, Any]:
        return await self.request("GET", self.path(plural, namespace))

    async def count(self, plural: str, namespace: str) -> int:
        # limit=1 keeps the answer small; remainingItemCount gives the rest.
        listing = await self.request("GET", self.path(plural, namespace), params={"limit": "1"})
        items = len(listing.get("items") or [])
        return items + int((listing.get("metadata") or {}).get("remainingItemCount") or 0)

    async def watch(
        self, plural: str, namespace: str, resource_version: str, *, deadline: float
    ) -> AsyncIterator[tuple[float, str, dict[str, Any]]]:
        """Yield ``(monotonic arrival time, type, object)`` until ``deadline``.

        Re-opens the stream from the last resourceVersion seen when the server
        ends it; stops at ``deadline`` (monotonic) whatever happens, and after
        a bounded number of consecutive failures.
        """
        rv = resource_version
        failures = 0
        while time.monotonic() < deadline and failures < 10:
            remaining = max(1, int(deadline - time.monotonic()))
            params = {
                "watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true",
                "timeoutSeconds": str(min(remaining, 1800)),
            }
            try:
                async with self.session.get(
                    self.server + self.path(plural, namespace), params=params,
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=remaining + 30),
                ) as resp:
                    if resp.status >= 400:
                        raise KubeError(resp.status, (await resp.text())[:300])
                    failures = 0
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        arrived = time.monotonic()
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        kind = str(event.get("type", ""))
                        if kind == "ERROR":
                            # 410 Gone: the caller's view is too old; nothing sensible
                            # to resume from, so restart from "now" and say so.
                            rv = ""
                            break
                        rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                        if kind != "BOOKMARK":
                            yield arrived, kind, obj
            except (aiohttp.ClientError, TimeoutError, KubeError):
                failures += 1
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))


def ready(obj: Mapping[str, Any]) -> bool:
    """The contract's Ready: condition True and observedGeneration == generation."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    if status.get("observedGeneration") != meta.get("generation"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
