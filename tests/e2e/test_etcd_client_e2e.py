"""End-to-end tests of the etcd client against real etcd processes.

Each etcd runs on free loopback ports with its data in ``tmp_path``. The
binary is looked up in ``$TETHER_BIN_DIR``, on ``PATH``, in the dev-stack build
cache and in ``/tmp/prebuild``; without one the module is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from aetcd import rpc

from tether.clients.etcd.client import PAGE_SIZE, EtcdClient
from tether.clients.etcd.connection import EtcdConnection
from tether.clients.etcd.errors import Compacted, EtcdRejected, EtcdUnavailable, RequestTooLarge, TooManyOps
from tether.clients.etcd.values import Compare, Delete, Put, WatchEvent
from tether_dev.harness.ports import free_port

pytestmark = pytest.mark.e2e

STARTUP_TIMEOUT = 30.0


def find_etcd() -> str | None:
    candidates: list[str] = []
    bin_dir = os.environ.get("TETHER_BIN_DIR")
    if bin_dir:
        candidates.append(os.path.join(bin_dir, "etcd"))
    on_path = shutil.which("etcd")
    if on_path:
        candidates.append(on_path)
    candidates += sorted(glob.glob(os.path.expanduser("~/.cache/tether/bin/*/etcd")))
    candidates.append("/tmp/prebuild/etcd")
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


class Tls:
    """A throwaway CA with a server certificate for 127.0.0.1 and a client certificate."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = directory / "ca.pem"
        self.server_cert = directory / "server.pem"
        self.server_key = directory / "server-key.pem"
        self.client_cert = directory / "client.pem"
        self.client_key = directory / "client-key.pem"
        ca_key = directory / "ca-key.pem"
        self._openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", ca_key, "-out", self.ca, "-subj", "/CN=tether-test-ca",
        )  # fmt: skip
        self._issue("server", self.server_cert, self.server_key, ca_key, server=True)
        self._issue("client", self.client_cert, self.client_key, ca_key, server=False)

    def _issue(self, name: str, cert: Path, key: Path, ca_key: Path, *, server: bool) -> None:
        csr = self.dir / f"{name}.csr"
        ext = self.dir / f"{name}.ext"
        usage = "serverAuth" if server else "clientAuth"
        lines = [f"extendedKeyUsage={usage}", "keyUsage=digitalSignature,keyEncipherment"]
        if server:
            lines.append("subjectAltName=IP:127.0.0.1,DNS:localhost")
        ext.write_text("\n".join(lines) + "\n")
        self._openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
            "-subj", f"/CN=tether-test-{name}",
        )  # fmt: skip
        self._openssl(
            "x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", ca_key, "-CAcreateserial",
            "-days", "2", "-out", cert, "-extfile", ext,
        )  # fmt: skip

    @staticmethod
    def _openssl(*args: object) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


class Etcd:
    """One etcd process on free loopback ports; start, kill and restart it."""

    def __init__(
        self, binary: str, directory: Path, *, tls: Tls | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        self.binary = binary
        self.dir = directory
        self.tls = tls
        self.extra = extra
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            self.binary,
            "--name", "default",
            "--data-dir", str(self.dir / "data"),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"default={peer}",
            "--log-level", "warn",
            *self.extra,
        ]  # fmt: skip
        if self.tls:
            args += [
                "--cert-file", str(self.tls.server_cert),
                "--key-file", str(self.tls.server_key),
                "--trusted-ca-file", str(self.tls.ca),
                "--client-cert-auth",
            ]  # fmt: skip
        log = open(self.dir / "etcd.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        context: ssl.SSLContext | None = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited at startup:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/health", timeout=1, context=context),
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not become healthy in {STARTUP_TIMEOUT}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        path = self.dir / "etcd.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def freeze(self) -> None:
        """Stop the process without closing its sockets: a server that never answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen etcd cannot handle SIGTERM
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="module")
def etcd_binary() -> str:
    binary = find_etcd()
    if binary is None:
        pytest.skip("no etcd binary: set TETHER_BIN_DIR, put etcd on PATH, or build it with `tether dev up`")
    return binary


@pytest.fixture(scope="module")
def etcd(etcd_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    server = Etcd(etcd_binary, tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_etcd(etcd_binary: str, tmp_path: Path) -> Iterator[Etcd]:
    """A private etcd for tests that kill it or change its configuration."""
    server = Etcd(etcd_binary, tmp_path / "etcd")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def client(etcd: Etcd) -> AsyncIterator[EtcdClient]:
    etcd_client = EtcdClient(EtcdConnection(endpoints=(etcd.url,), timeout=5.0))
    try:
        yield etcd_client
    finally:
        await etcd_client.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> bytes:
    """A key prefix of the test's own, so tests sharing one etcd do not see each other."""
    return f"/test/{request.node.name}/".encode()


