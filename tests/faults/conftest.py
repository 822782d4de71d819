"""Fault-injection suite set-up: a private dev stack, an operator per test, seeds.

- Every test here is marked ``faults``; ``make test`` deselects them, ``make
  test-faults`` runs them (``TETHER_FAULTS_REDUCED=1`` for the shorter CI form).
- ``stack`` starts a dev stack of its own in a temporary directory, once per
  session, and removes it afterwards (``TETHER_FAULTS_KEEP=1`` keeps it). The
  suite kills and pauses its components, so it must never be the shared
  ``.tether/dev`` stack other engineers' tests run against.
- ``operator`` runs ``tether run -A`` against that stack for one test; a test may
  kill and restart it. On failure the log tail is printed.
- ``seed`` is ``TETHER_FAULTS_SEED`` or a fresh random number, printed so that a
  failing run can be replayed.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import HTTP_TIMEOUT, REDUCED, FaultStack, Kube, log
from hakit import HaFaultStack

from tether_dev.harness import suites
from tether_dev.harness.consul import Consul
from tether_dev.harness.etcd import Etcd
from tether_dev.harness.operator import OperatorProcess

# A hook, imported so pytest finds it here: it lets `operator` print its log on failure.
from tether_dev.harness.suites import pytest_runtest_makereport  # noqa: F401

FAULTS_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    suites.mark_folder(items, FAULTS_DIR, pytest.mark.faults)


def base_seed() -> int:
    explicit = os.environ.get("TETHER_FAULTS_SEED")
    return int(explicit) if explicit else random.SystemRandom().randrange(2**31)


_SEED = base_seed()


@pytest.fixture(scope="session")
def session_seed() -> int:
    log(
        f"seed {_SEED} (replay with TETHER_FAULTS_SEED={_SEED}"
        f"{' TETHER_FAULTS_REDUCED=1' if REDUCED else ''}); mode {'reduced' if REDUCED else 'full'}"
    )
    return _SEED


@pytest.fixture
def seed(session_seed: int, request: pytest.FixtureRequest) -> int:
    """A per-test seed derived from the session's, so one test replays alone too."""
    derived = random.Random(f"{session_seed}/{request.node.name}").randrange(2**31)
    log(f"{request.node.name}: seed {derived} (session seed {session_seed})")
    return derived


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    base = tmp_path_factory.mktemp("faults")
    st = FaultStack(base / "stack")
    took = st.up()
    log(f"private dev stack up in {took:.1f} s at {st.state_dir}")
    try:
        yield st
    finally:
        st.resume_all()
        logs = base / "stack-logs"
        logs.mkdir(exist_ok=True)
        for path in st.state_dir.glob("*.log"):
            shutil.copy(path, logs / path.name)
        if os.environ.get("TETHER_FAULTS_KEEP") == "1":
            log(f"keeping the stack at {st.state_dir}")
        else:
            st.down()
            log(f"stack removed; component logs kept in {logs}")


@pytest.fixture
def kube(stack: FaultStack) -> Kube:
    return Kube(stack.env["KUBECONFIG"])


@pytest.fixture
def consul(stack: FaultStack) -> Consul:
    return Consul.from_env(stack.env, timeout=HTTP_TIMEOUT)


@pytest.fixture
def etcd(stack: FaultStack) -> Etcd:
    return Etcd.from_env(stack.env, timeout=HTTP_TIMEOUT)


@pytest.fixture
def operator(stack: FaultStack, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[OperatorProcess]:
    # A test that breaks the stack must leave it whole for the next one.
    stack.resume_all()
    stack.ensure_up()
    op = OperatorProcess(stack.env, tmp_path / "operator.log").start()
    log(f"operator pid {op.pid}, log {op.log_path}")
    try:
        yield op
    finally:
        stack.resume_all()
        if suites.failed(request):
            print(f"\n--- operator log tail ({op.log_path}):\n{op.log_tail(80)}")
        op.stop(grace=20)


@pytest.fixture
def run_id() -> str:
    """Names this test's namespaces and etcd root, so tests never see each other's objects."""
    return uuid.uuid4().hex[:6]


# ------------------------------------------------------------------ the HA stack


@pytest.fixture(scope="session", autouse=True)
def network_faults_healed() -> Iterator[None]:
    """No partition or slowdown outlives the session, nor comes in from a crashed one.

    Every rule and qdisc the HA faults add is tagged (``tether-fault``); this
    removes whatever is tagged before the first test and after the last, on
    top of each fault's own ``finally`` and watchdog.
    """
    from tether_dev import faults
    for line in faults.heal_all():
        log(f"removed a leftover network fault: {line}")
    try:
        yield
    finally:
        for line in faults.heal_all():
            log(f"removed a network fault left at the end of the session: {line}")


@pytest.fixture(scope="session")
def ha_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaFaultStack]:
    """A private HA dev stack (3 etcd members, 3 Consul servers + agent) for the session."""
    base = tmp_path_factory.mktemp("faults-ha")
    st = HaFaultStack(base / "stack")
    took = st.up()
    log(f"private HA dev stack up in {took:.1f} s at {st.state_dir}")
    try:
        yield st
    finally:
        from tether_dev import faults
        faults.heal_all()
        st.resume_all()
        logs = base / "stack-logs"
        logs.mkdir(exist_ok=True)
        for path in st.state_dir.glob("*.log"):
            shutil.copy(path, logs / path.name)
        if os.environ.get("TETHER_FAULTS_KEEP") == "1":
            log(f"keeping the HA stack at {st.state_dir}")
        else:
            st.down()
            log(f"HA stack removed; member logs kept in {logs}")


@pytest.fixture
def ha_operator(
    ha_stack: HaFaultStack, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    """``tether run -A`` against the HA stack (etcd: all members; Consul: the client agent)."""
    from tether_dev import faults
    faults.heal_all()
    ha_stack.resume_all()
    ha_stack.settle()
    op = OperatorProcess(ha_stack.env, tmp_path / "operator.log").start()
    log(f"operator pid {op.pid} on the HA stack, log {op.log_path}")
    try:
        yield op
    finally:
        faults.heal_all()
        if suites.failed(request):
            print(f"\n--- operator log tail ({op.log_path}):\n{op.log_tail(80)}")
        op.stop(grace=20)
