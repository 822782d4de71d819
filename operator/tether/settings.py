"""Settings, read once from the environment and validated before anything starts.

Connection settings use each ecosystem's own variable names (``CONSUL_*``,
``ETCD_*``); Tether's own are ``TETHER_*``. :meth:`Settings.from_env` raises
``ValueError`` naming the variable that is wrong, so a bad value is a clear
error at start, never a crash after the leader Lease is won.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from tether.etcd.connection import EtcdConnection


@dataclass(frozen=True)
class ConsulConnection:
    """Where and how to reach the Consul agent (``CONSUL_*`` variables)."""

    scheme: str = "http"
    host: str = "127.0.0.1"
    port: int = 8500
    token: str | None = None
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    timeout: float = 5.0

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

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
        return cls(
            scheme=parts.scheme,
            host=parts.hostname,
            port=port,
            token=env.get("CONSUL_HTTP_TOKEN") or None,
            ca_cert=env.get("CONSUL_CACERT") or None,
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


def cluster_name(env: Mapping[str, str] | None = None) -> str:
    """The ownership marker that tells this cluster's objects from another's."""
    env = os.environ if env is None else env
    name = env.get("TETHER_CLUSTER_NAME") or "kubernetes"
    # It is written into Consul meta, etcd and Consul KV ownership records and
    # the synthetic node's name: keep it to a DNS-label-like shape.
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?", name):
        raise ValueError(
            f"TETHER_CLUSTER_NAME={name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return name


def etcd_ownership_prefix(env: Mapping[str, str] | None = None) -> str:
    """Where Tether records in etcd which resource owns which key."""
    env = os.environ if env is None else env
    prefix = env.get("TETHER_ETCD_OWNERSHIP_PREFIX") or "/tether/"
    if not prefix.startswith("/"):
        raise ValueError(f"TETHER_ETCD_OWNERSHIP_PREFIX={prefix!r} must start with '/'")
    return prefix if prefix.endswith("/") else prefix + "/"


def consul_ownership_prefix(env: Mapping[str, str] | None = None) -> str:
    """Where Tether records in Consul KV which resource owns which key."""
    env = os.environ if env is None else env
    prefix = env.get("TETHER_CONSUL_OWNERSHIP_PREFIX") or "tether/"
    if prefix.startswith("/") or not prefix.strip("/"):
        raise ValueError(
            f"TETHER_CONSUL_OWNERSHIP_PREFIX={prefix!r} must be a Consul KV path without a leading '/'"
        )
    return prefix if prefix.endswith("/") else prefix + "/"


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a whole number") from None
    if not minimum <= value <= maximum:
        raise ValueError(f"{name}={value}: must be between {minimum} and {maximum}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything ``tether run`` reads from the environment, validated."""

    consul: ConsulConnection
    etcd: EtcdConnection
    cluster: str
    etcd_ownership_prefix: str
    consul_ownership_prefix: str
    workers: int
    etcd_max_txn_ops: int
    lease_namespace: str
    lease_name: str
    identity: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            consul=ConsulConnection.from_env(env),
            etcd=EtcdConnection.from_env(env),
            cluster=cluster_name(env),
            etcd_ownership_prefix=etcd_ownership_prefix(env),
            consul_ownership_prefix=consul_ownership_prefix(env),
            # Workers per kind: reconciles are I/O-bound, so more than cores.
            workers=_int(env, "TETHER_WORKERS", 16, minimum=1, maximum=256),
            etcd_max_txn_ops=_int(env, "TETHER_ETCD_MAX_TXN_OPS", 128, minimum=2, maximum=1_000_000),
            lease_namespace=env.get("POD_NAMESPACE") or "tether-system",
            lease_name=env.get("TETHER_LEASE_NAME") or "tether-leader",
            identity=env.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        )
