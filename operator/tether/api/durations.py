"""Go-style durations (``10s``, ``1m30s``, ``250ms``) as Consul accepts them."""

from __future__ import annotations

import re

from tether.api import InvalidSpec

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def parse_ns(text: str, *, field: str) -> int:
    """Return the duration in nanoseconds, or raise InvalidSpec naming ``field``."""
    if not text:
        raise InvalidSpec(f"{field}: empty duration; use a Go duration such as 10s or 1m30s")
    pos = 0
    total = 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS_NS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise InvalidSpec(
            f"{field}: {text!r} is not a duration; use a Go duration such as 10s, 500ms or 1m30s"
        )
    return int(total)


def render(ns: int) -> str:
    """Render nanoseconds the way Consul prints durations back (Go's time.Duration)."""
    if ns == 0:
        return "0s"
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return _trim(ns / 1_000) + "µs"
    if ns < 1_000_000_000:
        return _trim(ns / 1_000_000) + "ms"
    out = ""
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    return out + _trim(rest / 1_000_000_000) + "s"


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"
