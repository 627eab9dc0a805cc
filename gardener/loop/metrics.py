"""Prometheus metrics of the loop, in the default registry beside ingest's and the backends'.

``/metrics`` renders the whole default registry, so samples accepted and rejected (ingest)
and backend calls and errors (backends) appear next to these without the loop knowing them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter(
    "gardener_decisions",
    "Decisions the loop recorded, by action and outcome (applied, held, duplicate).",
    ["action", "outcome"],
)
TICK_SECONDS = Histogram(
    "gardener_tick_seconds",
    "Duration of one tick: detect crossings, read snapshots, decide, apply.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
FIT_SECONDS = Histogram(
    "gardener_fit_seconds",
    "Time in the pure core (curve fits and rung rules) for one race's decide call.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
SNAPSHOT_SECONDS = Histogram(
    "gardener_snapshot_seconds",
    "Time to read one race's snapshot (its trials, the samples new since the last one).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
DECISION_LATENCY = Histogram(
    "gardener_decision_latency_seconds",
    "From the newest sample of a race to the commit of the decisions it caused.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
TRIPWIRES = Counter("gardener_tripwires", "Tripwire events recorded, by kind.", ["kind"])
RACES_DONE = Counter("gardener_races_done", "Races the loop marked done.")
TICK_ERRORS = Counter("gardener_tick_errors", "Races whose decide or apply raised.")
PAUSED = Gauge("gardener_paused", "1 while the pause flag is set.")
LEADER = Gauge("gardener_leader", "1 while this process holds the leader lock, 0 on standby.")
RECONCILE_SECONDS = Histogram(
    "gardener_reconcile_seconds",
    "Duration of one reconcile pass over one account's backend.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
LOG_LINES = Counter(
    "gardener_backend_log_lines", "Service log lines handed to the ingest writer.", ["backend"]
)
LEADER_GONE = Gauge(
    "gardener_leader_gone",
    "1 on a standby while the leader's lease has run out (the leader is gone or cut off).",
)
LEASE_AGE = Gauge(
    "gardener_leader_lease_age_seconds",
    "Seconds since the leader last renewed its lease, as a standby sees it.",
)
FENCED = Counter(
    "gardener_fenced",
    "Mutations refused because this process no longer holds the leadership, by kind.",
    ["kind"],
)
ACCOUNT_FAILING = Gauge(
    "gardener_account_failing",
    "1 while an account's backend fails (bad token, outage); its retries slow down.",
    ["account"],
)
ACCOUNT_ERRORS = Counter(
    "gardener_account_errors",
    "Reconcile passes of one account that failed, by account and error type.",
    ["account", "error"],
)
DB_BLIPS = Counter(
    "gardener_db_blips",
    "Ticks that met a temporary database error (connection lost, client error) and retried.",
)
