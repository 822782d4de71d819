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
from typing import Literal

from tether.clients.consul.connection import ConsulConnection
from tether.clients.etcd.connection import EtcdConnection


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


def consul_node(cluster: str, env: Mapping[str, str] | None = None) -> str:
    """The synthetic Consul node that holds endpoints-mode instances (``TETHER_CONSUL_NODE``).

    One per cluster by default, so that two clusters sharing a Consul never
    share a node; Consul wants node names usable in DNS.
    """
    env = os.environ if env is None else env
    node = env.get("TETHER_CONSUL_NODE") or f"tether-{cluster}"
    # The default is "tether-" + a cluster name of up to 63 characters.
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?", node):
        raise ValueError(
            f"TETHER_CONSUL_NODE={node!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return node


def etcd_ownership_prefix(env: Mapping[str, str] | None = None) -> str:
    """Where Tether records in etcd which resource owns which key."""
    env = os.environ if env is None else env
    prefix = env.get("TETHER_ETCD_OWNERSHIP_PREFIX") or "/tether/"
    if not prefix.startswith("/") or not prefix.strip("/"):
        raise ValueError(
            f"TETHER_ETCD_OWNERSHIP_PREFIX={prefix!r} must start with '/' and name a path below "
            "the root (e.g. /tether/)"
        )
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


def policy_default(env: Mapping[str, str] | None = None) -> Literal["allow", "deny"]:
    """What a namespace no TetherPolicy selects may use, when nobody reserved it."""
    env = os.environ if env is None else env
    raw = (env.get("TETHER_POLICY_DEFAULT") or "allow").strip().lower()
    if raw == "allow":
        return "allow"
    if raw == "deny":
        return "deny"
    raise ValueError(f"TETHER_POLICY_DEFAULT={raw!r}: use allow or deny")


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
    consul_node: str
    etcd_ownership_prefix: str
    consul_ownership_prefix: str
    workers: int
    etcd_max_txn_ops: int
    consul_max_txn_ops: int
    consul_tombstone_seconds: int
    lease_namespace: str
    lease_name: str
    identity: str
    # TetherPolicy rule 3: what an unselected namespace may use that nobody reserved.
    policy_default: Literal["allow", "deny"] = "allow"

    def warnings(self) -> list[str]:
        """Settings that work but are unsafe (credentials in cleartext), for a loud log line."""
        return [*self.consul.warnings(), *self.etcd.warnings()]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        cluster = cluster_name(env)
        return cls(
            consul=ConsulConnection.from_env(env),
            etcd=EtcdConnection.from_env(env),
            cluster=cluster,
            consul_node=consul_node(cluster, env),
            etcd_ownership_prefix=etcd_ownership_prefix(env),
            consul_ownership_prefix=consul_ownership_prefix(env),
            # Workers per kind: reconciles are I/O-bound, so more than cores.
            workers=_int(env, "TETHER_WORKERS", 16, minimum=1, maximum=256),
            etcd_max_txn_ops=_int(env, "TETHER_ETCD_MAX_TXN_OPS", 128, minimum=2, maximum=1_000_000),
            # Catalog transactions of endpoints mode: Consul 1.16's maxTxnOps is 128
            # (a Consul older than 1.7 allows 64: set it there).
            consul_max_txn_ops=_int(env, "TETHER_CONSUL_MAX_TXN_OPS", 128, minimum=4, maximum=128),
            # How long a deleted ConsulConfig's index record stays a tombstone
            # (tether.config.stores.consulkv): far longer than a transaction in flight.
            consul_tombstone_seconds=_int(
                env, "TETHER_CONSUL_TOMBSTONE_SECONDS", 600, minimum=1, maximum=7 * 86400
            ),
            lease_namespace=env.get("POD_NAMESPACE") or "tether-system",
            lease_name=env.get("TETHER_LEASE_NAME") or "tether-leader",
            identity=env.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
            policy_default=policy_default(env),
        )
