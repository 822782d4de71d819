"""Per-namespace watches: a reader waits for a new watch, but never for a failing one."""

from __future__ import annotations

import time
from typing import Any

from tether.clients.kube.http import kube_error
from tether.clients.kube.watching import ENSURE_SECONDS, NamespaceWatches


class _Forbidden:
    """An API server that refuses the list (a missing RBAC rule)."""

    def __init__(self) -> None:
        self.lists = 0

    async def get(self, path: str, **_: Any) -> Any:
        self.lists += 1
        raise kube_error(f"GET {path}", 403, b'{"message": "forbidden"}', "Forbidden")


async def test_a_reader_does_not_wait_again_for_a_watch_that_fails() -> None:
    http = _Forbidden()
    watches = NamespaceWatches(
        http, what="secrets", path="api/v1/namespaces/{namespace}/secrets",  # type: ignore[arg-type]
        changed=lambda ns, meta: None, wanted=lambda ns: True, resync=lambda ns: None,
    )
    try:
        started = time.monotonic()
        await watches.ensure("team-a")  # the first list fails at once
        first = time.monotonic() - started
        started = time.monotonic()
        await watches.ensure("team-a")
        second = time.monotonic() - started
        assert watches.namespaces() == ["team-a"]  # still retrying in the background
    finally:
        await watches.stop()
    assert http.lists >= 1
    # Neither reader waits out ENSURE_SECONDS for a watch whose start failed:
    # they read at once, and the watch resyncs the namespace when it is up.
    assert first < 0.5 < ENSURE_SECONDS
    assert second < 0.5
