"""Leader failover time: SIGKILL the leader, time until the standby leads and reconciles.

Two ``tether run --leader-elect`` processes on the dev stack (``tether dev up``
first), one Lease; repeated ``--runs`` times (a fresh pair each run). Prints the
figures as JSON; asserts nothing. The bound is the Lease duration (15 s) plus one
retry period (2 s): a standby may take over only once the dead leader's lease expired.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.medians import Bench
from tether_dev.harness import devstack, kube
from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import timed as wait

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--env-file", type=Path, default=devstack.state_dir() / "env")
    args = parser.parse_args()
    bench = Bench.on_dev_stack(args.env_file, "failover")
    env, ns = bench.env, bench.ns
    takeovers, ready_after = [], []
    logs = Path(f"/tmp/tether-failover-{ns}")
    logs.mkdir(exist_ok=True)
    for run in range(args.runs):
        lease = f"lease-{run}"
        ops = [
            OperatorProcess(
                env,
                logs / f"{run}-{name}.log",
                args=("-n", ns, "--leader-elect"),
                extra_env={"POD_NAME": name, "POD_NAMESPACE": ns, "TETHER_LEASE_NAME": lease},
            ).start()
            for name in ("a", "b")
        ]
        try:
            wait(lambda ops=ops: sum(op.metrics().get("tether_leader", 0) for op in ops) == 1, 30, 0.1)
            leader = next(op for op in ops if op.metrics().get("tether_leader") == 1)
            standby = next(op for op in ops if op is not leader)
            killed = time.monotonic()
            leader.kill()
            wait(lambda standby=standby: standby.metrics().get("tether_leader") == 1, 40, 0.05)
            takeovers.append(time.monotonic() - killed)
            bench.create("consulservices", "ConsulService", f"after-{run}", {"port": 2000 + run})
            wait(lambda run=run: bench.ready("consulservices", f"after-{run}"), 30, 0.02)
            ready_after.append(time.monotonic() - killed)
        finally:
            for op in ops:
                op.stop()
    cleaner = OperatorProcess(env, logs / "cleaner.log", args=("-n", ns)).start()
    try:
        kube.kubectl(env, "delete", "consulservices", "--all", "-n", ns, "--timeout=60s", check=False)
    finally:
        cleaner.stop()
    print(
        json.dumps(
            {
                "runs": args.runs,
                "takeover_s": [round(t, 2) for t in takeovers],
                "takeover_median_s": round(statistics.median(takeovers), 2),
                "new_resource_ready_after_kill_median_s": round(statistics.median(ready_after), 2),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
