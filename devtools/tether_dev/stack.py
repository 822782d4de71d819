"""The dev stack: kube-etcd, kube-apiserver, a configuration etcd and a Consul agent.

``up(ha=True)`` (``tether dev up --ha``) starts the highly available variant
instead: the configuration etcd is a 3-member cluster (``etcd-0``…``etcd-2``) and
Consul a datacenter of three servers (``consul-server-0``…``2``) plus one client
agent (``consul-agent``), which is what Tether talks to. Each member listens on
a loopback address of its own (see :data:`HA_HOSTS`), so that a fault can cut
one member off without touching the others; Kubernetes stays on 127.0.0.1.
The mode is recorded in the state file; ``status`` and ``down`` follow it.

:class:`DevStack` owns one state directory (``.tether/dev`` by default)::

    state.json        ports (chosen once) and, per component, pid + command line
    lock              serialises concurrent up/down
    bin/              links to the programs in use (the env file puts it on PATH)
    pki/              CA, API server and admin certificates, service-account keys
    kubeconfig        admin credentials, inlined
    env               what `source` needs: KUBECONFIG, CONSUL_HTTP_ADDR, ETCD_ENDPOINTS
    kube-etcd/ etcd/  data directories (kept across restarts)
    consul.json       the agent's configuration
    <component>.log   each component's output

``up`` is idempotent: it starts what is not running (identified by pid *and*
command line, see :mod:`processes`), on the ports recorded the first time, then
waits until every component answers, installs the CRDs and writes ``env``. The
Kubernetes etcd comes before the API server; the rest start in parallel.

:func:`start_consul` / :func:`stop` start and stop one extra, separate Consul
agent (for example an ACL-enabled one for a test), with the same machinery;
with ``tls_dir`` it serves HTTPS and verifies client certificates.
:func:`start_etcd_tls` starts a separate etcd that requires client
certificates (the rotation tests add authentication).

(Over 500 lines on purpose: the single and the HA stack share one state file,
one lock and one start/probe/stop sequence; split, each would repeat them.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tether_dev import (
    binaries,
    certificates,
    commands,
    envfiles,
    locks,
    ports,
    probes,
    processes,
    reporting,
)
from tether_dev.reporting import DevStackError

KUBE_ETCD = "kube-etcd"
KUBE_APISERVER = "kube-apiserver"
ETCD = "etcd"
CONSUL = "consul"
#: Every component, in the order status reports them.
COMPONENTS: tuple[str, ...] = (KUBE_ETCD, KUBE_APISERVER, ETCD, CONSUL)

#: The HA stack's members.
ETCD_MEMBERS: tuple[str, ...] = ("etcd-0", "etcd-1", "etcd-2")
CONSUL_SERVERS: tuple[str, ...] = ("consul-server-0", "consul-server-1", "consul-server-2")
CONSUL_AGENT = "consul-agent"
HA_MEMBERS: tuple[str, ...] = (*ETCD_MEMBERS, *CONSUL_SERVERS, CONSUL_AGENT)
HA_COMPONENTS: tuple[str, ...] = (KUBE_ETCD, KUBE_APISERVER, *HA_MEMBERS)
#: One loopback address per HA member. Every address in 127.0.0.0/8 reaches
#: ``lo`` on Linux with no set-up; the default stack (and most other software)
#: uses 127.0.0.1 only, so these never collide with it, and a member's traffic
#: can be told apart by address. Ports are still chosen free per address, so two
#: HA stacks (say a dev one and the fault suite's) can share the addresses.
HA_HOSTS: Mapping[str, str] = {
    **{name: f"127.0.0.{10 + i}" for i, name in enumerate(ETCD_MEMBERS)},
    **{name: f"127.0.0.{20 + i}" for i, name in enumerate(CONSUL_SERVERS)},
    CONSUL_AGENT: "127.0.0.30",
}
#: First of the groups HA members run under (root only; see processes.spawn);
#: the stack adds an offset derived from its directory so two stacks differ.
HA_GROUP_BASE = 61000
MODE_SINGLE = "single"
MODE_HA = "ha"
#: The named ports each component listens on.
PORT_NAMES: Mapping[str, tuple[str, ...]] = {
    KUBE_ETCD: ("client", "peer"),
    KUBE_APISERVER: ("secure",),
    ETCD: ("client", "peer"),
    CONSUL: ("http", "serf_lan", "serf_wan", "server"),
    **{name: ("client", "peer") for name in ETCD_MEMBERS},
    **{name: ("http", "serf_lan", "serf_wan", "server") for name in (*CONSUL_SERVERS, CONSUL_AGENT)},
}
_PROGRAMS: Mapping[str, str] = {
    KUBE_ETCD: "etcd",
    KUBE_APISERVER: "kube-apiserver",
    ETCD: "etcd",
    CONSUL: "consul",
    **{name: "etcd" for name in ETCD_MEMBERS},
    **{name: "consul" for name in (*CONSUL_SERVERS, CONSUL_AGENT)},
}


def host_of(name: str) -> str:
    """The loopback address ``name`` listens on."""
    return HA_HOSTS.get(name, commands.HOST)


def components_of(mode: str) -> tuple[str, ...]:
    return HA_COMPONENTS if mode == MODE_HA else COMPONENTS

#: How long each component may take to answer after (re)starting.
READY_TIMEOUT = 60.0
#: How long `up` waits for another `up`/`down` on the same directory; an `up`
#: may be building binaries, which is bounded by binaries.BUILD_TIMEOUT.
LOCK_TIMEOUT = binaries.BUILD_TIMEOUT + 600.0
KUBECTL_TIMEOUT = 120.0
STATE_VERSION = 1


def repo_root() -> Path:
    return binaries.REPO_ROOT


def crds_dir() -> Path:
    """``$TETHER_CRDS_DIR``, else ``<repo>/crds``."""
    explicit = os.environ.get("TETHER_CRDS_DIR")
    return Path(explicit).expanduser().resolve() if explicit else repo_root() / "crds"


@dataclasses.dataclass(frozen=True)
class Component:
    """One started program: enough to reach it, recognise it and stop it."""

    name: str
    pid: int | None
    url: str
    argv: tuple[str, ...]
    log: Path
    ports: Mapping[str, int]
    host: str = commands.HOST
    #: The group the process runs under (HA members started as root), else None.
    group: int | None = None

    @property
    def running(self) -> bool:
        return processes.is_running(self.pid, self.argv)


def _child_env() -> dict[str, str]:
    """Our environment minus variables the programs would read as their own config.

    etcd maps every ``ETCD_*`` variable to a flag, so a shell that has sourced the
    env file (``ETCD_ENDPOINTS``) would otherwise reconfigure the server; the same
    care for ``CONSUL_*``.
    """
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ETCD_", "CONSUL_"))
    }


def _write_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _etcd_healthy(status: int, body: str) -> bool:
    return status == 200 and '"health":"true"' in body.replace(" ", "")


def _consul_has_leader(status: int, body: str) -> bool:
    return status == 200 and body.strip() not in ("", '""')


def _post_json(url: str, body: Mapping[str, Any], *, timeout: float = 2.0) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def etcd_role(url: str) -> str | None:
    """``leader`` or ``follower`` as the member at ``url`` sees itself; None if it does not answer."""
    try:
        answer = _post_json(f"{url}/v3/maintenance/status", {})
    except (OSError, ValueError):
        return None
    member, leader = answer.get("header", {}).get("member_id"), answer.get("leader")
    if not member or not leader:
        return "follower"  # no leader known (an isolated member): not the leader
    return "leader" if member == leader else "follower"


def consul_role(url: str) -> str | None:
    """``leader``, ``follower`` (or ``candidate``) for a server, ``client`` for a client agent."""
    try:
        status, body = probes.http_get(f"{url}/v1/agent/self")
        answer = json.loads(body) if status == 200 else None
    except (OSError, ValueError):
        return None
    if not answer:
        return None
    if not answer.get("Config", {}).get("Server"):
        return "client"
    state = str(answer.get("Stats", {}).get("raft", {}).get("state", "")).lower()
    return state or None


# ------------------------------------------------------------ a separate Consul


def start_consul(
    directory: Path,
    *,
    acl_initial_token: str | None = None,
    tls_dir: Path | None = None,
    name: str = CONSUL,
    binary: Path | None = None,
    timeout: float = READY_TIMEOUT,
) -> Component:
    """Start a Consul dev agent of its own in ``directory`` and wait until it leads.

    With ``acl_initial_token`` ACLs are enabled, deny by default, and the token is
    the initial management token; the call returns only once that token works.
    With ``tls_dir`` (``ca.crt``, ``server.crt``, ``server.key``) it also serves
    an HTTPS API that requires a client certificate of that CA: its URL is
    ``https://127.0.0.1:<ports["https"]>``. Stop it with :func:`stop`.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if binary is None:
        binary = binaries.ensure([CONSUL])[CONSUL]
    http, serf_lan, serf_wan, server, https = ports.allocate(5)
    consul_ports = commands.ConsulPorts(http=http, serf_lan=serf_lan, serf_wan=serf_wan, server=server)
    config_file = directory / f"{name}.json"
    config = commands.consul_config(
        consul_ports, node_name=f"tether-{name}", acl_initial_token=acl_initial_token
    )
    if tls_dir is not None:
        config = commands.consul_tls(config, https=https, tls_dir=Path(tls_dir).resolve())
    _write_atomic(config_file, commands.consul_config_text(config), mode=0o600)
    argv = tuple(commands.consul(binary, config_file=config_file))
    log = directory / f"{name}.log"
    pid = processes.spawn(argv, log=log, cwd=directory, env=_child_env())
    component = Component(
        name=name,
        pid=pid,
        url=commands.http_url(http),
        argv=argv,
        log=log,
        ports={**dataclasses.asdict(consul_ports), **({"https": https} if tls_dir is not None else {})},
    )
    try:
        checks = [probes.check_http(f"{component.url}/v1/status/leader", _consul_has_leader)]
        if acl_initial_token is not None:
            # The leader creates the management token just after its election;
            # until then requests with it are refused.
            checks.append(
                probes.check_http(
                    f"{component.url}/v1/acl/token/self",
                    lambda status, _body: status == 200,
                    headers={"X-Consul-Token": acl_initial_token},
                )
            )
        deadline = time.monotonic() + timeout
        for check in checks:
            probes.wait_ready(
                name,
                check,
                alive=lambda: component.running,
                log=log,
                timeout=max(1.0, deadline - time.monotonic()),
            )
    except BaseException:
        stop(component)
        raise
    return component


