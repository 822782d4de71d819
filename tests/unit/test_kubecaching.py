"""Per-namespace caches of full objects: paged list, then watch; only slim views kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from tether.clients.kube.caching import NamespaceCaches
from tether.clients.kube.http import kube_error


def _pod(name: str, rv: str, *, keep: bool = True, value: str = "") -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": rv}, "keep": keep, "value": value}


def _slim(obj: dict[str, Any]) -> str | None:
    return str(obj["value"]) if obj.get("keep") else None


class _Server:
    """Two list pages, then one watch request with the given events, then silence."""

    def __init__(self, events: list[dict[str, Any]], *, forbid: bool = False) -> None:
        self.events = events
        self.forbid = forbid
        self.lists: list[dict[str, str]] = []
        self.watches: list[dict[str, str]] = []
        self.idle = asyncio.Event()
        self.go = asyncio.Event()  # the watch's events wait for the test's first read

    async def get(self, path: str, *, params: dict[str, str], **_: Any) -> Any:
        self.lists.append(dict(params))
        if self.forbid:
            raise kube_error(f"GET {path}", 403, b'{"message": "forbidden"}', "Forbidden")
        if "continue" not in params:
            return {"metadata": {"resourceVersion": "10", "continue": "page2"},
                    "items": [_pod("a", "5", value="a0"), _pod("b", "6", keep=False)]}
        return {"metadata": {"resourceVersion": "10"}, "items": [_pod("c", "7", value="c0")]}

    async def watch(self, path: str, *, params: dict[str, str], **_: Any) -> AsyncIterator[dict[str, Any]]:
        self.watches.append(dict(params))
        if len(self.watches) == 1:
            await self.go.wait()
            for event in self.events:
                yield event
        self.idle.set()
        await asyncio.sleep(3600)


async def test_list_then_watch_keeps_only_slim_views_and_reports_changes() -> None:
    server = _Server([
        {"type": "MODIFIED", "object": _pod("a", "11", value="a1")},
        {"type": "MODIFIED", "object": _pod("a", "12", value="a1")},  # same slim view: no change
        {"type": "ADDED", "object": _pod("d", "13", keep=False)},  # not kept, not reported
        {"type": "MODIFIED", "object": _pod("c", "14", keep=False)},  # no longer kept: reported
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}},
        {"type": "DELETED", "object": _pod("a", "16", value="a1")},
    ])
    changes: list[tuple[str, str]] = []
    caches: NamespaceCaches[str] = NamespaceCaches(
        server, what="pods", path="api/v1/namespaces/{namespace}/pods",  # type: ignore[arg-type]
        slim=_slim, changed=lambda ns, name: changes.append((ns, name)), wanted=lambda ns: True,
    )
    try:
        first = await caches.items("team-a")
        assert first == {"a": "a0", "c": "c0"}  # both pages, "b" not kept
        server.go.set()
        await asyncio.wait_for(server.idle.wait(), 5)
        assert await caches.items("team-a") == {}
        assert server.watches[0]["resourceVersion"] == "10"  # from the list, nothing replayed
        assert [c[1] for c in changes] == ["a", "c", "a", "c", "a"]
        assert caches.namespaces() == ["team-a"]
    finally:
        await caches.stop()


async def test_a_forbidden_list_answers_empty_at_once_and_retries() -> None:
    server = _Server([], forbid=True)
    caches: NamespaceCaches[str] = NamespaceCaches(
        server, what="pods", path="api/v1/namespaces/{namespace}/pods",  # type: ignore[arg-type]
        slim=_slim, changed=lambda ns, name: None, wanted=lambda ns: True,
    )
    try:
        started = time.monotonic()
        assert await caches.items("team-a") == {}
        assert time.monotonic() - started < 1.0
        assert caches.namespaces() == ["team-a"]  # still trying in the background
    finally:
        await caches.stop()


async def test_lost_history_relists() -> None:
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}
    server = _Server([gone])
    caches: NamespaceCaches[str] = NamespaceCaches(
        server, what="pods", path="api/v1/namespaces/{namespace}/pods",  # type: ignore[arg-type]
        slim=_slim, changed=lambda ns, name: None, wanted=lambda ns: True,
    )
    try:
        await caches.items("team-a")
        server.go.set()
        await asyncio.wait_for(server.idle.wait(), 5)
        assert len([p for p in server.lists if "continue" not in p]) == 2  # listed again after the 410
    finally:
        await caches.stop()
