"""The optional admission component on kind: a forbidden resource is rejected at ``kubectl apply``.

``manifests/components/policy-admission/`` is a kustomize Component, so it is
installed as a user would: an overlay of its own that lists it under
``components`` (the Tether install itself is already in the cluster), built and
applied with ``kubectl apply -k``. The API server then refuses, before anything is
stored, what breaks the team convention in a namespace labelled
``tether.dev/team`` — nothing reaches the operator, Consul or etcd — while what
keeps to it is stored and reconciled as usual. Removed again with
``kubectl delete -k`` afterwards.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kind_support import REPO, Consul, KindCluster, Manifest, wait_for

pytestmark = pytest.mark.kind

COMPONENT = REPO / "manifests" / "components" / "policy-admission"


@pytest.fixture
def admission(kind_cluster: KindCluster, tmp_path: Path) -> Iterator[Path]:
    """The component applied through an overlay of its own; deleted afterwards."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"components:\n  - {os.path.relpath(COMPONENT, overlay)}\n"
    )
    kind_cluster.kubectl("apply", "-k", str(overlay))
    try:
        yield overlay
    finally:
        kind_cluster.kubectl("delete", "-k", str(overlay), "--ignore-not-found", check=False)


def _resource(kind: str, namespace: str, object_name: str, **spec: object) -> Manifest:
    """A Tether resource; ``object_name`` is its metadata name (``spec`` may have a ``name``)."""
    return {
        "apiVersion": "tether.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": object_name, "namespace": namespace},
        "spec": spec,
    }


def test_a_forbidden_resource_is_rejected_at_apply(
    kind_cluster: KindCluster, consul: Consul, namespace: str, admission: Path
) -> None:
    team = f"team{uuid.uuid4().hex[:6]}"
    kind_cluster.kubectl("label", "namespace", namespace, f"tether.dev/team={team}")
    hijack = _resource("ConsulService", namespace, "payments", name="payments", address="6.6.6.6", port=80)

    # The API server compiles a new admission policy a moment after it is created:
    # wait for it with dry runs, so that no real apply can slip in before it.
    def refused_dry_run() -> bool:
        proc = kind_cluster.kubectl(
            "apply", "--dry-run=server", "-f", "-", input=_json(hijack), check=False
        )
        return proc.returncode != 0

    wait_for(refused_dry_run, timeout=60, message="the admission policy to take effect")

    applied = kind_cluster.kubectl("apply", "-f", "-", input=_json(hijack), check=False)
    assert applied.returncode != 0, applied.stdout
    assert "payments" in applied.stderr and "not allowed" in applied.stderr, applied.stderr
    assert "ValidatingAdmissionPolicy" in applied.stderr, applied.stderr
    # Never stored, so never reconciled: nothing of it in Consul.
    stored = kind_cluster.kubectl("get", "consulservice", "payments", "-n", namespace, check=False)
    assert stored.returncode != 0 and "NotFound" in stored.stderr, stored
    assert consul.service(f"{namespace}-payments") is None

    adopt = _resource("EtcdConfig", namespace, "cfg", prefix=f"/{team}/cfg", adopt=True, data={"k": "v"})
    refused = kind_cluster.kubectl("apply", "-f", "-", input=_json(adopt), check=False)
    assert refused.returncode != 0 and "adopt" in refused.stderr, refused.stderr
    other = _resource("ConsulConfig", namespace, "kv", prefix=f"not-{team}", data={"k": "v"})
    refused = kind_cluster.kubectl("apply", "-f", "-", input=_json(other), check=False)
    assert refused.returncode != 0 and "not allowed" in refused.stderr, refused.stderr

    # What keeps to the convention goes through and becomes Ready as usual.
    own = _resource("ConsulService", namespace, "api", name=f"{team}-api", address="10.0.0.40", port=80)
    kind_cluster.apply(own)
    kind_cluster.wait_ready("consulservice", "api", namespace)
    assert consul.service(f"{namespace}-api") is not None


def _json(manifest: Manifest) -> str:
    return json.dumps(manifest)
