"""Prometheus metrics of the backends (registered once in the default registry)."""

from __future__ import annotations

from prometheus_client import Counter

REQUESTS = Counter(
    "gardener_backend_requests",
    "Requests a backend sent to its platform, by operation and outcome.",
    ["backend", "operation", "outcome"],
)

RECONCILE_STEPS = Counter(
    "gardener_reconcile_steps",
    "Steps the reconciler took, by kind and outcome.",
    ["backend", "kind", "outcome"],
)
