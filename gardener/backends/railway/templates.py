"""Trainer service templates from ``configs/railway.toml`` and the specs built from them.

Out of the box a trainer service is built from the gardener's own repository (its Dockerfile
runs either ``gardener run`` or, with the template's start command, the trainer): ``repo`` and
``branch`` may name environment variables (``${RAILWAY_GIT_REPO_OWNER}``...), which Railway
sets for a service deployed from GitHub. Samples: with ``ingest = "auto"`` a trainer POSTs them
to the gardener's ``/v1/samples`` when the gardener's address is known (``ingest_url``, else
``RAILWAY_PRIVATE_DOMAIN`` and ``PORT``, else ``RAILWAY_PUBLIC_DOMAIN``) and the account has
an ingest token; otherwise the gardener tails the deployment's log.
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gardener.backends.base import RestartPolicy, ServiceSpec
from gardener.configfiles import read_toml
from gardener.core.canon import CanonName, parse
from gardener.core.types import DesiredState
from gardener.errors import ConfigError

INGEST_URL_VAR = "GARDENER_INGEST_URL"
INGEST_TOKEN_VAR = "GARDENER_INGEST_TOKEN"
INGEST_MODES = ("auto", "http", "logs")
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
    ingest: str = "auto"
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
    if raw.get("ingest", "auto") not in INGEST_MODES:
        raise ConfigError(f"{where}: ingest must be one of {', '.join(INGEST_MODES)}")
    variables = raw.get("variables", {})
    if not all(isinstance(v, str) for v in variables.values()):
        raise ConfigError(f"{where}: variables must be strings")
    return ServiceTemplate(
        repo=raw.get("repo") or None, branch=raw.get("branch") or None,
        image=raw.get("image") or None,
        start_command=raw.get("start_command", "python -m gardener.trainer"),
        restart_policy=policy, max_retries=int(raw.get("max_retries", 2)),
        ingest=raw.get("ingest", "auto"), ingest_url=raw.get("ingest_url") or None,
        ingest_token_env=raw.get("ingest_token_env", "GARDENER_INGEST_TOKEN_{ACCOUNT}"),
        variables=dict(variables),
    )


def gardener_ingest_url(configured: str | None, environ: Mapping[str, str]) -> str | None:
    """Where trainers reach the gardener's ``/v1/samples``: the configured URL, else its
    Railway private domain (``http://<domain>:<PORT>``), else its public domain (https)."""
    if configured:
        return configured
    if environ.get("RAILWAY_PRIVATE_DOMAIN"):
        port = environ.get("PORT") or "8080"
        return f"http://{environ['RAILWAY_PRIVATE_DOMAIN']}:{port}/v1/samples"
    if environ.get("RAILWAY_PUBLIC_DOMAIN"):
        return f"https://{environ['RAILWAY_PUBLIC_DOMAIN']}/v1/samples"
    return None


def _expand(value: str | None, what: str, environ: Mapping[str, str]) -> str | None:
    """``${VAR}`` in a template value, from the environment; a missing one is a clear error."""
    if not value or "$" not in value:
        return value
    try:
        return string.Template(value).substitute(environ)
    except KeyError as exc:
        raise ConfigError(
            f"railway.toml: {what} = {value!r} needs ${exc.args[0]} (Railway sets it for a "
            "gardener deployed from its GitHub repository); or set repo or image in "
            "railway.toml (GARDENER_RAILWAY_CONFIG)"
        ) from None


def source_of(
    tpl: ServiceTemplate, environ: Mapping[str, str] | None = None
) -> tuple[str | None, str | None, str | None]:
    """(image, repo, branch) of a template, its ``${VAR}``s expanded; one of image or repo."""
    env = os.environ if environ is None else environ
    image = _expand(tpl.image, "image", env)
    repo = None if image else _expand(tpl.repo, "repo", env)
    if not image and not repo:
        raise ConfigError("railway.toml: the trainer template has neither image nor repo")
    return image, repo, (_expand(tpl.branch, "branch", env) if repo else None)


def trainer_spec(
    canon_name: str,
    account: str,
    train_variables: Mapping[str, str],
    templates: Templates,
    *,
    desired: DesiredState = DesiredState.RUNNING,
    race: str | None = None,
    environ: Mapping[str, str] | None = None,
    parsed: CanonName | None = None,
) -> ServiceSpec:
    """The spec of one trainer service: template, then TRAIN_* variables, then ingest
    (``parsed``: the name already parsed by the caller, not parsed again)."""
    env = os.environ if environ is None else environ
    tpl = templates.for_model((parsed or parse(canon_name)).model)
    image, repo, branch = source_of(tpl, env)
    variables = {**tpl.variables, **train_variables}
    if tpl.ingest != "logs":
        token_env = tpl.ingest_token_env.format(ACCOUNT=account.upper())
        url = gardener_ingest_url(tpl.ingest_url, env)
        if url and env.get(token_env):
            variables[INGEST_URL_VAR] = url
            variables[INGEST_TOKEN_VAR] = env[token_env]
        elif tpl.ingest == "http":
            raise ConfigError(
                f"ingest = 'http' needs the gardener's URL (ingest_url, RAILWAY_PRIVATE_DOMAIN "
                f"or RAILWAY_PUBLIC_DOMAIN) and ${token_env}"
            )
    return ServiceSpec(
        canon_name=canon_name, account=account, desired=desired, variables=variables,
        start_command=tpl.start_command, image=image, repo=repo,
        branch=branch,
        restart_policy=tpl.restart_policy, max_retries=tpl.max_retries, race=race,
    )
