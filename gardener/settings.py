"""One typed settings object: every knob of the gardener, from the environment.

Variables use the ``GARDENER_`` prefix, except the two Railway sets itself (``DATABASE_URL``,
``PORT``) and the per-account secrets (``RAILWAY_TOKEN_ACC1``, ``GARDENER_INGEST_TOKEN_ACC1``...),
which are read by name so one configuration source serves the daemon, the CLI and the workers.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from gardener.errors import ConfigError


class Settings(BaseSettings):
    """The gardener's configuration. Each field names the environment variable behind it."""

    model_config = SettingsConfigDict(env_prefix="GARDENER_", extra="ignore", frozen=True)

    database_url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "GARDENER_DATABASE_URL"),
        description="PostgreSQL URL (DATABASE_URL). Unset: an embedded server under data_dir.",
    )
    data_dir: Path = Field(
        default=Path(".gardener"),
        description="GARDENER_DATA_DIR: embedded database, local process state and logs.",
    )
    port: int = Field(
        default=8080,
        validation_alias=AliasChoices("PORT", "GARDENER_PORT"),
        description="PORT: HTTP port for /healthz, /readyz, /metrics and /v1/samples.",
    )
    host: str = Field(default="0.0.0.0", description="GARDENER_HOST: HTTP bind address.")
    account: str | None = Field(
        default=None, description="GARDENER_ACCOUNT: the account a command acts for."
    )
    accounts: tuple[str, ...] = Field(
        default=("acc1", "acc2", "acc3"),
        description="GARDENER_ACCOUNTS: the known accounts (JSON list).",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="GARDENER_LOG_FORMAT: auto is console on a terminal, else JSON."
    )
    log_level: str = Field(default="info", description="GARDENER_LOG_LEVEL.")
    poll_interval: float = Field(
        default=2.0, description="GARDENER_POLL_INTERVAL: seconds between fallback polls."
    )
    stall_after: float = Field(
        default=600.0,
        description="GARDENER_STALL_AFTER: seconds without a sample before a trial is stalled.",
    )
    floor_bpb: float = Field(
        default=1.89, description="GARDENER_FLOOR_BPB: ARCHITECTURAL_FLOOR_BPB for the tripwire."
    )
    corpus: str = Field(
        default="stdlib", description="GARDENER_CORPUS: the corpus every trainer must report."
    )
    corpus_sha256: str | None = Field(
        default=None, description="GARDENER_CORPUS_SHA256: its expected sha256, if pinned."
    )
    backend: Literal["local", "railway"] = Field(
        default="local", description="GARDENER_BACKEND: where training services run."
    )
    railway_url: str = Field(
        default="https://backboard.railway.com/graphql/v2",
        description="GARDENER_RAILWAY_URL: Railway's GraphQL endpoint.",
    )
    railway_budget_per_hour: int = Field(
        default=1000, description="GARDENER_RAILWAY_BUDGET_PER_HOUR: API requests per hour."
    )
    railway_config: Path | None = Field(
        default=None,
        description="GARDENER_RAILWAY_CONFIG: trainer service templates (configs/railway.toml).",
    )
    decision_config: Path | None = Field(
        default=None, description="GARDENER_DECISION_CONFIG: a TOML file overriding rung rules."
    )
    view_token: SecretStr | None = Field(
        default=None,
        description="GARDENER_VIEW_TOKEN: if set, the race view's API asks for it (a secret).",
    )
    view_account: str | None = Field(
        default=None,
        description="GARDENER_VIEW_ACCOUNT: the race view shows only this account's races.",
    )

    def database_dsn(self) -> str | None:
        return self.database_url.get_secret_value() if self.database_url else None

    def require_account(self, account: str | None = None) -> str:
        """The account to act for: the flag, else GARDENER_ACCOUNT; it must be a known one."""
        chosen = account or self.account
        if not chosen:
            raise ConfigError("no account: pass --account or set GARDENER_ACCOUNT")
        if chosen not in self.accounts:
            raise ConfigError(f"unknown account {chosen!r} (known: {', '.join(self.accounts)})")
        return chosen

    def railway_token(self, account: str) -> SecretStr | None:
        """``RAILWAY_TOKEN_<ACCOUNT>``: each account's own token, never another's."""
        value = os.environ.get(f"RAILWAY_TOKEN_{account.upper()}")
        return SecretStr(value) if value else None

    def railway_project(self, account: str) -> str | None:
        """``GARDENER_RAILWAY_PROJECT_<ACCOUNT>``: the project holding that account's services."""
        return os.environ.get(f"GARDENER_RAILWAY_PROJECT_{account.upper()}")

    def railway_environment(self, account: str) -> str | None:
        """``GARDENER_RAILWAY_ENVIRONMENT_<ACCOUNT>``: the environment within that project."""
        return os.environ.get(f"GARDENER_RAILWAY_ENVIRONMENT_{account.upper()}")

    def ingest_token(self, account: str) -> SecretStr | None:
        """``GARDENER_INGEST_TOKEN_<ACCOUNT>``: the bearer token trainers of that account use."""
        value = os.environ.get(f"GARDENER_INGEST_TOKEN_{account.upper()}")
        return SecretStr(value) if value else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
