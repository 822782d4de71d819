"""Small helpers for end-to-end tests: run kubectl, wait for a condition.

Every call is bounded in time, and a failure says what was run and what came back,
so a red test explains itself. Import them as ``from helpers import kubectl,
wait_for`` (pytest puts ``tests/e2e``, which has no ``__init__.py``, on
``sys.path``).

The dev stack runs no kube-controller-manager, so nothing deletes a namespace's
contents or finalizes a deleted namespace: delete what a test created first, then
drop the namespace with :func:`delete_namespace`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Bound on one kubectl call; `kubectl wait` callers pass their own --timeout below it.
KUBECTL_TIMEOUT = 120.0
#: Bound on one `tether dev ...` call. `up` takes seconds once the binaries exist
#: (the e2e conftest makes sure they do before any test starts).
UP_TIMEOUT = 300.0


def state_dir() -> Path:
    """The shared dev stack's state directory: $TETHER_DEV_DIR, else <repo>/.tether/dev."""
    explicit = os.environ.get("TETHER_DEV_DIR")
    return Path(explicit).resolve() if explicit else REPO_ROOT / ".tether" / "dev"


def tether(*args: str, timeout: float = UP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run this checkout's ``tether`` CLI; raise with its output if it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "tether.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"`tether {' '.join(args)}` failed (exit {done.returncode})\n"
            f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
    return done


class KubectlError(AssertionError):
    """kubectl failed or took too long; the message carries its stderr.

    An AssertionError, so pytest reports it as a test failure rather than an error
    in the test's machinery.
    """


def _full_env(env: Mapping[str, str]) -> dict[str, str]:
    # The dev env holds only the stack's variables; kubectl also needs HOME etc.
    return {**os.environ, **env}


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
    full = _full_env(env)
    # Resolve against the env's PATH, so the stack's kubectl wins over any other.
    program = shutil.which("kubectl", path=full.get("PATH")) or "kubectl"
    command = [program, *args]
    try:
        done = subprocess.run(
            command,
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


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.25,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    An exception from the predicate counts as "not yet" (a server restarting, a
    resource not created yet); if time runs out, the last one is chained to the
    :class:`AssertionError`, whose text starts with ``message``.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    last_value: T | None = None
    while True:
        try:
            last_value = predicate()
            if last_value:
                return last_value
        except Exception as exc:
            last_error = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f"last error: {last_error!r}" if last_error else f"last value: {last_value!r}"
            raise AssertionError(
                f"{message}: not true after {timeout:.0f} s ({detail})"
            ) from last_error
        time.sleep(min(interval, remaining))


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
        env,
        "replace",
        "--raw",
        f"/api/v1/namespaces/{name}/finalize",
        "-f",
        "-",
        input=json.dumps(namespace),
    )
    wait_for(
        lambda: not kubectl(env, "get", "namespace", name, "--ignore-not-found").stdout.strip(),
        timeout=30,
        message=f"namespace {name} to disappear",
    )
