"""The dev cluster's certificates and keys, made with the ``openssl`` command.

One throw-away CA signs the API server's serving certificate (valid for the
loopback address and the in-cluster names of the ``kubernetes`` Service) and an
admin client certificate in the group ``system:masters``, which RBAC lets do
anything. A separate RSA key pair signs and verifies service-account tokens.

``openssl`` rather than Python's ``cryptography`` keeps the operator's
dependencies free of a build-time-only need. Everything is generated into a
temporary directory that is renamed into place at the end, so the state
directory never holds half a PKI; once made, it is reused by every later ``up``,
so restarted components and existing kubeconfigs keep working.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tether_dev import commands
from tether_dev.reporting import DevStackError

# P-256 keys are quick to make and every component here accepts them.
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
_CA_DAYS = "3650"
_LEAF_DAYS = "825"
_OPENSSL_TIMEOUT = 60.0

SERVING_NAMES = (
    "IP:127.0.0.1",
    f"IP:{commands.KUBERNETES_SERVICE_IP}",
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)


def _openssl(args: Sequence[str], *, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise DevStackError("the `openssl` command is needed to make the dev cluster's certificates")
    done = subprocess.run(
        [openssl, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=_OPENSSL_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise DevStackError(f"openssl {' '.join(args[:2])} failed:\n{done.stderr.strip()}")


def _leaf(
    work: Path, *, stem: str, subject: str, extensions: Sequence[str]
) -> None:
    """Key, CSR and CA-signed certificate ``<stem>.{key,crt}`` in ``work``."""
    _openssl(
        ["req", "-new", "-nodes", *_EC, "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
         "-subj", subject],
        cwd=work,
    )
    (work / f"{stem}.ext").write_text("\n".join(extensions) + "\n")
    _openssl(
        ["x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         # A random serial: a fixed one would collide when the PKI is re-made and
         # a client has cached the old certificate.
         "-set_serial", f"0x{secrets.token_hex(16)}", "-days", _LEAF_DAYS,
         "-extfile", f"{stem}.ext", "-out", f"{stem}.crt"],
        cwd=work,
    )
    (work / f"{stem}.csr").unlink()
    (work / f"{stem}.ext").unlink()


def generate(work: Path) -> None:
    """Write a complete PKI (see :class:`commands.Pki`) into the directory ``work``."""
    _openssl(
        ["req", "-x509", "-new", "-nodes", *_EC, "-keyout", "ca.key", "-out", "ca.crt",
         "-days", _CA_DAYS, "-subj", "/CN=tether-dev-ca",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"],
        cwd=work,
    )
    _leaf(
        work,
        stem="apiserver",
        subject="/CN=kube-apiserver",
        extensions=[
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=serverAuth",
            "subjectAltName=" + ",".join(SERVING_NAMES),
        ],
    )
    _leaf(
        work,
        stem="admin",
        # O= is the Kubernetes group: system:masters is bound to cluster-admin.
        subject="/O=system:masters/CN=tether-dev-admin",
        extensions=[
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=clientAuth",
        ],
    )
    _openssl(
        ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key"],
        cwd=work,
    )
    _openssl(["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"], cwd=work)
    for key in work.glob("*.key"):
        key.chmod(0o600)


def make_ca(directory: Path, *, name: str = "tether-test-ca") -> None:
    """A new CA (``ca.crt``, ``ca.key``) in ``directory``: for backends run with TLS in tests."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        ["req", "-x509", "-new", "-nodes", *_EC, "-keyout", "ca.key", "-out", "ca.crt",
         "-days", _CA_DAYS, "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"],
        cwd=directory,
    )
    (directory / "ca.key").chmod(0o600)


def issue(
    directory: Path, stem: str, *, common_name: str | None, server: bool = False
) -> tuple[Path, Path]:
    """A certificate and key signed by the CA in ``directory``, with a new random serial.

    ``server``: for a server on the loopback address (and a client too, as
    etcd's peers are); otherwise a client certificate. Issuing the same
    ``stem`` again re-issues it (new key, new serial): a rotation.
    ``common_name`` None: a subject without CN, which etcd's JSON gateway
    requires of a client certificate (it refuses one whose CN it would ignore).
    Returns the paths of ``<stem>.crt`` and ``<stem>.key``.
    """
    usage = "serverAuth,clientAuth" if server else "clientAuth"
    extensions = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={usage}",
    ]
    if server:
        extensions.append("subjectAltName=IP:127.0.0.1,DNS:localhost")
    subject = f"/CN={common_name}" if common_name is not None else "/O=tether-dev"
    _leaf(directory, stem=stem, subject=subject, extensions=extensions)
    (directory / f"{stem}.key").chmod(0o600)
    return directory / f"{stem}.crt", directory / f"{stem}.key"


def ensure(directory: Path) -> commands.Pki:
    """The PKI in ``directory``, generated on first use."""
    pki = commands.Pki(directory)
    if directory.is_dir():
        return pki
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pki-", dir=directory.parent))
    try:
        generate(work)
        os.replace(work, directory)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return pki
