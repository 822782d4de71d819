"""Command lines and configuration files of the dev stack's programs (pure).

Everything here is a function of paths and ports, so the exact flags can be read
and unit-tested without starting anything. The command line is also the identity
of a running component: :mod:`tether_dev.processes` compares it with
``/proc/<pid>/cmdline``, so a recycled pid is never mistaken for ours. Every
command line therefore names a path inside the state directory.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

HOST = "127.0.0.1"
#: Service ClusterIPs; nothing routes them here, but the API server needs a range
#: to allocate from (the ``kubernetes`` Service takes its first address).
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"


def http_url(port: int, host: str = HOST) -> str:
    return f"http://{host}:{port}"


def https_url(port: int, host: str = HOST) -> str:
    return f"https://{host}:{port}"


# ---------------------------------------------------------------------- etcd


def etcd(binary: Path, *, name: str, data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    """A single-member etcd serving plain HTTP on loopback.

    ``--unsafe-no-fsync`` (as envtest does) trades durability against a machine
    crash for speed; a killed *process* loses nothing, since its writes are already
    in the page cache, so the "configuration etcd keeps its data" promise holds.
    The gRPC gateway (``/v3/kv/...`` over HTTP/JSON) and ``/health`` are on by
    default on the client URL.
    """
    client, peer = http_url(client_port), http_url(peer_port)
    return [
        str(binary),
        f"--name={name}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster={name}={peer}",
        "--initial-cluster-state=new",
        "--unsafe-no-fsync",
        "--log-outputs=stderr",
    ]


def etcd_tls(binary: Path, *, name: str, data_dir: Path, client_port: int, peer_port: int,
             tls_dir: Path) -> list[str]:
    """A single-member etcd whose clients must use TLS with a certificate of ``tls_dir``'s CA.

    ``tls_dir`` holds ``ca.crt`` and the serving pair ``server.crt``/``server.key``
    (see :func:`tether_dev.certificates.issue`); peers stay on plain HTTP (one member).
    """
    argv = etcd(binary, name=name, data_dir=data_dir, client_port=client_port, peer_port=peer_port)
    client = f"https://{HOST}:{client_port}"
    argv = [a for a in argv if not a.startswith(("--listen-client-urls=", "--advertise-client-urls="))]
    return [
        *argv,
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--trusted-ca-file={tls_dir / 'ca.crt'}",
        f"--cert-file={tls_dir / 'server.crt'}",
        f"--key-file={tls_dir / 'server.key'}",
        "--client-cert-auth",
    ]


def etcd_member(
    binary: Path,
    *,
    name: str,
    host: str,
    data_dir: Path,
    client_port: int,
    peer_port: int,
    peers: Mapping[str, str],
    cluster_token: str,
) -> list[str]:
    """One member of the HA stack's 3-member etcd, on its own loopback address.

    ``peers`` maps every member's name (this one's included) to its peer URL.
    ``--initial-cluster*`` only matter for the first start: a restarted member
    finds its membership in its data directory. The token keeps two stacks on
    one machine from ever joining each other. Raft timing is etcd's default
    (100 ms heartbeats, 1 s election timeout) so measured elections are the
    ones users get; ``--unsafe-no-fsync`` as for the single member.
    """
    client, peer = http_url(client_port, host), http_url(peer_port, host)
    initial = ",".join(f"{member}={url}" for member, url in sorted(peers.items()))
    return [
        str(binary),
        f"--name={name}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster={initial}",
        f"--initial-cluster-token={cluster_token}",
        "--initial-cluster-state=new",
        "--heartbeat-interval=100",
        "--election-timeout=1000",
        "--unsafe-no-fsync",
        "--log-outputs=stderr",
    ]


# ------------------------------------------------------------ kube-apiserver


@dataclasses.dataclass(frozen=True)
class Pki:
    """Where the certificates and keys of the dev cluster live."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.directory / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.directory / "apiserver.key"

    @property
    def admin_cert(self) -> Path:
        return self.directory / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.directory / "admin.key"

    @property
    def service_account_key(self) -> Path:
        return self.directory / "sa.key"

    @property
    def service_account_pub(self) -> Path:
        return self.directory / "sa.pub"


def kube_apiserver(binary: Path, *, port: int, etcd_url: str, pki: Pki) -> list[str]:
    """A bare API server, flags after controller-runtime's envtest, plus RBAC.

    No controller-manager runs next to it, which shapes two choices:
    - the ``ServiceAccount`` admission plugin is off, as in envtest: it rejects any
      Pod in a namespace whose ``default`` ServiceAccount the (absent) controller
      has not created;
    - service-account *tokens* still work: the TokenRequest API (``kubectl create
      token``) is served by the API server itself, signed with ``sa.key``.
    The issuer is the server's own URL, where it also serves the OIDC discovery
    documents. The endpoint reconciler is off: it would publish 127.0.0.1 as the
    ``kubernetes`` Service's endpoint, which validation rejects (loopback), and
    retry every 10 s; nothing here routes Service IPs anyway.
    """
    url = https_url(port)
    return [
        str(binary),
        f"--etcd-servers={etcd_url}",
        f"--bind-address={HOST}",
        f"--advertise-address={HOST}",
        f"--secure-port={port}",
        f"--cert-dir={pki.directory}",
        f"--tls-cert-file={pki.serving_cert}",
        f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        "--authorization-mode=RBAC",
        f"--service-account-issuer={url}",
        f"--service-account-key-file={pki.service_account_pub}",
        f"--service-account-signing-key-file={pki.service_account_key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--disable-admission-plugins=ServiceAccount",
        "--endpoint-reconciler-type=none",
        "--allow-privileged=true",
    ]


