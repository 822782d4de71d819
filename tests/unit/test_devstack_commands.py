"""The dev stack's command lines and config files, checked without starting anything."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import yaml

from tether_dev import commands

STATE = Path("/state")


def flags(argv: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in argv[1:] if "=" in arg)


def test_kube_apiserver_has_rbac_tls_and_service_account_tokens() -> None:
    pki = commands.Pki(STATE / "pki")
    argv = commands.kube_apiserver(
        Path("/bin/kube-apiserver"), port=21443, etcd_url="http://127.0.0.1:21379", pki=pki
    )
    got = flags(argv)
    assert got["--authorization-mode"] == "RBAC"
    assert got["--secure-port"] == "21443"
    assert got["--bind-address"] == "127.0.0.1"
    assert got["--etcd-servers"] == "http://127.0.0.1:21379"
    assert got["--client-ca-file"] == str(pki.ca_cert)
    assert got["--tls-cert-file"] == str(pki.serving_cert)
    assert got["--service-account-issuer"] == "https://127.0.0.1:21443"
    assert got["--service-account-key-file"] == str(pki.service_account_pub)
    assert got["--service-account-signing-key-file"] == str(pki.service_account_key)
    assert got["--service-cluster-ip-range"] == commands.SERVICE_CLUSTER_IP_RANGE
    # Without a controller-manager, nothing creates `default` service accounts.
    assert got["--disable-admission-plugins"] == "ServiceAccount"


def test_etcd_listens_only_on_loopback_in_its_data_dir() -> None:
    argv = commands.etcd(
        Path("/bin/etcd"), name="etcd", data_dir=STATE / "etcd", client_port=21001, peer_port=21002
    )
    got = flags(argv)
    assert got["--data-dir"] == "/state/etcd"
    assert got["--listen-client-urls"] == "http://127.0.0.1:21001"
    assert got["--listen-peer-urls"] == "http://127.0.0.1:21002"
    assert got["--initial-cluster"] == "etcd=http://127.0.0.1:21002"


def test_every_command_line_names_the_state_directory() -> None:
    # The command line identifies a process as ours; it must be unique per stack.
    argvs = [
        commands.etcd(Path("/b/etcd"), name="x", data_dir=STATE / "x", client_port=1, peer_port=2),
        commands.kube_apiserver(
            Path("/b/kube-apiserver"), port=3, etcd_url="http://127.0.0.1:1",
            pki=commands.Pki(STATE / "pki"),
        ),
        commands.consul(Path("/b/consul"), config_file=STATE / "consul.json"),
    ]
    for argv in argvs:
        assert any(f"{STATE}/" in arg for arg in argv[1:]), argv


PORTS = commands.ConsulPorts(http=21500, serf_lan=21301, serf_wan=21302, server=21300)


def test_consul_opens_only_chosen_ports() -> None:
    config = commands.consul_config(PORTS, node_name="n")
    assert config["ports"] == {
        "http": 21500,
        "https": -1,
        "grpc": -1,
        "grpc_tls": -1,
        "dns": -1,
        "serf_lan": 21301,
        "serf_wan": 21302,
        "server": 21300,
    }
    assert config["bind_addr"] == config["client_addr"] == "127.0.0.1"
    assert config["disable_update_check"] is True
    assert "acl" not in config
    json.loads(commands.consul_config_text(config))


def test_consul_with_a_token_denies_by_default() -> None:
    config = commands.consul_config(PORTS, node_name="n", acl_initial_token="secret")
    assert config["acl"]["enabled"] is True
    assert config["acl"]["default_policy"] == "deny"
    assert config["acl"]["tokens"]["initial_management"] == "secret"


def test_kubeconfig_inlines_the_credentials() -> None:
    text = commands.kubeconfig(
        server="https://127.0.0.1:21443", ca_pem=b"CA", cert_pem=b"CERT", key_pem=b"KEY"
    )
    config = yaml.safe_load(text)
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    assert cluster["server"] == "https://127.0.0.1:21443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"CA"
    assert base64.b64decode(user["client-certificate-data"]) == b"CERT"
    assert base64.b64decode(user["client-key-data"]) == b"KEY"
    assert config["current-context"] == config["contexts"][0]["name"]
