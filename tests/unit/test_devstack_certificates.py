"""The dev cluster's PKI, made with openssl: chains, names, groups, reuse."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tether_dev import certificates


def openssl(*args: str) -> str:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def test_pki_chains_to_its_ca_with_the_right_names(tmp_path: Path) -> None:
    pki = certificates.ensure(tmp_path / "pki")
    for cert in (pki.serving_cert, pki.admin_cert):
        assert openssl("verify", "-CAfile", str(pki.ca_cert), str(cert)).strip().endswith("OK")

    serving = openssl("x509", "-in", str(pki.serving_cert), "-noout", "-text")
    assert "IP Address:127.0.0.1" in serving
    assert "DNS:kubernetes.default.svc" in serving
    assert "TLS Web Server Authentication" in serving

    admin = openssl("x509", "-in", str(pki.admin_cert), "-noout", "-subject", "-nameopt", "RFC2253")
    # Kubernetes reads O as the group: system:masters may do anything under RBAC.
    assert "O=system:masters" in admin

    public = openssl("pkey", "-in", str(pki.service_account_key), "-pubout")
    assert public == pki.service_account_pub.read_text()
    for key in (pki.ca_key, pki.serving_key, pki.admin_key, pki.service_account_key):
        assert key.stat().st_mode & 0o077 == 0, key


def test_an_existing_pki_is_kept(tmp_path: Path) -> None:
    first = certificates.ensure(tmp_path / "pki")
    ca = first.ca_cert.read_bytes()
    second = certificates.ensure(tmp_path / "pki")
    assert second.ca_cert.read_bytes() == ca
    # Generated beside the target and renamed: no temporary directory is left.
    assert [p.name for p in tmp_path.iterdir()] == ["pki"]
