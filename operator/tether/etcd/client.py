"""A small asyncio client for the etcd v3 API, built for Tether's EtcdConfig controller.

Why not ``aetcd.Client``: it opens one insecure channel to one ``host:port``.
Tether needs TLS with client certificates, username/password authentication,
several endpoints with failover, pinned-revision pagination and watches that
report progress. So this module drives aetcd's generated gRPC stubs
(``aetcd.rpc``) over its own ``grpc.aio`` channels, one channel per endpoint.

Contract in short:

- every unary call has a deadline of ``EtcdConnection.timeout`` seconds in total,
  failover included, and never blocks the event loop;
- idempotent reads move to the next endpoint on ``UNAVAILABLE`` or
  ``DEADLINE_EXCEEDED``; a transaction is sent at most once, because after a
  failure it may have been applied (the caller re-reads and re-plans; its
  compares make that safe);
- gRPC failures become :class:`EtcdUnavailable` (retry later) or
  :class:`EtcdRejected` (the server refused the request as such);
- values never appear in messages, logs or reprs: they may be secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Self
from urllib.parse import urlsplit

import grpc
import grpc.aio
from aetcd import rpc

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT: Final = "http://127.0.0.1:2379"

#: Keys per Range page in :meth:`EtcdClient.get_prefix`. Small enough that a
#: page of large values stays far from any message limit, large enough that
#: 100k keys take only 100 round trips.
PAGE_SIZE: Final = 1000

# How often a paginated listing may start over because etcd compacted the
# revision it was pinned to between two pages.
_LIST_RESTARTS: Final = 3

# Upper bound on connectivity-state changes awaited while picking an endpoint;
# the deadline is the real bound, this only guards against a flapping channel.
_MAX_STATE_WAITS: Final = 64

# Bytes of a server message kept in an error; etcd's messages are short, but
# a proxy in between could return anything.
_MAX_DETAIL: Final = 300

# Channel options. Reconnect backoff is capped at one second (gRPC's default
# grows to two minutes) so a restarted etcd is used again promptly. Keepalive
# pings detect a dead peer under a long-lived watch stream; etcd's server
# enforcement (--grpc-keepalive-min-time, 5 s by default) closes connections
# that ping more often than that or while no stream is open, hence 10 s and no
# pings without calls. Responses may be large (a page of big values), so the
# 4 MiB default receive limit is lifted; the server enforces its own limits.
_CHANNEL_OPTIONS: Final = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
)

_Metadata = tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------- errors


class EtcdError(Exception):
    """Base class of every error this client raises for etcd's sake."""


class EtcdUnavailable(EtcdError):
    """etcd could not be reached or could not serve the request now; retry later."""


class EtcdRejected(EtcdError):
    """etcd refused the request itself (permissions, credentials, invalid request)."""


class TooManyOps(EtcdRejected):
    """The transaction has more operations than the server's ``--max-txn-ops``."""


class RequestTooLarge(EtcdRejected):
    """The request is larger than the server's ``--max-request-bytes``."""


class Compacted(EtcdError):
    """The requested revision was compacted; list again and watch from the new revision."""

    def __init__(self, compact_revision: int, message: str | None = None) -> None:
        self.compact_revision = compact_revision
        super().__init__(message or f"etcd revision has been compacted (compact revision {compact_revision})")


# --------------------------------------------------------------------------- connection


