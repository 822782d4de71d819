"""Credentials and certificates rotated under a running operator: no restart, no resource out of Ready.

A Consul with ACLs and an HTTPS API that verifies client certificates, and an
etcd that requires client certificates and password authentication, both of
their own on free loopback ports. The operator reads everything from one
directory laid out as the kubelet mounts a Secret (``..data`` swapped
atomically on each update): ``CONSUL_HTTP_TOKEN_FILE``, ``ETCD_PASSWORD_FILE``
and the TLS files. Then, with two resources updated throughout:

(a) the Consul token is replaced in the file, and the old one deleted in Consul 10 s later;
(b) the etcd password is changed in etcd and written to the file;
(c) the client certificate is re-issued (new key, new serial) and the old one's
    files removed from disk: the operator logs the new certificate's fingerprint
    for both clients within 60 s, and writes go on.

Throughout: one operator process, never restarted; no resource out of Ready for
longer than one retry. ``TETHER_ROTATION_SOAK_SECONDS=3600`` repeats the three rotations
(each round about 40 s) for an hour: the soak.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether.clients import reloading
from tether_dev import certificates, probes, stack
from tether_dev.harness.consul import Consul
from tether_dev.harness.kube import apply, get, kubectl, resource, wait_condition
from tether_dev.harness.operator import OperatorProcess

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

MANAGEMENT = str(uuid.uuid4())
ROOT_PASSWORD = "root-" + uuid.uuid4().hex
#: A reconcile retried after a refusal comes back within this (the first backoff steps).
ONE_RETRY = 10.0
#: The long soak: rotation rounds repeat for this long (one round when 0, as in CI).
SOAK_SECONDS = float(os.environ.get("TETHER_ROTATION_SOAK_SECONDS", "0"))
#: The suite's per-test timeout (600 s), plus the soak: the soak outlasts the default.
SOAK_BOUND = pytest.mark.timeout(SOAK_SECONDS + 600)


def kubelet_write(mount: Path, files: dict[str, bytes], version: str) -> Path:
    """Update ``mount`` as the kubelet updates a Secret volume; return the new data directory."""
    data = mount / f"..{version}"
    data.mkdir(parents=True)
    for name, content in files.items():
        (data / name).write_bytes(content)
        (data / name).chmod(0o600)
    link = mount / "..data_tmp"
    link.symlink_to(data.name)
    link.replace(mount / "..data")
    for name in files:
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")
    return data


class SecureBackends:
    """The TLS + auth Consul and etcd, and how the test talks to them as administrator."""

    def __init__(self, tls: Path, consul: stack.Component, etcd: stack.Component) -> None:
        self.tls = tls
        self.consul = consul
        self.etcd = etcd
        self.context = probes.client_tls(tls / "ca.crt", tls / "admin.crt", tls / "admin.key")
        self.consul_admin = Consul(consul.url, token=MANAGEMENT)

    def etcd_call(self, path: str, body: dict[str, Any], *, token: str | None = None) -> Any:
        request = urllib.request.Request(
            self.etcd.url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", **({"Authorization": token} if token else {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.context) as answer:
                return json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"etcd {path}: {exc.code} {exc.read().decode(errors='replace')}") from None

    def root_token(self) -> str:
        answer = self.etcd_call("/v3/auth/authenticate", {"name": "root", "password": ROOT_PASSWORD})
        return str(answer["token"])

    def etcd_value(self, key: str) -> str | None:
        answer = self.etcd_call(
            "/v3/kv/range", {"key": base64.b64encode(key.encode()).decode()}, token=self.root_token()
        )
        kvs = answer.get("kvs") or []
        return base64.b64decode(kvs[0]["value"]).decode() if kvs else None

    def consul_token(self) -> tuple[str, str]:
        """A new token that may do all Tether needs; (accessor, secret)."""
        rules = "\n".join([
            'service_prefix "" { policy = "write" }',
            'node_prefix "" { policy = "write" }',
            'key_prefix "" { policy = "write" }',
            'agent_prefix "" { policy = "read" }',
        ])
        policy = self.consul_admin.call(
            "PUT", "/v1/acl/policy", {"Name": f"rot-{uuid.uuid4().hex[:8]}", "Rules": rules}
        )
        token = self.consul_admin.call("PUT", "/v1/acl/token", {"Policies": [{"ID": policy["ID"]}]})
        return str(token["AccessorID"]), str(token["SecretID"])


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBackends]:
    directory = tmp_path_factory.mktemp("rotation")
    tls = directory / "pki"
    certificates.make_ca(tls)
    certificates.issue(tls, "server", common_name="localhost", server=True)
    certificates.issue(tls, "admin", common_name=None)
    etcd = stack.start_etcd_tls(directory, tls_dir=tls)
    try:
        consul = stack.start_consul(directory, acl_initial_token=MANAGEMENT, tls_dir=tls, name="consul-tls")
    except BaseException:
        stack.stop(etcd)
        raise
    try:
        yield SecureBackends(tls, consul, etcd)
    finally:
        stack.stop(consul)
        stack.stop(etcd)


def enable_etcd_auth(backends: SecureBackends, password: str) -> None:
    """Users root and tether (role root), then authentication on: etcd's own order of steps."""
    call = backends.etcd_call
    call("/v3/auth/role/add", {"name": "root"})
    for user, secret in (("root", ROOT_PASSWORD), ("tether", password)):
        call("/v3/auth/user/add", {"name": user, "password": secret})
        call("/v3/auth/user/grant", {"user": user, "role": "root"})
    call("/v3/auth/enable", {})


