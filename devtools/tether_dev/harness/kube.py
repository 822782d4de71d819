"""Kubernetes from a test's side: kubectl, resources' conditions, waits that explain themselves.

Every call is bounded in time, and a failure says what was run and what came back,
so a red test explains itself. kubectl rather than a client library: it is what the
README's reader types, and it needs nothing but a kubeconfig in the env.

The dev stack runs no kube-controller-manager, so nothing deletes a namespace's
contents or finalizes a deleted namespace: delete what a test created first, then
drop the namespace with :func:`delete_namespace`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

import yaml

from tether_dev.harness.operator import OperatorProcess
from tether_dev.harness.waiting import wait_for

#: Bound on one kubectl call; `kubectl wait` callers pass their own --timeout below it.
KUBECTL_TIMEOUT = 120.0
#: Tether's API group and version, as the CRDs in crds/ serve them.
API_VERSION = "tether.dev/v1alpha1"


class KubectlError(AssertionError):
    """kubectl failed or took too long; the message carries its stderr.

    An AssertionError, so pytest reports it as a test failure rather than an error
    in the test's machinery.
    """


def kubectl(
    env: Mapping[str, str],
    *args: str,
    input: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``kubectl *args`` with ``env`` (e.g. the ``dev_env`` fixture) and return the result.

    Text mode, output captured, at most :data:`KUBECTL_TIMEOUT` seconds. With
    ``check`` (the default) a non-zero exit raises :class:`KubectlError` quoting
    stderr; with ``check=False`` the caller looks at ``returncode`` itself.
    """
    # The dev env holds only the stack's variables; kubectl also needs HOME etc.
    full = {**os.environ, **env}
    # Resolve against the env's PATH, so the stack's kubectl wins over any other.
    program = shutil.which("kubectl", path=full.get("PATH")) or "kubectl"
    try:
        done = subprocess.run(
            [program, *args],
            input=input,
            capture_output=True,
            text=True,
            env=full,
            timeout=KUBECTL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise KubectlError(
            f"`kubectl {' '.join(args)}` did not finish within {KUBECTL_TIMEOUT:.0f} s"
        ) from exc
    if check and done.returncode != 0:
        raise KubectlError(
            f"`kubectl {' '.join(args)}` failed (exit {done.returncode})\n"
            f"stderr:\n{done.stderr.strip()}\nstdout:\n{done.stdout.strip()}"
        )
    return done


def delete_namespace(env: Mapping[str, str], name: str) -> None:
    """Delete namespace ``name`` without a controller-manager to finalize it.

    Deletes it (without waiting), then clears the ``kubernetes`` finalizer through
    the ``/finalize`` subresource, which is the namespace controller's last step.
    Objects still inside are *not* deleted: delete them first.
    """
    kubectl(env, "delete", "namespace", name, "--wait=false", "--ignore-not-found")
    got = kubectl(env, "get", "namespace", name, "-o", "json", "--ignore-not-found")
    if not got.stdout.strip():
        return
    namespace = json.loads(got.stdout)
    namespace["spec"]["finalizers"] = []
    kubectl(
        env, "replace", "--raw", f"/api/v1/namespaces/{name}/finalize", "-f", "-", input=json.dumps(namespace)
    )
    wait_for(
        lambda: not kubectl(env, "get", "namespace", name, "--ignore-not-found").stdout.strip(),
        timeout=30,
        message=f"namespace {name} to disappear",
    )


def resource(kind: str, name: str, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A Tether object (``ConsulService``, ``EtcdConfig``) as a manifest; no ``spec`` key if None."""
    obj: dict[str, Any] = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}}
    if spec is not None:
        obj["spec"] = dict(spec)
    return obj


def apply(env: Mapping[str, str], namespace: str, obj: dict[str, Any]) -> None:
    """``kubectl apply`` one object into ``namespace`` (set on ``obj``'s metadata)."""
    obj.setdefault("metadata", {})["namespace"] = namespace
    kubectl(env, "apply", "-f", "-", input=yaml.safe_dump(obj))


def get(env: Mapping[str, str], namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    """The object as JSON, or None if kubectl cannot get it (absent, or the server away)."""
    done = kubectl(env, "get", kind, name, "-n", namespace, "-o", "json", check=False)
    if done.returncode != 0:
        return None
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def events(env: Mapping[str, str], namespace: str, name: str) -> list[dict[str, Any]]:
    """The events about object ``name`` in ``namespace``."""
    done = kubectl(
        env, "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    )
    items: list[dict[str, Any]] = json.loads(done.stdout)["items"]
    return items


def condition(obj: Mapping[str, Any] | None, type_: str = "Ready") -> dict[str, Any]:
    """The condition ``type_`` of ``obj`` ({} if none)."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def is_ready(obj: Mapping[str, Any] | None) -> bool:
    """Ready=True at the current generation: the contract's meaning of done."""
    if not obj:
        return False
    status = obj.get("status") or {}
    return condition(obj).get("status") == "True" and status.get("observedGeneration") == obj[
        "metadata"
    ].get("generation")


def diagnose(env: Mapping[str, str], namespace: str, kind: str, name: str, op: OperatorProcess | None) -> str:
    """What a person needs when a wait fails: status, events, operator log tail."""
    obj = get(env, namespace, kind, name)
    evs = [f"{e.get('reason')}: {e.get('message')}" for e in events(env, namespace, name)][-10:]
    return (
        f"\n--- {kind}/{name} status:\n{json.dumps((obj or {}).get('status'), indent=1)}"
        f"\n--- events:\n" + "\n".join(evs) + (f"\n--- operator log:\n{op.log_tail()}" if op else "")
    )


def wait_condition(
    env: Mapping[str, str],
    namespace: str,
    kind: str,
    name: str,
    *,
    status: str = "True",
    reason: str | None = None,
    type_: str = "Ready",
    timeout: float = 30,
    op: OperatorProcess | None = None,
) -> dict[str, Any]:
    """Wait until a condition has ``status`` (and ``reason``) at the current generation.

    Returns the object as last read; on timeout the error carries :func:`diagnose`.
    """
    last: dict[str, Any] = {}

    def check() -> bool:
        obj = get(env, namespace, kind, name)
        if obj is None:
            return False
        last.clear()
        last.update(obj)
        cond = condition(obj, type_)
        return (
            cond.get("status") == status
            and (reason is None or cond.get("reason") == reason)
            and (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]
        )

    try:
        wait_for(
            check, timeout=timeout, interval=0.2, message=f"{kind}/{name} {type_}={status} {reason or ''}"
        )
    except Exception as exc:
        raise AssertionError(f"{exc}{diagnose(env, namespace, kind, name, op)}") from None
    return last


def wait_gone(env: Mapping[str, str], namespace: str, kind: str, name: str, timeout: float = 30) -> None:
    """Wait until ``kind/name`` can no longer be read."""
    wait_for(
        lambda: get(env, namespace, kind, name) is None,
        timeout=timeout,
        interval=0.2,
        message=f"{kind}/{name} to be deleted",
    )
