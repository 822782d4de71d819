"""Go-style durations (``10s``, ``1m30s``, ``250ms``) as Consul accepts them."""

from __future__ import annotations

import re
from fractions import Fraction

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

# Go's time.Duration is an int64 of nanoseconds (about 2562047h): Consul
# refuses anything longer when it decodes the registration.
MAX_NS = 2**63 - 1


def parse_ns(text: str, *, field: str) -> int:
    """Return the duration in nanoseconds, or raise InvalidSpec naming ``field``."""
    if not text:
        raise InvalidSpec(f"{field}: empty duration; use a Go duration such as 10s or 1m30s")
    pos = 0
    total = Fraction(0)
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        # Exact arithmetic: a float loses nanoseconds long before Go's range ends.
        total += Fraction(match.group(1)) * _UNITS_NS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise InvalidSpec(
            f"{field}: {_shown(text)} is not a duration; use a Go duration such as 10s, 500ms or 1m30s"
        )
    ns = int(total)  # Go truncates sub-nanosecond fractions too
    if ns > MAX_NS:
        raise InvalidSpec(
            f"{field}: {_shown(text)} is longer than Consul's longest duration "
            "(2562047h47m16.854775807s, Go's int64 nanoseconds)"
        )
    return ns


def _shown(text: str) -> str:
    """The user's text in a message, bounded (the schema limits it, a direct call may not)."""
    return repr(text if len(text) <= 64 else text[:64] + "…")


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
