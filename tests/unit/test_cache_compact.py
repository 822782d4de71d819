"""What the skeleton's cache keeps of a body: what a reconcile reads, with shared strings."""

from __future__ import annotations

import json
from typing import Any

from tether.reconciling import compact, slim

BODY: dict[str, Any] = {
    "apiVersion": "tether.dev/v1alpha1",
    "kind": "ConsulService",
    "metadata": {
        "name": "a", "namespace": "ns", "uid": "u-1", "generation": 2, "resourceVersion": "17",
        "finalizers": ["tether.dev/finalizer"],
        "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
    },
    "spec": {"name": "web", "port": 80, "tags": ["a", "b"], "meta": {"team": "x"}},
    "status": {
        "observedGeneration": 2,
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Reconciled", "observedGeneration": 2,
             "lastTransitionTime": "2026-12-08T00:03:53Z",
             "message": "Registered as 'ns-a' with the Consul agent http://127.0.0.1:8500 " * 2},
        ],
    },
}


def _decoded() -> dict[str, Any]:
    """The body as one watch event delivers it: decoded on its own."""
    decoded: dict[str, Any] = json.loads(json.dumps(BODY))
    return decoded


def test_slim_keeps_what_a_reconcile_reads_and_drops_the_rest() -> None:
    kept = slim(_decoded())
    assert kept["spec"] == BODY["spec"] and kept["status"] == BODY["status"]
    kept_metadata = {"name", "namespace", "uid", "generation", "resourceVersion", "finalizers"}
    assert set(kept["metadata"]) == kept_metadata
    assert "apiVersion" not in kept and "kind" not in kept


def test_two_bodies_decoded_apart_share_their_keys_and_short_strings() -> None:
    one, two = slim(_decoded()), slim(_decoded())
    c1, c2 = one["status"]["conditions"][0], two["status"]["conditions"][0]
    k1 = next(k for k in c1 if k == "lastTransitionTime")
    k2 = next(k for k in c2 if k == "lastTransitionTime")
    assert k1 is k2
    for field in ("type", "status", "reason", "lastTransitionTime"):
        assert c1[field] is c2[field], field
    # A long message is copied as it is: one resource's alone, interning would not share it.
    assert c1["message"] == c2["message"] and c1["message"] is not c2["message"]
    # Decoding alone shares nothing between events: what compact() is for.
    raw1, raw2 = _decoded()["status"]["conditions"][0], _decoded()["status"]["conditions"][0]
    assert raw1["reason"] is not raw2["reason"]


def test_compact_copies_and_keeps_every_json_type() -> None:
    value = {"a": [1, 2.5, None, True, "x", {"b": "y" * 100}], "c": {}}
    out = compact(value)
    assert out == value and out is not value and out["a"] is not value["a"]
