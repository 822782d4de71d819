"""End-to-end test setup: every test here runs against the real dev stack.

- Everything under ``tests/e2e`` is marked ``e2e`` (select with ``-m e2e``, skip
  with ``-m "not e2e"``).
- ``dev_env`` runs ``tether dev up`` once per session, on the same state directory
  as the README's commands (``$TETHER_DEV_DIR``, else ``<repo>/.tether/dev``), and
  returns the variables of its env file. ``up`` is idempotent, so a stack that is
  already running is reused as it is. The stack stays up after the session (CI
  tears it down separately; a developer keeps it for the next run) unless
  ``TETHER_DEV_DOWN_AFTER=1``.
- Building the binaries on a cold machine takes ~10 min, longer than a test's
  timeout; so before the first test runs, if any e2e test was selected, the
  binaries are found or built outside any test's time budget (the fixture's own
  ``up`` is then bounded by ``devstack.UP_TIMEOUT``).
- Tests marked ``jaeger`` need Jaeger's all-in-one (an optional program of the dev
  harness, never started by ``tether dev up``): it is found or built the same way,
  before the first test; ``jaeger_binary`` skips those tests, saying why, only if
  that build failed.
- ``operator`` is one ``tether run`` for the whole session, serving the per-test
  namespaces that ``namespace`` creates (``t-…``); tests that need an operator of
  their own (ACL, RBAC, leader election) start a :class:`OperatorProcess` themselves.

The helpers live in ``tether_dev.harness``, shared with the fault suite and the benchmarks.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether_dev import binaries, reporting
from tether_dev.harness import devstack, suites
from tether_dev.harness.jaeger import PROGRAM as PROGRAM_JAEGER
from tether_dev.harness.kube import kubectl
from tether_dev.harness.operator import OperatorProcess

E2E_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    suites.mark_folder(items, E2E_DIR, pytest.mark.e2e)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Find or build the binaries once, before any test's timeout starts."""
    if session.config.option.collectonly:
        return
    if any(item.get_closest_marker("e2e") for item in session.items):
        binaries.ensure()
    if any(item.get_closest_marker("jaeger") for item in session.items):
        try:
            _OPTIONAL[PROGRAM_JAEGER] = binaries.ensure_optional(PROGRAM_JAEGER)
        except reporting.DevStackError as exc:
            _OPTIONAL[PROGRAM_JAEGER] = str(exc)


# Optional programs built before the tests: a path, or why the build failed.
_OPTIONAL: dict[str, Path | str] = {}


@pytest.fixture(scope="session")
def jaeger_binary() -> Path:
    """Jaeger's all-in-one, built before the first test (see the module's docstring)."""
    found = _OPTIONAL.get(PROGRAM_JAEGER) or binaries.find_optional(PROGRAM_JAEGER)
    if isinstance(found, Path):
        return found
    pytest.skip(f"{PROGRAM_JAEGER} could not be built from devbin/jaeger: {found or 'not built'}")


@pytest.fixture(scope="session")
def dev_env() -> Iterator[dict[str, str]]:
    """The dev stack's environment: KUBECONFIG, CONSUL_HTTP_ADDR, ETCD_ENDPOINTS,
    TETHER_DEV_DIR and PATH (the stack's bin directory first).

    Only these variables: start processes with ``{**os.environ, **dev_env}``.
    """
    directory = devstack.state_dir()
    env = devstack.up(directory)
    yield env
    if os.environ.get("TETHER_DEV_DOWN_AFTER") == "1":
        devstack.down(directory)


@pytest.fixture(scope="session")
def operator(dev_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    # The shared operator serves the per-test namespaces ("t-…") only, so tests
    # that run their own operator (ACL, RBAC, leader election) use other names.
    proc = OperatorProcess(dev_env, log, args=("-n", "t-*"), verbose=True).start(timeout=60)
    yield proc
    proc.stop(grace=20)


@pytest.fixture
def namespace(dev_env: dict[str, str]) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (the operator releases finalizers)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl(dev_env, "create", "namespace", name)
    yield name
    # The dev stack runs no namespace controller, so a namespace's contents are
    # never deleted with it: delete Tether's resources first, so their Consul
    # registrations and etcd keys are cleaned up by the operator.
    kubectl(
        dev_env, "delete", "consulservices,etcdconfigs,consulconfigs", "--all", "-n", name, "--timeout=60s",
        check=False,
    )
    kubectl(dev_env, "delete", "namespace", name, "--wait=false", check=False)
