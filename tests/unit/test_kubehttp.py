"""The asyncio session speaks as the identity the official config loader found."""

from __future__ import annotations

import kubernetes.client as k8s

from tether.clients.kube.http import METADATA, KubeHttp


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
