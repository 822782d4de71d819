"""Tether's tests. A package only so that ``tests.support`` has one importable name.

The suites themselves (``unit``, ``e2e``, ``faults``, ``kind``) stay plain folders that
pytest puts on ``sys.path`` one by one; the repository root is put there by pytest's
``pythonpath`` setting (pyproject.toml) and by the benchmark scripts, so both import
the shared code as ``tests.support``. A regular package rather than a namespace one,
because a namespace ``tests`` loses to any installed distribution that ships a
top-level ``tests`` package.
"""