async def put_many(client: EtcdClient, items: list[tuple[bytes, bytes]]) -> None:
    for start in range(0, len(items), 100):
        result = await client.txn([], [Put(k, v) for k, v in items[start : start + 100]])
        assert result.succeeded


# --------------------------------------------------------------------------- KV


async def test_put_get_and_missing_key(client: EtcdClient, prefix: bytes) -> None:
    result = await client.txn([], [Put(prefix + b"a", b"1")])
    kv = await client.get(prefix + b"a")
    assert kv is not None
    assert (kv.key, kv.value, kv.version) == (prefix + b"a", b"1", 1)
    assert kv.mod_revision == kv.create_revision == result.revision
    assert await client.get(prefix + b"missing") is None
    assert await client.status() >= result.revision


async def test_get_prefix_paginates_at_one_revision(client: EtcdClient, prefix: bytes) -> None:
    count = 2 * PAGE_SIZE + 500
    items = [(prefix + f"k{i:05d}".encode(), f"v{i}".encode()) for i in range(count)]
    await put_many(client, items)
    # A neighbour that shares the textual prefix but not the "/" must not show up.
    await client.txn([], [Put(prefix.rstrip(b"/") + b"0", b"x")])

    revision, kvs = await client.get_prefix(prefix)
    assert [(kv.key, kv.value) for kv in kvs] == items
    assert revision >= max(kv.mod_revision for kv in kvs)
    # Reading again after a later write still yields the complete, sorted set.
    await client.txn([], [Put(prefix + b"k99999", b"late")])
    later, kvs = await client.get_prefix(prefix)
    assert later > revision
    assert len(kvs) == count + 1
    assert [kv.key for kv in kvs] == sorted(kv.key for kv in kvs)


async def test_get_prefix_of_nothing(client: EtcdClient, prefix: bytes) -> None:
    revision, kvs = await client.get_prefix(prefix)
    assert kvs == []
    assert revision > 0


async def test_txn_compares(client: EtcdClient, prefix: bytes) -> None:
    key = prefix + b"k"
    absent = Compare(key, "version", "=", 0)
    created = await client.txn([absent], [Put(key, b"1")], [Put(prefix + b"lost", b"x")])
    assert created.succeeded
    # The same guard now fails and the failure branch runs instead.
    again = await client.txn([absent], [Put(key, b"2")], [Put(prefix + b"lost", b"x")])
    assert not again.succeeded
    assert again.revision == created.revision + 1
    kv = await client.get(key)
    assert kv is not None and kv.value == b"1"
    assert await client.get(prefix + b"lost") is not None

    # Guard on mod revision and value, as Tether does before overwriting.
    ok = await client.txn(
        [Compare(key, "mod", "=", kv.mod_revision), Compare(key, "value", "=", b"1")],
        [Put(key, b"3")],
    )
    assert ok.succeeded
    stale = await client.txn([Compare(key, "mod", "=", kv.mod_revision)], [Delete(key)])
    assert not stale.succeeded
    assert (await client.txn([Compare(key, "mod", ">", kv.mod_revision)], [Delete(key)])).succeeded
    assert await client.get(key) is None


async def test_txn_writes_share_one_revision(client: EtcdClient, prefix: bytes) -> None:
    await client.txn([], [Put(prefix + b"old", b"x")])
    result = await client.txn(
        [], [Put(prefix + f"k{i}".encode(), b"v") for i in range(50)] + [Delete(prefix + b"old")]
    )
    _, kvs = await client.get_prefix(prefix)
    assert len(kvs) == 50
    assert {kv.mod_revision for kv in kvs} == {result.revision}


