"""A quiet operator stops cleanly on SIGTERM (issue 23, item 5): exit code 0 and no
"worker threads still alive" warning, with and without leader election.

The threads that warning counted were Kopf's executor's: Kopf runs plain-function
handlers in a thread pool it never shuts down, and its idle threads outlived
every stop. Tether's Kopf handlers are coroutines now; this test fails if any
non-daemon thread is left at exit again.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether_dev.harness.kube import kubectl
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for


@pytest.fixture
def quiet_ns(dev_env: dict[str, str]) -> Iterator[str]:
    ns = f"x-stop-{uuid.uuid4().hex[:6]}"
    kubectl(dev_env, "create", "namespace", ns)
    yield ns
    kubectl(dev_env, "delete", "namespace", ns, "--wait=false", check=False)


def _ready(op: OperatorProcess) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{op.health_port}/readyz", timeout=2) as resp:
            return bool(json.loads(resp.read()).get("status") == "ready")
    except (OSError, urllib.error.HTTPError, ValueError):
        return False


@pytest.mark.parametrize("leader_elect", [False, True], ids=["single", "leader-elect"])
def test_sigterm_of_a_quiet_operator_exits_0_without_lingering_threads(
    dev_env: dict[str, str], tmp_path: Path, quiet_ns: str, leader_elect: bool
) -> None:
    args = ["-n", quiet_ns, *(["--leader-elect"] if leader_elect else [])]
    op = OperatorProcess(
        dev_env, tmp_path / "operator.log", args=args,
        extra_env={"POD_NAME": "quiet", "POD_NAMESPACE": quiet_ns, "TETHER_LEASE_NAME": f"l-{quiet_ns}"},
    ).start(timeout=90)
    try:
        wait_for(lambda: _ready(op) and "Initial authentication has finished" in op.log_text(),
                 timeout=90, interval=0.1, message="operator ready")
        time.sleep(3)  # quiet: watches established, nothing to do
        took = op.stop(grace=30)
        assert op.proc is not None
        log = op.log_text()
        print(f"SIGTERM: exited in {took:.2f}s (rc {op.proc.returncode})")
        assert "still alive after the stop" not in log, op.log_tail()
        assert "not stopped" not in log and "no exit" not in log, op.log_tail()
        assert op.proc.returncode == 0, op.log_tail()
    finally:
        op.kill()
