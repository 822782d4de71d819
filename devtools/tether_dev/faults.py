"""Faults for the HA dev stack: kill a leader, partition a member, slow one down.

This is the fault suite's instrument for ``tether dev up --ha`` (it needs root
for the network faults, as the suite does). Three kinds of fault:

- **processes** — :meth:`HaFaults.kill` SIGKILLs a member (the etcd leader or a
  follower, the Consul server leader, the client agent); ``DevStack.up(ha=True)``
  brings it back on the same address, ports and data.
- **partitions** — :meth:`HaFaults.partition` cuts members off from each other
  and, optionally, from every client (Tether included). Packets are *dropped*,
  not refused: a client sees a connection that simply stops answering, which
  is what a real partition looks like and the hard case for failover.
- **slowness** — :meth:`HaFaults.slow` shapes the traffic to and from one member
  with ``tc`` so its requests crawl and time out. The kernels this project runs
  on lack ``sch_netem`` (``tc qdisc add ... netem`` says "Specified qdisc kind is
  unknown"), so the delay comes from an HTB class with a tiny rate: a request
  waits in its queue, which is a delay that grows with the bytes in flight.

How a partition tells members apart on one loopback interface. Every member
listens on its own 127.0.0.x, but the *source* address of the connections it
dials is 127.0.0.1 (the kernel's choice for loopback), so addresses alone cannot
say which member sent a packet. The stack therefore runs each member under a
group of its own (``Component.group``); ``iptables -m owner --gid-owner`` then
identifies every packet a member's sockets send, dialled or accepted. A
partition marks each connection between the two sides on its dialler's packets
(``CONNMARK`` in ``mangle``) and drops every packet of a marked connection in
both directions (``filter``), so replies stop too. Marks are unique per fault,
so a healed partition leaves nothing behind that a later one could match.
The marks go in 0.3 s before the drops, so every busy connection is marked
when the cut comes; a connection idle for that long is marked only by its
dialler's next packet, so data its *listener* sends first still crosses, once:
like a packet already in flight when a real network splits. (Seen once: an
isolated etcd leader's append reached a follower that way and was committed
by the next leader — correct Raft, and a reason clients must re-read.)

Everything is tagged: the rules live in chains named :data:`CHAIN` jumped to
from ``OUTPUT`` by a rule commented :data:`TAG`, each fault's rules carry
``TAG:<id>``, and the ``tc`` root qdisc has handle :data:`TC_HANDLE`. A fault is
healed when its context exits (``finally``), by a watchdog timer at its time
limit if the caller is stuck, and :func:`heal_all` removes anything tagged that
a crashed run left (the fault suite calls it before and after a session).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tether_dev import processes, stack
from tether_dev.reporting import DevStackError

TAG = "tether-fault"
CHAIN = "TETHER-FAULT"
#: Root qdisc handle on ``lo`` while a member is slowed (``7e70:``).
TC_HANDLE = "7e70"
#: Bits of the conntrack mark a partition uses; the rest are left to others.
MARK_MASK = 0x0FFF0000
#: Partitions and slowdowns are meant to last 10-30 s; the watchdog heals at this.
MAX_FAULT_SECONDS = 30.0
COMMAND_TIMEOUT = 10.0
#: Between marking a partition's connections and dropping their packets.
MARK_SETTLE = 0.3
#: Bound on waits for an election to settle.
ELECTION_TIMEOUT = 30.0

_ids = itertools.count(1)


class FaultError(DevStackError):
    """A fault could not be injected (not root, no iptables, not an HA stack...)."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise FaultError(f"`{' '.join(argv)}` took more than {COMMAND_TIMEOUT:.0f} s") from None
    if check and done.returncode != 0:
        raise FaultError(f"`{' '.join(argv)}` failed (exit {done.returncode}): {done.stderr.strip()}")
    return done