async def test_too_many_ops(client: EtcdClient, prefix: bytes) -> None:
    with pytest.raises(TooManyOps, match="max-txn-ops"):
        await client.txn([], [Put(prefix + f"k{i}".encode(), b"v") for i in range(129)])
    assert (await client.txn([], [Put(prefix + f"k{i}".encode(), b"v") for i in range(128)])).succeeded


@pytest.mark.parametrize("size", [1_600_000, 3 * 1024 * 1024])
async def test_request_too_large(client: EtcdClient, prefix: bytes, size: int) -> None:
    # 1.6 MB trips etcd's own --max-request-bytes check; 3 MiB trips the gRPC
    # receive limit etcd derives from it. Both are the same problem to Tether.
    secret = b"S3CRET" * (size // 6)
    with pytest.raises(RequestTooLarge) as info:
        await client.txn([], [Put(prefix + b"big", secret)])
    assert "S3CRET" not in str(info.value)
    assert await client.get(prefix + b"big") is None


# --------------------------------------------------------------------------- watch


async def collect(
    watch: AsyncIterator[tuple[int, list[WatchEvent]]], want: int, within: float = 10.0
) -> list[tuple[int, list[WatchEvent]]]:
    """Batches from ``watch`` until ``want`` events arrived (bounded by ``within`` seconds)."""
    batches: list[tuple[int, list[WatchEvent]]] = []

    async def run() -> None:
        async for revision, events in watch:
            batches.append((revision, events))
            if sum(len(b[1]) for b in batches) >= want:
                return

    await asyncio.wait_for(run(), within)
    return batches


async def test_watch_sees_puts_and_deletes(client: EtcdClient, prefix: bytes) -> None:
    revision, _ = await client.get_prefix(prefix)
    watch = client.watch_prefix(prefix, revision + 1)
    try:
        put = await client.txn([], [Put(prefix + b"a", b"1"), Put(prefix + b"b", b"2")])
        await client.txn([], [Put(b"/elsewhere", b"x")])
        deleted = await client.txn([], [Delete(prefix + b"a")])
        batches = await collect(watch, want=3)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    events = [e for _, batch in batches for e in batch]
    assert [(e.type, e.kv.key, e.kv.value) for e in events] == [
        ("put", prefix + b"a", b"1"),
        ("put", prefix + b"b", b"2"),
        ("delete", prefix + b"a", b""),
    ]
    assert events[0].kv.mod_revision == events[1].kv.mod_revision == put.revision
    assert events[2].kv.mod_revision == deleted.revision
    assert batches[-1][0] == deleted.revision
    assert [r for r, _ in batches] == sorted(r for r, _ in batches)


async def test_idle_watch_reports_progress(client: EtcdClient, prefix: bytes) -> None:
    revision, _ = await client.get_prefix(prefix)
    # Writes elsewhere advance the store revision; the watch must learn that
    # without seeing any event of its own.
    elsewhere = await client.txn([], [Put(b"/elsewhere/progress", b"x")])
    watch = client.watch_prefix(prefix, revision + 1, progress_interval=0.3)
    try:
        progress_revision, events = await asyncio.wait_for(anext(watch), 10)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    assert events == []
    assert progress_revision >= elsewhere.revision


async def test_watch_from_compacted_revision(client: EtcdClient, prefix: bytes) -> None:
    first = await client.txn([], [Put(prefix + b"k", b"1")])
    second = await client.txn([], [Put(prefix + b"k", b"2")])
    await client.compact(second.revision)
    await client.compact(second.revision)  # compacting again is harmless
    watch = client.watch_prefix(prefix, first.revision)
    try:
        with pytest.raises(Compacted) as info:
            await asyncio.wait_for(anext(watch), 10)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    assert info.value.compact_revision == second.revision
    # Watching from the compact revision itself is allowed.
    watch = client.watch_prefix(prefix, second.revision)
    try:
        batches = await collect(watch, want=1)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    assert batches[0][1][0].kv.value == b"2"


# --------------------------------------------------------------------------- failover, outages


async def test_failover_from_dead_endpoint(etcd: Etcd, prefix: bytes) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    conn = EtcdConnection(endpoints=(dead, etcd.url), timeout=5.0)
    async with EtcdClient(conn) as etcd_client:
        started = time.monotonic()
        result = await etcd_client.txn([], [Put(prefix + b"k", b"v")])
        assert result.succeeded
        kv = await etcd_client.get(prefix + b"k")
        assert kv is not None and kv.value == b"v"
        revision, _ = await etcd_client.get_prefix(prefix)
        watch = etcd_client.watch_prefix(prefix, revision + 1)
        try:
            await etcd_client.txn([], [Delete(prefix + b"k")])
            batches = await collect(watch, want=1)
        finally:
            await watch.aclose()  # type: ignore[attr-defined]
        assert batches[0][1][0].type == "delete"
        assert time.monotonic() - started < 5.0


async def test_only_dead_endpoints(prefix: bytes) -> None:
    conn = EtcdConnection(
        endpoints=(f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"),
        timeout=1.0,
    )
    async with EtcdClient(conn) as etcd_client:
        for call in (
            etcd_client.get(prefix),
            etcd_client.txn([], [Put(prefix, b"v")]),
            etcd_client.status(),
        ):
            started = time.monotonic()
            with pytest.raises(EtcdUnavailable, match=r"127\.0\.0\.1"):
                await call
            assert time.monotonic() - started < 1.5
        watch = etcd_client.watch_prefix(prefix, 1)
        with pytest.raises(EtcdUnavailable):
            await asyncio.wait_for(anext(watch), 5)


async def test_killed_and_restarted_etcd(own_etcd: Etcd, prefix: bytes) -> None:
    own_etcd.start()
    timeout = 2.0
    async with EtcdClient(EtcdConnection(endpoints=(own_etcd.url,), timeout=timeout)) as c:
        await c.txn([], [Put(prefix + b"k", b"v")])
        revision, _ = await c.get_prefix(prefix)
        watch = c.watch_prefix(prefix, revision + 1, progress_interval=0.5)
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.2)

        own_etcd.kill()
        # The watch notices the broken stream; unary calls give up within the timeout.
        with pytest.raises(EtcdUnavailable):
            await asyncio.wait_for(pending, timeout + 2)
        await watch.aclose()  # type: ignore[attr-defined]
        for call in (c.get(prefix + b"k"), c.txn([], [Put(prefix + b"k", b"w")]), c.status()):
            started = time.monotonic()
            with pytest.raises(EtcdUnavailable):
                await call
            assert time.monotonic() - started < timeout + 0.5

        own_etcd.start()
        # The same client recovers once etcd is back (its data survived).
        kv = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(EtcdUnavailable):
                kv = await c.get(prefix + b"k")
                break
            await asyncio.sleep(0.2)
        assert kv is not None and kv.value == b"v"
        assert (await c.txn([], [Put(prefix + b"k", b"again")])).succeeded


async def test_frozen_etcd(own_etcd: Etcd, prefix: bytes) -> None:
    """A server that keeps its connections open but never answers: every wait is bounded."""
    own_etcd.start()
    timeout = 1.5
    async with EtcdClient(EtcdConnection(endpoints=(own_etcd.url,), timeout=timeout)) as c:
        revision = (await c.txn([], [Put(prefix + b"k", b"v")])).revision
        watch = c.watch_prefix(prefix, revision + 1, progress_interval=0.5)
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.2)
        own_etcd.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(EtcdUnavailable, match="silent"):
                await asyncio.wait_for(pending, 10)
            assert time.monotonic() - started < 0.5 + timeout + 0.5
            await watch.aclose()  # type: ignore[attr-defined]
            for call in (c.get(prefix + b"k"), c.txn([], [Put(prefix + b"k", b"w")])):
                started = time.monotonic()
                with pytest.raises(EtcdUnavailable):
                    await call
                assert time.monotonic() - started < timeout + 0.5
        finally:
            own_etcd.thaw()
        kv = await c.get(prefix + b"k")
        # The txn above timed out on a frozen server; it was applied or not, never twice.
        assert kv is not None and kv.value in (b"v", b"w")