@dataclass(frozen=True)
class EtcdConnection:
    """Where and how to reach etcd: endpoints, TLS files, credentials, deadline.

    Endpoints are ``http://host:port`` or ``https://host:port`` URLs. An https
    endpoint without ``ca_cert`` verifies the server against the system roots.
    """

    endpoints: tuple[str, ...]
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("etcd: at least one endpoint is required")
        for endpoint in self.endpoints:
            _split_endpoint(endpoint)
        if (self.cert is None) != (self.key is None):
            raise ValueError(
                "etcd: a client certificate needs its key and a key needs its certificate "
                "(set both ETCD_CERT and ETCD_KEY, or neither)"
            )
        if (self.username is None) != (self.password is None):
            raise ValueError(
                "etcd: username and password go together "
                "(set both ETCD_USERNAME and ETCD_PASSWORD, or neither)"
            )
        if not self.timeout > 0:
            raise ValueError(f"etcd: timeout must be a positive number of seconds, not {self.timeout}")
        tls_files = self.ca_cert is not None or self.cert is not None
        plain = [e for e in self.endpoints if e.startswith("http://")]
        if tls_files and plain:
            # A CA or client certificate next to a plaintext endpoint means the
            # operator believes traffic is protected when it is not.
            raise ValueError(
                f"etcd: TLS files are configured but endpoint {plain[0]} is plaintext; use https:// endpoints"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EtcdConnection:
        """Read etcd's own variable names: ``ETCD_ENDPOINTS``, ``ETCD_CACERT``, ...

        ``ETCD_ENDPOINTS`` is comma-separated; an endpoint without a scheme uses
        https when TLS files are configured and http otherwise, as etcd's own
        client does. Raises ``ValueError`` naming the variable that is wrong.
        """

        def text(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        ca_cert = text("ETCD_CACERT")
        cert = text("ETCD_CERT")
        key = text("ETCD_KEY")
        for name, path in (("ETCD_CACERT", ca_cert), ("ETCD_CERT", cert), ("ETCD_KEY", key)):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name}={path}: no such file")
        # Passwords are taken verbatim (spaces may be part of them); empty means unset.
        password = env.get("ETCD_PASSWORD") or None

        raw = env.get("ETCD_ENDPOINTS", "")
        if not raw.strip():
            endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
        else:
            default_scheme = "https" if ca_cert is not None or cert is not None else "http"
            items = [item.strip() for item in raw.split(",")]
            if any(not item for item in items):
                raise ValueError(f"ETCD_ENDPOINTS={raw!r}: empty entry in the comma-separated list")
            try:
                endpoints = tuple(normalize_endpoint(item, default_scheme) for item in items)
            except ValueError as exc:
                raise ValueError(f"ETCD_ENDPOINTS: {exc}") from None
        try:
            return cls(
                endpoints=endpoints,
                ca_cert=ca_cert,
                cert=cert,
                key=key,
                username=text("ETCD_USERNAME"),
                password=password,
            )
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("etcd: ")) from None


def normalize_endpoint(endpoint: str, default_scheme: str = "http") -> str:
    """Return ``scheme://host:port`` for ``endpoint``; ``host:port`` gets ``default_scheme``."""
    candidate = endpoint if "://" in endpoint else f"{default_scheme}://{endpoint}"
    scheme, host, port = _split_endpoint(candidate)
    return f"{scheme}://{host}:{port}"


def _split_endpoint(endpoint: str) -> tuple[str, str, int]:
    """Parse ``scheme://host:port`` into its parts, or raise ``ValueError`` saying why not."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{endpoint!r} is not a valid endpoint: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{endpoint!r}: endpoint scheme must be http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{endpoint!r}: endpoint has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"{parts.scheme}://{parts.hostname}: credentials belong in "
            "ETCD_USERNAME/ETCD_PASSWORD, not in the endpoint"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{endpoint!r}: endpoint must be scheme://host:port with no path")
    if port is None:
        raise ValueError(f"{endpoint!r}: endpoint needs a port (etcd listens on 2379 by default)")
    if port == 0:
        raise ValueError(f"{endpoint!r}: port 0 is not a valid endpoint port")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal: keep the brackets gRPC expects
    return parts.scheme, host, port


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd stores it. ``value`` is left out of the repr: it may be a secret."""

    key: bytes
    value: bytes = field(repr=False)
    create_revision: int
    mod_revision: int
    version: int


CompareTarget = Literal["version", "create", "mod", "value"]
CompareOp = Literal["=", "!=", "<", ">"]


@dataclass(frozen=True)
class Compare:
    """A transaction guard: ``target`` of ``key`` compared with ``value`` by ``op``.

    ``version``, ``create`` and ``mod`` compare integers (``version = 0`` and
    ``create = 0`` mean "the key does not exist"); ``value`` compares bytes.
    """

    key: bytes
    target: CompareTarget
    op: CompareOp
    value: int | bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.target not in _COMPARE_TARGETS:
            raise ValueError(f"compare on {self.key!r}: unknown target {self.target!r}")
        if self.op not in _COMPARE_OPS:
            raise ValueError(f"compare on {self.key!r}: unknown operator {self.op!r}")
        if self.target == "value":
            if not isinstance(self.value, bytes):
                raise TypeError(f"compare on {self.key!r}: a value compare needs bytes")
        elif isinstance(self.value, bool) or not isinstance(self.value, int):
            # bool is an int subclass; True as a revision is always a mistake.
            raise TypeError(f"compare on {self.key!r}: a {self.target} compare needs an int")


