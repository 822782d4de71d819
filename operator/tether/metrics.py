"""Prometheus metrics (names prefixed ``tether_``), served on ``--metrics-port``.

Counters of writes per external system are what the idle, restart and
benchmark figures are built from, so every write path increments them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "tether_reconciles_total", "Reconciles by kind and result", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    "tether_reconcile_duration_seconds",
    "Reconcile latency by kind",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
WRITES = Counter(
    "tether_backend_writes_total", "Writes made to each system", ["system"]
)
BACKEND_ERRORS = Counter(
    "tether_backend_errors_total", "Failed calls to a backend", ["backend"]
)
BACKEND_UP = Gauge(
    "tether_backend_up", "1 when the backend answered the last call, else 0", ["backend"]
)
DRIFT_REPAIRS = Counter(
    "tether_drift_repairs_total", "External objects restored after out-of-band changes", ["kind"]
)
MANAGED = Gauge("tether_managed_objects", "Resources currently managed", ["kind"])
LEADER = Gauge("tether_leader", "1 while this replica holds the leader Lease")
QUEUE_DEPTH = Gauge("tether_queue_depth", "Keys waiting to be reconciled", ["kind"])
# A count per kind and reason, not a series per resource (which would grow
# with the number of resources); per-resource Ready is kube-state-metrics'
# business (see the README).
NOT_READY = Gauge(
    "tether_resources_not_ready", "Resources whose Ready condition is not True", ["kind", "reason"]
)


def serve(port: int) -> None:
    """Start the /metrics endpoint in a background thread."""
    start_http_server(port)
# The watches of objects around the resources (ConfigMaps, Secrets,
# EndpointSlices): how many namespaces are watched, and what they deliver —
# both follow what Tether manages, not the cluster's size.
WATCHED_NAMESPACES = Gauge(
    "tether_watched_namespaces", "Namespaces watched for a resource type", ["resource"]
)
WATCH_EVENTS = Counter(
    "tether_watch_events_total", "Events received from the per-namespace watches", ["resource"]
)
# 1 for a kind that Kopf was not watching a bound after start (its resources
# would never be reconciled): the operator reports it and exits to be restarted.
KINDS_UNSERVED = Gauge(
    "tether_kinds_unserved", "1 while a kind is not served (not watched) after start, else 0", ["kind"]
)
# Freed memory handed back to the system after bursts (tether.memory).
MEMORY_RELEASED = Counter(
    "tether_memory_released_bytes_total", "Freed memory handed back to the system after bursts of reconciles"
)
NAMESPACES_HANDED_TO_KOPF = Counter(
    "tether_kopf_namespaces_handed_total",
    "Namespaces Kopf had not picked up from its own watch, handed to it by Tether's namespace watch",
)
