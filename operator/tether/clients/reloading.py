"""Credentials and TLS files that may change on disk while the operator runs.

Rotation without a restart (cert-manager renewing a certificate, Vault
rotating a Consul token, a changed etcd password) needs two things from the
files a client was configured with:

- :class:`SecretFile`: one secret (``CONSUL_HTTP_TOKEN_FILE``,
  ``ETCD_PASSWORD_FILE``) read at each use. The content is cached by the
  file's *stamp* (device, inode, size, modification time and resolved path),
  so a use costs one ``stat`` and the file is read again only when it changed.
- :class:`WatchedFiles`: the TLS files of one client, checked at most every
  ``interval`` seconds; when any changed, the client builds a new SSL context
  or channel credentials *between* calls, and keeps the previous ones if the
  new files do not load (a certificate next to the old key, half-way through
  an update): that is retried at the next check.

The kubelet updates a mounted Secret by writing a new directory and swapping
the ``..data`` symlink atomically. ``os.stat`` follows every link, so the
stamp is the stamp of the file the path resolves to *now*, and the resolved
path is part of it: a swap is seen even if the new file has the same size and
modification time as the old one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from tether.errors import BackendRejected

T = TypeVar("T")
log = logging.getLogger(__name__)

#: How often TLS files are checked for a change: well inside the 60 s within
#: which a rotated certificate must be in use, and cheap (a few ``stat`` calls).
CHECK_INTERVAL: Final = 5.0

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True)
class Stamp:
    """What tells one version of a file from another without reading it."""

    resolved: str
    device: int
    inode: int
    size: int
    mtime_ns: int


def stamp(path: str) -> Stamp | None:
    """The stamp of the file ``path`` resolves to now; None when there is none."""
    try:
        st = os.stat(path)  # follows symlinks: the kubelet's ..data swap included
    except OSError:
        return None
    return Stamp(os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SecretFileError(BackendRejected):
    """A secret file is missing, unreadable or empty: a person (or the kubelet) must act."""


class SecretFile:
    """A secret read from ``path`` at each use, re-read only when the file changed.

    ``variable`` names the setting in messages. The content is stripped of
    surrounding whitespace (a trailing newline is how most tools write a file);
    a missing or empty file raises :class:`SecretFileError`.
    """

    def __init__(self, path: str, variable: str) -> None:
        self.path = path
        self.variable = variable
        self._stamp: Stamp | None = None
        self._value = ""

    def read(self) -> str:
        current = stamp(self.path)
        if current is None:
            raise SecretFileError(f"{self.variable}={self.path}: no such file (is the Secret mounted?)")
        if current != self._stamp:
            try:
                with open(self.path, encoding="utf-8") as handle:
                    value = handle.read().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise SecretFileError(f"{self.variable}={self.path}: cannot read it: {exc}") from None
            if not value:
                raise SecretFileError(f"{self.variable}={self.path}: the file is empty")
            if self._stamp is not None:
                log.info("%s changed on disk; using its new content from now on", self.variable)
            self._stamp, self._value = current, value
        return self._value


class WatchedFiles:
    """The TLS files of one client, and whether they changed since they were loaded.

    :meth:`load` records the files' stamps *before* calling the builder, so a
    file that changes while it is read is seen as changed at the next check,
    and loaded again then.
    """

    def __init__(
        self,
        paths: Sequence[str | None],
        *,
        what: str,
        interval: float = CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = tuple(p for p in paths if p)
        self.what = what
        self.interval = interval
        self._clock = clock
        self._loaded: tuple[Stamp | None, ...] | None = None
        self._checked = clock()

    def stamps(self) -> tuple[Stamp | None, ...]:
        return tuple(stamp(p) for p in self.paths)

    def due(self) -> bool:
        """Whether a check is due and found a change (at most one check per ``interval``)."""
        if not self.paths:
            return False
        now = self._clock()
        if now - self._checked < self.interval:
            return False
        self._checked = now
        return self.stamps() != self._loaded

    def load(self, build: Callable[[], T]) -> T:
        """``build()`` from the files as they are now; its errors propagate, nothing recorded."""
        before = self.stamps()
        value = build()
        self._loaded = before
        return value

    def reload(self, build: Callable[[], T]) -> T | None:
        """Like :meth:`load`, but a failure is logged and gives None: keep what is in use."""
        try:
            value = self.load(build)
        except (OSError, ssl.SSLError, ValueError, BackendRejected) as exc:
            log.warning(
                "%s: the TLS files changed but do not load (%s); keeping the previous ones "
                "and trying again in %.0fs", self.what, exc, self.interval,
            )
            return None
        return value


def read_bytes(path: str | None, variable: str) -> bytes | None:
    """The content of ``path`` (None for no path); a failure is :class:`SecretFileError`."""
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise SecretFileError(f"{variable}={path}: cannot read it: {exc.strerror}") from None


def check_pair(cert: str | None, key: str | None, ca: str | None = None) -> None:
    """Raise ``ssl.SSLError`` / ``OSError`` unless the certificate, its key and the CA load.

    gRPC would accept a certificate next to the wrong key and fail only at the
    handshake, so the pair is loaded here first, as the ``ssl`` module does it.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert and key:
        context.load_cert_chain(cert, key)
    if ca:
        context.load_verify_locations(cafile=ca)


def fingerprint(pem: bytes | None) -> str:
    """SHA-256 of the first certificate in ``pem``, as hex: names the certificate in logs."""
    match = _PEM_CERT.search(pem or b"")
    if match is None:
        return "none"
    der = ssl.PEM_cert_to_DER_cert(match.group(0).decode("ascii"))
    return hashlib.sha256(der).hexdigest()
