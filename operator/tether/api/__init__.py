"""Typed models of the two custom resources: parse and validate a spec.

The API server's schema rejects most bad input; what it cannot express (a
malformed check URL, a ``..`` key, a duration Consul would refuse) is caught
here and raised as :class:`InvalidSpec` with a message a person can act on.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "tether.dev"
VERSION = "v1alpha1"
FINALIZER = "tether.dev/cleanup"


class InvalidSpec(ValueError):
    """The spec cannot be reconciled as written; retrying will not help."""


@dataclass(frozen=True, order=True)
class ObjectRef:
    """Identity of one custom resource: what ownership markers and queues key on."""

    plural: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.plural}/{self.namespace}/{self.name}"
