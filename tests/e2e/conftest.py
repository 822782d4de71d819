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
  ``up`` is then bounded by ``helpers.UP_TIMEOUT``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import state_dir, tether
from opfixture import namespace, operator  # noqa: F401  (shared fixtures)

from tether.devstack import binaries, envfiles

E2E_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # First, so that `-m e2e` / `-m "not e2e"` (applied by pytest's own hook) see
    # the mark. This hook sees the whole session's items, not only this directory's.
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Find or build the binaries once, before any test's timeout starts."""
    if session.config.option.collectonly:
        return
    if any(item.get_closest_marker("e2e") for item in session.items):
        binaries.ensure()


@pytest.fixture(scope="session")
def dev_env() -> Iterator[dict[str, str]]:
    """The dev stack's environment: KUBECONFIG, CONSUL_HTTP_ADDR, ETCD_ENDPOINTS,
    TETHER_DEV_DIR and PATH (the stack's bin directory first).

    Only these variables: start processes with ``{**os.environ, **dev_env}``.
    """
    directory = state_dir()
    tether("dev", "--dir", str(directory), "up")
    env = envfiles.parse((directory / "env").read_text(), os.environ)
    yield env
    if os.environ.get("TETHER_DEV_DOWN_AFTER") == "1":
        tether("dev", "--dir", str(directory), "down")
