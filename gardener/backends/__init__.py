"""Where trials run: Railway over its GraphQL API, or local subprocesses.

``make_backend`` builds either from settings; ``reconcile_once`` drives one toward the
desired state. See docs/backends.md.
"""

from __future__ import annotations

from pathlib import Path

from gardener.backends.base import (
    Backend,
    BudgetExhausted,
    EnsureOutcome,
    LogLine,
    PermanentBackendError,
    RestartPolicy,
    ServiceSpec,
    ServiceState,
    Status,
    TemporaryBackendError,
)
from gardener.backends.reconcile import Backoff, ReconcileReport, plan, reconcile_once
from gardener.errors import ConfigError

__all__ = [
    "Backend",
    "Backoff",
    "BudgetExhausted",
    "EnsureOutcome",
    "LogLine",
    "PermanentBackendError",
    "ReconcileReport",
    "RestartPolicy",
    "ServiceSpec",
    "ServiceState",
    "Status",
    "TemporaryBackendError",
    "make_backend",
    "plan",
    "reconcile_once",
]


def make_backend(
    kind: str,
    account: str,
    *,
    data_dir: str | Path = ".gardener",
    railway_token: str | None = None,
    project_id: str | None = None,
    environment_id: str | None = None,
    base_url: str | None = None,
    budget_per_hour: int = 1000,
    timeout: float = 30.0,
) -> Backend:
    """A backend bound to one account: ``local`` or ``railway`` (token, project, environment)."""
    if kind == "local":
        from gardener.backends.local import LocalBackend

        return LocalBackend(account, data_dir)
    if kind == "railway":
        from gardener.backends.railway.backend import RailwayBackend
        from gardener.backends.railway.client import DEFAULT_URL, RailwayClient, RequestBudget

        missing = [n for n, v in (("railway_token", railway_token), ("project_id", project_id),
                                  ("environment_id", environment_id)) if not v]
        if missing:
            raise ConfigError(f"the railway backend for {account} needs {', '.join(missing)}")
        assert railway_token and project_id and environment_id
        client = RailwayClient(
            railway_token, base_url=base_url or DEFAULT_URL, timeout=timeout,
            budget=RequestBudget(budget_per_hour),
        )
        return RailwayBackend(
            account, client, project_id=project_id, environment_id=environment_id
        )
    raise ConfigError(f"unknown backend {kind!r} (local or railway)")
