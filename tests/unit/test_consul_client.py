"""The Consul client's KV calls: HTTP answers sorted into results and the shared errors.

py-consul's HTTP layer is replaced by a stub that answers with a status,
headers and a body, so these tests pin how each answer is read: a 409 from
``/v1/txn`` is a failed guard (not an error), a 413 is "too many
operations" or "too large" (the engine shrinks its transactions), 401/403
are rejections, 5xx and timeouts mean "unavailable".
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tether import errors
from tether.clients.consul.client import (
    ConsulClient,
    ConsulRejected,
    ConsulRequestTooLarge,
    ConsulTooManyOps,
    ConsulUnavailable,
)
from tether.clients.consul.connection import ConsulConnection


@dataclass
class Response:
    code: int
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)


class StubHTTP:
    """Answers every request with the next response; records what was asked."""

    def __init__(self) -> None:
        self.responses: list[Response] = []
        self.requests: list[dict[str, Any]] = []
        self.hang = False

    async def _answer(self, callback: Callable[[Any], Any], **request: Any) -> Any:
        self.requests.append(request)
        if self.hang:
            await asyncio.Event().wait()
        return callback(self.responses.pop(0))

    async def get(
        self, callback: Callable[[Any], Any], path: str, params: Any = None, headers: Any = None
    ) -> Any:
        return await self._answer(callback, method="GET", path=path, params=params, headers=headers)

    async def put(
        self, callback: Callable[[Any], Any], path: str, params: Any = None, data: str = "",
        headers: Any = None,
    ) -> Any:
        return await self._answer(
            callback, method="PUT", path=path, params=params, data=data, headers=headers
        )


Stubbed = tuple[ConsulClient, StubHTTP]

# py-consul's own connector setup warns on recent aiohttp; not Tether's code.
pytestmark = pytest.mark.filterwarnings("ignore:ssl_context is deprecated:DeprecationWarning")


@pytest.fixture
async def stubbed() -> AsyncIterator[Stubbed]:
    client = ConsulClient(ConsulConnection(token="t0ken", timeout=0.2))
    real = client._http
    stub = StubHTTP()
    client._http = stub
    yield client, stub
    client._http = real
    await client.close()


def entry(key: str, value: bytes, index: int) -> dict[str, Any]:
    return {"Key": key, "Value": base64.b64encode(value).decode(), "ModifyIndex": index, "CreateIndex": 1}


async def test_kv_get_returns_the_entry_or_none(stubbed: Stubbed) -> None:
    client, http = stubbed
    http.responses = [Response(200, json.dumps([entry("app/a b", b"1", 7)])), Response(404)]
    assert await client.kv_get("app/a b") == entry("app/a b", b"1", 7)
    assert await client.kv_get("app/missing") is None
    assert http.requests[0]["path"] == "/v1/kv/app/a%20b"
    assert http.requests[0]["headers"] == {"X-Consul-Token": "t0ken"}


async def test_kv_tree_lists_recursively_and_blocks_with_an_index(stubbed: Stubbed) -> None:
    client, http = stubbed
    http.responses = [
        Response(200, json.dumps([entry("app/a", b"1", 7)]), {"X-Consul-Index": "42"}),
        Response(404, "", {"X-Consul-Index": "43"}),
    ]
    assert await client.kv_tree("app/") == (42, [entry("app/a", b"1", 7)])
    assert http.requests[0]["params"] == [("recurse", "true")]
    assert await client.kv_tree("app/", index=42, wait="1s") == (43, [])
    assert http.requests[1]["params"] == [("recurse", "true"), ("index", "42"), ("wait", "1s")]


async def test_kv_txn_applied_and_rolled_back(stubbed: Stubbed) -> None:
    client, http = stubbed
    ops = [{"KV": {"Verb": "cas", "Key": "app/a", "Value": "MQ==", "Index": 0}}]
    http.responses = [
        Response(200, json.dumps({"Results": [{"KV": {"Key": "app/a", "ModifyIndex": 9}}], "Errors": None})),
        Response(409, json.dumps({"Results": None, "Errors": [{"OpIndex": 0, "What": "failed to set key"}]})),
    ]
    assert await client.kv_txn(ops) == (True, [{"Key": "app/a", "ModifyIndex": 9}])
    assert (http.requests[0]["method"], http.requests[0]["path"]) == ("PUT", "/v1/txn")
    assert json.loads(http.requests[0]["data"]) == ops
    # A failed guard rolls the transaction back: a result, not an error.
    assert await client.kv_txn(ops) == (False, [])


@pytest.mark.parametrize(
    ("response", "error", "base"),
    [
        (Response(413, "Transaction contains too many operations (129 > 128)"), ConsulTooManyOps,
         errors.TooManyOperations),
        (Response(413, "Request body too large, max size: 524288 bytes"), ConsulRequestTooLarge,
         errors.RequestTooLarge),
        (Response(403, "Permission denied"), ConsulRejected, errors.BackendRejected),
        (Response(401, "ACL not found"), ConsulRejected, errors.BackendRejected),
        (Response(400, "Invalid verb"), ConsulRejected, errors.BackendRejected),
        (Response(500, "rpc error: No cluster leader"), ConsulUnavailable, errors.BackendUnavailable),
        (Response(503, "Service Unavailable"), ConsulUnavailable, errors.BackendUnavailable),
    ],
)
async def test_kv_txn_failures_become_the_shared_errors(
    stubbed: Stubbed, response: Response, error: type[Exception], base: type[Exception]
) -> None:
    client, http = stubbed
    http.responses = [response]
    with pytest.raises(error) as info:
        await client.kv_txn([{"KV": {"Verb": "check-not-exists", "Key": "app/a"}}])
    assert isinstance(info.value, base)
    assert "t0ken" not in str(info.value)


async def test_a_hung_agent_is_unavailable_within_the_timeout(stubbed: Stubbed) -> None:
    client, http = stubbed
    http.hang = True
    with pytest.raises(ConsulUnavailable, match="did not answer"):
        await client.kv_get("app/a")
