"""The dev stack: a real Kubernetes control plane, etcd and Consul on one machine.

``tether dev up`` (see :mod:`tether.cli`) drives :class:`stack.DevStack`; tests use
the same class through ``tests/e2e/conftest.py``. The package is layered, each
module using only the ones listed before it:

- :mod:`reporting` — the error type and the progress callback;
- :mod:`ports`, :mod:`envfiles`, :mod:`commands` — pure: port choice, the env
  file, and the command lines / config files of each program;
- :mod:`locks`, :mod:`processes`, :mod:`probes`, :mod:`certificates` — small I/O
  helpers: file locks, detached processes, readiness polling, ``openssl``;
- :mod:`binaries` — find ``kube-apiserver``, ``kubectl``, ``etcd`` and ``consul``,
  or build them from the pinned Go modules in ``devbin/``;
- :mod:`stack` — starts, checks and stops the four components.
"""
