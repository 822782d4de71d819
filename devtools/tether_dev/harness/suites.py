"""pytest plumbing the suites' conftests share: folder marks and "did this test fail?".

Hooks only take effect from a conftest or plugin, so a conftest imports the hook it
wants by name (``from tether_dev.harness.suites import pytest_runtest_makereport``);
the functions here are plain and need no plugin registration.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest


def mark_folder(items: list[pytest.Item], folder: Path, mark: pytest.MarkDecorator) -> None:
    """Add ``mark`` to every collected item under ``folder``.

    Call it from a ``tryfirst`` ``pytest_collection_modifyitems`` so ``-m`` (applied
    by pytest's own hook) sees the mark. That hook sees the whole session's items,
    not only its own folder's, hence the filter.
    """
    for item in items:
        if folder in item.path.parents:
            item.add_marker(mark)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Keep each phase's report on the item, so a fixture's teardown can tell a
    # failed test from a passed one and print diagnostics only when they help.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def failed(request: pytest.FixtureRequest) -> bool:
    """Whether the test that ``request`` belongs to failed in its call phase.

    Needs :func:`pytest_runtest_makereport` imported into the suite's conftest.
    """
    report = getattr(request.node, "report_call", None)
    return bool(report is not None and report.failed)
