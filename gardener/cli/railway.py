"""Deploying batches and looking at services: ``tri railway batch-deploy``, ``tri services``.

A batch is validated whole before the first write: the names (canon, L-R9, duplicates), the
backend's credentials and service templates, the request budget and the smoke gate are
checked first; then the race, the trials, their seeds and EXP_IDs (a reused seed or id
refuses the whole batch) and the audit row of a skipped smoke gate are written in one
transaction. A refused batch leaves the ledger exactly as it was.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import anyio
import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from gardener.backends import backend_for
from gardener.backends.base import ServiceState
from gardener.backends.railway.templates import load_templates, trainer_spec
from gardener.backends.reconcile import ReconcileReport, reconcile_once
from gardener.cli.common import AccountOpt, JsonOpt, account, actor, by_exp_id, emit, settings
from gardener.configfiles import read_toml
from gardener.core import canon
from gardener.errors import ConfigError, InvalidCanonName, UserError
from gardener.ledger import db, migrate, trials
from gardener.ledger.queries import Queries
from gardener.loop.reconciler import build_spec
from gardener.race import smoke_gate
from gardener.settings import Settings
from gardener.trainer.spec import ModelsConfig, hidden_size_for, load_models_config

Q = Queries("loop.sql")
console = Console()

railway_app = typer.Typer(help="Railway batches.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(railway_app, name="railway")
    app.command("services")(services_cmd)


def read_names(lines: list[str]) -> list[str]:
    """Canon names from stdin: one a line; blank lines and # comments are skipped."""
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


def validate_batch(names: list[str], models: ModelsConfig) -> list[canon.CanonName]:
    """Parse every name (L-R9 included) and report every bad one at once."""
    known = (*canon.DEFAULT_MODELS, *models.models)
    parsed: list[canon.CanonName] = []
    errors: list[str] = []
    seen: set[str] = set()
    for name in names:
        try:
            c = canon.parse(name, models=known)
            canon.check_gf16_hidden(c, hidden_size_for(c, models))
        except UserError as exc:
            errors.append(str(exc))
            continue
        if name in seen:
            errors.append(f"{name} appears twice in the batch")
        seen.add(name)
        parsed.append(c)
    if errors:
        shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise InvalidCanonName(
            f"{len(errors)} of {len(names)} names refused, nothing deployed: {shown}"
        )
    return parsed


# Railway requests a new service costs: serviceCreate, variableCollectionUpsert, the deploy.
REQUESTS_PER_SERVICE = 3


def check_railway_ready(s: Settings, who: str, parsed: list[canon.CanonName]) -> None:
    """Everything a Railway deploy of the batch needs, before anything is written: the
    account's credentials, a usable service template per model, and the request budget."""
    missing = [var for var, value in (
        (f"RAILWAY_TOKEN_{who.upper()}", s.railway_token(who)),
        (f"GARDENER_RAILWAY_PROJECT_{who.upper()}", s.railway_project(who)),
        (f"GARDENER_RAILWAY_ENVIRONMENT_{who.upper()}", s.railway_environment(who)),
    ) if not value]
    if missing:
        raise ConfigError(f"the railway backend for {who} needs {', '.join(missing)}; "
                          "nothing was admitted")
    templates = load_templates(s.railway_config)
    for c in parsed:
        trainer_spec(str(c), who, {}, templates)  # source, ingest URL and token: or ConfigError
    need = REQUESTS_PER_SERVICE * len(parsed) + 1
    if need > s.railway_budget_per_hour:
        raise UserError(f"{len(parsed)} services need about {need} Railway requests, more than "
                        f"{who}'s budget of {s.railway_budget_per_hour} an hour "
                        "(GARDENER_RAILWAY_BUDGET_PER_HOUR); split the batch")


def load_batch_config(path: Path | None) -> dict[str, Any]:
    """The ``[race]`` table of a batch's config file (nothing without one)."""
    if path is None:
        return {}
    raw, _ = read_toml(path.name, path)
    race = raw.get("race", {})
    if not isinstance(race, dict):
        raise ConfigError(f"{path}: [race] must be a table")
    return race


