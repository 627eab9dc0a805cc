"""Race commands: ``smoke-race`` (Gate-0 end to end), ``leaderboard rank`` and ``report``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import anyio
import asyncpg
import typer

from gardener.backends.base import ServiceState
from gardener.cli.common import AccountOpt, JsonOpt, emit, settings, with_db
from gardener.errors import UserError
from gardener.ledger import db
from gardener.race import criteria as crit
from gardener.race import leaderboard as lb
from gardener.race import smoke
from gardener.settings import Settings

DEFAULT_REPORT = Path("docs/SMOKE_GATE_0_REPORT.md")

leaderboard_app = typer.Typer(help="Ranked final BPB per trial, with gate verdicts.",
                              no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("smoke-race")(smoke_race_cmd)
    app.add_typer(leaderboard_app, name="leaderboard")
    app.command("report")(report_cmd)


def _observer(s: Settings, kind: str, account: str) -> smoke.ObserveFn:
    """``observe()`` of the race's backend, built once and reused (criterion 13, teardown)."""
    from gardener.backends import make_backend

    token = s.railway_token(account)
    backend = make_backend(
        kind, account, data_dir=s.data_dir,
        railway_token=token.get_secret_value() if token else None,
        project_id=s.railway_project(account), environment_id=s.railway_environment(account),
        base_url=s.railway_url,
    )

    async def observe() -> Sequence[ServiceState]:
        return await backend.observe()

    return observe


class _LiveTable:
    """A rich Live table on a terminal: trial, step, BPB, state."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)

    def __enter__(self) -> _LiveTable:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def update(self, p: smoke.Progress) -> None:
        from rich.table import Table

        t = Table(title=f"{p.race} — {p.phase}, {p.elapsed_s:.0f} s, "
                  f"{p.finished}/{len(p.rows)} finished", expand=False)
        for col in ("trial", "step", "BPB", "samples", "state"):
            t.add_column(col, justify="right" if col in ("step", "BPB", "samples") else "left")
        for r in p.rows:
            bpb = "" if r["bpb"] is None else f"{r['bpb']:.4f}"
            t.add_row(r["canon_name"], str(r["step"] or ""), bpb, str(r["samples"]),
                      f"{r['desired']}/{r['observed']}")
        self.live.update(t)


def smoke_race_cmd(
    config: Annotated[Path | None, typer.Option("--config", help="Smoke config TOML "
                      "(default: gate0-smoke.toml of the package or repository).")] = None,
    tags: Annotated[str | None, typer.Option("--tags", help="Comma-separated tag specs.")] = None,
    seeds_per_tag: Annotated[int | None, typer.Option("--seeds-per-tag")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps")] = None,
    wallclock: Annotated[str | None, typer.Option("--wallclock", help="e.g. 30m")] = None,
    acct: AccountOpt = None,
    auto_teardown: Annotated[bool | None, typer.Option(
        "--auto-teardown/--no-auto-teardown", help="Stop every service at the end.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Markdown report path.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="local or railway.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the Gate-0 smoke race end to end and check its 14 acceptance criteria.

    Exits non-zero when any criterion is RED; prints SMOKE_DONE when all are GREEN.
    """
    s = settings()
    cfg = smoke.load_config(config).with_overrides(
        tags=tags, seeds_per_tag=seeds_per_tag, max_steps=max_steps, wallclock=wallclock,
        account=s.require_account(acct) if acct else None, auto_teardown=auto_teardown,
        report=str(report) if report else None, backend=backend,
    )
    s.require_account(cfg.account)
    from gardener.trainer.data import describe

    run_settings = s.model_copy(update={
        "backend": cfg.backend, "account": cfg.account, "corpus": cfg.corpus,
        "corpus_sha256": describe(cfg.corpus)[1],
    })
    observe = _observer(s, cfg.backend, cfg.account)
    live = _LiveTable() if sys.stderr.isatty() and not as_json else None
    log = smoke.log()
    last = [0.0]

    def on_progress(p: smoke.Progress) -> None:
        if live is not None:
            live.update(p)
        elif p.elapsed_s - last[0] >= 5 or p.phase != "running":
            last[0] = p.elapsed_s
            log.info("smoke_progress", race=p.race, phase=p.phase, elapsed_s=round(p.elapsed_s, 1),
                     finished=p.finished, trials=len(p.rows),
                     min_step=min((r["step"] or 0 for r in p.rows), default=0))

    async def main() -> smoke.SmokeResult:
        dsn, _ = db.resolve_dsn(s)
        return await smoke.run_smoke(cfg, run_settings, dsn=dsn, observe=observe,
                                     on_progress=on_progress)

    if live is not None:
        with live:
            result = anyio.run(main)
    else:
        result = anyio.run(main)

    def human() -> None:
        for c in result.criteria:
            colour = typer.colors.GREEN if c.green else typer.colors.RED
            typer.secho(f"{c.number:>2} {c.status:<5} {c.title}: {c.evidence}", fg=colour)
        if result.report:
            typer.echo(f"report: {result.report}")
        red = ", ".join(str(c.number) for c in result.criteria if not c.green)
        typer.echo(crit.SMOKE_DONE if result.smoke_done else f"SMOKE FAILED: {red} RED")

    emit(result.to_dict(), as_json, human)
    if not result.smoke_done:
        raise typer.Exit(1)


@leaderboard_app.command("rank")
def leaderboard_rank(
    gate: Annotated[str, typer.Option("--gate", help="gate-0, gate-2 or gate-final.")] = "gate-0",
    race: Annotated[str | None, typer.Option("--race", help="Race name (default: latest).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Final BPB per trial from the ledger, ranked, with the gate's verdict."""

    async def run(conn: asyncpg.Connection) -> lb.Leaderboard:
        name = race or await lb.latest_race(conn)
        if name is None:
            raise UserError("no race in the ledger yet")
        return await lb.rank(conn, gate, race=name)

    board = with_db(run)

    def human() -> None:
        typer.echo(f"{board.gate} leaderboard of {board.race}")
        typer.echo(lb.markdown(board))

    emit(board.to_dict(), as_json, human)


def report_cmd(
    race: Annotated[str | None, typer.Option("--race", help="Race name (default: latest).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Markdown path; images go to img/ "
                   "beside it (default docs/SMOKE_GATE_0_REPORT.md for a smoke race, "
                   "else docs/<race>.md).")] = None,
) -> None:
    """Write the Markdown report of a race, with its plots, from the ledger."""

    from gardener.race import report as report_mod

    async def run(conn: asyncpg.Connection) -> Path:
        name = race or await lb.latest_race(conn)
        if name is None:
            raise UserError("no race in the ledger yet")
        kind = await conn.fetchval("SELECT kind FROM races WHERE name = $1", name)
        if kind is None:
            raise UserError(f"unknown race {name!r}")
        path = out or (DEFAULT_REPORT if kind == "smoke" else Path("docs") / f"{name}.md")
        return await report_mod.write_report(conn, name, path)

    typer.echo(json.dumps({"report": str(with_db(run))}))
