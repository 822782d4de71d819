"""Asking a component whether it answers, and waiting (boundedly) until it does.

A started process is not a ready one: the API server needs its post-start hooks,
etcd its election, Consul a leader. Each component gets one check, which returns
``None`` when the component answers and otherwise a short reason; the waiting
loop stops early if the process dies and, on failure, quotes the log tail so the
error alone usually says what went wrong.
"""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tether_dev.reporting import DevStackError

Check = Callable[[], "str | None"]


def http_get(
    url: str,
    *,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 2.0,
) -> tuple[int, str]:
    """(status, body) of a GET; HTTP error statuses are returned, not raised."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def client_tls(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS context trusting only ``ca`` and presenting the client certificate."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


def check_http(
    url: str,
    accept: Callable[[int, str], bool],
    *,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> Check:
    """A check that GETs ``url`` and passes when ``accept(status, body)``."""

    def check() -> str | None:
        try:
            status, body = http_get(url, context=context, headers=headers)
        except (OSError, ssl.SSLError) as exc:
            return f"{url}: {getattr(exc, 'reason', None) or exc}"
        if accept(status, body):
            return None
        return f"{url}: HTTP {status} {body.strip()[:200]}"

    return check


def log_tail(log: Path, *, lines: int = 25, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of ``log`` (read from its last ``max_bytes``)."""
    try:
        with log.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            text = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return f"(no log at {log})"
    return "\n".join(text.splitlines()[-lines:])


def wait_ready(
    name: str,
    check: Check,
    *,
    alive: Callable[[], bool],
    log: Path,
    timeout: float,
    interval: float = 0.2,
) -> float:
    """Poll ``check`` until it passes; return the seconds it took.

    Raises :class:`DevStackError` naming the component, the last reason and the
    log tail if the process exits or ``timeout`` seconds pass.
    """
    started = time.monotonic()
    deadline = started + timeout
    reason: str | None = "not checked yet"
    while True:
        reason = check()
        if reason is None:
            return time.monotonic() - started
        if not alive():
            raise DevStackError(
                f"{name} exited while starting ({reason}); last lines of {log}:\n{log_tail(log)}"
            )
        if time.monotonic() >= deadline:
            raise DevStackError(
                f"{name} did not answer within {timeout:.0f} s ({reason}); "
                f"last lines of {log}:\n{log_tail(log)}"
            )
        time.sleep(interval)
