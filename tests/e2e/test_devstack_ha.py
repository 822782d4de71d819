"""`tether dev up --ha`: a 3-member etcd and a 3-server Consul datacenter with a client agent.

The HA stack runs in a state directory of its own (never the shared
``.tether/dev`` other tests use), with real processes: it comes up with one
leader per cluster, every member on its own 127.0.0.x, heals a killed member
(the etcd leader, the Consul server leader, the client agent) on the next
``up``, keeps etcd's data across that, and goes away on ``down``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether_dev import envfiles, processes, stack
from tether_dev.harness.devstack import tether

ETCD_MEMBERS = ["etcd-0", "etcd-1", "etcd-2"]
CONSUL_SERVERS = ["consul-server-0", "consul-server-1", "consul-server-2"]
EVERY = {"kube-etcd", "kube-apiserver", *ETCD_MEMBERS, *CONSUL_SERVERS, "consul-agent"}
#: Bound on waits for an election or a rejoin.
SETTLE = 60.0


@pytest.fixture(scope="module")
def ha_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("ha") / "dev"
    try:
        tether("dev", "--dir", str(directory), "up", "--ha")
        yield directory
    finally:
        # Whatever a test did, nothing of this stack outlives the module.
        tether("dev", "--dir", str(directory), "down")


def status(directory: Path) -> dict[str, Any]:
    report = json.loads(tether("dev", "--dir", str(directory), "status", "--json").stdout)
    components: dict[str, Any] = report["components"]
    return components


def post(url: str, body: Any) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read() or b"null")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def roles(components: dict[str, Any], names: list[str]) -> dict[str, str | None]:
    return {name: components[name]["role"] for name in names}


def wait_roles(directory: Path, *, timeout: float = SETTLE) -> dict[str, Any]:
    """Status once both clusters have exactly one leader and every member runs."""
    deadline = time.monotonic() + timeout
    components: dict[str, Any] = {}
    while time.monotonic() < deadline:
        components = status(directory)
        etcd = sorted(str(r) for r in roles(components, ETCD_MEMBERS).values())
        consul = sorted(str(r) for r in roles(components, CONSUL_SERVERS).values())
        if (
            all(c["running"] and c["ready"] for c in components.values())
            and etcd == ["follower", "follower", "leader"]
            and consul == ["follower", "follower", "leader"]
        ):
            return components
        time.sleep(0.5)
    raise AssertionError(f"no settled HA stack within {timeout:.0f} s: {json.dumps(components, indent=1)}")


def leader(components: dict[str, Any], names: list[str]) -> str:
    (name,) = [n for n in names if components[n]["role"] == "leader"]
    return name


def kill(component: dict[str, Any]) -> None:
    os.killpg(component["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while processes.read_cmdline(component["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_ha_up_lists_every_member_with_its_role(ha_dir: Path) -> None:
    components = wait_roles(ha_dir)
    assert set(components) == EVERY
    addresses = set()
    for name, component in components.items():
        assert isinstance(component["pid"], int), f"{name}: {component}"
        assert component["url"].split("://")[1].split(":")[0] == component["address"], name
        if name.startswith("kube-"):
            assert component["address"] == "127.0.0.1", name
        else:
            # Its own address, x >= 10: never the default stack's 127.0.0.1.
            assert int(component["address"].rsplit(".", 1)[1]) >= 10, name
            addresses.add(component["address"])
            if os.geteuid() == 0:
                assert isinstance(component["group"], int), f"{name}: {component}"
    assert len(addresses) == 7, "every member has an address of its own"
    assert components["consul-agent"]["role"] == "client"
    assert components["kube-etcd"]["role"] == "leader"

    # The env file: every etcd member, and the client agent for Consul.
    env = envfiles.parse((ha_dir / "env").read_text(), os.environ)
    assert env["ETCD_ENDPOINTS"].split(",") == [components[n]["url"] for n in ETCD_MEMBERS]
    assert env["CONSUL_HTTP_ADDR"] == components["consul-agent"]["url"]

    # One etcd cluster of three, one Consul datacenter of three servers and a client.
    members = post(f"{components['etcd-0']['url']}/v3/cluster/member/list", {})["members"]
    assert sorted(m["name"] for m in members) == ETCD_MEMBERS
    peers = get(f"{env['CONSUL_HTTP_ADDR']}/v1/status/peers")
    assert len(peers) == 3
    nodes = {m["Name"]: m for m in get(f"{env['CONSUL_HTTP_ADDR']}/v1/agent/members")}
    assert set(nodes) == {*CONSUL_SERVERS, "consul-agent"}
    assert all(node["Status"] == 1 for node in nodes.values()), nodes  # 1 = alive

    # A write through one member is read through another (replication).
    post(f"{components['etcd-1']['url']}/v3/kv/put", {"key": b64("/ha/k"), "value": b64("v1")})
    kvs = post(f"{components['etcd-2']['url']}/v3/kv/range", {"key": b64("/ha/k")})["kvs"]
    assert base64.b64decode(kvs[0]["value"]) == b"v1"


def test_ha_up_restarts_killed_leaders_and_the_agent(ha_dir: Path) -> None:
    components = wait_roles(ha_dir)
    url = components["etcd-0"]["url"]
    post(f"{url}/v3/kv/put", {"key": b64("/ha/kept"), "value": b64("before")})
    etcd_leader = leader(components, ETCD_MEMBERS)
    consul_leader = leader(components, CONSUL_SERVERS)
    untouched = {
        name: components[name]["pid"]
        for name in EVERY - {etcd_leader, consul_leader, "consul-agent"}
    }

    for name in (etcd_leader, consul_leader, "consul-agent"):
        kill(components[name])
    after_kill = status(ha_dir)
    for name in (etcd_leader, consul_leader, "consul-agent"):
        assert not after_kill[name]["running"], name
        assert after_kill[name]["pid"] is None, name

    # Idempotent up: restarts exactly the dead ones, on the same addresses.
    tether("dev", "--dir", str(ha_dir), "up", "--ha")
    healed = wait_roles(ha_dir)
    for name, pid in untouched.items():
        assert healed[name]["pid"] == pid, f"{name} was restarted but was not down"
    for name in (etcd_leader, consul_leader, "consul-agent"):
        assert healed[name]["pid"] != components[name]["pid"], name
        assert healed[name]["url"] == components[name]["url"], name
    # The restarted etcd member rejoined with its data (read through it).
    kvs = post(f"{healed[etcd_leader]['url']}/v3/kv/range", {"key": b64("/ha/kept")})["kvs"]
    assert base64.b64decode(kvs[0]["value"]) == b"before"
    nodes = {m["Name"]: m["Status"] for m in get(f"{healed['consul-agent']['url']}/v1/agent/members")}
    assert nodes == {name: 1 for name in (*CONSUL_SERVERS, "consul-agent")}


def test_ha_dir_refuses_the_single_mode(ha_dir: Path) -> None:
    with pytest.raises(AssertionError, match="holds a ha stack"):
        tether("dev", "--dir", str(ha_dir), "up")


def test_down_stops_every_member(ha_dir: Path) -> None:
    components = status(ha_dir)
    recorded = stack.DevStack(ha_dir).components()
    tether("dev", "--dir", str(ha_dir), "down")
    assert not ha_dir.exists()
    for name, component in recorded.items():
        assert not component.running, f"{name} (pid {components[name]['pid']}) still runs"