def _iptables(table: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # -w: wait for the xtables lock rather than fail when another rule change runs.
    return _run("iptables", "-w", "5", "-t", table, *args, check=check)


def require_network_tools() -> None:
    """Raise unless we are root with ``iptables`` and ``tc`` (what partitions and slowdowns use)."""
    if os.geteuid() != 0:
        raise FaultError("network faults need root (iptables, tc)")
    missing = [tool for tool in ("iptables", "tc") if shutil.which(tool) is None]
    if missing:
        raise FaultError(f"network faults need {', '.join(missing)} (apt-get install iptables iproute2)")


# ------------------------------------------------------------------ rule text (pure)


def comment_of(fault_id: int, pid: int | None = None) -> str:
    """``tether-fault:<pid>:<id>``: which process injected the rule, so a cleanup
    by one fault session never removes a live fault of another."""
    return f"{TAG}:{os.getpid() if pid is None else pid}:{fault_id}"


def owner_of(line: str) -> tuple[int, int] | None:
    """``(pid, fault id)`` named in a rule's comment, if any."""
    found = re.search(rf"{TAG}:(\d+):(\d+)", line)
    return (int(found.group(1)), int(found.group(2))) if found else None


def mark_of(fault_id: int) -> int:
    """The conntrack mark of fault ``fault_id`` (1…4095 inside :data:`MARK_MASK`)."""
    return ((fault_id - 1) % 0xFFF + 1) << 16


def partition_rules(
    fault_id: int,
    sides: Sequence[tuple[int, str]],
    others: Sequence[tuple[int, str]],
    *,
    clients: bool,
    member_groups: tuple[int, int],
) -> list[tuple[str, list[str]]]:
    """``(table, rule)`` pairs that cut ``sides`` off from ``others`` (and from clients).

    ``sides`` and ``others`` are ``(group, address)`` of members. A connection
    is marked by its dialler's packets: a member of one side dialling an
    address of the other. With ``clients`` every process outside the stack's
    member groups (``member_groups``, an inclusive range) dialling an isolated
    member counts too: that is Tether, and the test's own readers.
    """
    comment = ["-m", "comment", "--comment", comment_of(fault_id)]
    mark = f"{mark_of(fault_id):#x}/{MARK_MASK:#x}"
    rules: list[tuple[str, list[str]]] = []
    for (group_a, address_a), (group_b, address_b) in itertools.product(sides, others):
        for group, address in ((group_a, address_b), (group_b, address_a)):
            rules.append(
                (
                    "mangle",
                    ["-m", "owner", "--gid-owner", str(group), "-d", address, *comment,
                     "-j", "CONNMARK", "--set-xmark", mark],
                )
            )
    if clients:
        low, high = member_groups
        for _group, address in sides:
            rules.append(
                (
                    "mangle",
                    ["-m", "owner", "!", "--gid-owner", f"{low}-{high}", "-d", address, *comment,
                     "-j", "CONNMARK", "--set-xmark", mark],
                )
            )
    rules.append(("filter", ["-m", "connmark", "--mark", mark, *comment, "-j", "DROP"]))
    return rules


# ------------------------------------------------------------------ chains


def _ensure_chains() -> None:
    """Create the tagged chains and their jumps from OUTPUT (idempotent)."""
    for table in ("mangle", "filter"):
        if _iptables(table, "-S", CHAIN, check=False).returncode != 0:
            _iptables(table, "-N", CHAIN)
        jump = ["OUTPUT", "-m", "comment", "--comment", TAG, "-j", CHAIN]
        if _iptables(table, "-C", *jump, check=False).returncode != 0:
            _iptables(table, "-I", *jump)


def _delete_rules(match: str) -> int:
    """Delete every rule in our chains whose text contains ``match``; how many."""
    deleted = 0
    for table in ("mangle", "filter"):
        listing = _iptables(table, "-S", CHAIN, check=False)
        if listing.returncode != 0:
            continue
        for line in listing.stdout.splitlines():
            if line.startswith(f"-A {CHAIN} ") and match in line:
                # -S quotes the comment ("tether-fault:7"); shlex undoes that.
                spec = shlex.split(line)[2:]
                if _iptables(table, "-D", CHAIN, *spec, check=False).returncode == 0:
                    deleted += 1
    return deleted


def leftovers() -> list[str]:
    """What :func:`heal_all` would remove: tagged rules, chains and our qdisc."""
    found: list[str] = []
    if shutil.which("iptables") is not None:
        for table in ("mangle", "filter"):
            # Every chain of the table: the jumps from OUTPUT and our chain's rules.
            listing = _iptables(table, "-S", check=False).stdout
            found += [
                f"{table}: {line}"
                for line in listing.splitlines()
                if line.startswith("-A") and (TAG in line or line.startswith(f"-A {CHAIN} "))
            ]
    if shutil.which("tc") is not None:
        qdiscs = _run("tc", "qdisc", "show", "dev", "lo", check=False).stdout
        found += [f"tc: {line}" for line in qdiscs.splitlines() if f" {TC_HANDLE}: " in f" {line} "]
    return found


def _alive(pid: int) -> bool:
    """Is ``pid`` a live fault session other than this one?

    Faults are injected from Python (the suites, the CLI); a pid reused since by any
    other program does not keep a dead session's rules in place.
    """
    if pid == os.getpid():
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"python" in argv


def heal_all() -> list[str]:
    """Remove what this process or a dead one left; return what was removed.

    Faults of *another live* process (a second fault session on the machine)
    are left alone: its own exits and watchdogs heal them. The chains and the
    jumps to them go only once no rule is left in them; the qdisc only when
    its recorded owner is gone.
    """
    removed: list[str] = []
    if shutil.which("iptables") is not None:
        for line in leftovers():
            owner = owner_of(line)
            # The closing quote of -S output keeps fault 1 from matching fault 12.
            if owner is not None and not _alive(owner[0]) and _delete_rules(
                comment_of(owner[1], owner[0]) + '"'
            ):
                removed.append(line)
        busy = any(line.split(": ", 1)[1].startswith(f"-A {CHAIN} ") for line in leftovers())
        if not busy:
            for table in ("mangle", "filter"):
                jump = ["OUTPUT", "-m", "comment", "--comment", TAG, "-j", CHAIN]
                # Bounded: there is normally one jump; a crashed run may have left a few.
                for _ in range(16):
                    if _iptables(table, "-D", *jump, check=False).returncode != 0:
                        break
                    removed.append(f"{table}: jump to {CHAIN}")
                _iptables(table, "-X", CHAIN, check=False)
    if shutil.which("tc") is not None and any(line.startswith("tc:") for line in leftovers()):
        tc_owner = _tc_owner()
        if tc_owner is None or not _alive(tc_owner):
            _run("tc", "qdisc", "del", "dev", "lo", "root", check=False)
            TC_OWNER_FILE.unlink(missing_ok=True)
            removed.append("tc: qdisc on lo")
    return removed


#: Who added the qdisc on lo (a pid), for :func:`heal_all`.
TC_OWNER_FILE = Path("/run/tether-fault-tc.pid")


def _tc_owner() -> int | None:
    try:
        return int(TC_OWNER_FILE.read_text().strip())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ faults


@dataclass
class Fault:
    """One injected network fault; :meth:`heal` undoes it (idempotent, thread-safe)."""

    id: int
    description: str
    started: float
    _undo: list[Callable[[], object]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    healed_at: float | None = None

    def heal(self) -> None:
        with self._lock:
            if self.healed_at is not None:
                return
            for undo in reversed(self._undo):
                undo()
            self.healed_at = time.monotonic()


@contextlib.contextmanager
def _bounded(fault: Fault, limit: float) -> Iterator[Fault]:
    """Heal ``fault`` on exit, whatever happens, and after ``limit`` s at the latest."""
    timer = threading.Timer(limit, fault.heal)
    timer.daemon = True
    timer.start()
    try:
        yield fault
    finally:
        timer.cancel()
        fault.heal()


class HaFaults:
    """Faults aimed at the members of one HA dev stack."""

    def __init__(self, dev_stack: stack.DevStack) -> None:
        if dev_stack.mode != stack.MODE_HA:
            raise FaultError(f"{dev_stack.state_dir} is not an HA stack (`tether dev up --ha`)")
        self.stack = dev_stack

    # -------------------------------------------------------------- who is who

    def component(self, name: str) -> stack.Component:
        return self.stack.components()[name]

    def etcd_roles(self) -> dict[str, str | None]:
        components = self.stack.components()
        return {
            name: stack.etcd_role(components[name].url) if components[name].running else None
            for name in stack.ETCD_MEMBERS
        }

    def consul_roles(self) -> dict[str, str | None]:
        components = self.stack.components()
        return {
            name: stack.consul_role(components[name].url) if components[name].running else None
            for name in stack.CONSUL_SERVERS
        }

    def etcd_leader(self, *, timeout: float = ELECTION_TIMEOUT, exclude: str | None = None) -> str:
        """The etcd member that leads (waiting, boundedly, for an election to settle)."""
        return self._wait_leader(self.etcd_roles, "etcd", timeout, exclude)

    def consul_leader(self, *, timeout: float = ELECTION_TIMEOUT, exclude: str | None = None) -> str:
        """The Consul server that leads."""
        return self._wait_leader(self.consul_roles, "Consul", timeout, exclude)

    @staticmethod
    def _wait_leader(
        roles: Callable[[], dict[str, str | None]], what: str, timeout: float, exclude: str | None
    ) -> str:
        deadline = time.monotonic() + timeout
        seen: dict[str, str | None] = {}
        while True:
            seen = roles()
            leaders = [name for name, role in seen.items() if role == "leader" and name != exclude]
            if len(leaders) == 1:
                return leaders[0]
            if time.monotonic() >= deadline:
                raise FaultError(f"no single {what} leader within {timeout:.0f} s: {seen}")
            time.sleep(0.02)

    def etcd_followers(self) -> list[str]:
        leader = self.etcd_leader()
        return [name for name in stack.ETCD_MEMBERS if name != leader]

    # -------------------------------------------------------------- processes

    def kill(self, name: str) -> int:
        """SIGKILL member ``name`` (its process group); return the pid killed."""
        component = self.component(name)
        if component.pid is None or not component.running:
            raise FaultError(f"{name} is not running")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(component.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while processes.is_running(component.pid, component.argv):
            if time.monotonic() >= deadline:
                raise FaultError(f"{name} (pid {component.pid}) survived SIGKILL for 10 s")
            time.sleep(0.01)
        return component.pid

    def restart(self) -> None:
        """Start whatever is down, as ``tether dev up --ha`` does."""
        self.stack.up(ha=True)

    def wipe(self, name: str) -> None:
        """Remove a stopped member's data directory (a client agent lost with its disk)."""
        if self.component(name).running:
            raise FaultError(f"{name} is running; kill it first")
        shutil.rmtree(self.stack.state_dir / name, ignore_errors=True)

    # -------------------------------------------------------------- network

    def _member(self, name: str) -> tuple[int, str]:
        component = self.component(name)
        if component.group is None:
            raise FaultError(
                f"{name} runs without a group of its own (the stack was not started as root); "
                "partitions cannot tell its traffic apart"
            )
        return component.group, component.host

    def _member_groups(self) -> tuple[int, int]:
        groups = [c.group for c in self.stack.components().values() if c.group is not None]
        if not groups:
            raise FaultError("no member of this stack runs under a group of its own")
        return min(groups), max(groups)

    @contextlib.contextmanager
    def partition(
        self,
        isolated: Sequence[str],
        others: Sequence[str],
        *,
        clients: bool = False,
        limit: float = MAX_FAULT_SECONDS,
    ) -> Iterator[Fault]:
        """Drop all traffic between ``isolated`` and ``others`` (and clients) while open.

        Healed on exit, on an exception, and after ``limit`` seconds at the
        latest (a watchdog thread), whichever comes first.
        """
        require_network_tools()
        sides = [self._member(name) for name in isolated]
        rest = [self._member(name) for name in others]
        fault_id = next(_ids)
        rules = partition_rules(
            fault_id, sides, rest, clients=clients, member_groups=self._member_groups()
        )
        description = (
            f"partition {'+'.join(isolated)} | {'+'.join(others)}"
            f"{' and clients' if clients else ''}"
        )
        fault = Fault(id=fault_id, description=description, started=time.monotonic())
        fault._undo.append(lambda: _delete_rules(comment_of(fault_id) + '"'))
        with _bounded(fault, limit):
            _ensure_chains()
            # Marks first, drops a moment later. A connection is marked by its
            # dialler's next packet; were both in place at once, data already on
            # its way from the listener would still be delivered (only the
            # dialler's acknowledgement dropped), so a message or two would cross
            # the partition after it began. Members talk every 100 ms (etcd
            # heartbeats, Serf probes), so by the time the drop rule goes in every
            # busy connection carries its mark and the cut is sharp.
            for table, rule in rules:
                if table == "mangle":
                    _iptables(table, "-A", CHAIN, *rule)
            time.sleep(MARK_SETTLE)
            for table, rule in rules:
                if table != "mangle":
                    _iptables(table, "-A", CHAIN, *rule)
            yield fault

    @contextlib.contextmanager
    def slow(
        self, name: str, *, rate: str = "64kbit", limit: float = MAX_FAULT_SECONDS
    ) -> Iterator[Fault]:
        """Throttle every packet to or from ``name``'s address to ``rate`` while open.

        An HTB root qdisc on ``lo`` sends everything else through a class with
        no practical limit and the member's traffic (matched by address with
        ``u32``) through one of ``rate``; a full queue drops. Refuses when ``lo``
        already has a root qdisc of someone else's.
        """
        require_network_tools()
        address = self.component(name).host
        current = _run("tc", "qdisc", "show", "dev", "lo").stdout
        if current.strip() and not current.startswith("qdisc noqueue"):
            raise FaultError(f"lo already has a root qdisc, not ours to replace: {current.strip()}")
        fault = Fault(id=next(_ids), description=f"slow {name} to {rate}", started=time.monotonic())
        fault._undo.append(lambda: _run("tc", "qdisc", "del", "dev", "lo", "root", check=False))
        fault._undo.append(lambda: TC_OWNER_FILE.unlink(missing_ok=True))
        handle = TC_HANDLE
        with _bounded(fault, limit):
            TC_OWNER_FILE.write_text(f"{os.getpid()}\n")
            _run("tc", "qdisc", "add", "dev", "lo", "root", "handle", f"{handle}:", "htb",
                 "default", "1")
            _run("tc", "class", "add", "dev", "lo", "parent", f"{handle}:", "classid",
                 f"{handle}:1", "htb", "rate", "100gbit", "burst", "4mb")
            _run("tc", "class", "add", "dev", "lo", "parent", f"{handle}:", "classid",
                 f"{handle}:2", "htb", "rate", rate, "ceil", rate)
            for direction in ("dst", "src"):
                _run("tc", "filter", "add", "dev", "lo", "parent", f"{handle}:", "protocol", "ip",
                     "prio", "1", "u32", "match", "ip", direction, f"{address}/32",
                     "flowid", f"{handle}:2")
            yield fault
