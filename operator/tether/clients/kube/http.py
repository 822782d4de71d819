"""An asyncio HTTP session to the Kubernetes API server: every call Tether makes itself.

The official ``kubernetes`` client is synchronous: each call ran in a worker
thread (≈14 % of the operator's CPU in the thread pool and model conversion at
N = 1000), a call had no deadline of its own (a stalled connection pinned a
worker), and a watch would block a thread for its whole life. This session is
aiohttp — already a dependency through Kopf — speaking JSON, with a deadline
on every request, and the credentials the official client's config loader
found (certificates, CA, bearer token and the refresh hook that re-reads a
rotated in-cluster token), so Kopf, the Lease elector and Tether's own calls
speak as one identity. ``kubernetes.aio`` was the other candidate: it would
load a second copy of the client's thousand model classes for no gain here.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import kubernetes.client as k8s

from tether import tracing
from tether.errors import BackendError, BackendRejected, BackendUnavailable, Contended


class KubeError(BackendError):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0 if none).

    Raised only as one of the subclasses below, chosen by :func:`kube_error`.
    """

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class KubeUnavailable(KubeError, BackendUnavailable):
    """No answer (refused, timed out, unreadable), a 5xx, or 408/429: retry later."""


class KubeRejected(KubeError, BackendRejected):
    """The API server answered no: 401/403 (RBAC), 400/422 (invalid), any other 4xx."""


class KubeNotFound(KubeError, BackendRejected):
    """404: the object (or its namespace, or its API) does not exist."""


class KubeConflict(KubeError, Contended):
    """409: a write guarded by ``resourceVersion`` met a newer object (or it exists)."""


class KubeGone(KubeError, BackendUnavailable):
    """410: the watch's ``resourceVersion`` is older than the history kept; list again."""


def kube_error(
    what: str, status: int, body: bytes | str | Mapping[str, Any] = b"", reason: str = ""
) -> KubeError:
    """The one response check: an HTTP status and its body as the error to raise.

    ``status`` 0 means no HTTP answer (``body`` then says why, as text);
    otherwise ``body`` is the raw response or a decoded ``Status`` object (a
    watch stream's ERROR event), of which the ``message`` is kept.
    Every failure of :class:`KubeHttp`, and so of the facade, comes from here.
    """
    detail = _message(body)
    message = f"{what}: {status} {reason}: {detail}" if reason else f"{what}: {status} {detail}"
    if status == 0:
        return KubeUnavailable(f"{what}: {detail}", 0)
    if status == 404:
        return KubeNotFound(message, status)
    if status == 409:
        return KubeConflict(message, status)
    if status == 410:
        return KubeGone(message, status)
    if status in (408, 429) or status >= 500:
        # Overloaded (API priority and fairness answers 429) or failing: transient.
        return KubeUnavailable(message, status)
    if 400 <= status < 500:
        return KubeRejected(message, status)
    # Not an error status at all (a caller's mistake): nothing says a retry fails.
    return KubeUnavailable(message, status)


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
        token = self._conf.get_api_key_with_prefix("BearerToken", alias="authorization")
        if token:
            headers["Authorization"] = token
        return headers

    @tracing.traced(lambda _self, method, path, **kwargs: _span_of(method, path, kwargs.get("what", "")))
    async def request(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None, body: Any = None,
        content_type: str = "application/json", accept: str = "application/json", what: str = "",
    ) -> Any:
        """One call, within the request deadline; an HTTP error is :class:`KubeError` with its status."""
        session = self._open()
        timeout = aiohttp.ClientTimeout(total=self._request_timeout)
        headers = self._headers(accept)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        what = what or f"{method} {path}"
        try:
            async with session.request(method, path.lstrip("/"), params=params, data=data, headers=headers,
                                       timeout=timeout) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise kube_error(what, response.status, raw, response.reason or "")
                return json.loads(raw) if raw else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise kube_error(what, 0, f"{type(exc).__name__}: {exc}") from exc

    async def get(self, path: str, *, params: Mapping[str, str], accept: str = "application/json") -> Any:
        """One GET (see :meth:`request`)."""
        return await self.request("GET", path, params=params, accept=accept)

    async def post(self, path: str, body: Any) -> Any:
        """One POST of a JSON body, e.g. a TokenReview (see :meth:`request`)."""
        return await self.request("POST", path, body=body)

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
                    raise kube_error(f"watch {path}", response.status, await response.read())
                async for line in response.content:
                    if line.strip():
                        yield json.loads(line)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise kube_error(f"watch {path}", 0, f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _span_of(method: str, path: str, what: str) -> tuple[str, dict[str, str]]:
    """A request's span: named by method and resource ("kubernetes PATCH consulservices/status")."""
    parts = path.strip("/").split("/")
    # .../namespaces/<namespace>/<plural>[/<name>[/<subresource>]]
    at = parts.index("namespaces") + 2 if "namespaces" in parts else len(parts) - 1
    resource = parts[min(at, len(parts) - 1)]
    if len(parts) > at + 2:
        resource += "/" + parts[at + 2]
    attrs = {"http.request.method": method, "url.path": path}
    if what:
        attrs["tether.call"] = what
    return f"kubernetes {method} {resource}", attrs


def _message(body: bytes | str | Mapping[str, Any]) -> str:
    """The ``message`` of a ``Status`` body, else the body's start."""
    if isinstance(body, str):
        return body[:300]
    if isinstance(body, Mapping):
        return str(body.get("message", ""))[:300]
    try:
        return str(json.loads(body).get("message", ""))[:300]
    except (ValueError, AttributeError):
        return body[:300].decode(errors="replace")
