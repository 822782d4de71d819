"""Where and how to reach etcd, read from etcd's own variables (``ETCD_*``).

Pure: parsing and validation only, so that settings are checked before any
client or gRPC channel exists.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from tether.clients import cleartext

DEFAULT_ENDPOINT: Final = "http://127.0.0.1:2379"


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
    #: ``ETCD_PASSWORD_FILE``: the password is read from this file when authenticating.
    password_file: str | None = None
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("etcd: at least one endpoint is required")
        for endpoint in self.endpoints:
            split_endpoint(endpoint)
        if (self.cert is None) != (self.key is None):
            raise ValueError(
                "etcd: a client certificate needs its key and a key needs its certificate "
                "(set both ETCD_CERT and ETCD_KEY, or neither)"
            )
        if self.password is not None and self.password_file is not None:
            raise ValueError("etcd: ETCD_PASSWORD and ETCD_PASSWORD_FILE are both set: use one of them")
        if (self.username is None) != (self.password is None and self.password_file is None):
            raise ValueError(
                "etcd: username and password go together "
                "(set both ETCD_USERNAME and ETCD_PASSWORD or ETCD_PASSWORD_FILE, or neither)"
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

    def warnings(self) -> list[str]:
        """What is allowed but unsafe, to be logged loudly at start-up."""
        if self.username is None:
            return []
        plain = [
            e for e in self.endpoints
            if e.startswith("http://") and not cleartext.loopback(urlsplit(e).hostname or "")
        ]
        if not plain:
            return []
        return [
            f"ETCD_USERNAME/ETCD_PASSWORD are sent in cleartext to {plain[0]}: anyone on the "
            "network path can read them; use https:// endpoints"
        ]

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
                password_file=text("ETCD_PASSWORD_FILE"),
            )
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("etcd: ")) from None


def normalize_endpoint(endpoint: str, default_scheme: str = "http") -> str:
    """Return ``scheme://host:port`` for ``endpoint``; ``host:port`` gets ``default_scheme``."""
    candidate = endpoint if "://" in endpoint else f"{default_scheme}://{endpoint}"
    scheme, host, port = split_endpoint(candidate)
    return f"{scheme}://{host}:{port}"


def split_endpoint(endpoint: str) -> tuple[str, str, int]:
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