def start_etcd_tls(
    directory: Path,
    *,
    tls_dir: Path,
    name: str = "etcd-tls",
    binary: Path | None = None,
    timeout: float = READY_TIMEOUT,
) -> Component:
    """Start an etcd of its own whose clients need a certificate of ``tls_dir``'s CA.

    ``tls_dir`` holds ``ca.crt`` and the serving pair ``server.crt``/``server.key``
    (:func:`tether_dev.certificates.make_ca` and ``issue(..., server=True)``);
    ``admin.crt``/``admin.key`` there, a client certificate, is what the
    readiness probe presents. Authentication (users, ``auth enable``) is the
    caller's to set up. Stop it with :func:`stop`.
    """
    directory = Path(directory).resolve()
    tls_dir = Path(tls_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if binary is None:
        binary = binaries.ensure([ETCD])[ETCD]
    client, peer = ports.allocate(2)
    argv = tuple(commands.etcd_tls(
        binary, name=name, data_dir=directory / f"{name}-data", client_port=client, peer_port=peer,
        tls_dir=tls_dir,
    ))
    log = directory / f"{name}.log"
    pid = processes.spawn(argv, log=log, cwd=directory, env=_child_env())
    component = Component(
        name=name, pid=pid, url=f"https://{commands.HOST}:{client}", argv=argv, log=log,
        ports={"client": client, "peer": peer},
    )
    context = probes.client_tls(tls_dir / "ca.crt", tls_dir / "admin.crt", tls_dir / "admin.key")
    try:
        probes.wait_ready(
            name,
            probes.check_http(f"{component.url}/health", _etcd_healthy, context=context),
            alive=lambda: component.running,
            log=log,
            timeout=timeout,
        )
    except BaseException:
        stop(component)
        raise
    return component


def stop(component: Component, *, grace: float = 10.0) -> None:
    """Stop ``component`` if it is still running (SIGTERM, then SIGKILL)."""
    processes.terminate(component.pid, component.argv, grace=grace)


# ------------------------------------------------------------------ the stack


class DevStack:
    """The dev stack rooted at ``state_dir``."""

    def __init__(
        self,
        state_dir: Path,
        *,
        progress: reporting.Progress = reporting.to_stderr,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.progress = progress
        self.ready_timeout = ready_timeout
        self.env_file = self.state_dir / "env"
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.bin_dir = self.state_dir / "bin"
        self.pki = commands.Pki(self.state_dir / "pki")
        self._state_file = self.state_dir / "state.json"
        self._lock_file = self.state_dir / "lock"

    # ---------------------------------------------------------------- state

    def _load(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return {"version": STATE_VERSION, "ports": {}, "processes": {}}
        except ValueError as exc:
            raise DevStackError(
                f"{self._state_file} is unreadable ({exc}); `tether dev down` starts afresh"
            ) from None
        if state.get("version") != STATE_VERSION:
            raise DevStackError(
                f"{self._state_file} is from another Tether version; `tether dev down` first"
            )
        return state

    def _save(self, state: Mapping[str, Any]) -> None:
        _write_atomic(self._state_file, json.dumps(state, indent=2) + "\n")

    def log_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    @staticmethod
    def _url(name: str, component_ports: Mapping[str, int]) -> str:
        if not component_ports:
            return ""
        if name == KUBE_APISERVER:
            return commands.https_url(component_ports["secure"])
        if "http" in component_ports:  # Consul, every agent of the HA datacenter
            return commands.http_url(component_ports["http"], host_of(name))
        return commands.http_url(component_ports["client"], host_of(name))

    @staticmethod
    def _mode(state: Mapping[str, Any]) -> str:
        return str(state.get("mode", MODE_SINGLE))

    @property
    def mode(self) -> str:
        """``single`` or ``ha``: what the state directory holds (``single`` when empty)."""
        return self._mode(self._load())

    def _component(self, name: str, state: Mapping[str, Any]) -> Component:
        component_ports: dict[str, int] = dict(state["ports"].get(name, {}))
        record: Mapping[str, Any] = state["processes"].get(name, {})
        return Component(
            name=name,
            pid=record.get("pid"),
            url=self._url(name, component_ports),
            argv=tuple(record.get("argv", ())),
            log=self.log_file(name),
            ports=component_ports,
            host=host_of(name),
            group=record.get("group"),
        )

    def components(self) -> dict[str, Component]:
        """Every component as recorded (running or not)."""
        state = self._load()
        return {name: self._component(name, state) for name in components_of(self._mode(state))}

    def env(self) -> dict[str, str]:
        """The variables of the env file, expanded against the current environment."""
        return envfiles.parse(self.env_file.read_text(), os.environ)

    # ------------------------------------------------------------------- up

    def up(self, *, ha: bool = False) -> None:
        """Start every component that is down, wait until all answer, install the CRDs.

        ``ha`` asks for the HA variant; a state directory keeps the mode it was
        first brought up in, and asking for the other one is an error (``down``
        first) rather than a silent switch that would strand running processes.
        """
        started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        wanted = MODE_HA if ha else MODE_SINGLE
        with locks.exclusive(self._lock_file, timeout=LOCK_TIMEOUT, what="the dev stack"):
            state = self._load()
            # A state file from before the HA mode existed has ports but no mode: single.
            mode = state.get("mode") or (MODE_SINGLE if state["ports"] else wanted)
            state["mode"] = mode
            if mode != wanted:
                flag = "with --ha" if mode == MODE_HA else "without --ha"
                raise DevStackError(
                    f"{self.state_dir} holds a {mode} stack: run `tether dev up` {flag}, "
                    "or `tether dev down` first to switch"
                )
            self._assign_ports(state)
            self._save(state)

            programs = binaries.ensure(progress=self.progress)
            self._link_programs(programs)
            certificates.ensure(self.pki.directory)
            self._write_kubeconfig(state)

            # The API server needs its etcd; the other backends are independent.
            # Start them all, then wait for each, so their start-ups overlap (an
            # etcd or Consul cluster cannot answer before a quorum is up anyway).
            backends = tuple(name for name in components_of(mode) if name != KUBE_APISERVER)
            for name in backends:
                self._ensure_started(name, state, programs)
            for name in backends:
                self._wait_ready(name, state)
            self._ensure_started(KUBE_APISERVER, state, programs)
            self._wait_ready(KUBE_APISERVER, state)

            self._write_env(state)
            self._install_crds(programs["kubectl"])
        for name, component in self.components().items():
            self.progress(f"{name:15} pid {component.pid:<8} {component.url}")
        self.progress(f"up in {time.monotonic() - started:.1f} s")

    def _assign_ports(self, state: dict[str, Any]) -> None:
        """Choose ports for components that have none yet (the first `up`).

        Ports are allocated per address, all of one address in one call (so
        they are distinct there): 127.0.0.1 for the default stack and
        Kubernetes, one address per HA member.
        """
        by_host: dict[str, list[tuple[str, str]]] = {}
        for name in components_of(self._mode(state)):
            for port_name in PORT_NAMES[name]:
                if port_name not in state["ports"].get(name, {}):
                    by_host.setdefault(host_of(name), []).append((name, port_name))
        for host, needed in by_host.items():
            chosen = ports.allocate(len(needed), host=host)
            for (name, port_name), port in zip(needed, chosen, strict=True):
                state["ports"].setdefault(name, {})[port_name] = port

    def _link_programs(self, programs: Mapping[str, Path]) -> None:
        """Point ``bin/<program>`` at each program, replacing links atomically."""
        self.bin_dir.mkdir(exist_ok=True)
        for name, path in programs.items():
            link = self.bin_dir / name
            tmp = self.bin_dir / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(path)
            os.replace(tmp, link)

    def _write_kubeconfig(self, state: Mapping[str, Any]) -> None:
        server = self._url(KUBE_APISERVER, state["ports"][KUBE_APISERVER])
        text = commands.kubeconfig(
            server=server,
            ca_pem=self.pki.ca_cert.read_bytes(),
            cert_pem=self.pki.admin_cert.read_bytes(),
            key_pem=self.pki.admin_key.read_bytes(),
        )
        _write_atomic(self.kubeconfig, text, mode=0o600)

    def _argv(self, name: str, state: Mapping[str, Any], programs: Mapping[str, Path]) -> list[str]:
        component_ports: Mapping[str, int] = state["ports"][name]
        binary = programs[_PROGRAMS[name]]
        if name in ETCD_MEMBERS:
            return commands.etcd_member(
                binary,
                name=name,
                host=host_of(name),
                data_dir=self.state_dir / name,
                client_port=component_ports["client"],
                peer_port=component_ports["peer"],
                peers={
                    member: commands.http_url(state["ports"][member]["peer"], host_of(member))
                    for member in ETCD_MEMBERS
                },
                cluster_token=f"tether-{zlib.crc32(str(self.state_dir).encode()):08x}",
            )
        if name in (*CONSUL_SERVERS, CONSUL_AGENT):
            config_file = self.state_dir / f"{name}.json"
            config = commands.consul_member_config(
                commands.ConsulPorts(**component_ports),
                node_name=name,
                host=host_of(name),
                data_dir=self.state_dir / name,
                join=[
                    f"{host_of(server)}:{state['ports'][server]['serf_lan']}"
                    for server in CONSUL_SERVERS
                    if server != name
                ],
                server=name != CONSUL_AGENT,
            )
            _write_atomic(config_file, commands.consul_config_text(config), mode=0o600)
            return commands.consul_agent(binary, config_file=config_file)
        if name in (KUBE_ETCD, ETCD):
            return commands.etcd(
                binary,
                name=name,
                data_dir=self.state_dir / name,
                client_port=component_ports["client"],
                peer_port=component_ports["peer"],
            )
        if name == KUBE_APISERVER:
            return commands.kube_apiserver(
                binary,
                port=component_ports["secure"],
                etcd_url=self._url(KUBE_ETCD, state["ports"][KUBE_ETCD]),
                pki=self.pki,
            )
        config_file = self.state_dir / "consul.json"
        consul_ports = commands.ConsulPorts(**component_ports)
        config = commands.consul_config(consul_ports, node_name="tether-dev")
        _write_atomic(config_file, commands.consul_config_text(config), mode=0o600)
        return commands.consul(binary, config_file=config_file)

    def _ensure_started(
        self, name: str, state: dict[str, Any], programs: Mapping[str, Path]
    ) -> None:
        if self._component(name, state).running:
            return
        component_ports: Mapping[str, int] = state["ports"][name]
        host = host_of(name)
        taken = [port for port in component_ports.values() if not ports.is_free(port, host)]
        if taken:
            raise DevStackError(
                f"cannot start {name}: its port(s) {', '.join(map(str, taken))} on {host} are "
                "taken by another process; stop it, or `tether dev down` to start afresh on new ports"
            )
        argv = self._argv(name, state, programs)
        group = self._group(name)
        pid = processes.spawn(
            argv, log=self.log_file(name), cwd=self.state_dir, env=_child_env(), group=group
        )
        # Recorded at once, so that even if we fail from here on, `down` finds it.
        state["processes"][name] = {"pid": pid, "argv": argv, "group": group}
        self._save(state)
        self.progress(f"started {name} (pid {pid}), log in {self.log_file(name)}")

    def _group(self, name: str) -> int | None:
        """The group an HA member runs under when we are root, else None.

        Derived from the state directory, so two HA stacks on one machine use
        different groups and a fault aimed at one never matches the other.
        """
        if name not in HA_MEMBERS or os.geteuid() != 0:
            return None
        offset = (zlib.crc32(str(self.state_dir).encode()) % 256) * 16
        return HA_GROUP_BASE + offset + HA_MEMBERS.index(name)

    def _check(self, name: str, url: str) -> probes.Check:
        if name == KUBE_APISERVER:
            context = probes.client_tls(self.pki.ca_cert, self.pki.admin_cert, self.pki.admin_key)
            return probes.check_http(
                f"{url}/readyz", lambda status, body: status == 200 and body.strip() == "ok",
                context=context,
            )
        if name == CONSUL or name in (*CONSUL_SERVERS, CONSUL_AGENT):
            return probes.check_http(f"{url}/v1/status/leader", _consul_has_leader)
        return probes.check_http(f"{url}/health", _etcd_healthy)

    def _wait_ready(self, name: str, state: Mapping[str, Any]) -> None:
        component = self._component(name, state)
        took = probes.wait_ready(
            name,
            self._check(name, component.url),
            alive=lambda: component.running,
            log=component.log,
            timeout=self.ready_timeout,
        )
        if took > 1.0:
            self.progress(f"{name} answered after {took:.1f} s")

    def _write_env(self, state: Mapping[str, Any]) -> None:
        if self._mode(state) == MODE_HA:
            # Tether talks to the client agent (as users' services do) and knows
            # every etcd member, so its client can fail over.
            consul = self._url(CONSUL_AGENT, state["ports"][CONSUL_AGENT])
            etcd = ",".join(self._url(name, state["ports"][name]) for name in ETCD_MEMBERS)
        else:
            consul = self._url(CONSUL, state["ports"][CONSUL])
            etcd = self._url(ETCD, state["ports"][ETCD])
        text = envfiles.render(
            kubeconfig=self.kubeconfig,
            consul_http_addr=consul,
            etcd_endpoints=etcd,
            state_dir=self.state_dir,
            bin_dir=self.bin_dir,
        )
        _write_atomic(self.env_file, text)

    def kubectl(
        self, kubectl: Path, *args: str, timeout: float = KUBECTL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this stack; raise with its stderr if it fails."""
        command = [str(kubectl), f"--kubeconfig={self.kubeconfig}", *args]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise DevStackError(f"`kubectl {' '.join(args)}` took more than {timeout:.0f} s") from None
        if done.returncode != 0:
            raise DevStackError(
                f"`kubectl {' '.join(args)}` failed (exit {done.returncode}):\n{done.stderr.strip()}"
            )
        return done

    def _install_crds(self, kubectl: Path) -> None:
        """Apply ``crds/`` (with its kustomization if it has one) and wait until Established."""
        directory = crds_dir()
        if not directory.is_dir():
            self.progress(f"no CRDs installed: {directory} does not exist")
            return
        kustomizations = {"kustomization.yaml", "kustomization.yml", "Kustomization"}
        manifests = sorted(
            path
            for path in directory.iterdir()
            if path.suffix in (".yaml", ".yml") and path.name not in kustomizations
        )
        if not manifests:
            self.progress(f"no CRDs installed: no YAML in {directory}")
            return
        # Server-side apply: no last-applied annotation (CRDs with big schemas can
        # outgrow it), and re-applying on every `up` picks up CRD edits.
        apply = ["apply", "--server-side", "--force-conflicts", "--field-manager=tether-dev"]
        if any((directory / name).is_file() for name in kustomizations):
            self.kubectl(kubectl, *apply, "-k", str(directory))
        else:
            self.kubectl(kubectl, *apply, *(arg for path in manifests for arg in ("-f", str(path))))
        self.kubectl(
            kubectl, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s",
            timeout=90.0,
        )
        self.progress(f"CRDs from {directory} installed and established")

    # --------------------------------------------------------------- status

    def role(self, name: str, url: str) -> str | None:
        """The component's role in its cluster, asked from it; None if it does not answer.

        etcd members (and the single etcds) say ``leader``/``follower``, Consul
        servers ``leader``/``follower``/``candidate``, the client agent
        ``client``; the API server is always ``apiserver``.
        """
        if name == KUBE_APISERVER:
            return "apiserver"
        if name == CONSUL or name in (*CONSUL_SERVERS, CONSUL_AGENT):
            return consul_role(url)
        return etcd_role(url)

    def status(self) -> dict[str, Any]:
        """``{"mode", "components": {name: {"pid", "running", "ready", "url", ...}}}``.

        In HA mode each component also has ``role``, ``address`` and ``group``.
        """
        state = self._load()
        components = {name: self._component(name, state) for name in components_of(self._mode(state))}
        context = None
        if self.pki.admin_key.exists():
            context = probes.client_tls(self.pki.ca_cert, self.pki.admin_cert, self.pki.admin_key)
        report: dict[str, Any] = {}
        for name, component in components.items():
            running = component.running
            ready = False
            if running and (name != KUBE_APISERVER or context is not None):
                ready = self._check(name, component.url)() is None
            report[name] = {
                "pid": component.pid if running else None,
                "running": running,
                "ready": ready,
                "url": component.url,
                "log": str(component.log),
                "ports": dict(component.ports),
            }
            if self._mode(state) == MODE_HA:
                # Only the HA stack reports roles and addresses: the default
                # stack's report stays exactly what its users parse.
                report[name].update(
                    role=self.role(name, component.url) if running else None,
                    address=component.host,
                    group=component.group,
                )
        return {"state_dir": str(self.state_dir), "mode": self._mode(state), "components": report}

    # ----------------------------------------------------------------- down

    def _strays(self) -> list[int]:
        """Processes of ours that the state file does not name (an interrupted `up`)."""
        marker = f"{self.state_dir}{os.sep}"
        programs = set(_PROGRAMS.values())

        def ours(argv: Sequence[str]) -> bool:
            return Path(argv[0]).name in programs and any(marker in arg for arg in argv[1:])

        return processes.find(ours)

    def down(self) -> None:
        """Stop every component and remove the state directory."""
        if self.state_dir.is_dir():
            with locks.exclusive(self._lock_file, timeout=LOCK_TIMEOUT, what="the dev stack"):
                try:
                    state = self._load()
                except DevStackError:
                    state = {"ports": {}, "processes": {}}
                # API server first, so it does not spend its last seconds retrying
                # etcd; the client agent before the servers it would keep calling.
                for name in (KUBE_APISERVER, CONSUL, ETCD, CONSUL_AGENT, *CONSUL_SERVERS,
                             *ETCD_MEMBERS, KUBE_ETCD):
                    component = self._component(name, state)
                    if processes.terminate(component.pid, component.argv):
                        self.progress(f"stopped {name} (pid {component.pid})")
                self._stop_strays()
                shutil.rmtree(self.state_dir)
        else:
            self._stop_strays()
        self.progress(f"removed {self.state_dir}")

    def _stop_strays(self) -> None:
        for pid in self._strays():
            argv = processes.read_cmdline(pid)
            if argv and processes.terminate(pid, argv):
                self.progress(f"stopped stray {Path(argv[0]).name} (pid {pid})")
