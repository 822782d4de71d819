"""The Consul client's calls: HTTP answers sorted into results and the shared errors.

py-consul's HTTP layer is replaced by a stub that answers with a status,
headers and a body, so these tests pin how each answer is read: a 409 from
``/v1/txn`` is a failed guard (not an error), a 413 is "too many
operations" or "too large" (the engine shrinks its transactions), 401/403
are rejections, 5xx and timeouts mean "unavailable". Every failure, whether
py-consul raised it or a raw answer carried it, goes through one mapping,
:func:`consul_error`, pinned here case by case.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from consul import exceptions as consul_errors

from tether import errors
from tether.clients.consul.client import (
    ConsulClient,
    ConsulContended,
    ConsulError,
    ConsulRejected,
    ConsulRequestTooLarge,
    ConsulTooManyOps,
    ConsulUnavailable,
    consul_error,
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
    # The raw HTTP client of the session in use (a rotation would replace the session).
    session = client._session.client
    real = session.http
    stub = StubHTTP()
    session.http = stub
    yield client, stub
    session.http = real
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


async def test_a_kv_transaction_refused_by_the_acl_is_rejected_not_rolled_back(stubbed: Stubbed) -> None:
    client, http = stubbed
    # Consul answers 409 for a transaction with an op the token may not write.
    http.responses = [Response(409, json.dumps({"Errors": [{"OpIndex": 0, "What": "Permission denied"}]}))]
    with pytest.raises(ConsulRejected, match="CONSUL_HTTP_TOKEN"):
        await client.kv_txn([{"KV": {"Verb": "set", "Key": "app/a", "Value": "MQ=="}}])


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


# --------------------------------------------------------------------------- the one mapping


@pytest.mark.parametrize(
    ("failure", "error", "base"),
    [
        (TimeoutError(), ConsulUnavailable, errors.BackendUnavailable),
        (aiohttp.ClientConnectionError("refused"), ConsulUnavailable, errors.BackendUnavailable),
        (ConnectionRefusedError(111, "refused"), ConsulUnavailable, errors.BackendUnavailable),
        (consul_errors.Timeout(), ConsulUnavailable, errors.BackendUnavailable),
        (consul_errors.ConsulException("500 rpc error: No cluster leader"), ConsulUnavailable,
         errors.BackendUnavailable),
        (consul_errors.ConsulException("Failed to decode JSON: <html>"), ConsulUnavailable,
         errors.BackendUnavailable),
        (consul_errors.ClientError("429 rate limit exceeded"), ConsulUnavailable, errors.BackendUnavailable),
        (consul_errors.ACLPermissionDenied("Permission denied"), ConsulRejected, errors.BackendRejected),
        (consul_errors.ACLDisabled("ACL support disabled"), ConsulRejected, errors.BackendRejected),
        (consul_errors.ConsulException("500 rpc error: ACL not found"), ConsulRejected,
         errors.BackendRejected),
        (consul_errors.BadRequest("400 Invalid service address"), ConsulRejected, errors.BackendRejected),
        (consul_errors.ClientError("405 method not allowed"), ConsulRejected, errors.BackendRejected),
        (consul_errors.NotFound("Unknown service"), ConsulRejected, errors.BackendRejected),
        (consul_errors.ClientError("413 Request body too large"), ConsulRequestTooLarge,
         errors.RequestTooLarge),
        (consul_errors.ClientError("409 index is stale"), ConsulContended, errors.Contended),
    ],
)
def test_each_py_consul_failure_is_one_type_under_one_base(
    failure: BaseException, error: type[Exception], base: type[Exception]
) -> None:
    exc = consul_error("registration of 'web'", failure, agent="http://127.0.0.1:8500", deadline=5)
    assert type(exc) is error and isinstance(exc, base) and isinstance(exc, ConsulError)
    assert "registration of 'web'" in str(exc)


@pytest.mark.parametrize(
    ("code", "body", "error", "base"),
    [
        (500, "rpc error: No cluster leader", ConsulUnavailable, errors.BackendUnavailable),
        (503, "", ConsulUnavailable, errors.BackendUnavailable),
        (429, "rate limit exceeded", ConsulUnavailable, errors.BackendUnavailable),
        (401, "ACL not found", ConsulRejected, errors.BackendRejected),
        (403, "Permission denied", ConsulRejected, errors.BackendRejected),
        (400, "Invalid verb", ConsulRejected, errors.BackendRejected),
        (404, "", ConsulRejected, errors.BackendRejected),
        (413, "Transaction contains too many operations (129 > 128)", ConsulTooManyOps,
         errors.TooManyOperations),
        (413, "Request body too large", ConsulRequestTooLarge, errors.RequestTooLarge),
        (409, json.dumps({"Errors": [{"OpIndex": 0, "What": "index is stale"}]}), ConsulContended,
         errors.Contended),
        # A transaction refused for its ACL is a rejection, not contention.
        (409, json.dumps({"Errors": [{"OpIndex": 0, "What": "Permission denied"}]}), ConsulRejected,
         errors.BackendRejected),
    ],
)
def test_each_http_answer_is_one_type_under_one_base(
    code: int, body: str, error: type[Exception], base: type[Exception]
) -> None:
    exc = consul_error("catalog transaction of 2 operations", code=code, body=body)
    assert type(exc) is error and isinstance(exc, base) and isinstance(exc, ConsulError)


def test_the_messages_say_what_failed_and_what_to_check() -> None:
    agent = "http://127.0.0.1:8500"
    assert str(consul_error("read of service 'web'", TimeoutError(), agent=agent, deadline=5)) == (
        "Consul agent at http://127.0.0.1:8500 did not answer read of service 'web' within 5s"
    )
    assert "check CONSUL_HTTP_TOKEN and its policy" in str(
        consul_error("registration of 'web'", consul_errors.ACLPermissionDenied("Permission denied"))
    )
    stale = json.dumps({"Errors": [{"OpIndex": 1, "What": "index is stale"}]})
    assert str(consul_error("catalog transaction of 2 operations", code=409, body=stale)) == (
        "Consul rolled catalog transaction of 2 operations back: index is stale"
    )
    assert str(consul_error("list of agent checks", code=502, body="Bad\n  Gateway")) == (
        "Consul failed list of agent checks: 502 Bad Gateway"
    )


async def test_agent_calls_map_py_consuls_exceptions(stubbed: Stubbed) -> None:
    client, http = stubbed
    http.responses = [Response(403, "Permission denied"), Response(500, "No cluster leader"),
                      Response(400, "Invalid check")]
    with pytest.raises(ConsulRejected, match=r"registration of 'web'.*CONSUL_HTTP_TOKEN"):
        await client.register({"ID": "web"})
    with pytest.raises(ConsulUnavailable, match="list of agent services: 500 No cluster leader"):
        await client.services()
    with pytest.raises(ConsulRejected, match="deregistration of 'web': 400 Invalid check"):
        await client.deregister("web")


async def test_blocking_watches_return_the_index_and_map_failures(stubbed: Stubbed) -> None:
    client, http = stubbed
    http.responses = [Response(200, "{}", {"X-Consul-Index": "77"}), Response(403, "Permission denied")]
    assert await client.wait_services(12, "1s") == 77
    assert http.requests[0]["params"] == [("index", "12"), ("wait", "1s")]
    with pytest.raises(ConsulRejected):
        await client.wait_health(12, "1s")


async def test_catalog_answers(stubbed: Stubbed) -> None:
    client, http = stubbed
    stale = json.dumps({"Errors": [{"OpIndex": 0, "What": "index is stale"}]})
    http.responses = [Response(200, "{}"), Response(409, stale), Response(404, "", {"X-Consul-Index": "5"}),
                      Response(429, "rate limited")]
    await client.catalog_txn([{"Service": {"Verb": "set"}}])
    with pytest.raises(ConsulContended, match="index is stale"):
        await client.catalog_txn([{"Service": {"Verb": "cas"}}])
    assert await client.node_services("n1") == (5, None, [])
    with pytest.raises(ConsulUnavailable):
        await client.node_checks("n1")