class CompactingClient(EtcdClient):
    """Compacts etcd right after the first page of a listing, once."""

    armed = True

    async def _unary(self, service: str, method: str, request: Any, *, idempotent: bool) -> Any:
        response = await super()._unary(service, method, request, idempotent=idempotent)
        if self.armed and method == "Range" and response.more:
            self.armed = False
            newer = await self.txn([], [Put(request.key + b"-new", b"x")])
            await self.compact(newer.revision)
        return response


async def test_listing_restarts_after_compaction(etcd: Etcd, prefix: bytes) -> None:
    conn = EtcdConnection(endpoints=(etcd.url,))
    async with CompactingClient(conn) as etcd_client:
        items = [(prefix + f"k{i:05d}".encode(), b"v") for i in range(PAGE_SIZE + 10)]
        await put_many(etcd_client, items)
        revision, kvs = await etcd_client.get_prefix(prefix)
        assert not etcd_client.armed
        # The second listing reads at the new revision and sees the key written
        # after the first page.
        assert len(kvs) == len(items) + 1
        assert revision >= max(kv.mod_revision for kv in kvs)


# --------------------------------------------------------------------------- TLS and auth


async def test_tls_with_client_certificates(etcd_binary: str, tmp_path: Path, prefix: bytes) -> None:
    tls = Tls(tmp_path / "tls")
    server = Etcd(etcd_binary, tmp_path / "etcd", tls=tls)
    server.start()
    try:
        conn = EtcdConnection.from_env(
            {
                "ETCD_ENDPOINTS": f"127.0.0.1:{server.client_port}",
                "ETCD_CACERT": str(tls.ca),
                "ETCD_CERT": str(tls.client_cert),
                "ETCD_KEY": str(tls.client_key),
            }
        )
        assert conn.endpoints == (server.url,)
        async with EtcdClient(conn) as etcd_client:
            await etcd_client.txn([], [Put(prefix + b"k", b"v")])
            kv = await etcd_client.get(prefix + b"k")
            assert kv is not None and kv.value == b"v"

        # Without a client certificate the server refuses the handshake.
        no_cert = EtcdConnection(endpoints=(server.url,), ca_cert=str(tls.ca), timeout=1.0)
        async with EtcdClient(no_cert) as etcd_client:
            with pytest.raises(EtcdUnavailable):
                await etcd_client.get(prefix + b"k")
        # A plaintext client to a TLS port gets nowhere either.
        plain = EtcdConnection(endpoints=(f"http://127.0.0.1:{server.client_port}",), timeout=1.0)
        async with EtcdClient(plain) as etcd_client:
            with pytest.raises(EtcdUnavailable):
                await etcd_client.get(prefix + b"k")
    finally:
        server.stop()


