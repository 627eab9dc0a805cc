"""Prometheus metrics of ingest (default registry, registered once at import)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

SAMPLES_ACCEPTED = Counter(
    "gardener_samples_accepted", "Samples written to bpb_samples (new rows only)."
)
SAMPLES_REJECTED = Counter(
    "gardener_samples_rejected",
    "Inputs sent to sample_quarantine, by reason code (bpb_format, step_conflict, ...).",
    ["reason"],
)
SAMPLES_DUPLICATE = Counter(
    "gardener_samples_duplicate", "Re-delivered identical samples (no-ops)."
)
CORPUS_REPORTS = Counter("gardener_corpus_reports", "corpus=NAME sha256=HEX lines recorded.")
BATCH_SECONDS = Histogram(
    "gardener_ingest_batch_seconds",
    "Time to write one batch (lookup, insert, summary, quarantine, NOTIFY, commit).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BATCH_ITEMS = Histogram(
    "gardener_ingest_batch_items",
    "Items (samples, rejections, reports) per written batch.",
    buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000),
)
