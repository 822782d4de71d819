"""Where and how to reach Consul, read from Consul's own variables (``CONSUL_*``).

Pure: parsing and validation only, so that settings are checked before any
client exists.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tether.clients import cleartext


@dataclass(frozen=True)
class ConsulConnection:
    """Where and how to reach the Consul agent (``CONSUL_*`` variables)."""

    scheme: str = "http"
    host: str = "127.0.0.1"
    port: int = 8500
    token: str | None = field(default=None, repr=False)
    #: ``CONSUL_HTTP_TOKEN_FILE``: the token is read from this file at each use.
    token_file: str | None = None
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    timeout: float = 5.0

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def warnings(self) -> list[str]:
        """What is allowed but unsafe, to be logged loudly at start-up."""
        if self.scheme == "http" and (self.token or self.token_file) and not cleartext.loopback(self.host):
            return [
                f"the ACL token (CONSUL_HTTP_TOKEN or its file) is sent in cleartext to {self.url}: "
                "anyone on the network path can read it; use an https:// CONSUL_HTTP_ADDR"
            ]
        return []

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ConsulConnection:
        env = os.environ if env is None else env
        addr = env.get("CONSUL_HTTP_ADDR") or "http://127.0.0.1:8500"
        if "://" not in addr:
            # Consul's own CLI accepts host:port and picks https via CONSUL_HTTP_SSL.
            ssl = env.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true")
            addr = ("https://" if ssl else "http://") + addr
        parts = urlsplit(addr)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"CONSUL_HTTP_ADDR={addr!r}: expected http://host:port or https://host:port"
            )
        try:
            port = parts.port or (443 if parts.scheme == "https" else 8500)
        except ValueError:
            raise ValueError(f"CONSUL_HTTP_ADDR={addr!r}: invalid port") from None
        cert, key = env.get("CONSUL_CLIENT_CERT") or None, env.get("CONSUL_CLIENT_KEY") or None
        if bool(cert) != bool(key):
            raise ValueError("CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY must be set together")
        ca = env.get("CONSUL_CACERT") or None
        if parts.scheme == "http" and (ca or cert):
            # These used to be ignored in silence, and the ACL token went out in
            # cleartext; etcd's settings refuse the same mix.
            given = ", ".join(n for n, v in (("CONSUL_CACERT", ca), ("CONSUL_CLIENT_CERT", cert)) if v)
            raise ValueError(
                f"{given} set but CONSUL_HTTP_ADDR={addr!r} is plain HTTP: use an https:// address "
                "(or CONSUL_HTTP_SSL=true with host:port), or unset the TLS variables"
            )
        token, token_file = env.get("CONSUL_HTTP_TOKEN") or None, env.get("CONSUL_HTTP_TOKEN_FILE") or None
        if token and token_file:
            raise ValueError("CONSUL_HTTP_TOKEN and CONSUL_HTTP_TOKEN_FILE are both set: use one of them")
        return cls(
            scheme=parts.scheme,
            host=parts.hostname,
            port=port,
            token=token,
            token_file=token_file,
            ca_cert=ca,
            client_cert=cert,
            client_key=key,
            timeout=_seconds(env, "TETHER_CONSUL_TIMEOUT", 5.0),
        )


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds") from None
    if not 0 < value <= 300:
        raise ValueError(f"{name}={value}: must be more than 0 and at most 300 seconds")
    return value
