"""Logging set-up: human text or one JSON object per line.

JSON lines come from python-json-logger (maintained, and already what Kopf
uses): ``time`` is ISO 8601 with milliseconds and the zone (``+00:00``),
``level`` and ``logger`` name the source, and every structured field a
caller passes through ``extra`` is kept as a key. Lines about a resource carry
its ``namespace``, ``name`` and ``kind`` (Tether's loggers pass
``tether_ref``, Kopf's per-object loggers ``k8s_ref``). With tracing on, a line
logged inside a trace (a reconcile) carries its ``trace_id`` and ``span_id``,
to look the trace up in the tracing back end.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import kopf
from pythonjsonlogger.json import JsonFormatter as _BaseJsonFormatter

from tether import tracing

LEVELS = ("debug", "info", "warning", "error")

# The resource references the loggers attach, flattened into top-level keys.
_REFS = ("tether_ref", "k8s_ref")


class JsonFormatter(_BaseJsonFormatter):
    """One JSON object per line: time, level, logger, message, and every extra field."""

    def __init__(self) -> None:
        super().__init__("%(message)s", json_ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = self.formatTime(record)
        log_data["level"] = record.levelname.lower()
        log_data["logger"] = record.name
        super().add_fields(log_data, record, message_dict)
        log_data["level"] = record.levelname.lower()
        for attr in _REFS:
            ref = log_data.pop(attr, None)
            if isinstance(ref, dict):
                for key in ("namespace", "name", "kind"):
                    if ref.get(key):
                        log_data.setdefault(key, ref[key])
        # The handler formats in the logging call itself (no queue, no thread
        # hand-off), so the current span is the one the record was made in.
        ids = tracing.current_ids()
        if ids is not None:
            log_data["trace_id"], log_data["span_id"] = ids


def configure(*, fmt: str, level: str = "info", verbose: bool = False) -> None:
    """Set up the root logger; ``verbose`` is the old spelling of ``level="debug"``."""
    if verbose:
        level = "debug"
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(sys.stdout)
    debug = level == "debug"
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        kopf.configure(verbose=debug, log_format=kopf.LogFormat.JSON)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        kopf.configure(verbose=debug)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # Per-event chatter from Kopf (one line per watch event on every Secret
    # and ConfigMap) would drown everything else.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    for noisy in ("aiohttp.access", "urllib3", "kubernetes.client.rest"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
