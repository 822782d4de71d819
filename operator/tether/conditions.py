"""Kubernetes-style conditions: pure bookkeeping shared by both kinds.

A condition's ``lastTransitionTime`` moves only when its ``status`` flips, so
that ``kubectl wait`` and dashboards see real transitions, and so that an
unchanged outcome produces an identical status (and therefore no patch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]

READY = "Ready"
HEALTHY = "Healthy"

# Reasons of the Ready condition (the contract fixes these names).
RECONCILED = "Reconciled"
RECONCILING = "Reconciling"
INVALID_SPEC = "InvalidSpec"
CONFLICT = "Conflict"
# A TetherPolicy does not allow what the resource asks for (its name, prefix or adopt).
FORBIDDEN = "Forbidden"
BACKEND_UNAVAILABLE = "BackendUnavailable"
BACKEND_REJECTED = "BackendRejected"
DELETING = "Deleting"


# The CRDs cap a condition's message at 32768 characters; a longer one makes
# the API server refuse the whole status patch (422), leaving the resource with
# no condition at all and retried forever. Messages carry user input (key
# names, check names, URLs), so every one is bounded here, well under the cap.
MAX_MESSAGE = 4096


def bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` cut to ``limit`` characters, saying how much was left out."""
    if len(message) <= limit:
        return message
    tail = f"… ({len(message) - limit} more characters)"
    return message[: limit - len(tail)] + tail


@dataclass(frozen=True)
class Condition:
    """A condition as a reconcile decides it, before timestamps are attached."""

    type: str
    status: Status
    reason: str
    message: str


def now() -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes stores metav1.Time."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(
    existing: Sequence[Mapping[str, Any]] | None,
    updates: Iterable[Condition],
    *,
    generation: int | None,
    timestamp: str,
) -> list[dict[str, Any]]:
    """Apply ``updates`` to ``existing`` and return the new list, sorted by type.

    Conditions not mentioned in ``updates`` are kept as they are.
    """
    by_type: dict[str, dict[str, Any]] = {
        str(c.get("type")): dict(c) for c in (existing or []) if c.get("type")
    }
    for cond in updates:
        old = by_type.get(cond.type)
        changed = old is None or old.get("status") != cond.status
        entry: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": bounded(cond.message),
            "lastTransitionTime": timestamp
            if changed or old is None or not old.get("lastTransitionTime")
            else old["lastTransitionTime"],
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        by_type[cond.type] = entry
    return [by_type[t] for t in sorted(by_type)]


def find(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for cond in conditions or []:
        if cond.get("type") == type_:
            return cond
    return None
