"""What the end-to-end, fault and kind suites and the benchmarks share.

Plain, synchronous, bounded helpers that drive real processes and servers from the
outside, as a person would with ``curl`` and ``kubectl``:

- :mod:`.ports` — a free loopback port;
- :mod:`.waiting` — poll until true, fail with a message after a deadline;
- :mod:`.devstack` — find, start and read the environment of a dev stack;
- :mod:`.operator` — ``tether run`` as a child process: logs, metrics, stop;
- :mod:`.kube` — kubectl, resources' conditions, waits that explain a failure;
- :mod:`.consul`, :mod:`.etcd` — the backends read and written over HTTP;
- :mod:`.suites` — pytest plumbing for conftests: folder marks, "did it fail?".

Besides the standard library these import only ``tether_dev``, PyYAML and (in
:mod:`.suites` alone) pytest: no Kubernetes or etcd client, and every address comes
from the caller, so a suite that reaches a remote cluster through port-forwards,
such as ``tests/kind``, can use the same modules. Import it as
``from tether_dev.harness import waiting`` (see ``tests/__init__.py`` for why that works
from pytest and from the benchmark scripts alike).
"""
