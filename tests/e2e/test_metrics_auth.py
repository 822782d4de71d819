"""``/metrics`` over HTTPS with authentication and authorisation, against the dev stack's API server.

The operator runs with ``--metrics-secure --metrics-cert-dir`` and a certificate made
here with ``openssl``. Two ServiceAccounts get tokens (``kubectl create token``); one is
bound to the ``tether-metrics-reader`` ClusterRole of ``manifests/components/metrics-auth``.
No token → 401, the unbound one → 403, the bound one → 200 and the ``tether_`` metrics.
Then the certificate files are replaced, as the kubelet does when cert-manager renews the
Secret, and the server must present the new certificate within 60 s, without a restart.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether_dev.harness import devstack, waiting
from tether_dev.harness.kube import delete_namespace, kubectl
from tether_dev.harness.operator import OperatorProcess, parse_metrics

READER_ROLE = devstack.REPO / "manifests" / "components" / "metrics-auth" / "metrics_reader_role.yaml"
#: The brief's bound on picking up a rotated certificate (the server checks every 10 s).
ROTATION_BOUND = 60.0


def make_certificate(directory: Path, serial: int) -> None:
    """A self-signed certificate for 127.0.0.1 with this serial, written as ``tls.crt``/``tls.key``
    into ``directory`` by renaming over the old files (as the kubelet swaps a Secret)."""
    staging = directory.parent / f"staging-{serial:x}"
    staging.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=tether-metrics", "-addext", "subjectAltName=IP:127.0.0.1",
         "-set_serial", str(serial),
         "-keyout", str(staging / "tls.key"), "-out", str(staging / "tls.crt")],
        check=True, capture_output=True, timeout=60,
    )
    directory.mkdir(exist_ok=True)
    for name in ("tls.crt", "tls.key"):
        os.replace(staging / name, directory / name)
    (directory.parent / f"ca-{serial:x}.pem").write_text((directory / "tls.crt").read_text())


def client_context(tmp: Path) -> ssl.SSLContext:
    """Verifies the server against every certificate made so far (old and new)."""
    context = ssl.create_default_context()
    for ca in sorted(tmp.glob("ca-*.pem")):
        context.load_verify_locations(str(ca))
    return context


def served_serial(port: int, tmp: Path) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            client_context(tmp).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        cert = tls.getpeercert()
    assert cert is not None
    return int(str(cert["serialNumber"]), 16)


def get(port: int, tmp: Path, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(f"https://127.0.0.1:{port}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, context=client_context(tmp), timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.fixture
def scrapers(dev_env: dict[str, str]) -> Iterator[tuple[str, str, str]]:
    """A namespace with two ServiceAccounts, ``reader`` bound to the metrics reader role."""
    env = dev_env
    ns = f"x-metrics-{uuid.uuid4().hex[:6]}"
    binding = f"{ns}-reader"
    kubectl(env, "create", "namespace", ns)
    kubectl(env, "apply", "-f", str(READER_ROLE))
    for account in ("reader", "stranger"):
        kubectl(env, "create", "serviceaccount", account, "-n", ns)
    kubectl(env, "create", "clusterrolebinding", binding, "--clusterrole=tether-metrics-reader",
            f"--serviceaccount={ns}:reader")
    tokens = [kubectl(env, "create", "token", a, "-n", ns, "--duration=1h").stdout.strip()
              for a in ("reader", "stranger")]
    try:
        yield ns, tokens[0], tokens[1]
    finally:
        kubectl(env, "delete", "clusterrolebinding", binding, check=False)
        delete_namespace(env, ns)


def test_metrics_over_https_need_a_reader_token(
    dev_env: dict[str, str], scrapers: tuple[str, str, str], tmp_path: Path,
) -> None:
    ns, reader, stranger = scrapers
    certs = tmp_path / "certs"
    first, second = random.sample(range(1 << 20, 1 << 30), 2)
    make_certificate(certs, first)
    op = OperatorProcess(
        dev_env, tmp_path / "op.log", verbose=True,
        args=("-n", ns, "--metrics-secure", "--metrics-cert-dir", str(certs)),
    ).start(wait=False)
    port = op.metrics_port

    def serving() -> bool:
        if not op.alive():
            raise waiting.GiveUp(f"the operator exited:\n{op.log_tail()}")
        return get(port, tmp_path, None)[0] == 401

    try:
        waiting.wait_for(serving, timeout=90, interval=0.2, message="HTTPS /metrics answering")
        # Plain HTTP on that port is no longer /metrics.
        with pytest.raises((OSError, urllib.error.URLError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()

        status, _ = get(port, tmp_path, None)
        assert status == 401
        assert get(port, tmp_path, "not-a-token")[0] == 401
        assert get(port, tmp_path, stranger)[0] == 403, op.log_tail()
        status, body = get(port, tmp_path, reader)
        assert status == 200, (status, body, op.log_tail())
        samples = parse_metrics(body)
        assert any(name.startswith("tether_") for name in samples), body[:500]
        assert "tether_leader" in samples
        # Cached answers stay the same answers.
        assert get(port, tmp_path, stranger)[0] == 403
        assert get(port, tmp_path, reader)[0] == 200

        # Rotation: new files on disk, the same process, the new certificate served.
        assert served_serial(port, tmp_path) == first
        make_certificate(certs, second)
        waiting.wait_for(lambda: served_serial(port, tmp_path) == second, timeout=ROTATION_BOUND,
                         interval=1.0, message="the rotated certificate served")
        assert op.alive() and op.starts == 1
        assert get(port, tmp_path, reader)[0] == 200
    finally:
        with contextlib.suppress(Exception):
            op.stop(grace=20)
