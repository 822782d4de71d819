"""Credentials and TLS files that change on disk: secret files, watched TLS files, client rebuilds."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import grpc.aio
import pytest

from tether.clients import reloading
from tether.clients.consul.client import ConsulClient, ConsulRejected
from tether.clients.consul.connection import ConsulConnection
from tether.clients.etcd.client import EtcdClient
from tether.clients.etcd.connection import EtcdConnection
from tether.clients.etcd.errors import EtcdRejected
from tether_dev import certificates

pytestmark = [
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
    # py-consul's own connector setup warns on recent aiohttp; not Tether's code.
    pytest.mark.filterwarnings("ignore:ssl_context is deprecated:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and two client certificates (one, two), each with its key."""
    directory = tmp_path_factory.mktemp("pki")
    certificates.make_ca(directory)
    certificates.issue(directory, "one", common_name="tether")
    certificates.issue(directory, "two", common_name="tether")
    return directory


def kubelet_secret(mount: Path, files: dict[str, bytes], version: str) -> None:
    """Write ``files`` the way the kubelet updates a mounted Secret: a new directory, ..data swapped."""
    data = mount / f"..{version}"
    data.mkdir(parents=True)
    for name, content in files.items():
        (data / name).write_bytes(content)
        # Same size and time as before: only the symlink swap tells them apart.
        os.utime(data / name, ns=(1_000_000_000, 1_000_000_000))
    link = mount / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, mount / "..data")
    for name in files:
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ SecretFile


def test_secret_file_is_read_again_only_when_it_changed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    secret = reloading.SecretFile(str(path), "CONSUL_HTTP_TOKEN_FILE")
    assert secret.read() == "first"
    path.write_text("second-longer\n")
    assert secret.read() == "second-longer"


def test_secret_file_cache_is_keyed_by_the_stamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token"
    path.write_text("first")
    secret = reloading.SecretFile(str(path), "X")
    assert secret.read() == "first"
    opened: list[str] = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(str(a[0])) or real_open(*a, **k))
    assert secret.read() == "first"
    assert opened == []  # unchanged: one stat, no read


