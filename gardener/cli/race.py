"""Race commands: ``smoke-race`` (Gate-0 end to end), ``leaderboard rank`` and ``report``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import anyio
import asyncpg
import typer

from gardener import logs
from gardener.backends import backend_for
from gardener.backends.base import ACTIVE, Backend, BackendError, ServiceState
from gardener.cli.common import AccountOpt, JsonOpt, account_filter, emit, settings, with_db
from gardener.errors import CrossAccountKillForbidden, UserError
from gardener.ledger import db
from gardener.race import criteria as crit
from gardener.race import leaderboard as lb
from gardener.race import smoke, smoke_config
from gardener.settings import Settings

DEFAULT_REPORT = Path("docs/SMOKE_GATE_0_REPORT.md")

leaderboard_app = typer.Typer(help="Ranked final BPB per trial, with gate verdicts.",
                              no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("smoke-race")(smoke_race_cmd)
    app.add_typer(leaderboard_app, name="leaderboard")
    app.command("report")(report_cmd)


def _backend(s: Settings, kind: str, account: str) -> Backend:
    """The race's backend, built once: observe() for criterion 13 and the teardown, stop()
    for an interrupted run."""
    return backend_for(s, account, kind)


def _observer(backend: Backend) -> smoke.ObserveFn:
    async def observe() -> Sequence[ServiceState]:
        return await backend.observe()

    return observe


def _stopper(backend: Backend, account: str) -> smoke.StopFn:
    """Stop the named trials at once (each one's process group: SIGTERM, then SIGKILL)."""

    async def stop_trials(names: Sequence[str]) -> Sequence[str]:
        stopped: list[str] = []

        async def one(name: str) -> None:
            try:
                if await backend.stop(name, account=account):
                    stopped.append(name)
            except (OSError, UserError, BackendError) as exc:
                smoke.log().warning("smoke_stop_failed", canon_name=name, error=str(exc))

        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(one, name)
        return sorted(stopped)

    return stop_trials


class _ConsoleStream:
    """Log lines printed above the live table instead of through it."""

    def __init__(self, console: Any) -> None:
        self.console = console

    def write(self, text: str) -> int:
        from rich.text import Text

        if text.strip():
            self.console.print(Text.from_ansi(text.rstrip("\n")))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


class _LiveTable:
    """A rich Live table on a terminal: trial, step, BPB, state."""

    def __init__(self, header: str) -> None:
        from rich.console import Console
        from rich.live import Live

        self.header = header
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
                  f"{p.finished}/{len(p.rows)} finished", caption=self.header, expand=False)
        name_w = max((len(r["canon_name"]) for r in p.rows), default=5)
        wide = self.console.width >= name_w + 50  # room for the samples column too
        t.add_column("trial", no_wrap=True, min_width=name_w)
        t.add_column("step", justify="right", no_wrap=True, min_width=4)
        t.add_column("BPB", justify="right", no_wrap=True, min_width=6)
        if wide:
            t.add_column("samples", justify="right", no_wrap=True)
        t.add_column("state", no_wrap=True, min_width=7, overflow="ellipsis")
        for r in p.rows:
            bpb = "" if r["bpb"] is None else f"{r['bpb']:.4f}"
            stopping = r["desired"] != "running" and r["observed"] in ACTIVE
            state = f"{r['observed']}, stopping" if stopping else str(r["observed"])
            cells = [r["canon_name"], str(r["step"] or ""), bpb]
            cells += [str(r["samples"])] if wide else []
            t.add_row(*cells, state)
        self.live.update(t)


