"""The ``.tether/dev/env`` file: what ``source`` needs to talk to the dev stack.

It is written for a POSIX shell and read back by the tests (``tests/e2e``), so
both directions live here and round-trip. The form is fixed by DESIGN.md §3::

    export KUBECONFIG=<absolute path>
    export CONSUL_HTTP_ADDR=http://127.0.0.1:<port>
    export ETCD_ENDPOINTS=http://127.0.0.1:<port>

followed by ``TETHER_DEV_DIR`` and a ``PATH`` line that puts the stack's programs
(``kubectl`` above all) first.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path

_EXPORT = re.compile(r"export\s+([A-Za-z_][A-Za-z0-9_]*)=(.*)")
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def render(
    *,
    kubeconfig: Path,
    consul_http_addr: str,
    etcd_endpoints: str,
    state_dir: Path,
    bin_dir: Path | None,
) -> str:
    """The env file's text."""
    lines = [
        f"export KUBECONFIG={shlex.quote(str(kubeconfig))}",
        f"export CONSUL_HTTP_ADDR={shlex.quote(consul_http_addr)}",
        f"export ETCD_ENDPOINTS={shlex.quote(etcd_endpoints)}",
        f"export TETHER_DEV_DIR={shlex.quote(str(state_dir))}",
    ]
    if bin_dir is not None:
        # $PATH stays outside the quotes so the shell expands it.
        lines.append(f"export PATH={shlex.quote(str(bin_dir))}:$PATH")
    return "\n".join(lines) + "\n"


def parse(text: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables the file exports, as a POSIX shell sourcing it would set them.

    Understands what :func:`render` writes: ``export NAME=value`` lines, where the
    value may mix single quotes (literal), double quotes and bare text, with
    ``$NAME`` / ``${NAME}`` expanded (outside single quotes) from the lines before
    and then ``environ``; unset names expand to "", as in the shell.
    """
    result: dict[str, str] = {}
    # Only "\n" ends a line for the shell; str.splitlines would also split on
    # characters such as \x1e, which may appear in a path.
    for raw in text.split("\n"):
        line = raw.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        match = _EXPORT.fullmatch(line)
        if match is None:
            continue
        name, value = match.groups()
        result[name] = _word(value, lambda key: result.get(key, environ.get(key, "")))
    return result


def _word(value: str, lookup: Callable[[str], str]) -> str:
    """One shell word (an assignment's value): quotes removed, variables expanded."""
    out: list[str] = []
    i = 0
    quote: str | None = None
    while i < len(value):
        char = value[i]
        if quote == "'":
            if char == "'":
                quote = None
            else:
                out.append(char)
            i += 1
            continue
        if char == "'" and quote is None:
            quote = "'"
            i += 1
            continue
        if char == '"':
            quote = None if quote == '"' else '"'
            i += 1
            continue
        if char == "\\" and i + 1 < len(value):
            # Inside double quotes a backslash only escapes $ ` " \ (POSIX).
            if quote == '"' and value[i + 1] not in '$`"\\':
                out.append(char)
            out.append(value[i + 1])
            i += 2
            continue
        if char == "$":
            var = _VARIABLE.match(value, i)
            if var is not None:
                out.append(lookup(var.group(1) or var.group(2)))
                i = var.end()
                continue
        if char in " \t" and quote is None:
            break  # the end of the word: anything after is not part of the value
        out.append(char)
        i += 1
    return "".join(out)
