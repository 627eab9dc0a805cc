"""Trainer service templates from ``configs/railway.toml`` and the specs built from them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gardener.backends.base import RestartPolicy, ServiceSpec
from gardener.configfiles import read_toml
from gardener.core.canon import parse
from gardener.core.types import DesiredState
from gardener.errors import ConfigError

INGEST_URL_VAR = "GARDENER_INGEST_URL"
INGEST_TOKEN_VAR = "GARDENER_INGEST_TOKEN"
_KEYS = {
    "repo", "branch", "image", "start_command", "restart_policy", "max_retries", "ingest",
    "ingest_url", "ingest_token_env", "variables",
}


@dataclass(frozen=True)
class ServiceTemplate:
    """How a trainer service of one model is set up on Railway."""

    repo: str | None = None
    branch: str | None = None
    image: str | None = None
    start_command: str = "python -m gardener.trainer"
    restart_policy: RestartPolicy = RestartPolicy.ON_FAILURE
    max_retries: int = 2
    ingest: str = "logs"
    ingest_url: str | None = None
    ingest_token_env: str = "GARDENER_INGEST_TOKEN_{ACCOUNT}"
    variables: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Templates:
    default: ServiceTemplate
    models: Mapping[str, ServiceTemplate]

    def for_model(self, model: str) -> ServiceTemplate:
        return self.models.get(model, self.default)


def load_templates(path: str | Path | None = None) -> Templates:
    """Read ``railway.toml`` (an explicit path, else the shipped one)."""
    raw, source = read_toml("railway.toml", path)
    return parse_templates(raw, source)


def parse_templates(raw: Mapping[str, Any], source: str = "railway.toml") -> Templates:
    base = dict(raw.get("defaults", {}))
    default = _template(base, f"{source} [defaults]")
    models = {}
    for model, over in (raw.get("models") or {}).items():
        merged = {**base, **over, "variables": {**base.get("variables", {}),
                                                **over.get("variables", {})}}
        models[model] = _template(merged, f"{source} [models.{model}]")
    return Templates(default, models)


def _template(raw: Mapping[str, Any], where: str) -> ServiceTemplate:
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    try:
        policy = RestartPolicy(raw.get("restart_policy", "ON_FAILURE"))
    except ValueError:
        raise ConfigError(f"{where}: restart_policy must be ALWAYS, NEVER or ON_FAILURE") from None
    if raw.get("ingest", "logs") not in ("logs", "http"):
        raise ConfigError(f"{where}: ingest must be 'logs' or 'http'")
    variables = raw.get("variables", {})
    if not all(isinstance(v, str) for v in variables.values()):
        raise ConfigError(f"{where}: variables must be strings")
    return ServiceTemplate(
        repo=raw.get("repo") or None, branch=raw.get("branch") or None,
        image=raw.get("image") or None,
        start_command=raw.get("start_command", "python -m gardener.trainer"),
        restart_policy=policy, max_retries=int(raw.get("max_retries", 2)),
        ingest=raw.get("ingest", "logs"), ingest_url=raw.get("ingest_url") or None,
        ingest_token_env=raw.get("ingest_token_env", "GARDENER_INGEST_TOKEN_{ACCOUNT}"),
        variables=dict(variables),
    )


def trainer_spec(
    canon_name: str,
    account: str,
    train_variables: Mapping[str, str],
    templates: Templates,
    *,
    desired: DesiredState = DesiredState.RUNNING,
    race: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServiceSpec:
    """The spec of one trainer service: template, then TRAIN_* variables, then ingest."""
    tpl = templates.for_model(parse(canon_name).model)
    variables = {**tpl.variables, **train_variables}
    if tpl.ingest == "http":
        env = os.environ if environ is None else environ
        token_env = tpl.ingest_token_env.format(ACCOUNT=account.upper())
        if not tpl.ingest_url or not env.get(token_env):
            raise ConfigError(f"ingest = 'http' needs ingest_url and ${token_env}")
        variables[INGEST_URL_VAR] = tpl.ingest_url
        variables[INGEST_TOKEN_VAR] = env[token_env]
    return ServiceSpec(
        canon_name=canon_name, account=account, desired=desired, variables=variables,
        start_command=tpl.start_command, image=tpl.image, repo=tpl.repo, branch=tpl.branch,
        restart_policy=tpl.restart_policy, max_retries=tpl.max_retries, race=race,
    )