@dataclass(frozen=True)
class Put:
    """Set ``key`` to ``value`` inside a transaction."""

    key: bytes
    value: bytes = field(repr=False)


@dataclass(frozen=True)
class Delete:
    """Delete ``key`` (one key, not a range) inside a transaction."""

    key: bytes


@dataclass(frozen=True)
class TxnResult:
    """Whether the compares held, and the store revision after the transaction."""

    succeeded: bool
    revision: int


@dataclass(frozen=True)
class WatchEvent:
    """A change under a watched prefix.

    For ``delete``, ``kv.value`` is empty and ``kv.mod_revision`` is the
    revision of the deletion.
    """

    type: Literal["put", "delete"]
    kv: KeyValue


# --------------------------------------------------------------------------- pure conversions

_COMPARE_TARGETS: Final[Mapping[str, tuple[int, str]]] = {
    # target -> (protobuf enum value, protobuf field holding the operand)
    "version": (rpc.Compare.VERSION, "version"),
    "create": (rpc.Compare.CREATE, "create_revision"),
    "mod": (rpc.Compare.MOD, "mod_revision"),
    "value": (rpc.Compare.VALUE, "value"),
}

_COMPARE_OPS: Final[Mapping[str, int]] = {
    "=": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}


def compare_to_pb(compare: Compare) -> Any:
    """Build the ``etcdserverpb.Compare`` message for ``compare``."""
    target, operand_field = _COMPARE_TARGETS[compare.target]
    return rpc.Compare(
        key=compare.key,
        target=target,
        result=_COMPARE_OPS[compare.op],
        **{operand_field: compare.value},
    )


def op_to_pb(op: Put | Delete) -> Any:
    """Build the ``etcdserverpb.RequestOp`` message for a transaction operation."""
    if isinstance(op, Put):
        return rpc.RequestOp(request_put=rpc.PutRequest(key=op.key, value=op.value))
    if isinstance(op, Delete):
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key))
    raise TypeError(f"not a transaction operation: {type(op).__name__}")


def txn_to_pb(
    compares: Sequence[Compare], success: Sequence[Put | Delete], failure: Sequence[Put | Delete]
) -> Any:
    """Build the ``etcdserverpb.TxnRequest`` message."""
    return rpc.TxnRequest(
        compare=[compare_to_pb(c) for c in compares],
        success=[op_to_pb(op) for op in success],
        failure=[op_to_pb(op) for op in failure],
    )


def prefix_range_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a Range or Watch cover every key starting with ``prefix``.

    That is the prefix with its last byte below 0xff incremented and what
    follows dropped; with no such byte (empty prefix, all 0xff) etcd's ``\\0``
    means "to the end of the keyspace".
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def keyvalue_from_pb(kv: Any) -> KeyValue:
    """Convert an ``mvccpb.KeyValue`` message."""
    return KeyValue(
        key=bytes(kv.key),
        value=bytes(kv.value),
        create_revision=int(kv.create_revision),
        mod_revision=int(kv.mod_revision),
        version=int(kv.version),
    )


def event_from_pb(event: Any) -> WatchEvent:
    """Convert an ``mvccpb.Event`` message."""
    kind: Literal["put", "delete"] = "delete" if event.type == rpc.Event.DELETE else "put"
    return WatchEvent(type=kind, kv=keyvalue_from_pb(event.kv))


# etcd's messages (api/v3rpc/rpctypes) that mean "authenticate again and retry":
# the simple token expired, the auth store changed under the token, or no token
# was sent because none was held yet.
_REAUTH_MARKERS: Final = (
    "invalid auth token",
    "revision of auth store is old",
    "user name is empty",
)

# Refusals that retrying cannot fix; used where there is no status code (a
# watch cancel reason) and for codes that are otherwise transient.
_REJECTED_MARKERS: Final = (
    "permission denied",
    "invalid auth token",
    "user name is empty",
    "authentication failed",
    "authentication is not enabled",
)

# Codes meaning "this endpoint cannot serve now": try another, or later.
_FAILOVER_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# Codes meaning a transient failure of the server or the connection; everything
# else (INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED, ...) is a refusal.
_TRANSIENT_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        # "too many requests" and "database space exceeded" (NOSPACE alarm):
        # the cluster cannot take writes now, an operator or time fixes it.
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def needs_reauth(details: str) -> bool:
    """Whether etcd's error message says the auth token must be renewed."""
    lowered = details.lower()
    return any(marker in lowered for marker in _REAUTH_MARKERS)