class ReadyWatch(threading.Thread):
    """Polls the resources' Ready condition; records the longest time each was out of Ready."""

    def __init__(self, env: dict[str, str], ns: str, names: list[tuple[str, str]]) -> None:
        super().__init__(daemon=True)
        self.env, self.ns, self.names = env, ns, names
        self.longest: dict[str, float] = {name: 0.0 for _, name in names}
        self._since: dict[str, float] = {}
        self._done = threading.Event()

    def run(self) -> None:
        # Bounded by the test: it sets _stop; each pass is two kubectl calls.
        while not self._done.wait(1.0):
            for kind, name in self.names:
                obj = get(self.env, self.ns, kind, name)
                now = time.monotonic()
                status = ((obj or {}).get("status") or {}).get("conditions") or []
                ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status)
                if ready:
                    self._since.pop(name, None)
                else:
                    start = self._since.setdefault(name, now)
                    self.longest[name] = max(self.longest[name], now - start)

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join(timeout=10)
        return self.longest


@SOAK_BOUND
def test_rotation_of_token_password_and_certificates(
    dev_env: dict[str, str], backends: SecureBackends, tmp_path: Path
) -> None:
    tls = backends.tls
    mount = tmp_path / "credentials"
    mount.mkdir()
    old_accessor, old_token = backends.consul_token()
    enable_etcd_auth(backends, "first-password")
    certificates.issue(tls, "operator-1", common_name="tether")

    def files(token: str, password: str, cert: str) -> dict[str, bytes]:
        return {
            "consul-token": token.encode() + b"\n",
            "etcd-password": password.encode() + b"\n",
            "ca.crt": (tls / "ca.crt").read_bytes(),
            "tls.crt": (tls / f"{cert}.crt").read_bytes(),
            "tls.key": (tls / f"{cert}.key").read_bytes(),
        }

    version = kubelet_write(mount, files(old_token, "first-password", "operator-1"), "v1")
    ns = f"x-rot-{uuid.uuid4().hex[:6]}"
    kubectl(dev_env, "create", "namespace", ns)
    extra = {
        "CONSUL_HTTP_ADDR": f"https://127.0.0.1:{backends.consul.ports['https']}",
        "CONSUL_HTTP_TOKEN_FILE": str(mount / "consul-token"),
        "CONSUL_CACERT": str(mount / "ca.crt"),
        "CONSUL_CLIENT_CERT": str(mount / "tls.crt"),
        "CONSUL_CLIENT_KEY": str(mount / "tls.key"),
        "ETCD_ENDPOINTS": backends.etcd.url,
        "ETCD_CACERT": str(mount / "ca.crt"),
        "ETCD_CERT": str(mount / "tls.crt"),
        "ETCD_KEY": str(mount / "tls.key"),
        "ETCD_USERNAME": "tether",
        "ETCD_PASSWORD_FILE": str(mount / "etcd-password"),
    }
    env = dev_env
    op = OperatorProcess(env, tmp_path / "op.log", args=("-n", ns), extra_env=extra, verbose=True).start()
    prefix = f"/rot/{uuid.uuid4().hex[:8]}"
    step = 0

    def churn() -> None:
        """Update both resources and wait until both changes are in the backends."""
        nonlocal step
        step += 1
        web = {"name": "rot-web", "id": "rot-web-1", "port": 8000 + step}
        apply(env, ns, resource("ConsulService", "web", web))
        apply(env, ns, resource("EtcdConfig", "cfg", {"prefix": prefix + "/", "data": {"step": str(step)}}))
        wait_condition(env, ns, "consulservice", "web", op=op, timeout=30)
        wait_condition(env, ns, "etcdconfig", "cfg", op=op, timeout=30)
        svc = backends.consul_admin.call("GET", "/v1/agent/service/rot-web-1")
        assert svc is not None and svc["Port"] == 8000 + step, svc
        assert backends.etcd_value(f"{prefix}/step") == str(step)

    watch: ReadyWatch | None = None
    soak_until = time.monotonic() + SOAK_SECONDS
    token_accessor, token, password, cert = old_accessor, old_token, "first-password", "operator-1"
    pickups: list[float] = []
    rounds = 0
    try:
        churn()
        watch = ReadyWatch(env, ns, [("consulservice", "web"), ("etcdconfig", "cfg")])
        watch.start()
        # One round, or as many as fit in TETHER_ROTATION_SOAK_SECONDS (the long soak).
        while rounds == 0 or time.monotonic() < soak_until:
            rounds += 1
            # (a) A new Consul token in the file; the old one deleted 10 s later.
            new_accessor, token = backends.consul_token()
            version = kubelet_write(mount, files(token, password, cert), f"v{rounds}a")
            churn()
            time.sleep(10)
            backends.consul_admin.call("DELETE", f"/v1/acl/token/{token_accessor}")
            token_accessor = new_accessor
            churn()

            # (b) The etcd password changed in etcd, then in the file.
            password = f"password-{rounds}"
            backends.etcd_call(
                "/v3/auth/user/changepw", {"name": "tether", "password": password},
                token=backends.root_token(),
            )
            version = kubelet_write(mount, files(token, password, cert), f"v{rounds}b")
            churn()

            # (c) The client certificate re-issued (new key, new serial); the old files removed.
            old_cert, cert = cert, f"operator-{rounds + 1}"
            certificates.issue(tls, cert, common_name="tether")
            old_version = version
            version = kubelet_write(mount, files(token, password, cert), f"v{rounds}c")
            rotated_at = time.monotonic()
            for stale in (tls / f"{old_cert}.crt", tls / f"{old_cert}.key"):
                stale.unlink()
            for stale_dir in mount.glob("..v*"):
                if stale_dir.name != version.name:
                    shutil.rmtree(stale_dir)
            assert not old_version.exists()
            new_fp = reloading.fingerprint((tls / f"{cert}.crt").read_bytes())
            wanted = [
                f"etcd TLS files changed: new connections use client certificate {new_fp}",
                f"Consul TLS files changed: new connections to https://127.0.0.1:"
                f"{backends.consul.ports['https']} use client certificate {new_fp}",
            ]
            # Rotation happens between calls: the churn goes on while the operator
            # is expected to pick the new certificate up (checked every 5 s).
            deadline = rotated_at + 60
            while not all(line in op.log_text() for line in wanted):
                assert time.monotonic() < deadline, f"new certificate not in use after 60 s:\n{op.log_tail()}"
                churn()
            pickups.append(time.monotonic() - rotated_at)
            assert op.alive() and op.starts == 1, f"the operator restarted in round {rounds}"
        churn()
        longest = watch.stop()
        watch = None
        rss_mib = op.metrics().get("process_resident_memory_bytes", 0) / 2**20
        print(
            f"rotation rounds: {rounds}; churn steps: {step}; longest time out of Ready per resource: "
            f"{longest}; new certificate in use after (s): max {max(pickups):.1f}, "
            f"p50 {sorted(pickups)[len(pickups) // 2]:.1f}; operator RSS {rss_mib:.0f} MiB"
        )
        assert op.alive() and op.starts == 1, "the operator restarted"
        assert all(seconds <= ONE_RETRY for seconds in longest.values()), longest
        assert "Traceback" not in op.log_text(), op.log_tail()
    finally:
        if watch is not None:
            watch.stop()
        kubectl(env, "delete", "consulservices,etcdconfigs", "--all", "-n", ns, "--timeout=60s", check=False)
        op.stop()
        kubectl(env, "delete", "namespace", ns, "--wait=false", check=False)
