"""Fixtures for the kind end-to-end tests (``make e2e-kind``).

Without Docker, kind or the cluster, every test here is skipped with the reason.
``scripts/e2e-kind.sh`` sets ``TETHER_KIND_REQUIRED=1``: there, a missing piece is a
failure, so ``make e2e-kind`` can never pass by skipping everything.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator, Iterator

import pytest
from kind_support import (
    DEFAULT_CLUSTER,
    OPERATOR_DEPLOYMENT,
    OPERATOR_NAMESPACE,
    Consul,
    Etcd,
    KindCluster,
    PortForward,
    unavailable_reason,
)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Keep each phase's report on the item, so fixtures can tell a failed test
    # from a passed one and print diagnostics only when they help.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "report_call", None)
    return bool(report is not None and report.failed)


@pytest.fixture(scope="session")
def kind_cluster() -> KindCluster:
    name = os.environ.get("KIND_CLUSTER_NAME", DEFAULT_CLUSTER)
    required = os.environ.get("TETHER_KIND_REQUIRED") == "1"
    reason = unavailable_reason(name)
    if reason is not None:
        if required:
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = KindCluster.connect(name)
    deployment = cluster.kubectl(
        "get", "deployment", OPERATOR_DEPLOYMENT, "-n", OPERATOR_NAMESPACE, check=False
    )
    if deployment.returncode != 0:
        message = (
            f"kind cluster {name!r} has no Tether Deployment "
            f"({OPERATOR_NAMESPACE}/{OPERATOR_DEPLOYMENT}): run `make e2e-kind`"
        )
        if required:
            pytest.fail(message)
        pytest.skip(message)
    return cluster


@pytest.fixture(scope="session")
def consul(kind_cluster: KindCluster) -> Iterator[Consul]:
    forward = PortForward(kind_cluster, "consul", "consul-server", 8500)
    try:
        yield Consul(forward.url)
    finally:
        forward.close()


@pytest.fixture(scope="session")
def etcd(kind_cluster: KindCluster) -> Iterator[Etcd]:
    forward = PortForward(kind_cluster, "etcd", "etcd", 2379)
    try:
        yield Etcd(forward.url)
    finally:
        forward.close()


@pytest.fixture
def namespace(kind_cluster: KindCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of the test's own; deleted afterwards, with diagnostics on failure."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    kind_cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        if _failed(request):
            print(f"\n===== diagnostics for {request.node.name} ({name}) =====")
            print(kind_cluster.describe(name))
        # Deleting the namespace deletes the resources in it, and the operator
        # removes what they made in Consul and etcd before the finalizers let go.
        kind_cluster.kubectl(
            "delete", "namespace", name, "--wait=true", "--timeout=120s",
            check=False, timeout=180,
        )
