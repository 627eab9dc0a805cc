"""Ledger commands: migrate, status, db, exp, canon, champion, kill, pause/resume, tripwire."""

from __future__ import annotations

import getpass
import time
from typing import Annotated

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from gardener.cli.common import AccountOpt, JsonOpt, account, emit, settings, with_db
from gardener.core import canon
from gardener.errors import UserError
from gardener.ledger import control, db, expid, migrate, trials
from gardener.ledger.queries import Queries

Q = Queries("ledger.sql")
console = Console()


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry in some containers
        return "unknown"


def register(app: typer.Typer) -> None:
    app.command("migrate")(migrate_cmd)
    app.command("status")(status_cmd)
    app.command("kill")(kill_cmd)
    app.command("pause")(pause_cmd)
    app.command("resume")(resume_cmd)
    app.add_typer(db_app, name="db")
    app.add_typer(exp_app, name="exp")
    app.add_typer(canon_app, name="canon")
    app.add_typer(champion_app, name="champion")
    app.add_typer(tripwire_app, name="tripwire")


def migrate_cmd() -> None:
    """Create or update the ledger (embedded PostgreSQL when DATABASE_URL is unset)."""
    s = settings()
    started = time.perf_counter()
    _, where = db.resolve_dsn(s)

    async def run(conn: asyncpg.Connection) -> list[str]:
        return await migrate.migrate(conn)

    applied = with_db(run, apply_migrations=False)
    took = time.perf_counter() - started
    if applied:
        typer.echo(f"ledger at {where}: applied {', '.join(applied)} in {took:.2f}s")
    else:
        typer.echo(f"ledger at {where}: up to date ({took:.2f}s)")


def status_cmd(as_json: JsonOpt = False) -> None:
    """Show the ledger: counts, the pause flag and the champion slots."""
    s = settings()
    _, where = db.resolve_dsn(s)

    async def run(conn: asyncpg.Connection) -> dict[str, object]:
        counts = dict(await conn.fetchrow(Q.ledger_counts) or {})
        ctl = await control.get(conn)
        slots = [dict(r) for r in await conn.fetch(Q.champion_slots)]
        return {
            "database": where,
            "counts": counts,
            "paused": ctl.paused,
            "pause_reason": ctl.reason,
            "next_exp_id": expid.format_exp_id(await expid.next_exp_id(conn)),
            "champion_slots": slots,
        }

    data = with_db(run)

    def human() -> None:
        console.print(f"[bold]ledger[/] {data['database']}")
        counts = data["counts"]
        assert isinstance(counts, dict)
        console.print("  " + "  ".join(f"{k}={v}" for k, v in counts.items()))
        console.print(f"  paused={data['paused']} next EXP_ID={data['next_exp_id']}")
        table = Table("slot", "canon name", "BPB", "seed", "state")
        for slot in data["champion_slots"]:  # type: ignore[attr-defined]
            table.add_row(
                expid.format_exp_id(slot["exp_id"]),
                slot["canon_name"] or "(reserved)",
                f"{slot['bpb']:.4f}" if slot["bpb"] is not None else "",
                str(slot["seed"] or ""),
                slot["desired_state"] or "",
            )
        console.print(table)

    emit(data, as_json, human)


db_app = typer.Typer(help="The embedded database.", no_args_is_help=True)


@db_app.command("start")
def db_start() -> None:
    """Start the embedded PostgreSQL and keep it running until `gardener db stop`."""
    where = db.embedded_dir(settings())
    db.start_embedded(where, keep_running=True)
    typer.echo(f"embedded PostgreSQL running in {where} until `gardener db stop`")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL server, if one runs under the data directory."""
    where = db.embedded_dir(settings())
    stopped = db.stop_embedded(where)
    typer.echo(f"stopped embedded PostgreSQL in {where}" if stopped else f"none running in {where}")


@db_app.command("url")
def db_url() -> None:
    """Print where the ledger is (never the password)."""
    typer.echo(db.resolve_dsn(settings())[1])


exp_app = typer.Typer(help="EXP_IDs: show the next one, or claim ids.", no_args_is_help=True)


@exp_app.command("next")
def exp_next(acct: AccountOpt = None, as_json: JsonOpt = False) -> None:
    """Show the next EXP_ID without taking it."""
    account(acct)
    value = with_db(expid.next_exp_id)
    emit(
        {"next": expid.format_exp_id(value)},
        as_json,
        lambda: typer.echo(expid.format_exp_id(value)),
    )


@exp_app.command("claim")
def exp_claim(
    acct: AccountOpt = None,
    count: Annotated[int, typer.Option("--count", help="How many ids to take.")] = 1,
    exp_id: Annotated[
        int | None, typer.Option("--exp-id", help="Take this exact id (refused if used or a slot).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Take EXP_IDs; never a duplicate, even with many concurrent claimers."""
    who = account(acct)

    async def run(conn: asyncpg.Connection) -> list[int]:
        if exp_id is not None:
            return [await expid.claim_exact(conn, exp_id, who, None, by=_who())]
        return await expid.claim(conn, who, count, by=_who())

    ids = with_db(run)
    names = [expid.format_exp_id(i) for i in ids]
    emit({"claimed": names, "account": who}, as_json, lambda: typer.echo("\n".join(names)))


canon_app = typer.Typer(help="Canon names.", no_args_is_help=True)


