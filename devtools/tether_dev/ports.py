"""Choosing free loopback ports for the components.

Ports are chosen once, on the first ``up``, and kept for the life of the state
directory, so that a restarted component comes back where its clients (the env
file, the kubeconfig, a running operator) expect it. Two choices make that work:

- candidates come from *below* the kernel's ephemeral range
  (``/proc/sys/net/ipv4/ip_local_port_range``): the kernel hands ephemeral ports to
  outgoing connections, which could otherwise sit on a port while its component is
  down and block the restart;
- a candidate must be bindable on 127.0.0.1 for TCP *and* UDP, because Consul's
  Serf ports use both.

All sockets of one allocation are held open until every port is chosen, so the
ports of one call are distinct.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable

from tether_dev.reporting import DevStackError

HOST = "127.0.0.1"
#: The lowest port considered: well clear of the registered services below it.
LOWEST = 20000
#: Linux' default ephemeral range starts here; used when /proc cannot be read.
DEFAULT_EPHEMERAL_START = 32768
#: Bound on candidates tried per port before giving up.
MAX_ATTEMPTS = 200


def ephemeral_start(read: Callable[[], str] | None = None) -> int:
    """First port of the kernel's ephemeral range."""
    try:
        if read is not None:
            text = read()
        else:
            with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
                text = handle.read()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_START


def candidate_range(ephemeral: int) -> range:
    """Ports to pick from: [LOWEST, ephemeral), or below LOWEST if the range is unusual."""
    if ephemeral - LOWEST >= 1000:
        return range(LOWEST, ephemeral)
    # A tuned kernel may start its ephemeral range low; fall back to a band that
    # still avoids it (and the well-known ports).
    return range(10000, max(10000 + 1000, ephemeral))


def _try_bind(port: int, host: str = HOST) -> list[socket.socket] | None:
    """Bind TCP and UDP on ``host:port``; the sockets if both succeed, else None."""
    held: list[socket.socket] = []
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            sock = socket.socket(socket.AF_INET, kind)
            held.append(sock)
            if kind == socket.SOCK_STREAM:
                # As the servers themselves do (Go sets it on every listener): a port
                # whose only users are TIME_WAIT leftovers of a killed server is free
                # to listen on again; one with a listener is not.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        return held
    except OSError:
        for sock in held:
            sock.close()
        return None


def allocate(count: int, *, rng: random.Random | None = None, host: str = HOST) -> list[int]:
    """``count`` distinct ports, free right now on ``host`` (127.0.0.1) for TCP and UDP.

    The HA stack gives each member its own loopback address; a port is then
    checked on that address, where the member will listen.
    """
    rng = rng or random.Random()
    # (127.0.0.1 keeps the one-argument call the unit tests stub.)
    candidates = candidate_range(ephemeral_start())
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(count):
            for _attempt in range(MAX_ATTEMPTS):
                port = rng.choice(candidates)
                if port in ports:
                    continue
                sockets = _try_bind(port) if host == HOST else _try_bind(port, host)
                if sockets is not None:
                    held += sockets
                    ports.append(port)
                    break
            else:
                raise DevStackError(
                    f"found no free port on {host} after {MAX_ATTEMPTS} attempts"
                )
        return ports
    finally:
        for sock in held:
            sock.close()


def is_free(port: int, host: str = HOST) -> bool:
    """Whether ``port`` could be bound right now (TCP and UDP on ``host``)."""
    sockets = _try_bind(port, host)
    if sockets is None:
        return False
    for sock in sockets:
        sock.close()
    return True
