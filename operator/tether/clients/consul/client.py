"""Consul I/O through py-consul's asyncio client: the agent API, the catalog and the KV store.

Every call has a deadline, so a hung agent cannot stall the operator; failures
are sorted into *unavailable* (retry with backoff) and *rejected* (ACL denied,
bad request: a person must act), subclasses of Tether's one error vocabulary.
py-consul's quirks stay in this module, as do the backend-up gauge and the
write counter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import aiohttp
import consul.aio
from consul import exceptions as consul_errors
from consul.callback import CB

from tether import errors, metrics, tracing
from tether.clients import reloading
from tether.clients.consul.connection import ConsulConnection
from tether.errors import BackendError, BackendRejected, BackendUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)


class ConsulError(BackendError):
    """Base of Consul failures."""


class ConsulUnavailable(ConsulError, BackendUnavailable):
    """The agent did not answer (refused, timed out, 5xx): retry later."""


class ConsulRejected(ConsulError, BackendRejected):
    """The agent answered no (ACL denied, invalid request): a person must act."""


class ConsulTooManyOps(ConsulRejected, errors.TooManyOperations):
    """A KV transaction had more operations than the server allows."""


class ConsulRequestTooLarge(ConsulRejected, errors.RequestTooLarge):
    """A request body was larger than the server allows (``txn_max_req_len``)."""


class ConsulContended(ConsulError, errors.Contended):
    """A guarded catalog transaction was rolled back: an entry changed since it was read."""


class Catalog(Protocol):
    """What endpoints mode needs from Consul's catalog: one node's entries, and transactions."""

    async def node_services(
        self, node: str, *, where: str | None = None, index: int = 0, wait: str = ""
    ) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]]]: ...

    async def node_checks(
        self, node: str, *, where: str | None = None, index: int = 0, wait: str = ""
    ) -> tuple[int, list[dict[str, Any]]]: ...

    async def catalog_txn(self, ops: list[dict[str, Any]]) -> None: ...


class Agent(Protocol):
    """What the reconciler and the watcher need from a Consul agent."""

    async def node_name(self) -> str: ...

    async def service(self, service_id: str) -> dict[str, Any] | None: ...

    async def service_checks(self, service_id: str) -> list[dict[str, Any]]: ...

    async def checks_with_ids(self, check_ids: Sequence[str]) -> list[dict[str, Any]]: ...

    async def services(self) -> dict[str, dict[str, Any]]: ...

    async def checks(self) -> dict[str, dict[str, Any]]: ...

    async def register(self, body: Mapping[str, Any], *, replace_checks: bool = True) -> None: ...

    async def deregister(self, service_id: str) -> None: ...

    async def wait_services(self, index: int, wait: str) -> int: ...

    async def wait_health(self, index: int, wait: str) -> int: ...


class ConsulClient:
    """The agent at ``CONSUL_HTTP_ADDR``, via py-consul's aiohttp client."""

    def __init__(self, conn: ConsulConnection) -> None:
        self.conn = conn
        self._token_file = (
            reloading.SecretFile(conn.token_file, "CONSUL_HTTP_TOKEN_FILE") if conn.token_file else None
        )
        # The TLS files are watched only where they are used: an https address.
        self._tls = reloading.WatchedFiles(
            (conn.ca_cert, conn.client_cert, conn.client_key) if conn.scheme == "https" else (),
            what=f"Consul client for {conn.url}",
        )
        self._session = self._tls.load(self._open)
        # Sessions replaced by a rotation, open until their calls in flight end.
        self._retired: set[_Session] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._self_denied = False  # the token may not read /v1/agent/self

    def _open(self) -> _Session:
        """A py-consul client (an aiohttp session) with the TLS files as they are now."""
        conn = self.conn
        verify: bool | str = conn.ca_cert or True
        cert = (conn.client_cert, conn.client_key) if conn.client_cert else None
        client = consul.aio.Consul(
            host=conn.host, port=conn.port, token=None, scheme=conn.scheme,
            verify=verify, cert=cert,
        )
        # py-consul reads CONSUL_HTTP_TOKEN itself and lets it win over the
        # argument; the token goes in each request's header instead (_headers).
        client.token = None
        return _Session(client, fingerprint=_cert_fingerprint(conn.client_cert))

    @property
    def _http(self) -> _Session:
        """The session for the next call: a new one once the TLS files changed on disk.

        Calls already running keep the session they started on; it is closed
        when the last of them ends, so a rotation loses no request.
        """
        if self._tls.due():
            fresh = self._tls.reload(self._open)
            if fresh is not None:
                old, self._session = self._session, fresh
                # A Secret's update rewrites every file: the certificate may be the same.
                log.log(
                    logging.INFO if fresh.fingerprint != old.fingerprint else logging.DEBUG,
                    "Consul TLS files changed: new connections to %s use client certificate %s "
                    "(was %s)", self.conn.url, fresh.fingerprint, old.fingerprint,
                )
                self._retire(old)
        return self._session

    def _retire(self, session: _Session) -> None:
        self._retired.add(session)
        session.on_idle(lambda: self._close_later(session))

    def _close_later(self, session: _Session) -> None:
        self._retired.discard(session)
        task = asyncio.get_running_loop().create_task(session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _headers(self) -> dict[str, str]:
        if self._token_file is not None:
            try:
                return {"X-Consul-Token": self._token_file.read()}
            except reloading.SecretFileError as exc:
                raise ConsulRejected(str(exc)) from None
        return {"X-Consul-Token": self.conn.token} if self.conn.token else {}

    @tracing.traced(lambda self, fn, *, what, **_: _span_of(what, self.conn.url))
    async def _call(
        self, fn: Callable[[], Awaitable[T]], *, what: str, deadline: float | None = None
    ) -> T:
        seconds = deadline or self.conn.timeout
        try:
            result = await asyncio.wait_for(fn(), seconds)
        except (TimeoutError, consul_errors.ConsulException, aiohttp.ClientError, OSError) as exc:
            raise self._failed(consul_error(what, exc, agent=self.conn.url, deadline=seconds)) from None
        self._up()
        return result

    def _failed(self, error: ConsulError) -> ConsulError:
        """Keep the backend gauge in step with ``error``: down only when the agent could not serve."""
        if isinstance(error, ConsulUnavailable):
            self._down()
        else:
            self._up()
        return error

    @staticmethod
    def _up() -> None:
        metrics.BACKEND_UP.labels(backend="consul").set(1)

    @staticmethod
    def _down() -> None:
        metrics.BACKEND_UP.labels(backend="consul").set(0)
        metrics.BACKEND_ERRORS.labels(backend="consul").inc()

    async def node_name(self) -> str:
        """The name of the node of the agent that answered (``/v1/agent/self``); "" if unknown.

        It needs ``agent:read``. A token without it is not an error (the rest
        works without): the check is skipped from then on, said once in the log.
        """
        if self._self_denied:
            return ""
        try:
            result: dict[str, Any] = await self._call(
                lambda: self._http.get(CB.json(), "/v1/agent/self", headers=self._headers()),
                what="read of the agent's own configuration",
            )
        except ConsulRejected as exc:
            self._self_denied = True
            log.info(
                "cannot tell whether CONSUL_HTTP_ADDR reaches one agent (%s); grant agent:read "
                "to CONSUL_HTTP_TOKEN to detect a load-balanced address", exc,
            )
            return ""
        return str(((result or {}).get("Config") or {}).get("NodeName") or "")

    async def service(self, service_id: str) -> dict[str, Any] | None:
        path = f"/v1/agent/service/{quote(service_id, safe='')}"
        result: dict[str, Any] | None = await self._call(
            lambda: self._http.get(CB.json(allow_404=True), path, headers=self._headers()),
            what=f"read of service {service_id!r}",
        )
        return result

    async def service_checks(self, service_id: str) -> list[dict[str, Any]]:
        expr = f"ServiceID == {json.dumps(service_id)}"
        result: dict[str, dict[str, Any]] = await self._call(
            lambda: self._http.get(
                CB.json(), "/v1/agent/checks", params=[("filter", expr)], headers=self._headers()
            ),
            what=f"read of checks of {service_id!r}",
        )
        return list((result or {}).values())

    async def checks_with_ids(self, check_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The agent's checks under any of ``check_ids``, whichever service holds them."""
        if not check_ids:
            return []
        expr = " or ".join(f"CheckID == {json.dumps(cid)}" for cid in sorted(set(check_ids)))
        result: dict[str, dict[str, Any]] = await self._call(
            lambda: self._http.get(
                CB.json(), "/v1/agent/checks", params=[("filter", expr)], headers=self._headers()
            ),
            what="read of checks by ID",
        )
        return list((result or {}).values())

    async def services(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = await self._call(
            lambda: self._http.get(CB.json(), "/v1/agent/services", headers=self._headers()),
            what="list of agent services",
        )
        return result or {}

    async def checks(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = await self._call(
            lambda: self._http.get(CB.json(), "/v1/agent/checks", headers=self._headers()),
            what="list of agent checks",
        )
        return result or {}

    async def register(self, body: Mapping[str, Any], *, replace_checks: bool = True) -> None:
        """Register ``body``; ``replace_checks=False`` keeps checks the body does not list."""
        metrics.WRITES.labels(system="consul").inc()
        params = [("replace-existing-checks", "true")] if replace_checks else []
        await self._call(
            lambda: self._http.put(
                CB.boolean(), "/v1/agent/service/register",
                params=params,
                data=json.dumps(body), headers=self._headers(),
            ),
            what=f"registration of {body.get('ID')!r}",
        )

    async def deregister(self, service_id: str) -> None:
        metrics.WRITES.labels(system="consul").inc()
        path = f"/v1/agent/service/deregister/{quote(service_id, safe='')}"
        await self._call(
            lambda: self._http.put(CB.boolean(), path, headers=self._headers()),
            what=f"deregistration of {service_id!r}",
        )

    async def _wait(self, path: str, index: int, wait: str, what: str) -> int:
        params = [("index", str(index)), ("wait", wait)] if index else []
        seconds = float(wait.rstrip("s")) if index else 0.0
        # Only the index is wanted: the body (every service, or every check
        # of the datacenter) is never parsed — decoding it on each change
        # was the operator's largest single cost while 1000 services converged.
        _, headers, _ = await self._kv_request(
            "GET", path, params=params, what=what,
            # Consul adds up to wait/16 of jitter to a blocking query.
            deadline=seconds * 1.1 + self.conn.timeout,
        )
        return int(headers.get("X-Consul-Index") or 0)

    async def wait_services(self, index: int, wait: str) -> int:
        """Block until the catalog's services change after ``index``; return the new index."""
        return await self._wait("/v1/catalog/services", index, wait, "watch of services")

    async def wait_health(self, index: int, wait: str) -> int:
        """Block until any check changes state after ``index``; return the new index."""
        return await self._wait("/v1/health/state/any", index, wait, "watch of checks")

    # -- the KV store -------------------------------------------------------------

    async def _kv_request(
        self, method: str, path: str, *, what: str, params: list[tuple[str, str]] | None = None,
        data: str = "", deadline: float | None = None, allow: tuple[int, ...] = (),
    ) -> tuple[int, Mapping[str, str], str]:
        """One raw call: status, headers, body; an error status not in ``allow`` raises."""
        def raw(response: Any) -> tuple[int, Mapping[str, str], str]:
            return int(response.code), response.headers, str(response.body or "")

        if method == "GET":
            call = lambda: self._http.get(raw, path, params=params, headers=self._headers())  # noqa: E731
        else:
            call = lambda: self._http.put(raw, path, params=params, data=data, headers=self._headers())  # noqa: E731
        code, headers, body = await self._call(call, what=what, deadline=deadline)
        if not 200 <= code < 300 and code not in allow:
            raise self._failed(consul_error(what, code=code, body=body))
        return code, headers, body

    async def kv_get(self, key: str) -> dict[str, Any] | None:
        """One KV entry as Consul returns it, or None."""
        code, _, body = await self._kv_request(
            "GET", f"/v1/kv/{quote(key, safe='/')}", what=f"read of KV key {key!r}", allow=(404,)
        )
        if code == 404:
            return None
        entries = json.loads(body) or []
        return dict(entries[0]) if entries else None

    async def kv_tree(
        self, prefix: str, *, index: int = 0, wait: str = ""
    ) -> tuple[int, list[dict[str, Any]]]:
        """Every entry under ``prefix`` and Consul's index; with ``index``, a blocking query."""
        params = [("recurse", "true")]
        deadline = None
        if index:
            params += [("index", str(index)), ("wait", wait)]
            # Consul adds up to wait/16 of jitter to a blocking query.
            deadline = float(wait.rstrip("s")) * 1.1 + self.conn.timeout
        code, headers, body = await self._kv_request(
            "GET", f"/v1/kv/{quote(prefix, safe='/')}", params=params,
            what=f"list of KV keys under {prefix!r}", deadline=deadline, allow=(404,),
        )
        new_index = int(headers.get("X-Consul-Index") or 0)
        if code == 404:
            return new_index, []
        return new_index, [dict(e) for e in json.loads(body) or []]

    async def kv_txn(self, ops: list[dict[str, Any]]) -> tuple[bool, list[dict[str, Any]]]:
        """Run one KV transaction: (True, results) when applied, (False, []) when rolled back."""
        metrics.WRITES.labels(system="consul").inc()
        try:
            _, _, body = await self._kv_request(
                "PUT", "/v1/txn", data=json.dumps(ops), what=f"KV transaction of {len(ops)} operations"
            )
        except ConsulContended:
            # A guard failed and Consul rolled the whole transaction back. (An
            # op the token may not write rolls it back too, but the mapping
            # makes that ConsulRejected: re-reading would not help.)
            return False, []
        results = (json.loads(body) or {}).get("Results") or []
        return True, [dict(r.get("KV") or {}) for r in results]

    # -- the catalog (endpoints mode) -----------------------------------------------

    def _blocking(self, index: int, wait: str) -> tuple[list[tuple[str, str]], float | None]:
        if not index:
            return [], None
        # Consul adds up to wait/16 of jitter to a blocking query.
        return [("index", str(index)), ("wait", wait)], float(wait.rstrip("s")) * 1.1 + self.conn.timeout

    async def node_services(
        self, node: str, *, where: str | None = None, index: int = 0, wait: str = ""
    ) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]]]:
        """The node (None if absent) and its services; ``where``: only those matching
        that Consul filter expression (the node is returned either way).

        With ``index``, a blocking query that returns once the node's services
        change after it (or after ``wait``).
        """
        new_index, data = await self._node_read(
            f"/v1/catalog/node-services/{quote(node, safe='')}", f"list of services on node {node!r}",
            where=where, index=index, wait=wait,
        )
        if not data or not data.get("Node"):
            return new_index, None, []
        return new_index, dict(data["Node"]), [dict(s) for s in data.get("Services") or []]

    async def node_checks(
        self, node: str, *, where: str | None = None, index: int = 0, wait: str = ""
    ) -> tuple[int, list[dict[str, Any]]]:
        """The checks on the node; ``where``: only those matching that filter expression."""
        new_index, data = await self._node_read(
            f"/v1/health/node/{quote(node, safe='')}", f"list of checks on node {node!r}",
            where=where, index=index, wait=wait,
        )
        return new_index, [dict(c) for c in data or []]

    async def _node_read(
        self, path: str, what: str, *, where: str | None, index: int, wait: str
    ) -> tuple[int, Any]:
        """One read of a node's services or checks (blocking with ``index``, filtered with
        ``where``): the X-Consul-Index and the JSON answer (None for a 404 or an empty body)."""
        params, deadline = self._blocking(index, wait)
        if where is not None:
            params.append(("filter", where))
        code, headers, body = await self._kv_request(
            "GET", path, params=params, what=what, deadline=deadline, allow=(404,),
        )
        data = json.loads(body) if code == 200 and body.strip() else None
        return int(headers.get("X-Consul-Index") or 0), data

    async def catalog_txn(self, ops: list[dict[str, Any]]) -> None:
        """Apply one catalog transaction; :class:`ConsulContended` when a guard failed."""
        metrics.WRITES.labels(system="consul").inc()
        # A 409 (a failed guard: Consul rolled the whole transaction back) is
        # ConsulContended, from the one mapping.
        await self._kv_request(
            "PUT", "/v1/txn", data=json.dumps(ops),
            what=f"catalog transaction of {len(ops)} operations",
        )

    async def close(self) -> None:
        sessions = [self._session, *self._retired]
        self._retired.clear()
        for session in sessions:
            await session.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _Session:
    """One py-consul client and its aiohttp session, counting the calls running on it.

    Exposes the two raw calls the client makes (``get``, ``put``); a session
    retired by a rotation runs ``on_idle``'s callback once its last call ends.
    """

    def __init__(self, client: consul.aio.Consul, *, fingerprint: str) -> None:
        self.client = client
        self.fingerprint = fingerprint
        self.running = 0
        self._idle: Callable[[], None] | None = None

    def get(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return self._run(lambda: self.client.http.get(*args, **kwargs))

    def put(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return self._run(lambda: self.client.http.put(*args, **kwargs))

    async def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        self.running += 1
        try:
            return await call()
        finally:
            self.running -= 1
            if self.running == 0 and self._idle is not None:
                idle, self._idle = self._idle, None
                idle()

    def on_idle(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` as soon as no call runs on this session (now, if none does)."""
        if self.running == 0:
            callback()
        else:
            self._idle = callback

    async def close(self) -> None:
        await self.client.close()


def _cert_fingerprint(path: str | None) -> str:
    if path is None:
        return "none"
    try:
        return reloading.fingerprint(reloading.read_bytes(path, "CONSUL_CLIENT_CERT"))
    except (reloading.SecretFileError, ValueError):
        return "unreadable"


# Quoted names, lists of them and counts in a call's description.
_NAMES_IN_WHAT = re.compile(r"(?<!\w)'[^']*'(?!\w)|\[[^\]]*\]|\b\d+\b")


def _span_of(what: str, agent: str) -> tuple[str, dict[str, str]]:
    """A call's span, named by what it does without the names it does it to.

    ``what`` ("read of service 'web'") goes whole into an attribute; the span's
    name ("consul read of service") stays one per kind of call, as tracing
    back ends expect.
    """
    words = _NAMES_IN_WHAT.sub(" ", what).split()
    # "registration of 'web'" -> "registration", not "registration of".
    while len(words) > 1 and words[-1] in ("of", "on", "under"):
        words.pop()
    return f"consul {' '.join(words)}", {"tether.call": what, "server.address": agent}


def consul_error(
    what: str, failure: BaseException | None = None, *, code: int = 0, body: str = "",
    agent: str = "", deadline: float = 0.0,
) -> ConsulError:
    """The one mapping of a failed Consul call to this client's errors.

    Either ``failure``, what the call raised (a timeout, a connection error,
    or one of py-consul's exceptions, which carry the HTTP status in their
    class or text), or ``code`` and ``body``, an HTTP answer read raw.
    ``what`` names the call ("registration of 'web'"); ``agent`` and
    ``deadline`` complete the messages of failures without an answer.
    """
    if isinstance(failure, TimeoutError):
        return ConsulUnavailable(f"Consul agent at {agent} did not answer {what} within {deadline:.0f}s")
    if isinstance(failure, aiohttp.ClientError | OSError):
        return ConsulUnavailable(f"Consul agent at {agent} is unreachable ({what}): {failure}")
    if failure is not None:
        code, body = _status_of(failure)
    text = " ".join(body.split())[:300]
    if code in (401, 403) or "Permission denied" in text or "ACL not found" in text:
        # Consul words an ACL failure differently across versions and
        # endpoints, sometimes under a 500: the words decide.
        return ConsulRejected(
            f"Consul refused {what}: permission denied (check CONSUL_HTTP_TOKEN and its policy): {text}"
        )
    if code == 413:
        if "too many operations" in text.lower():
            return ConsulTooManyOps(f"Consul refused {what}: {text}")
        return ConsulRequestTooLarge(f"Consul refused {what}: {text}")
    if code == 409:
        # A guard of a transaction failed and Consul rolled it all back; its
        # errors say which op: mostly a stale index, which a re-read fixes.
        return ConsulContended(f"Consul rolled {what} back: {_txn_errors(body) or text[:200]}")
    if code == 0 or code == 429 or code >= 500:
        # No status (an answer py-consul could not read), rate-limited, or failing.
        return ConsulUnavailable(f"Consul failed {what}: {text}" if code == 0 else
                                 f"Consul failed {what}: {code} {text}")
    return ConsulRejected(f"Consul rejected {what}: {code} {text}")


# py-consul raises these for the statuses its callbacks check (consul.callback.CB).
_STATUS_OF_CLASS: tuple[tuple[type[consul_errors.ConsulException], int], ...] = (
    (consul_errors.ACLDisabled, 401),
    (consul_errors.ACLPermissionDenied, 403),
    (consul_errors.NotFound, 404),
    (consul_errors.BadRequest, 400),
)


def _status_of(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and text a py-consul exception stands for (0: not an HTTP answer)."""
    text = str(exc)
    for cls, code in _STATUS_OF_CLASS:
        if isinstance(exc, cls):
            return code, text.removeprefix(f"{code} ")
    if isinstance(exc, consul_errors.Timeout):
        return 504, "timed out"  # py-consul's name for a 599 answer
    # ClientError ("4xx body") and ConsulException ("5xx body", or a body it could not decode).
    head, _, rest = text.partition(" ")
    if head.isdigit() and len(head) == 3:
        return int(head), rest
    return 0, text


def _txn_errors(body: str) -> str:
    """What a rolled-back transaction's ``Errors`` say, for the first three."""
    try:
        errs = (json.loads(body or "{}") or {}).get("Errors") or []
        return "; ".join(str(e.get("What", "")) for e in errs[:3])
    except (ValueError, AttributeError, TypeError):
        return ""