def _in_checkout(cwd: Path) -> bool:
    """Whether ``cwd`` is a checkout of this project (its docs/ is where the report belongs)."""
    return (cwd / "configs" / "gate0-smoke.toml").is_file() and (cwd / "gardener").is_dir()


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
    report: Annotated[Path | None, typer.Option("--report", help="Markdown report path "
                      "(default: docs/SMOKE_GATE_0_REPORT.md in a checkout, else in the data "
                      "directory).")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="local or railway.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the Gate-0 smoke race end to end and check its 14 acceptance criteria.

    Exits 0 with SMOKE_DONE when all are GREEN, 1 when any is RED, 130 on Ctrl-C and 143 on
    SIGTERM (every trainer of the race stopped, the race marked torn_down).
    """
    s = settings()
    cfg = smoke_config.load_config(config).with_overrides(
        tags=tags, seeds_per_tag=seeds_per_tag, max_steps=max_steps, wallclock=wallclock,
        account=s.require_account(acct) if acct else None, auto_teardown=auto_teardown,
        report=str(report) if report else None, backend=backend,
    )
    s.require_account(cfg.account)
    fallback = s.data_dir.resolve() / "reports"
    if report is None and cfg.report and not Path(cfg.report).is_absolute() \
            and not _in_checkout(Path.cwd()):
        cfg = cfg.with_overrides(report=str(fallback / Path(cfg.report).name))
    from gardener.trainer.data import describe

    run_settings = s.model_copy(update={
        "backend": cfg.backend, "account": cfg.account, "corpus": cfg.corpus,
        "corpus_sha256": describe(cfg.corpus)[1],
    })
    race_backend = _backend(s, cfg.backend, cfg.account)
    embedded = s.database_dsn() is None
    where = [f"embedded PostgreSQL in {db.embedded_dir(s)}" if embedded else ""]
    live = _LiveTable("") if sys.stderr.isatty() and not as_json else None

    def say(text: str) -> None:
        """A plain line for the user on stderr (stdout stays the result)."""
        typer.echo(text, err=True)

    if live is not None:  # daemon logs above the table, and only what needs attention
        logs.configure(s.log_format, "warning" if s.log_level.lower() in ("info", "debug")
                       else s.log_level, stream=_ConsoleStream(live.console))
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
        if embedded:
            say(f"ledger: starting {where[0]} ...")
        dsn, described = await anyio.to_thread.run_sync(db.resolve_dsn, s)
        where[0] = described
        say(f"ledger: {described}; trainers: {cfg.backend} backend"
            + (f", state in {race_backend_state(s)}" if cfg.backend == "local" else "")
            + (f"; report: {cfg.report}" if cfg.report else ""))
        if live is not None:
            live.header = f"ledger: {described} — Ctrl-C stops every trainer of the race"
        log.info("smoke_ledger", ledger=described, backend=cfg.backend, report=cfg.report)
        return await smoke.run_smoke(cfg, run_settings, dsn=dsn, observe=_observer(race_backend),
                                     stop_trials=_stopper(race_backend, cfg.account),
                                     on_progress=on_progress, report_fallback=fallback,
                                     handle_signals=True)

    try:
        if live is not None:
            with live:
                result = anyio.run(main)
        else:
            result = anyio.run(main)
    except KeyboardInterrupt:  # before the race's own handler was installed: nothing runs yet
        say("interrupted (SIGINT) before the race started: nothing was admitted or started")
        raise typer.Exit(130) from None
    db_note = (" (the embedded PostgreSQL stops as this command exits; any gardener command "
               "starts it again to read the ledger)" if embedded else "")

    if result.interrupted is not None:
        i = result.interrupted
        if as_json:
            emit(result.to_dict(), True, lambda: None)
        if i.status is None:
            say(f"interrupted ({i.signal}) before the race was admitted: nothing runs{db_note}")
        else:
            left = (f"; STILL RUNNING: {', '.join(i.left_running)}" if i.left_running else "")
            ended = len(result.planned) - len(i.stopped) - len(i.left_running)
            say(f"interrupted ({i.signal}) during {i.phase}: {len(i.stopped)} running "
                f"trainer(s) stopped" + (f" ({ended} had finished)" if ended else "")
                + f"{left or ', none left running'}; race {result.race} marked {i.status} "
                f"in the ledger ({where[0]}){db_note}")
        raise typer.Exit(i.exit_code)

    def human() -> None:
        width = max((len(c.title) for c in result.criteria), default=0)
        typer.echo(f"Gate-0 criteria of {result.race}:")
        for c in result.criteria:
            colour = typer.colors.GREEN if c.green else typer.colors.RED
            typer.secho(f"{c.number:>2} {c.status:<5} {c.title:<{width}}  {c.evidence}",
                        fg=colour)
        if result.report_note:
            typer.echo(f"note: {result.report_note}")
        if result.report:
            typer.echo(f"report: {result.report}")
        typer.echo(f"ledger: {where[0]}")
        red = ", ".join(str(c.number) for c in result.criteria if not c.green)
        typer.echo((crit.SMOKE_DONE if result.smoke_done else f"SMOKE FAILED: {red} RED")
                   + db_note)

    emit(result.to_dict(), as_json, human)
    if not result.smoke_done:
        raise typer.Exit(1)


def race_backend_state(s: Settings) -> Path:
    """Where the local backend keeps its pid records and trainer logs."""
    return (s.data_dir / "local").resolve()


@leaderboard_app.command("rank")
def leaderboard_rank(
    gate: Annotated[str, typer.Option(
        "--gate", help="gate-0, gate-2 or gate-final (any case: GATE-FINAL).")] = "gate-0",
    race: Annotated[str | None, typer.Option("--race", help="Race name (default: latest).")] = None,
    acct: AccountOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Final BPB per trial from the ledger, ranked, with the gate's verdict (a trial counts
    only at its horizon and with no open tripwire; ``--account``: that account's trials)."""
    who = account_filter(acct)

    async def run(conn: asyncpg.Connection) -> lb.Leaderboard:
        name = race or await lb.latest_race(conn, account=who)
        if name is None:
            raise UserError("no race in the ledger yet"
                            + (f" for {who}" if who else ""))
        return await lb.rank(conn, gate, race=name, account=who)

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
    acct: AccountOpt = None,
) -> None:
    """Write the Markdown report of a race, with its plots, from the ledger (``--account``:
    that account's latest race, and no other account's)."""

    from gardener.race import report as report_mod

    who = account_filter(acct)

    async def run(conn: asyncpg.Connection) -> Path:
        name = race or await lb.latest_race(conn, account=who)
        if name is None:
            raise UserError("no race in the ledger yet")
        row = await conn.fetchrow("SELECT kind, account FROM races WHERE name = $1", name)
        if row is None:
            raise UserError(f"unknown race {name!r}")
        if who is not None and row["account"] != who:
            raise CrossAccountKillForbidden(f"race {name!r} belongs to {row['account']}, "
                                            f"not {who}")
        kind = row["kind"]
        path = out or (DEFAULT_REPORT if kind == "smoke" else Path("docs") / f"{name}.md")
        return await report_mod.write_report(conn, name, path)

    typer.echo(json.dumps({"report": str(with_db(run))}))
