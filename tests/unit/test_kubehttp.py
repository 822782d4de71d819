"""The asyncio session: the identity the official config loader found, and its one response check."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import kubernetes.client as k8s
import pytest
from aiohttp import web

from tether import errors
from tether.clients.kube.http import (
    METADATA,
    KubeConflict,
    KubeError,
    KubeGone,
    KubeHttp,
    KubeNotFound,
    KubeRejected,
    KubeUnavailable,
    kube_error,
)


def test_bearer_tokens_as_the_config_loaders_store_them() -> None:
    # load_kube_config and load_incluster_config store "Bearer <token>" under
    # BearerToken; the in-cluster one also sets a hook that re-reads a rotated token.
    conf = k8s.Configuration()
    conf.api_key["BearerToken"] = "Bearer one"
    tokens = iter(["Bearer two", "Bearer three"])
    conf.refresh_api_key_hook = lambda c: c.api_key.update(BearerToken=next(tokens))
    http = KubeHttp(conf)
    assert http._headers(METADATA) == {"Accept": METADATA, "Authorization": "Bearer two"}
    assert http._headers("application/json")["Authorization"] == "Bearer three"


def test_no_token_no_header() -> None:
    assert KubeHttp(k8s.Configuration())._headers("application/json") == {"Accept": "application/json"}


# --------------------------------------------------------------------------- the one response check


@pytest.mark.parametrize(
    ("status", "error", "base"),
    [
        (0, KubeUnavailable, errors.BackendUnavailable),
        (500, KubeUnavailable, errors.BackendUnavailable),
        (502, KubeUnavailable, errors.BackendUnavailable),
        (503, KubeUnavailable, errors.BackendUnavailable),
        (504, KubeUnavailable, errors.BackendUnavailable),
        (429, KubeUnavailable, errors.BackendUnavailable),
        (408, KubeUnavailable, errors.BackendUnavailable),
        (400, KubeRejected, errors.BackendRejected),
        (401, KubeRejected, errors.BackendRejected),
        (403, KubeRejected, errors.BackendRejected),
        (422, KubeRejected, errors.BackendRejected),
        (405, KubeRejected, errors.BackendRejected),
        (404, KubeNotFound, errors.BackendRejected),
        (409, KubeConflict, errors.Contended),
        (410, KubeGone, errors.BackendUnavailable),
    ],
)
def test_each_status_class_is_one_type_under_one_base(
    status: int, error: type[KubeError], base: type[errors.BackendError]
) -> None:
    exc = kube_error("read ConfigMap a/b", status, b'{"kind": "Status", "message": "what the server said"}')
    assert type(exc) is error
    assert isinstance(exc, base) and isinstance(exc, KubeError) and isinstance(exc, errors.BackendError)
    assert exc.status == status
    assert str(exc).startswith("read ConfigMap a/b: ")


def test_the_types_do_not_overlap() -> None:
    # The skeleton catches NotFound and Conflict before KubeError: neither may
    # also be the other, and a rejection is never retried as unavailable.
    assert not issubclass(KubeNotFound, KubeConflict | KubeUnavailable | KubeRejected)
    assert not issubclass(KubeConflict, KubeNotFound | KubeUnavailable | KubeRejected)
    assert not issubclass(KubeRejected, errors.BackendUnavailable)
    assert not issubclass(KubeUnavailable, errors.BackendRejected)


def test_the_message_keeps_the_status_the_reason_and_the_servers_words() -> None:
    exc = kube_error(
        "patch status of x", 422, b'{"message": "spec.port: Invalid value"}', "Unprocessable Entity"
    )
    assert str(exc) == "patch status of x: 422 Unprocessable Entity: spec.port: Invalid value"
    # A body that is not a Status is quoted as it came, cut short.
    assert str(kube_error("GET x", 502, b"<html>" + b"x" * 1000)) == "GET x: 502 <html>" + "x" * 294
    # A watch stream's ERROR event carries a decoded Status.
    event = kube_error("watch of secrets in a", 403, {"code": 403, "message": "secrets is forbidden"})
    assert (type(event), str(event)) == (KubeRejected, "watch of secrets in a: 403 secrets is forbidden")
    # No HTTP answer: the transport's words, status 0.
    down = kube_error("GET x", 0, "ClientConnectorError: connection refused")
    assert (type(down), down.status) == (KubeUnavailable, 0)
    assert str(down) == "GET x: ClientConnectorError: connection refused"


@contextlib.asynccontextmanager
async def _serve(status: int, body: bytes) -> AsyncIterator[KubeHttp]:
    """A loopback server that answers every request with ``status`` and ``body``."""
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    conf = k8s.Configuration(host=f"http://127.0.0.1:{port}")
    http = KubeHttp(conf, request_timeout=5)
    try:
        yield http
    finally:
        await http.close()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "error"),
    [(403, KubeRejected), (404, KubeNotFound), (409, KubeConflict), (503, KubeUnavailable)],
)
async def test_requests_and_watches_raise_through_the_check(status: int, error: type[KubeError]) -> None:
    async with _serve(status, b'{"kind": "Status", "message": "no"}') as http:
        with pytest.raises(error) as info:
            await http.request("PATCH", "apis/x/v1/namespaces/a/things/b", body={}, what="patch b")
        assert info.value.status == status and str(info.value).startswith(f"patch b: {status} ")
        with pytest.raises(error) as info:
            async for _ in http.watch("api/v1/namespaces/a/secrets", params={}, accept=METADATA,
                                      timeout_seconds=1):
                pass
        assert info.value.status == status


async def test_a_client_that_reaches_no_server_is_unavailable() -> None:
    async with _serve(200, b"{}") as http:
        port = int(http._conf.host.rsplit(":", 1)[1])
    # The server is gone now: connection refused.
    http = KubeHttp(k8s.Configuration(host=f"http://127.0.0.1:{port}"), request_timeout=5)
    try:
        with pytest.raises(KubeUnavailable) as info:
            await http.get("api/v1/namespaces/a/configmaps/b", params={})
        assert info.value.status == 0
    finally:
        await http.close()