@railway_app.command("batch-deploy")
def batch_deploy(
    acct: AccountOpt = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Race settings (TOML, a [race] table).")
    ] = None,
    validate_canon: Annotated[
        bool, typer.Option("--validate-canon", help="Validate every name before any change.")
    ] = True,
    race: Annotated[
        str | None, typer.Option("--race", help="Race name (else the config's).")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Steps per trainer.")] = None,
    backend: Annotated[
        str | None, typer.Option("--backend", help="local or railway (else the config's).")
    ] = None,
    no_deploy: Annotated[
        bool, typer.Option("--no-deploy", help="Only admit; the daemon deploys on its next pass.")
    ] = False,
    skip_smoke_gate: Annotated[
        bool, typer.Option("--skip-smoke-gate", help="Admit without a SMOKE_DONE race on the "
                           "same trainer configuration (needs --reason; audited).")
    ] = False,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why the smoke gate is skipped.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Admit canon names from stdin into a race and deploy them (all or nothing)."""
    who = account(acct)
    if skip_smoke_gate and not (reason or "").strip():
        raise UserError('--skip-smoke-gate needs --reason "..." for the audit trail')
    names = read_names(sys.stdin.read().splitlines())
    if not names:
        raise UserError("no canon names on stdin")
    cfg = load_batch_config(config)
    models = load_models_config()
    parsed = validate_batch(names, models) if validate_canon else [canon.parse(n) for n in names]
    race_name = race or cfg.get("name") or "batch"
    run_steps = int(steps or cfg.get("steps") or 81000)
    base = settings()
    chosen = backend or cfg.get("backend") or base.backend
    if chosen not in ("local", "railway"):
        raise ConfigError(f"backend must be local or railway, not {chosen!r}")
    s = base.model_copy(update={"backend": chosen})
    if chosen == "railway":
        check_railway_ready(s, who, parsed)
    trainer = smoke_gate.trainer_configuration(chosen, s.railway_config)
    admissions = [
        trials.Admission(canon=c, hidden_size=hidden_size_for(c, models), steps=run_steps)
        for c in parsed
    ]
    by = actor(who)

    async def main() -> dict[str, Any]:
        dsn, _ = db.resolve_dsn(s)
        conn = await db.connect(dsn)
        try:
            await migrate.migrate(conn)
            gate = None if skip_smoke_gate else await smoke_gate.check(conn, who, trainer)
            async with conn.transaction():  # the race, every trial and the audit: or nothing
                await trials.ensure_race(
                    conn,
                    race_name,
                    who,
                    kind=str(cfg.get("kind", "hunt")),
                    horizon=run_steps,
                    config={"auto_teardown": bool(cfg.get("auto_teardown", False)),
                            "trainer": trainer,
                            "trainer_fingerprint": smoke_gate.fingerprint(trainer)},
                )
                admitted = await trials.admit(conn, race_name, who, admissions, backend=chosen)
                if skip_smoke_gate:
                    await smoke_gate.record_skip(conn, race_name, who, by, str(reason),
                                                 trainer, admitted)
            report = None if no_deploy else await _deploy(conn, s, who, race_name, models)
        finally:
            await conn.close()
        return {
            "race": race_name,
            "account": who,
            "smoke_gate": gate or f"skipped: {reason}",
            "admitted": admitted,
            "already_admitted": [str(c) for c in parsed if str(c) not in admitted],
            "deploy": None if report is None else report.summary(),
        }

    result = anyio.run(main)

    def human() -> None:
        typer.echo(
            f"race {result['race']}: admitted {len(result['admitted'])}, "
            f"already there {len(result['already_admitted'])}; smoke gate: "
            f"{result['smoke_gate']}"
        )
        if result["deploy"] is not None:
            typer.echo(f"deploy: {result['deploy']}")

    emit(result, as_json, human)


async def _deploy(
    conn: asyncpg.Connection, s: Settings, who: str, race: str, models: ModelsConfig
) -> ReconcileReport:
    rows = [r for r in await conn.fetch(Q.desired_trials, who) if r["race"] == race]
    specs = [build_spec(r, s, models) for r in rows]
    backend = backend_for(s, who)
    try:
        return await reconcile_once(specs, backend)
    finally:
        await backend.aclose()


def services_cmd(acct: AccountOpt = None, as_json: JsonOpt = False) -> None:
    """What runs for the account: desired state in the ledger against what its backends see."""
    who = account(acct)
    s = settings()

    async def main() -> list[dict[str, Any]]:
        dsn, _ = db.resolve_dsn(s)
        conn = await db.connect(dsn)
        try:
            await migrate.migrate(conn)
            rows = await conn.fetch(Q.desired_trials, who)
        finally:
            await conn.close()
        observed: dict[str | None, ServiceState] = {}
        for kind in sorted({r["backend"] for r in rows if r["backend"]} or {s.backend}):
            backend = backend_for(s, who, kind)
            try:
                observed.update((o.canon_name, o) for o in await backend.observe() if o.owned)
            finally:
                await backend.aclose()
        out = []
        for r in sorted(rows, key=lambda r: by_exp_id(r["canon_name"])):
            o = observed.pop(r["canon_name"], None)
            out.append(
                {
                    "canon_name": r["canon_name"],
                    "race": r["race"],
                    "desired": r["desired_state"],
                    "observed": o.status.value if o else "absent",
                    "service": o.service_name if o else None,
                }
            )
        out += [
            {
                "canon_name": name,
                "race": None,
                "desired": "orphan",
                "observed": o.status.value,
                "service": o.service_name,
            }
            for name, o in observed.items()
        ]
        return out

    services = anyio.run(main)

    def human() -> None:
        table = Table("canon name", "race", "desired", "observed", "service")
        for x in services:
            table.add_row(
                x["canon_name"], x["race"] or "", x["desired"], x["observed"], x["service"] or ""
            )
        console.print(table)

    emit(services, as_json, human)
