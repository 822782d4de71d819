"""Set-up shared by every suite, before any test module imports gRPC.

gRPC's fork handlers are turned off in the test processes. The suites start and
restart etcd, Consul and operators with ``subprocess`` while etcd clients run in the
same process. With the handlers on, a fork that meets gRPC threads at work logs
"Other threads are currently calling into gRPC, skipping fork() handlers", and the
child could crash before its ``exec``: once, the restart of a killed etcd member
never started (a segmentation fault in the forked child, in the HA client fault
test). A child that only runs ``exec`` needs no gRPC state, so the handlers have
nothing to protect here. The operator itself never forks.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
