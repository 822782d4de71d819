"""An asyncio HTTP session to the Kubernetes API server, for the watches Tether runs itself.

Kopf watches Tether's own kinds. The objects *around* them — the ConfigMaps and
Secrets that ``spec.from`` names, the EndpointSlices of followed Services —
are watched by :mod:`tether.kubewatching`, per namespace and metadata only,
which Kopf cannot do (its watches are fixed at start-up and carry whole
bodies). The official client's watch is synchronous: one blocked thread per
watch. This session is aiohttp (already a dependency through Kopf), with the
credentials the official client loaded (certificates, CA, bearer token and its
refresh hook for in-cluster tokens), so both speak as the same identity.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import kubernetes.client as k8s

from tether.kube import KubeError

# Metadata only: the API server sends names, labels and resourceVersions, never
# a Secret's data or a ConfigMap's values (the server-side "as" conversion).
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
# A watch event is one line; aiohttp's line limit is twice its read buffer, and
# metadata can be large (a client-side `kubectl apply` annotation): 2 MiB → 4 MiB.
_READ_BUFFER = 2 * 1024 * 1024


class KubeHttp:
    """GETs and watch streams against the API server, as the loaded identity."""

    def __init__(
        self, configuration: k8s.Configuration | None = None, *, request_timeout: float = 30.0
    ) -> None:
        self._conf = configuration or k8s.Configuration.get_default_copy()
        self._request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        conf = self._conf
        if not conf.host.startswith("https"):
            return False
        if not conf.verify_ssl:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.create_default_context(cafile=conf.ssl_ca_cert or None)
        if conf.cert_file:
            context.load_cert_chain(conf.cert_file, conf.key_file or None)
        return context

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=0)
            self._session = aiohttp.ClientSession(
                base_url=self._conf.host.rstrip("/") + "/", connector=connector,
                read_bufsize=_READ_BUFFER,
            )
        return self._session

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept}
        # Calls the refresh hook an in-cluster configuration sets: projected
        # service-account tokens rotate, and a watch outlives one token.
        token = self._conf.get_api_key_with_prefix("authorization")
        if token:
            headers["Authorization"] = token
        return headers

    async def get(self, path: str, *, params: Mapping[str, str], accept: str = "application/json") -> Any:
        """One GET; an HTTP error is :class:`KubeError` with its status."""
        session = self._open()
        timeout = aiohttp.ClientTimeout(total=self._request_timeout)
        try:
            async with session.get(path.lstrip("/"), params=params, headers=self._headers(accept),
                                   timeout=timeout) as response:
                body = await response.read()
                if response.status >= 400:
                    raise KubeError(f"GET {path}: {response.status} {_message(body)}", response.status)
                return json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KubeError(f"GET {path}: {type(exc).__name__}: {exc}") from exc

    async def watch(
        self, path: str, *, params: Mapping[str, str], accept: str, timeout_seconds: int,
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of one watch request, until the server ends it (``timeout_seconds``)."""
        session = self._open()
        query = {**params, "watch": "1", "timeoutSeconds": str(timeout_seconds)}
        # The server ends the request after timeout_seconds; the client gives it
        # a margin, and a stalled connection (no bytes, not even a bookmark,
        # for that long) is cut rather than trusted.
        timeout = aiohttp.ClientTimeout(total=None, connect=self._request_timeout,
                                        sock_read=timeout_seconds + 30)
        try:
            async with session.get(path.lstrip("/"), params=query, headers=self._headers(accept),
                                   timeout=timeout) as response:
                if response.status >= 400:
                    body = await response.read()
                    raise KubeError(f"watch {path}: {response.status} {_message(body)}", response.status)
                async for line in response.content:
                    if line.strip():
                        yield json.loads(line)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KubeError(f"watch {path}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("message", ""))[:300]
    except (ValueError, AttributeError):
        return body[:300].decode(errors="replace")