@canon_app.command("check")
def canon_check(
    names: Annotated[list[str], typer.Argument(help="Canon names to check.")],
    hidden_size: Annotated[
        int | None, typer.Option("--hidden-size", help="Hidden size, for the L-R9 check.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Parse canon names and apply L-R9; exit non-zero if any is bad."""
    results = []
    for name in names:
        try:
            parsed = canon.parse(name)
            h = hidden_size or parsed.hidden_size or _default_hidden(parsed)
            canon.check_gf16_hidden(parsed, h)
            results.append(
                {
                    "name": name,
                    "ok": True,
                    "model": parsed.model,
                    "format": parsed.format,
                    "tags": list(parsed.tags),
                    "exp_id": parsed.exp_id,
                    "seed": parsed.seed,
                    "hidden_size": h,
                }
            )
        except UserError as exc:
            results.append({"name": name, "ok": False, "error": str(exc)})

    def human() -> None:
        for r in results:
            if r["ok"]:
                typer.echo(f"ok   {r['name']}  (h={r['hidden_size']})")
            else:
                typer.secho(f"bad  {r['error']}", err=True, fg=typer.colors.RED)

    emit(results, as_json, human)
    if not all(r["ok"] for r in results):
        raise typer.Exit(2)


def _default_hidden(parsed: canon.CanonName) -> int | None:
    """The model's default hidden size from configs/models.toml."""
    try:
        from gardener.trainer.spec import hidden_size_for, load_models_config
    except ImportError:
        return None
    return hidden_size_for(parsed, load_models_config())


champion_app = typer.Typer(help="Champion slots E0001..E0004.", no_args_is_help=True)


@champion_app.command("deploy")
def champion_deploy(
    name: Annotated[str, typer.Argument(help="Canon name of the champion to put in the slot.")],
    slot: Annotated[int, typer.Option("--slot", help="Champion slot number, 1..4.")],
    acct: AccountOpt = None,
    force_replace: Annotated[
        bool,
        typer.Option("--force-replace", help="Replace the slot's holder (it must be stopped)."),
    ] = False,
) -> None:
    """Bind a champion to a slot: refused for a used slot unless forced and its service is down."""
    who = account(acct)
    parsed = canon.parse(name)

    async def run(conn: asyncpg.Connection) -> expid.SlotState:
        return await expid.replace_champion_slot(
            conn, slot, str(parsed), parsed.seed, who, force_replace=force_replace
        )

    state = with_db(run)
    typer.echo(f"{expid.format_exp_id(state.exp_id)} now holds {state.canon_name}")


def kill_cmd(
    name: Annotated[str, typer.Argument(help="Canon name of the trial to stop.")],
    acct: AccountOpt = None,
    reason: Annotated[str, typer.Option("--reason")] = "",
) -> None:
    """Stop one of your account's trials (the reconciler then stops its service)."""
    who = account(acct)

    async def run(conn: asyncpg.Connection) -> bool:
        return await trials.kill(conn, name, who, by=_who(), reason=reason)

    changed = with_db(run)
    typer.echo(f"{name}: stop requested" if changed else f"{name}: already stopping or stopped")


def pause_cmd(
    reason: Annotated[str, typer.Option("--reason", help="Why, for the audit trail.")] = "",
) -> None:
    """Pause every mutating action (ingest and fitting go on)."""
    ctl = with_db(lambda conn: control.set_paused(conn, True, reason or "paused", _who()))
    typer.echo(f"paused by {ctl.changed_by}: {ctl.reason}")


def resume_cmd() -> None:
    """Resume mutating actions."""
    ctl = with_db(lambda conn: control.set_paused(conn, False, "resumed", _who()))
    typer.echo(f"resumed by {ctl.changed_by}")


tripwire_app = typer.Typer(help="Tripwire events.", no_args_is_help=True)


@tripwire_app.command("list")
def tripwire_list(
    all_events: Annotated[bool, typer.Option("--all", help="Include acknowledged events.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List open (or all) tripwire events."""

    async def run(conn: asyncpg.Connection) -> list[dict[str, object]]:
        where = "" if all_events else "WHERE acknowledged_at IS NULL"
        rows = await conn.fetch(
            f"SELECT id, kind, race, canon_name, evidence, fired_at, acknowledged_by "
            f"FROM tripwire_events {where} ORDER BY id"
        )
        return [dict(r) for r in rows]

    events = with_db(run)

    def human() -> None:
        table = Table("id", "kind", "trial", "fired", "ack")
        for e in events:
            table.add_row(
                str(e["id"]),
                str(e["kind"]),
                str(e["canon_name"] or e["race"] or ""),
                str(e["fired_at"])[:19],
                str(e["acknowledged_by"] or ""),
            )
        console.print(table)

    emit(events, as_json, human)


@tripwire_app.command("ack")
def tripwire_ack(
    event_id: Annotated[int, typer.Argument(help="The tripwire event id.")],
    acct: AccountOpt = None,
) -> None:
    """Acknowledge a tripwire after review; held promotions and mirrors resume."""
    who = account(acct)
    done = with_db(lambda conn: control.ack_tripwire(conn, event_id, who, _who()))
    typer.echo(
        f"tripwire {event_id} acknowledged"
        if done
        else f"tripwire {event_id} was already acknowledged"
    )