def kubeconfig(*, server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> str:
    """An admin kubeconfig with the credentials inlined.

    Inlined rather than pointing at ``pki/`` so the file stands alone: it can be
    copied, mounted or used from another working directory.
    """

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    config: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "tether-dev",
                "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)},
            }
        ],
        "users": [
            {
                "name": "tether-dev-admin",
                "user": {
                    "client-certificate-data": b64(cert_pem),
                    "client-key-data": b64(key_pem),
                },
            }
        ],
        "contexts": [
            {
                "name": "tether-dev",
                "context": {"cluster": "tether-dev", "user": "tether-dev-admin"},
            }
        ],
        "current-context": "tether-dev",
        "preferences": {},
    }
    return yaml.safe_dump(config, sort_keys=False)


# -------------------------------------------------------------------- consul


@dataclasses.dataclass(frozen=True)
class ConsulPorts:
    http: int
    serf_lan: int
    serf_wan: int
    server: int


def consul_tls(config: dict[str, Any], *, https: int, tls_dir: Path) -> dict[str, Any]:
    """``config`` with an HTTPS API on port ``https`` that verifies client certificates.

    ``tls_dir`` holds ``ca.crt`` and ``server.crt``/``server.key``; the plain
    HTTP port stays open (the dev probes use it).
    """
    config = {**config, "ports": {**config["ports"], "https": https}}
    config["tls"] = {
        "defaults": {
            "ca_file": str(tls_dir / "ca.crt"),
            "cert_file": str(tls_dir / "server.crt"),
            "key_file": str(tls_dir / "server.key"),
            "verify_incoming": True,
        }
    }
    return config


def consul(binary: Path, *, config_file: Path) -> list[str]:
    """``consul agent -dev`` with everything else in the config file."""
    return [str(binary), "agent", "-dev", f"-config-file={config_file}"]


def consul_config(
    ports: ConsulPorts, *, node_name: str, acl_initial_token: str | None = None
) -> dict[str, Any]:
    """The agent's JSON configuration.

    Dev mode would open fixed ports (8500, 8502, 8503, 8600, 8300-8302) on every
    run; each is either moved to a chosen free port or switched off (-1), so several
    stacks can share a machine. The update check is off: it phones home at start.

    With ``acl_initial_token``, ACLs are on and deny by default, and that token is
    the initial management token; the agent uses it too, so its own node and
    service sync is not denied.
    """
    config: dict[str, Any] = {
        "node_name": node_name,
        "bind_addr": HOST,
        "client_addr": HOST,
        "advertise_addr": HOST,
        "ports": {
            "http": ports.http,
            "https": -1,
            "grpc": -1,
            "grpc_tls": -1,
            "dns": -1,
            "serf_lan": ports.serf_lan,
            "serf_wan": ports.serf_wan,
            "server": ports.server,
        },
        "disable_update_check": True,
        "log_level": "INFO",
    }
    if acl_initial_token is not None:
        config["acl"] = {
            "enabled": True,
            "default_policy": "deny",
            "enable_token_persistence": False,
            "tokens": {"initial_management": acl_initial_token, "agent": acl_initial_token},
        }
    return config


def consul_agent(binary: Path, *, config_file: Path) -> list[str]:
    """``consul agent`` (not dev mode: a datacenter member) with its config file."""
    return [str(binary), "agent", f"-config-file={config_file}"]


def consul_member_config(
    ports: ConsulPorts,
    *,
    node_name: str,
    host: str,
    data_dir: Path,
    join: list[str],
    server: bool,
    bootstrap_expect: int = 3,
) -> dict[str, Any]:
    """Configuration of one agent of the HA stack's Consul datacenter.

    Every agent binds (Serf, RPC, HTTP) to its own loopback address, so a fault
    can cut one off. ``join`` lists the servers' Serf LAN addresses
    (``host:port``); ``retry_join`` keeps trying them, which is what brings a
    restarted agent back. Servers bootstrap once ``bootstrap_expect`` of them
    have met. ``raft_multiplier: 1`` is Consul's production recommendation
    (the default 5 is tuned for tiny cloud instances) and keeps elections to
    about a second. ``leave_on_terminate`` is off for servers (a SIGTERM is a
    restart, not a decommissioning) and on for the client agent, as Consul's
    defaults have it.
    """
    config: dict[str, Any] = {
        "node_name": node_name,
        "datacenter": "dc1",
        "data_dir": str(data_dir),
        "server": server,
        "bind_addr": host,
        "client_addr": host,
        "advertise_addr": host,
        "retry_join": join,
        "retry_interval": "1s",
        "ports": {
            "http": ports.http,
            "https": -1,
            "grpc": -1,
            "grpc_tls": -1,
            "dns": -1,
            "serf_lan": ports.serf_lan,
            "serf_wan": ports.serf_wan,
            "server": ports.server,
        },
        "performance": {"raft_multiplier": 1},
        "disable_update_check": True,
        "log_level": "INFO",
    }
    if server:
        config["bootstrap_expect"] = bootstrap_expect
        config["leave_on_terminate"] = False
    return config


def consul_config_text(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2) + "\n"