def error_from_status(code: grpc.StatusCode | None, details: str, *, endpoint: str) -> EtcdError:
    """Map a gRPC status (or, with ``code=None``, a bare etcd message) to an exception.

    The message names the endpoint and keeps etcd's own words, which never
    contain values.
    """
    text = " ".join(details.split())[:_MAX_DETAIL] or (code.name if code else "unknown error")
    lowered = text.lower()
    where = f"etcd {endpoint}"
    if "too many operations in txn request" in lowered:
        return TooManyOps(
            f"{where}: the transaction has more operations than the server allows "
            f"(--max-txn-ops, 128 by default): {text}"
        )
    if "request is too large" in lowered or (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in lowered
    ):
        return RequestTooLarge(
            f"{where}: the request is larger than the server accepts "
            f"(--max-request-bytes, 1.5 MiB by default): {text}"
        )
    if "compacted" in lowered and code in (None, grpc.StatusCode.OUT_OF_RANGE):
        return Compacted(0, f"{where}: {text}")
    if "not leader" in lowered or "no leader" in lowered or "leader changed" in lowered:
        # FAILED_PRECONDITION "not leader" is a transient election state.
        return EtcdUnavailable(f"{where}: {text}")
    if code is None:
        if any(marker in lowered for marker in _REJECTED_MARKERS):
            return EtcdRejected(f"{where}: {text}")
        return EtcdUnavailable(f"{where}: {text}")
    if code in _TRANSIENT_CODES:
        return EtcdUnavailable(f"{where}: {code.name}: {text}")
    return EtcdRejected(f"{where}: {code.name}: {text}")


# --------------------------------------------------------------------------- client


class _Endpoint:
    """One etcd endpoint: its URL, its gRPC channel and the stubs bound to it."""

    def __init__(self, index: int, url: str, channel: Any) -> None:
        self.index = index
        self.url = url
        self.channel = channel
        self.kv = rpc.KVStub(channel)
        self.watch = rpc.WatchStub(channel)
        self.auth = rpc.AuthStub(channel)
        self.maintenance = rpc.MaintenanceStub(channel)

    def state(self) -> Any:
        # try_to_connect wakes an IDLE channel; it costs nothing when connected.
        return self.channel.get_state(try_to_connect=True)


class _StreamEnd:
    """Marker the watch reader queues when the server ends the stream without error."""


