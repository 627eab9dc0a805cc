"""Where trials run: Railway over its GraphQL API, or local subprocesses.

``make_backend`` builds either from settings; ``reconcile_once`` drives one toward the
desired state. See docs/backends.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from gardener.settings import Settings

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
    "backend_for",
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


def backend_for(settings: Settings, account: str, kind: str | None = None) -> Backend:
    """The backend of ``kind`` (else the configured one) with ``account``'s own credentials:
    the one way every command and the daemon build a backend from settings."""
    token = settings.railway_token(account)
    return make_backend(
        kind or settings.backend,
        account,
        data_dir=settings.data_dir,
        railway_token=token.get_secret_value() if token else None,
        project_id=settings.railway_project(account),
        environment_id=settings.railway_environment(account),
        base_url=settings.railway_url,
        budget_per_hour=settings.railway_budget_per_hour,
    )