async def enable_auth(url: str, password: str) -> None:
    """Create root (and an unprivileged user) and turn authentication on, over plain gRPC."""
    async with grpc.aio.insecure_channel(url.removeprefix("http://")) as channel:
        auth: Any = rpc.AuthStub(channel)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=password), timeout=5)
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"), timeout=5)
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="nobody", password="nobody"), timeout=5)
        await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)


async def test_username_and_password(own_etcd: Etcd, prefix: bytes) -> None:
    # Tokens expire after 2 s of disuse, so the test can watch re-authentication.
    own_etcd.extra = ("--auth-token-ttl", "2")
    own_etcd.start()
    password = "correct horse"
    await enable_auth(own_etcd.url, password)

    def conn(username: str | None, secret: str | None) -> EtcdConnection:
        return EtcdConnection(endpoints=(own_etcd.url,), username=username, password=secret, timeout=3.0)

    async with EtcdClient(conn("root", "wrong")) as etcd_client:
        with pytest.raises(EtcdRejected, match="root") as info:
            await etcd_client.get(prefix + b"k")
        assert "wrong" not in str(info.value)

    async with EtcdClient(conn(None, None)) as etcd_client:
        with pytest.raises(EtcdRejected):
            await etcd_client.get(prefix + b"k")

    async with EtcdClient(conn("nobody", "nobody")) as etcd_client:
        with pytest.raises(EtcdRejected, match="permission denied"):
            await etcd_client.get(prefix + b"k")

    async with EtcdClient(conn("root", password)) as etcd_client:
        result = await etcd_client.txn([], [Put(prefix + b"k", b"v")])
        assert result.succeeded
        await asyncio.sleep(3.5)  # let the token expire
        kv = await etcd_client.get(prefix + b"k")
        assert kv is not None and kv.value == b"v"
        await asyncio.sleep(3.5)
        watch = etcd_client.watch_prefix(prefix, result.revision)
        try:
            batches = await collect(watch, want=1)
        finally:
            await watch.aclose()  # type: ignore[attr-defined]
        assert batches[0][1][0].kv.key == prefix + b"k"