class EtcdClient:
    """An asyncio etcd v3 client over its own gRPC channels; see the module docstring."""

    def __init__(self, conn: EtcdConnection) -> None:
        self._conn = conn
        self._endpoints: list[_Endpoint] = []
        self._current = 0
        self._open_lock = asyncio.Lock()
        self._auth_lock = asyncio.Lock()
        # None: not authenticated yet; "": the server has auth disabled.
        self._token: str | None = None
        self._closed = False

    @property
    def connection(self) -> EtcdConnection:
        return self._conn

    # ----------------------------------------------------------------- public API

    async def get_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        """All keys under ``prefix``, sorted by key, with the revision they were read at.

        Reads in pages of :data:`PAGE_SIZE`, every page pinned to the revision of
        the first, so the result is one consistent snapshot however many keys
        there are. If etcd compacts that revision mid-listing, the listing
        starts over (a few times at most).
        """
        last_error: Compacted | None = None
        for _ in range(_LIST_RESTARTS):
            try:
                return await self._list(prefix)
            except Compacted as exc:
                last_error = exc
        assert last_error is not None
        raise EtcdUnavailable(
            f"listing keys kept racing with compaction ({_LIST_RESTARTS} attempts): {last_error}"
        )

    async def get(self, key: bytes) -> KeyValue | None:
        """The key, or ``None`` when it does not exist (a linearizable read)."""
        response = await self._unary("kv", "Range", rpc.RangeRequest(key=key), idempotent=True)
        return keyvalue_from_pb(response.kvs[0]) if response.kvs else None

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Put | Delete],
        failure: Sequence[Put | Delete] = (),
    ) -> TxnResult:
        """Run one transaction: ``success`` if every compare holds, else ``failure``.

        Sent at most once: if the outcome is unknown (connection lost, deadline
        passed) this raises :class:`EtcdUnavailable` and the caller re-reads.
        """
        request = txn_to_pb(compares, success, failure)
        response = await self._unary("kv", "Txn", request, idempotent=False)
        return TxnResult(succeeded=bool(response.succeeded), revision=int(response.header.revision))

    async def watch_prefix(
        self, prefix: bytes, start_revision: int, *, progress_interval: float = 10.0
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        """Yield ``(revision, events)`` for changes under ``prefix`` from ``start_revision`` on.

        ``revision`` says the watch has delivered everything up to it: for a
        batch of events it is the last event's revision, for a progress
        notification (``events == []``) the store revision. When no message
        arrives for ``progress_interval`` seconds the client asks etcd for
        progress, so an idle watch still advances; if etcd then stays silent for
        ``timeout`` seconds the stream is declared broken.

        Raises :class:`Compacted` if ``start_revision`` was compacted and
        :class:`EtcdUnavailable` when the stream breaks (re-list, then watch
        again from the listing's revision + 1). Closing the generator ends the
        stream cleanly.
        """
        if start_revision < 0:
            raise ValueError(f"start_revision must be >= 0, not {start_revision}")
        if not progress_interval > 0:
            raise ValueError(f"progress_interval must be positive, not {progress_interval}")
        loop = asyncio.get_running_loop()
        await self._ensure_open()
        next_revision = start_revision
        last_revision = max(start_revision - 1, 0)
        reauthenticated = False
        # One pass per stream; a second pass happens only after re-authenticating,
        # which resumes exactly where the first stream stopped.
        for _ in range(2):
            endpoint, call, token = await self._open_watch(prefix, next_revision)
            queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=16)
            reader = asyncio.create_task(self._pump(call, queue))
            reopen = False
            try:
                progress_asked_at: float | None = None
                # This loop lives as long as the consumer iterates; every wait in it is
                # bounded (progress_interval, then timeout) and a silent stream ends it.
                while True:
                    wait = (
                        progress_interval
                        if progress_asked_at is None
                        else progress_asked_at + self._conn.timeout - loop.time()
                    )
                    try:
                        item = await asyncio.wait_for(queue.get(), max(wait, 0.0))
                    except TimeoutError:
                        if progress_asked_at is not None:
                            raise EtcdUnavailable(
                                f"etcd {endpoint.url}: watch stream silent for "
                                f"{progress_interval + self._conn.timeout:.1f}s, "
                                "even after a progress request; treating it as broken"
                            ) from None
                        await self._request_progress(endpoint, call)
                        progress_asked_at = loop.time()
                        continue
                    progress_asked_at = None  # any message proves the stream alive
                    if isinstance(item, _StreamEnd):
                        self._advance(endpoint)
                        raise EtcdUnavailable(f"etcd {endpoint.url}: watch stream ended by the server")
                    if isinstance(item, grpc.aio.AioRpcError):
                        self._advance(endpoint)
                        raise self._stream_error(endpoint, item) from item
                    if item.canceled:
                        if item.compact_revision > 0:
                            raise Compacted(
                                int(item.compact_revision),
                                f"etcd {endpoint.url}: cannot watch {prefix!r} from revision "
                                f"{next_revision}: compacted up to {item.compact_revision}",
                            )
                        reason = str(item.cancel_reason)
                        if self._has_credentials and not reauthenticated and needs_reauth(reason):
                            reauthenticated = True
                            self._forget_token(token)
                            reopen = True
                            break
                        raise error_from_status(None, reason or "watch canceled", endpoint=endpoint.url)
                    if item.events:
                        events = [event_from_pb(e) for e in item.events]
                        last_revision = max(last_revision, max(e.kv.mod_revision for e in events))
                        next_revision = last_revision + 1
                        yield last_revision, events
                    elif item.created:
                        continue
                    else:
                        # Progress notification: everything up to the header revision
                        # has been delivered to this (synced) watcher.
                        last_revision = max(last_revision, int(item.header.revision))
                        next_revision = last_revision + 1
                        yield last_revision, []
            finally:
                reader.cancel()
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            if not reopen:
                return
        raise EtcdRejected("etcd: watch refused again right after re-authenticating")

    async def compact(self, revision: int) -> None:
        """Compact history up to ``revision`` (tests and fault injection)."""
        request = rpc.CompactionRequest(revision=revision, physical=False)
        try:
            await self._unary("kv", "Compact", request, idempotent=True)
        except Compacted:
            return  # already compacted at or past that revision: nothing to do

    async def status(self) -> int:
        """The current store revision of the answering member: a cheap health probe."""
        response = await self._unary("maintenance", "Status", rpc.StatusRequest(), idempotent=True)
        return int(response.header.revision)

    async def close(self) -> None:
        """Close every channel; running calls and watches end with an error."""
        self._closed = True
        endpoints, self._endpoints = self._endpoints, []
        for endpoint in endpoints:
            await endpoint.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- internals

    @property
    def _has_credentials(self) -> bool:
        return self._conn.username is not None

    async def _list(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        range_end = prefix_range_end(prefix)
        # etcd rejects an empty key; "\0" with range_end "\0" means every key.
        start = prefix or b"\0"
        revision = 0  # the first page reads the latest revision; the rest pin it
        result: list[KeyValue] = []
        # Each page advances start past a returned key, so this ends; the bound
        # is for a server that misbehaves.
        for _ in range(10_000_000 // PAGE_SIZE + 1):
            request = rpc.RangeRequest(
                key=start,
                range_end=range_end,
                limit=PAGE_SIZE,
                revision=revision,
                sort_order=rpc.RangeRequest.ASCEND,
                sort_target=rpc.RangeRequest.KEY,
            )
            response = await self._unary("kv", "Range", request, idempotent=True)
            if revision == 0:
                revision = int(response.header.revision)
            result.extend(keyvalue_from_pb(kv) for kv in response.kvs)
            if not response.more or not response.kvs:
                return revision, result
            start = bytes(response.kvs[-1].key) + b"\0"
        raise EtcdUnavailable(f"etcd: listing {prefix!r} did not end after 10 million keys")

    async def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError("EtcdClient is closed")
        if self._endpoints:
            return
        async with self._open_lock:
            if self._endpoints:
                return
            credentials = await self._credentials()
            endpoints = []
            for index, url in enumerate(self._conn.endpoints):
                scheme, host, port = _split_endpoint(url)
                target = f"{host}:{port}"
                if scheme == "https":
                    channel = grpc.aio.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
                else:
                    channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
                endpoints.append(_Endpoint(index, f"{scheme}://{target}", channel))
            self._endpoints = endpoints

    async def _credentials(self) -> Any:
        """TLS channel credentials, or ``None`` when no endpoint uses https."""
        if not any(url.startswith("https://") for url in self._conn.endpoints):
            return None

        def read(path: str | None, variable: str) -> bytes | None:
            if path is None:
                return None
            try:
                with open(path, "rb") as handle:
                    return handle.read()
            except OSError as exc:
                raise EtcdRejected(f"etcd: cannot read {variable} file {path}: {exc.strerror}") from None

        # File reads go to a thread: the event loop must never wait on a disk.
        root, cert, key = await asyncio.gather(
            asyncio.to_thread(read, self._conn.ca_cert, "ETCD_CACERT"),
            asyncio.to_thread(read, self._conn.cert, "ETCD_CERT"),
            asyncio.to_thread(read, self._conn.key, "ETCD_KEY"),
        )
        # root None: gRPC verifies against its default (system) roots.
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)

    def _advance(self, endpoint: _Endpoint) -> None:
        """Make the endpoint after ``endpoint`` the preferred one (round-robin)."""
        if self._current == endpoint.index and len(self._endpoints) > 1:
            self._current = (endpoint.index + 1) % len(self._endpoints)
            logger.debug(
                "etcd endpoint %s failed; preferring %s",
                endpoint.url,
                self._endpoints[self._current].url,
            )

    async def _pick(self, deadline: float, exclude: Collection[int]) -> _Endpoint | None:
        """An endpoint to send the next request to, preferring a connected one.

        Waits (until shortly before ``deadline``) for any candidate channel to
        be READY, starting with the preferred endpoint. Knowing the channel is
        connected lets a transaction fail over safely before it is sent. If none
        connects in time the preferred candidate is returned anyway: the request
        then fails fast with gRPC's own explanation (refused, TLS handshake...).
        """
        count = len(self._endpoints)
        candidates = [
            self._endpoints[(self._current + i) % count]
            for i in range(count)
            if (self._current + i) % count not in exclude
        ]
        if not candidates:
            return None
        loop = asyncio.get_running_loop()
        # Keep part of the budget for the request itself.
        wait_until = deadline - min(0.5, self._conn.timeout / 4)
        for _ in range(_MAX_STATE_WAITS):
            states = [(endpoint, endpoint.state()) for endpoint in candidates]
            for endpoint, state in states:
                if state == grpc.ChannelConnectivity.READY:
                    self._current = endpoint.index
                    return endpoint
            remaining = wait_until - loop.time()
            if remaining <= 0:
                break
            waiters = [
                asyncio.ensure_future(endpoint.channel.wait_for_state_change(state))
                for endpoint, state in states
            ]
            try:
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
        return candidates[0]

    async def _auth_metadata(self, endpoint: _Endpoint, deadline: float) -> _Metadata:
        """Call metadata carrying the auth token, authenticating first if needed."""
        if not self._has_credentials:
            return ()
        async with self._auth_lock:
            if self._token is None:
                self._token = await self._authenticate(endpoint, deadline)
            token = self._token
        return (("token", token),) if token else ()

    async def _authenticate(self, endpoint: _Endpoint, deadline: float) -> str:
        assert self._conn.username is not None and self._conn.password is not None
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.001)
        request = rpc.AuthenticateRequest(name=self._conn.username, password=self._conn.password)
        try:
            response = await endpoint.auth.Authenticate(request, timeout=remaining)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if "authentication is not enabled" in details:
                # Credentials are configured but the server does not use them;
                # go on without a token, as etcd's own client does. If auth is
                # enabled later, "user name is empty" triggers a new attempt.
                return ""
            error = error_from_status(exc.code(), details, endpoint=endpoint.url)
            if isinstance(error, EtcdRejected):
                raise EtcdRejected(
                    f"etcd {endpoint.url} refused to authenticate user "
                    f"{self._conn.username!r}: {details or exc.code().name}"
                ) from exc
            raise error from exc
        logger.debug("authenticated to etcd %s as %r", endpoint.url, self._conn.username)
        return str(response.token)

    def _forget_token(self, metadata_or_token: _Metadata | str) -> None:
        """Drop the cached token, unless another caller already replaced it."""
        used = (
            metadata_or_token
            if isinstance(metadata_or_token, str)
            else dict(metadata_or_token).get("token", "")
        )
        if self._token == used:
            self._token = None

    async def _unary(self, service: str, method: str, request: Any, *, idempotent: bool) -> Any:
        """Send one unary request with failover, re-authentication and one overall deadline."""
        await self._ensure_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._conn.timeout
        tried: set[int] = set()
        reauthenticated = False
        last_error: EtcdError | None = None
        # At most one attempt per endpoint plus one re-authentication retry; the
        # deadline bounds the time.
        for _ in range(len(self._endpoints) + 2):
            endpoint = await self._pick(deadline, tried)
            if endpoint is None or loop.time() >= deadline:
                break
            try:
                metadata = await self._auth_metadata(endpoint, deadline)
            except EtcdUnavailable as exc:
                # Authenticating happens before the request is sent, so moving
                # on is safe even for a transaction.
                last_error = exc
                tried.add(endpoint.index)
                self._advance(endpoint)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # A read leaves time for the endpoints it has not tried yet.
            untried = max(len(self._endpoints) - len(tried), 1)
            attempt_timeout = remaining / untried if idempotent else remaining
            stub = getattr(endpoint, service)
            # Whether a connection existed when sending: without one the request
            # cannot have reached etcd, which the error message can say.
            connected = endpoint.state() == grpc.ChannelConnectivity.READY
            try:
                return await getattr(stub, method)(request, timeout=attempt_timeout, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if self._has_credentials and not reauthenticated and needs_reauth(details):
                    # The server refused the token before executing anything.
                    reauthenticated = True
                    self._forget_token(metadata)
                    continue
                error = error_from_status(code, details, endpoint=endpoint.url)
                if code not in _FAILOVER_CODES:
                    raise error from exc
                self._advance(endpoint)
                if not idempotent:
                    outcome = (
                        "the transaction may or may not have been applied"
                        if connected
                        else "no connection when sending; most likely not applied"
                    )
                    raise EtcdUnavailable(f"{error} ({outcome})") from exc
                logger.debug("etcd %s.%s failed on %s: %s", service, method, endpoint.url, code.name)
                last_error = error
                tried.add(endpoint.index)
        if last_error is not None:
            raise last_error
        urls = ", ".join(self._conn.endpoints)
        raise EtcdUnavailable(f"etcd: no endpoint answered within {self._conn.timeout:g}s ({urls})")

    async def _open_watch(self, prefix: bytes, start_revision: int) -> tuple[_Endpoint, Any, str]:
        """Open a Watch stream and wait for etcd to confirm the watcher.

        Returns the endpoint, the call and the token used. Until the watcher is
        created nothing has been delivered, so failing over here is safe.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._conn.timeout
        tried: set[int] = set()
        last_error: EtcdError | None = None
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=prefix or b"\0",
                range_end=prefix_range_end(prefix),
                start_revision=start_revision,
                progress_notify=True,
                prev_kv=False,
            )
        )
        for _ in range(len(self._endpoints)):
            endpoint = await self._pick(deadline, tried)
            if endpoint is None:
                break
            tried.add(endpoint.index)
            try:
                metadata = await self._auth_metadata(endpoint, deadline)
            except EtcdUnavailable as exc:
                last_error = exc
                self._advance(endpoint)
                continue
            token = dict(metadata).get("token", "")
            # "hasleader" makes a member that lost its leader cancel the stream
            # instead of silently serving nothing (etcd's WithRequireLeader).
            call = endpoint.watch.Watch(metadata=(*metadata, ("hasleader", "true")))
            try:
                remaining = max(deadline - loop.time(), 0.001)
                await asyncio.wait_for(call.write(create), remaining)
                remaining = max(deadline - loop.time(), 0.001)
                first = await asyncio.wait_for(call.read(), remaining)
            except (TimeoutError, grpc.aio.AioRpcError) as exc:
                call.cancel()
                self._advance(endpoint)
                if isinstance(exc, grpc.aio.AioRpcError):
                    error = self._stream_error(endpoint, exc)
                    if not isinstance(error, EtcdUnavailable):
                        raise error from exc
                    last_error = error
                else:
                    last_error = EtcdUnavailable(
                        f"etcd {endpoint.url}: no answer to a watch request within {self._conn.timeout:g}s"
                    )
                continue
            if first is grpc.aio.EOF:
                call.cancel()
                self._advance(endpoint)
                last_error = EtcdUnavailable(f"etcd {endpoint.url}: watch stream ended at once")
                continue
            # The creation answer may already carry a cancellation (compacted
            # start revision, permission denied): hand it to the main loop.
            if first.created and not first.canceled:
                return endpoint, call, token
            return endpoint, _PrefetchedCall(call, first), token
        raise last_error or EtcdUnavailable(
            f"etcd: no endpoint accepted a watch within {self._conn.timeout:g}s"
        )

    def _stream_error(self, endpoint: _Endpoint, exc: Any) -> EtcdError:
        if exc.code() == grpc.StatusCode.CANCELLED and self._closed:
            return EtcdUnavailable(f"etcd {endpoint.url}: client closed")
        return error_from_status(exc.code(), exc.details() or "", endpoint=endpoint.url)

    async def _request_progress(self, endpoint: _Endpoint, call: Any) -> None:
        request = rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())
        try:
            await asyncio.wait_for(call.write(request), self._conn.timeout)
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            self._advance(endpoint)
            raise EtcdUnavailable(f"etcd {endpoint.url}: cannot write to the watch stream: {exc}") from exc

    @staticmethod
    async def _pump(call: Any, queue: asyncio.Queue[Any]) -> None:
        """Move stream messages into ``queue``, ending with ``_StreamEnd`` or the error.

        A separate task reads because cancelling a pending gRPC read cancels
        the whole call; waiting on the queue can time out harmlessly. The queue
        is small, so a slow consumer slows the stream (gRPC flow control) rather
        than growing memory. Runs for the life of the stream.
        """
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    await queue.put(_StreamEnd())
                    return
                await queue.put(message)
        except grpc.aio.AioRpcError as exc:
            await queue.put(exc)


class _PrefetchedCall:
    """A watch call whose first message was already read; ``read`` returns it first."""

    def __init__(self, call: Any, first: Any) -> None:
        self._call = call
        self._first: Any = first

    async def read(self) -> Any:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._call.read()

    async def write(self, request: Any) -> None:
        await self._call.write(request)

    def cancel(self) -> bool:
        return bool(self._call.cancel())
