"""How the dev stack tells a person what it is doing, and what went wrong.

Progress goes to stderr, so that ``tether dev status --json`` and ``tether dev env``
keep stdout machine-readable; callers (tests, CI) can pass their own callback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

Progress = Callable[[str], None]


class DevStackError(RuntimeError):
    """A component could not be found, built, started or reached.

    The message is meant for a person: it names the component and, where there is
    one, quotes the tail of its log.
    """


def to_stderr(message: str) -> None:
    """The default progress callback."""
    print(f"tether dev: {message}", file=sys.stderr, flush=True)
