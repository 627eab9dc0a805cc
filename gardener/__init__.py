"""The gardener: an autonomous race scheduler for fleets of language-model training runs.

Samples flow one way: ingest -> ledger (PostgreSQL) -> tick -> pure ``core.decide`` ->
apply (one transaction per decision) -> reconcile -> backend (Railway or local processes).
"""

__version__ = "0.1.0"
