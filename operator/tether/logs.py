"""Logging set-up: human text or one JSON object per line.

In JSON mode every line that concerns a resource carries its ``namespace`` and
``name`` (Kopf's own object loggers, and Tether's via ``extra``).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import kopf


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Tether's loggers pass ``tether_ref``; Kopf's per-object loggers ``k8s_ref``.
        for attr in ("tether_ref", "k8s_ref"):
            ref = getattr(record, attr, None)
            if isinstance(ref, dict):
                for key in ("namespace", "name", "kind"):
                    if ref.get(key):
                        out[key] = ref[key]
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(*, fmt: str, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stdout)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        kopf.configure(verbose=verbose)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Per-event chatter from Kopf (one line per watch event on every Secret
    # and ConfigMap) would drown everything else.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    for noisy in ("aiohttp.access", "urllib3", "kubernetes.client.rest"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
