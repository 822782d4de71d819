"""Per-namespace watches: a reader waits for a new watch, but never for a failing one.

A watch stream's ERROR event is read by the same response check as an HTTP answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tether.clients.kube.http import KubeRejected, kube_error
from tether.clients.kube.watching import ENSURE_SECONDS, NamespaceWatches, _Watch
from tether.retrying import Retry


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


_RETRY = Retry("test", base=1.0, cap=1.0)


class _Stream:
    """A watch whose stream carries one ERROR event (a ``Status`` object)."""

    def __init__(self, code: int, message: str) -> None:
        self.event = {"type": "ERROR", "object": {"kind": "Status", "code": code, "message": message}}

    async def watch(self, path: str, **_: Any) -> AsyncIterator[dict[str, Any]]:
        yield self.event


def _watches(http: Any) -> NamespaceWatches:
    return NamespaceWatches(
        http, what="secrets", path="api/v1/namespaces/{namespace}/secrets",
        changed=lambda ns, meta: None, wanted=lambda ns: True, resync=lambda ns: None,
    )


async def test_an_expired_watch_asks_for_a_relist() -> None:
    watches = _watches(_Stream(410, "too old resource version: 5 (90)"))
    assert await watches._follow("team-a", _Watch(), "api/v1/namespaces/team-a/secrets", "5", _RETRY) is None


async def test_a_watch_error_event_goes_through_the_response_check() -> None:
    watches = _watches(_Stream(403, 'secrets is forbidden: User "tether" cannot watch'))
    with pytest.raises(KubeRejected) as info:
        await watches._follow("team-a", _Watch(), "api/v1/namespaces/team-a/secrets", "5", _RETRY)
    assert info.value.status == 403
    assert str(info.value).startswith("watch of secrets in team-a: 403 secrets is forbidden")
async def test_a_failing_watch_warns_once_however_often_it_retries(caplog: pytest.LogCaptureFixture) -> None:
    http = _Forbidden()
    watches = NamespaceWatches(
        http, what="secrets", path="api/v1/namespaces/{namespace}/secrets",  # type: ignore[arg-type]
        changed=lambda ns, meta: None, wanted=lambda ns: True, resync=lambda ns: None,
    )
    caplog.set_level(logging.DEBUG, logger="tether.clients.kube.watching")
    try:
        await watches.ensure("team-a")
        for _ in range(500):  # the second try comes after about 1 s; 5 s at most
            if http.lists >= 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await watches.stop()
    assert http.lists >= 2
    levels = [r.levelname for r in caplog.records]
    assert levels.count("WARNING") == 1 and levels[0] == "WARNING"
    assert "watch of secrets in team-a failed" in caplog.records[0].getMessage()
    assert "DEBUG" in levels