def test_secret_file_sees_a_kubelet_symlink_swap(tmp_path: Path) -> None:
    kubelet_secret(tmp_path, {"password": b"aaaa"}, "v1")
    secret = reloading.SecretFile(str(tmp_path / "password"), "ETCD_PASSWORD_FILE")
    assert secret.read() == "aaaa"
    kubelet_secret(tmp_path, {"password": b"bbbb"}, "v2")
    assert secret.read() == "bbbb"


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_missing_or_empty_secret_file_is_rejected_with_its_variable(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    secret = reloading.SecretFile(str(path), "CONSUL_HTTP_TOKEN_FILE")
    with pytest.raises(reloading.SecretFileError, match="CONSUL_HTTP_TOKEN_FILE"):
        secret.read()


# ---------------------------------------------------------------- WatchedFiles


def test_watched_files_are_checked_at_most_once_per_interval(pki: Path, tmp_path: Path) -> None:
    cert = tmp_path / "tls.crt"
    shutil.copy(pki / "one.crt", cert)
    clock = Clock()
    files = reloading.WatchedFiles([str(cert), None], what="test", interval=5.0, clock=clock)
    assert files.paths == (str(cert),)
    files.load(lambda: None)
    shutil.copy(pki / "two.crt", cert)
    clock.now += 1.0
    assert not files.due()  # changed, but not checked yet
    clock.now += 5.0
    assert files.due()
    clock.now += 5.0
    assert files.due()  # still not loaded: still changed
    files.load(lambda: None)
    clock.now += 5.0
    assert not files.due()


def test_watched_files_see_a_kubelet_symlink_swap(pki: Path, tmp_path: Path) -> None:
    kubelet_secret(tmp_path, {"tls.crt": (pki / "one.crt").read_bytes()}, "v1")
    clock = Clock()
    files = reloading.WatchedFiles([str(tmp_path / "tls.crt")], what="test", interval=1.0, clock=clock)
    files.load(lambda: None)
    kubelet_secret(tmp_path, {"tls.crt": (pki / "two.crt").read_bytes()}, "v2")
    clock.now += 1.0
    assert files.due()


def test_a_bad_pair_is_kept_out_and_tried_again(pki: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki / "one.crt", cert)
    shutil.copy(pki / "one.key", key)
    clock = Clock()
    files = reloading.WatchedFiles([str(cert), str(key)], what="test", interval=1.0, clock=clock)

    def build() -> str:
        reloading.check_pair(str(cert), str(key))
        return reloading.fingerprint(cert.read_bytes())

    first = files.load(build)
    # Half-way through an update: the new certificate next to the old key.
    shutil.copy(pki / "two.crt", cert)
    clock.now += 1.0
    assert files.due()
    assert files.reload(build) is None
    shutil.copy(pki / "two.key", key)
    clock.now += 1.0
    assert files.due()  # the failed load was not recorded: checked again
    second = files.reload(build)
    assert second is not None and second != first
    assert second == reloading.fingerprint((pki / "two.crt").read_bytes())


def test_fingerprint_names_the_first_certificate(pki: Path) -> None:
    one, two = (pki / "one.crt").read_bytes(), (pki / "two.crt").read_bytes()
    assert reloading.fingerprint(one + two) == reloading.fingerprint(one) != reloading.fingerprint(two)
    assert reloading.fingerprint(b"") == "none"


# -------------------------------------------------------------------- Consul


async def test_consul_token_is_read_from_its_file_per_request(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("old-token\n")
    client = ConsulClient(ConsulConnection(token_file=str(token)))
    try:
        assert client._headers() == {"X-Consul-Token": "old-token"}
        token.write_text("new-token-2\n")
        assert client._headers() == {"X-Consul-Token": "new-token-2"}
        token.unlink()
        with pytest.raises(ConsulRejected, match="CONSUL_HTTP_TOKEN_FILE"):
            client._headers()
    finally:
        await client.close()


def tls_files(pki: Path, directory: Path, which: str) -> tuple[str, str, str]:
    for suffix in ("crt", "key"):
        shutil.copy(pki / f"{which}.{suffix}", directory / f"tls.{suffix}")
    shutil.copy(pki / "ca.crt", directory / "ca.crt")
    return str(directory / "ca.crt"), str(directory / "tls.crt"), str(directory / "tls.key")


async def test_consul_session_is_rebuilt_between_calls_and_the_old_one_closed_when_idle(
    pki: Path, tmp_path: Path
) -> None:
    ca, cert, key = tls_files(pki, tmp_path, "one")
    client = ConsulClient(
        ConsulConnection(scheme="https", ca_cert=ca, client_cert=cert, client_key=key)
    )
    client._tls.interval = 0.0  # check at every call (the interval is tested above)
    try:
        first = client._http
        assert first.fingerprint == reloading.fingerprint((pki / "one.crt").read_bytes())
        assert client._http is first  # nothing changed
        # A call is running on the first session while the files rotate.
        release = asyncio.Event()
        call = asyncio.create_task(first._run(release.wait))
        await asyncio.sleep(0)
        assert first.running == 1
        tls_files(pki, tmp_path, "two")
        second = client._http
        assert second is not first
        assert second.fingerprint == reloading.fingerprint((pki / "two.crt").read_bytes())
        assert not first.client.http._session.closed  # its call still runs
        # The call ends on the old session, which then closes.
        release.set()
        assert await call is True
        await asyncio.gather(*client._closing)
        assert first.client.http._session.closed
        # A new certificate with the old key: the second session stays.
        shutil.copy(pki / "one.crt", cert)
        shutil.copy(pki / "two.key", key)
        assert client._http is second
    finally:
        await client.close()


# ---------------------------------------------------------------------- etcd


async def test_etcd_channels_are_rebuilt_when_the_files_change_and_kept_on_a_bad_pair(
    pki: Path, tmp_path: Path
) -> None:
    ca, cert, key = tls_files(pki, tmp_path, "one")
    client = EtcdClient(
        EtcdConnection(endpoints=("https://127.0.0.1:1",), ca_cert=ca, cert=cert, key=key)
    )
    client._tls.interval = 0.0  # check at every call (the interval is tested above)
    try:
        await client._ensure_open()
        first = client._endpoints
        assert client._fingerprint == reloading.fingerprint((pki / "one.crt").read_bytes())
        # Mid-update: the new certificate next to the old key. Kept out.
        shutil.copy(pki / "two.crt", cert)
        await client._ensure_open()
        assert client._endpoints is first
        shutil.copy(pki / "two.key", key)
        await client._ensure_open()
        assert client._endpoints is not first
        assert client._fingerprint == reloading.fingerprint((pki / "two.crt").read_bytes())
        assert [channel for channel in client._closing.values()] == [e.channel for e in first]
    finally:
        # A stop does not wait out the old channels' grace period.
        started = asyncio.get_running_loop().time()
        await client.close()
        assert asyncio.get_running_loop().time() - started < 2.0
        assert not client._closing


async def test_etcd_password_file_is_read_when_authenticating(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    conn = EtcdConnection(endpoints=("http://127.0.0.1:1",), username="root", password_file=str(password))
    client = EtcdClient(conn)
    assert client._password() == "s3cret"
    password.write_text("rotated\n")
    assert client._password() == "rotated"
    password.unlink()
    with pytest.raises(EtcdRejected, match="ETCD_PASSWORD_FILE"):
        client._password()


def test_settings_take_the_file_variables_and_refuse_both_forms(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("x")
    conn = EtcdConnection.from_env({"ETCD_USERNAME": "root", "ETCD_PASSWORD_FILE": str(password)})
    assert conn.password_file == str(password) and conn.password is None
    with pytest.raises(ValueError, match="both set"):
        EtcdConnection.from_env(
            {"ETCD_USERNAME": "root", "ETCD_PASSWORD": "x", "ETCD_PASSWORD_FILE": str(password)}
        )
    with pytest.raises(ValueError, match="ETCD_USERNAME"):
        EtcdConnection.from_env({"ETCD_PASSWORD_FILE": str(password)})
    consul = ConsulConnection.from_env({"CONSUL_HTTP_TOKEN_FILE": "/var/run/token"})
    assert consul.token_file == "/var/run/token" and consul.token is None
    with pytest.raises(ValueError, match="both set"):
        ConsulConnection.from_env({"CONSUL_HTTP_TOKEN": "t", "CONSUL_HTTP_TOKEN_FILE": "/f"})


class _Auth:
    """etcd's Authenticate: a token for the right password, etcd's refusal for any other.

    ``on_refusal`` runs just before a refusal: the file changing while it is on its way.
    """

    def __init__(self, right: str, on_refusal: Callable[[], None] = lambda: None) -> None:
        self.right = right
        self.on_refusal = on_refusal
        self.tried: list[str] = []

    async def Authenticate(self, request: Any, **_: Any) -> Any:  # gRPC stub method name
        self.tried.append(request.password)
        if request.password != self.right:
            self.on_refusal()
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(),
                details="etcdserver: authentication failed, invalid user ID or password",
            )
        return SimpleNamespace(token=f"token-for-{request.password}")


async def test_etcd_authenticates_again_once_with_a_password_that_changed_meanwhile(
    tmp_path: Path,
) -> None:
    password = tmp_path / "password"
    password.write_text("old")
    client = EtcdClient(
        EtcdConnection(endpoints=("http://127.0.0.1:1",), username="tether", password_file=str(password))
    )
    auth = _Auth("new", on_refusal=lambda: password.write_text("new"))
    endpoint = SimpleNamespace(url="http://127.0.0.1:1", auth=auth)
    deadline = asyncio.get_running_loop().time() + 5
    assert await client._authenticate(endpoint, deadline) == "token-for-new"  # type: ignore[arg-type]
    assert auth.tried == ["old", "new"]
    # A wrong password that stays wrong: refused once, naming the file's variable.
    stuck = _Auth("other")
    endpoint = SimpleNamespace(url="http://127.0.0.1:1", auth=stuck)
    with pytest.raises(EtcdRejected, match="ETCD_PASSWORD_FILE"):
        await client._authenticate(endpoint, deadline)  # type: ignore[arg-type]
    assert stuck.tried == ["new"]
