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
  compares make that safe), unless gRPC says it never left (connection
  refused, no connection: :func:`wire.never_sent`), then the next member
  gets it at once;
- a call gives up after :data:`_LOST_MEMBER_GRACE` when another member was
  just lost (its connection refused or dropped): it is most likely waiting on
  a dead leader, which etcd answers only after its own, longer timeout;
- gRPC failures become :class:`EtcdUnavailable` (retry later) or
  :class:`EtcdRejected` (the server refused the request as such);
- values never appear in messages, logs or reprs: they may be secrets.

(Over 500 lines on purpose: endpoints, failover, authentication and the watch
stream share one channel state; the pure parts live in ``values``, ``wire``,
``errors`` and ``connection``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any, Final, Self

import grpc
import grpc.aio
from aetcd import rpc

from tether import tracing
from tether.clients import reloading
from tether.clients.etcd.connection import EtcdConnection, split_endpoint
from tether.clients.etcd.errors import Compacted, EtcdError, EtcdRejected, EtcdUnavailable
from tether.clients.etcd.values import Compare, Delete, KeyValue, Put, TxnResult, WatchEvent, prefix_range_end
from tether.clients.etcd.wire import (
    FAILOVER_CODES,
    error_from_status,
    event_from_pb,
    keyvalue_from_pb,
    needs_reauth,
    never_sent,
    txn_to_pb,
)

logger = logging.getLogger(__name__)

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

# After a rotation of the TLS files, how long the replaced channels may finish
# what runs on them: unary calls end within their deadline; a watch stream
# still open then is cut, and its watcher re-lists and watches on the new
# channel (well within the 60 s in which a rotated certificate must be in use).
_ROTATION_GRACE: Final = 30.0

# How long a call still waits once the connection to another member has broken
# under it (see EtcdClient._call). etcd answers a healthy write in milliseconds
# and a slow disk in a few hundred; a call still pending after this is most
# likely waiting on a leader that is gone.
_LOST_MEMBER_GRACE: Final = 1.0

# For how long after a member is lost a slow call is blamed on it. etcd answers
# a request stuck behind a lost leader by itself after its request timeout (7 s
# with the default election timeout), and elects a new leader well before.
_LOSS_WINDOW: Final = 10.0

# A call that every member failed retryably goes round them again after this pause,
# at most _MAX_PASSES times, within its deadline (an election takes about a second).
_PASS_PAUSE: Final = 0.2
_MAX_PASSES: Final = 4

_Metadata = tuple[tuple[str, str], ...]


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
        self.lease = rpc.LeaseStub(channel)
        # When the client first saw this member unreachable; None while it is not.
        self.lost_at: float | None = None

    def state(self) -> Any:
        # try_to_connect wakes an IDLE channel; it costs nothing when connected.
        return self.channel.get_state(try_to_connect=True)


class _Abandoned(Exception):
    """A call given up on because another member was lost while it waited; outcome unknown."""


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
        self._password_file = (
            reloading.SecretFile(conn.password_file, "ETCD_PASSWORD_FILE") if conn.password_file else None
        )
        # The TLS files are watched only where they are used: https endpoints.
        https = any(url.startswith("https://") for url in conn.endpoints)
        self._tls = reloading.WatchedFiles(
            (conn.ca_cert, conn.cert, conn.key) if https else (), what="etcd client"
        )
        self._fingerprint = "none"
        # Channels replaced by a rotation, closing once their calls end.
        self._closing: dict[asyncio.Task[None], Any] = {}

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
        # etcd answers a progress request only once its revision has reached
        # the watch's start revision (progressIfSync in its watchable store):
        # a watch "from the next revision" on a store where nothing is written
        # would never be answered, and its silence would look like a broken
        # stream. So the stream opens one revision early, where the server can
        # always answer, and the events of that revision are dropped here.
        early = next_revision > 1
        # One pass per stream; another pass happens only after re-authenticating
        # or when the early revision was compacted away, and resumes exactly
        # where the stream before stopped.
        for _ in range(3):
            opened_at = next_revision - 1 if early else next_revision
            endpoint, call, token = await self._open_watch(prefix, opened_at)
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
                        if early and 0 < item.compact_revision <= next_revision:
                            # Only the early revision is gone, and nothing was
                            # asked of it: open from the revision asked for.
                            early = False
                            reopen = True
                            break
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
                        events = [
                            event for event in map(event_from_pb, item.events)
                            if event.kv.mod_revision >= next_revision
                        ]
                        if not events:
                            continue  # the early revision's events: delivered before
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

    async def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds, never kept alive; its ID.

        Sent with failover like a read: a grant repeated after an unknown
        outcome only leaves an unused lease behind, which expires by itself.
        """
        response = await self._unary("lease", "LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl), idempotent=True)
        if response.error:
            raise EtcdRejected(f"etcd refused a lease of {ttl}s: {response.error}")
        return int(response.ID)

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
        # A stop must not wait out the grace of rotated channels: close them now.
        closing, self._closing = dict(self._closing), {}
        for task in closing:
            task.cancel()
        await asyncio.gather(*closing, return_exceptions=True)
        for channel in closing.values():
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- internals

    @property
    def _has_credentials(self) -> bool:
        return self._conn.username is not None

    def _password(self) -> str:
        """The password as configured now: ``ETCD_PASSWORD_FILE`` is read at each use."""
        if self._password_file is None:
            assert self._conn.password is not None
            return self._conn.password
        try:
            return self._password_file.read()
        except reloading.SecretFileError as exc:
            raise EtcdRejected(f"etcd: {exc}") from None

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
            if self._tls.due():
                await self._rotate()
            return
        async with self._open_lock:
            if self._endpoints:
                return
            try:
                credentials = await asyncio.to_thread(self._tls.load, self._read_credentials)
            except (OSError, ValueError, reloading.SecretFileError) as exc:
                raise EtcdRejected(f"etcd: the TLS files do not load: {exc}") from None
            self._endpoints = self._channels(credentials)

    def _channels(self, credentials: Any) -> list[_Endpoint]:
        endpoints = []
        for index, url in enumerate(self._conn.endpoints):
            scheme, host, port = split_endpoint(url)
            target = f"{host}:{port}"
            if scheme == "https":
                channel = grpc.aio.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
            endpoints.append(_Endpoint(index, f"{scheme}://{target}", channel))
        return endpoints

    async def _rotate(self) -> None:
        """New channels with the TLS files as they are now; the old ones close when idle.

        Calls that already hold an endpoint finish on its old channel, which
        gRPC closes once they end (or after :data:`_ROTATION_GRACE`); new
        calls pick from the new channels. Files that do not load keep the old
        channels in use, and are tried again at the next check.
        """
        async with self._open_lock:
            old_fingerprint = self._fingerprint
            credentials = await asyncio.to_thread(self._tls.reload, self._read_credentials)
            if credentials is None or self._closed or not self._endpoints:
                return
            old, self._endpoints = self._endpoints, self._channels(credentials)
        # A Secret's update rewrites every file: the certificate may be the same.
        logger.log(
            logging.INFO if self._fingerprint != old_fingerprint else logging.DEBUG,
            "etcd TLS files changed: new connections use client certificate %s (was %s)",
            self._fingerprint, old_fingerprint,
        )
        for endpoint in old:
            task = asyncio.get_running_loop().create_task(endpoint.channel.close(grace=_ROTATION_GRACE))
            self._closing[task] = endpoint.channel
            task.add_done_callback(lambda done: self._closing.pop(done, None))

    def _read_credentials(self) -> Any:
        """TLS channel credentials from the files as they are now, or ``None`` without https.

        Runs in a thread: the event loop must never wait on a disk. The pair is
        loaded by :mod:`ssl` first, because gRPC accepts a certificate next to
        the wrong key and fails only at the handshake.
        """
        if not any(url.startswith("https://") for url in self._conn.endpoints):
            return None
        conn = self._conn
        reloading.check_pair(conn.cert, conn.key, conn.ca_cert)
        root = reloading.read_bytes(conn.ca_cert, "ETCD_CACERT")
        cert = reloading.read_bytes(conn.cert, "ETCD_CERT")
        key = reloading.read_bytes(conn.key, "ETCD_KEY")
        self._fingerprint = reloading.fingerprint(cert)
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
        ``None`` when every candidate is excluded, or when some endpoints were
        tried already and every candidate left refuses connections.
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
            if exclude and all(state == grpc.ChannelConnectivity.TRANSIENT_FAILURE for _, state in states):
                # The members that accept connections were tried already, the
                # rest refuse them: waiting for one to come back would spend the
                # deadline for nothing (the caller retries later anyway).
                return None
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
        """A token for the configured user, with the password as it is now.

        A changed ``ETCD_PASSWORD_FILE`` needs no step of its own: etcd drops
        the user's tokens when the password changes, the next call is refused
        with "invalid auth token", and the client authenticates again here
        with the file's new content. If the file changed while the refusal
        was on its way, the new password is tried once before failing.
        """
        assert self._conn.username is not None
        password = self._password()
        for attempt in range(2):
            remaining = max(deadline - asyncio.get_running_loop().time(), 0.001)
            request = rpc.AuthenticateRequest(name=self._conn.username, password=password)
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
                    if attempt == 0 and self._password_file is not None and self._password() != password:
                        password = self._password()
                        continue
                    source = "ETCD_PASSWORD_FILE" if self._password_file is not None else "ETCD_PASSWORD"
                    raise EtcdRejected(
                        f"etcd {endpoint.url} refused to authenticate user "
                        f"{self._conn.username!r}: {details or exc.code().name} (check {source})"
                    ) from exc
                raise error from exc
            logger.debug("authenticated to etcd %s as %r", endpoint.url, self._conn.username)
            return str(response.token)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _forget_token(self, metadata_or_token: _Metadata | str) -> None:
        """Drop the cached token, unless another caller already replaced it."""
        used = (
            metadata_or_token
            if isinstance(metadata_or_token, str)
            else dict(metadata_or_token).get("token", "")
        )
        if self._token == used:
            self._token = None

    @tracing.traced(lambda _self, service, method, *_, **__: (
        f"etcd {service}.{method}", {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}))
    async def _unary(self, service: str, method: str, request: Any, *, idempotent: bool) -> Any:
        """Send one unary request with failover, re-authentication and one overall deadline."""
        await self._ensure_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._conn.timeout
        tried: set[int] = set()
        reauthenticated = False
        last_error: EtcdError | None = None
        # Passes over the members: at most one attempt per endpoint plus one
        # re-authentication retry each; the deadline bounds the time.
        for attempt in range(_MAX_PASSES * (len(self._endpoints) + 2)):
            if len(tried) == len(self._endpoints) and attempt:
                # Every member failed this request in a way that allows another try
                # (a read, or a request that never left): during an election each
                # answers "leader changed" or waits on the dead leader. The new
                # leader comes within the deadline more often than not: pause, then
                # go round again rather than fail the whole call.
                if loop.time() + _PASS_PAUSE >= deadline:
                    break
                await asyncio.sleep(_PASS_PAUSE)
                tried.clear()
            endpoint = await self._pick(deadline, tried)
            if loop.time() >= deadline:
                break
            if endpoint is None:
                if not tried:
                    break
                # The members not tried yet refuse connections: this pass is over.
                tried = set(range(len(self._endpoints)))
                continue
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
                return await self._call(endpoint, getattr(stub, method), request, attempt_timeout, metadata)
            except grpc.aio.AioRpcError as exc:
                code, details, cause = exc.code(), exc.details() or "", exc
            except _Abandoned as exc:
                code, details, cause = grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), exc
            if self._has_credentials and not reauthenticated and needs_reauth(details):
                # The server refused the token before executing anything.
                reauthenticated = True
                self._forget_token(metadata)
                continue
            error = error_from_status(code, details, endpoint=endpoint.url)
            if code not in FAILOVER_CODES:
                raise error from cause
            self._advance(endpoint)
            if not idempotent and not never_sent(code, details):
                outcome = (
                    "the transaction may or may not have been applied"
                    if connected
                    else "no connection when sending; most likely not applied"
                )
                # Never retried here and never reported as success: the caller
                # re-reads and re-plans, its compares making a repeat safe. The
                # warning is how an operator (and the HA fault suite, which
                # counts the writes repeated this way) learns it happened.
                logger.warning(
                    "etcd transaction outcome unknown on %s: %s (%s); re-reading before deciding",
                    endpoint.url, code.name, outcome,
                )
                raise EtcdUnavailable(f"{error} ({outcome})") from cause
            # A read, or a request that never left this client (the member
            # refused the connection or had none): the next member, at once.
            logger.debug("etcd %s.%s failed on %s: %s", service, method, endpoint.url, code.name)
            last_error = error
            tried.add(endpoint.index)
        if last_error is not None:
            raise last_error
        urls = ", ".join(self._conn.endpoints)
        raise EtcdUnavailable(f"etcd: no endpoint answered within {self._conn.timeout:g}s ({urls})")

    async def _call(
        self, endpoint: _Endpoint, method: Any, request: Any, attempt_timeout: float, metadata: _Metadata
    ) -> Any:
        """Send one request on ``endpoint``; give up early while another member is lost.

        A write sent to a follower just after the leader died is forwarded to
        the dead leader until the follower notices (etcd's election timeout),
        and then waits in etcd for a commit that never comes: etcd answers only
        after its own request timeout (7 s by default), so the call would wait
        out the whole deadline. A read waiting for the leader's read index can
        do the same. The client's connections to the other members show the
        loss: when one of them is refused, or drops from READY, while the call
        runs or shortly before (see :meth:`_until_lost`), the call gets at most
        :data:`_LOST_MEMBER_GRACE` seconds (a healthy quorum answers well
        within it) and is then abandoned with :class:`_Abandoned`, whose
        outcome is unknown like a deadline's. A member that is blackholed
        rather than killed keeps a READY connection, so it is not seen here
        and a call stuck behind it still costs its deadline.
        """
        call = method(request, timeout=attempt_timeout, metadata=metadata)
        others = [other for other in self._endpoints if other is not endpoint]
        if not others:
            return await call
        response = asyncio.ensure_future(call)
        watchers: dict[asyncio.Future[Any], _Endpoint] = {
            asyncio.ensure_future(self._until_lost(other)): other for other in others
        }
        try:
            pending: set[asyncio.Future[Any]] = {response, *watchers}
            lost: list[str] = []
            # Each pass ends the call or at least one watcher.
            for _ in range(len(watchers)):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if response in done:
                    return response.result()
                lost = [watchers[watcher].url for watcher in done if watcher.result()]
                if lost:
                    break
            if not lost:
                return await response  # every watcher ended without a member lost
            done, _ = await asyncio.wait({response}, timeout=_LOST_MEMBER_GRACE)
            if response in done:
                return response.result()
            raise _Abandoned(
                f"no answer within {_LOST_MEMBER_GRACE:g}s while {', '.join(lost)} was unreachable "
                "(a request forwarded to a lost leader is not answered before etcd's own timeout)"
            )
        finally:
            if not response.done():
                call.cancel()
            for watcher in watchers:
                watcher.cancel()
            # Reaps the cancelled call and watchers; returns at once when they are done.
            await asyncio.gather(response, *watchers, return_exceptions=True)

    @staticmethod
    async def _until_lost(endpoint: _Endpoint) -> bool:
        """Follow a channel until its member is found lost (True) or the channel closes (False).

        Lost: a connection attempt failed (TRANSIENT_FAILURE), or a READY
        connection dropped (gRPC then goes IDLE and reconnects only when asked;
        ``state()`` asks, so an IDLE channel is put to the test at once). A loss
        counts for :data:`_LOSS_WINDOW` seconds after the client first saw it:
        a member down for longer no longer explains a slow answer. A member
        that accepts the connection but does not answer (restarting, frozen,
        blackholed) stays CONNECTING or READY and is never reported.
        """
        loop = asyncio.get_running_loop()
        state = endpoint.state()
        for _ in range(_MAX_STATE_WAITS):
            if state == grpc.ChannelConnectivity.READY:
                endpoint.lost_at = None
            elif state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                if endpoint.lost_at is None:
                    endpoint.lost_at = loop.time()
                return loop.time() - endpoint.lost_at < _LOSS_WINDOW
            await endpoint.channel.wait_for_state_change(state)
            previous, state = state, endpoint.state()
            if state == grpc.ChannelConnectivity.SHUTDOWN:
                return False  # closed by a TLS rotation or close(): no member lost
            if previous == grpc.ChannelConnectivity.READY and state != grpc.ChannelConnectivity.READY:
                endpoint.lost_at = loop.time()
                return True
        return False

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
