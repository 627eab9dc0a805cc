"""Ledger commands: migrate, status, db, exp, canon, champion, kill, pause/resume, tripwire."""

from __future__ import annotations

import time
from typing import Annotated

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from gardener.backends import Backend, backend_for
from gardener.cli.common import (
    AccountOpt,
    JsonOpt,
    account,
    account_filter,
    actor,
    emit,
    settings,
    with_db,
)
from gardener.cli.common import user as _who
from gardener.core import canon
from gardener.errors import UserError
from gardener.ledger import control, db, expid, migrate
from gardener.ledger.apply import Applied
from gardener.ledger.queries import Queries
from gardener.loop import hand

Q = Queries("ledger.sql")
console = Console()


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


def migrate_cmd(acct: AccountOpt = None) -> None:
    """Create or update the ledger (embedded PostgreSQL when DATABASE_URL is unset)."""
    account_filter(acct)  # the ledger is shared: an account is accepted, and must be known
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


def status_cmd(acct: AccountOpt = None, as_json: JsonOpt = False) -> None:
    """Show the ledger: counts, the pause flag and the champion slots (of ``--account`` only,
    when given)."""
    who = account_filter(acct)
    s = settings()
    _, where = db.resolve_dsn(s)

    async def run(conn: asyncpg.Connection) -> dict[str, object]:
        counts = dict(await conn.fetchrow(Q.ledger_counts, who) or {})
        ctl = await control.get(conn)
        slots = [dict(r) for r in await conn.fetch(Q.champion_slots, who)]
        return {
            "database": where,
            "account": who,
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
        table = Table("slot", "owner", "canon name", "BPB", "seed", "state")
        for slot in data["champion_slots"]:  # type: ignore[attr-defined]
            table.add_row(
                expid.format_exp_id(slot["exp_id"]),
                slot["owner"],
                slot["canon_name"] or "(reserved)",
                f"{slot['bpb']:.4f}" if slot["bpb"] is not None else "",
                str(slot["seed"] or ""),
                slot["desired_state"] or "",
            )
        console.print(table)

    emit(data, as_json, human)


db_app = typer.Typer(help="The embedded database.", no_args_is_help=True)


@db_app.command("start")
def db_start(acct: AccountOpt = None) -> None:
    """Start the embedded PostgreSQL and keep it running until `gardener db stop`."""
    account_filter(acct)
    where = db.embedded_dir(settings())
    db.start_embedded(where, keep_running=True)
    typer.echo(f"embedded PostgreSQL running in {where} until `gardener db stop`")


@db_app.command("stop")
def db_stop(acct: AccountOpt = None) -> None:
    """Stop the embedded PostgreSQL server, if one runs under the data directory."""
    account_filter(acct)
    where = db.embedded_dir(settings())
    stopped = db.stop_embedded(where)
    typer.echo(f"stopped embedded PostgreSQL in {where}" if stopped else f"none running in {where}")


@db_app.command("url")
def db_url(acct: AccountOpt = None) -> None:
    """Print where the ledger is (never the password)."""
    account_filter(acct)
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
    acct: AccountOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Parse canon names and apply L-R9; exit non-zero if any is bad."""
    account_filter(acct)  # names are the same for every account; a given one must be known
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
    name: Annotated[str, typer.Argument(help="The trial to deploy: canon name, EXP_ID or seed.")],
    slot: Annotated[int, typer.Option("--slot", help="Champion slot number, 1..4.")],
    acct: AccountOpt = None,
    force_replace: Annotated[
        bool,
        typer.Option("--force-replace", help="Replace the slot's holder (it must be stopped)."),
    ] = False,
    no_deploy: Annotated[
        bool, typer.Option("--no-deploy", help="Only bind; the daemon deploys on its next pass.")
    ] = False,
) -> None:
    """Put one of your trials into a champion slot you own and deploy its service: refused for
    a used slot unless forced, and then only once its holder is stopped (kill before spin)."""
    who = account(acct)
    s = settings()

    def backend(kind: str, acc: str) -> Backend:
        return backend_for(s, acc, kind)

    async def run(conn: asyncpg.Connection) -> hand.ChampionDeployed:
        return await hand.champion_deploy(
            conn, s, name, slot, who, force_replace=force_replace, by=actor(who),
            backend_for=None if no_deploy else backend)

    done = with_db(run)
    state = done.slot
    line = f"{expid.format_exp_id(state.exp_id)} now holds {state.canon_name}"
    if state.replaced:
        line += f" (replacing {state.replaced})"
    if not state.changed:
        line = f"{expid.format_exp_id(state.exp_id)} already holds {state.canon_name}"
    if done.deploy is not None:
        line += f"; deploy: {done.deploy.summary()}"
    typer.echo(line)


def kill_cmd(
    name: Annotated[str, typer.Argument(help="The trial to stop: canon name, EXP_ID or seed.")],
    acct: AccountOpt = None,
    reason: Annotated[str, typer.Option("--reason")] = "",
    replace: Annotated[
        bool, typer.Option("--replace", help="Start a fresh seed of its variant in its place.")
    ] = False,
) -> None:
    """Stop one of your account's trials as the daemon prunes one (the reconciler then stops
    its service)."""
    typer.echo(kill_line(name, account(acct), reason=reason, replace=replace))


def kill_line(name: str, who: str, *, reason: str = "", replace: bool = False) -> str:
    """Kill through the daemon's apply path; the one line the user reads."""
    s = settings()

    async def run(conn: asyncpg.Connection) -> list[Applied]:
        return await hand.kill(conn, name, who, by=actor(who), reason=reason, replace=replace,
                               backend=s.backend)

    done = with_db(run)
    if not done:
        return f"{name}: already stopping or stopped"
    spawned = [n for a in done for n in a.spawned]
    return f"{done[0].decision.canon_name}: stop requested" + (
        f"; replaced by {', '.join(spawned)}" if spawned else "")


def pause_cmd(
    reason: Annotated[str, typer.Option("--reason", help="Why, for the audit trail.")] = "",
    acct: AccountOpt = None,
) -> None:
    """Pause every mutating action (ingest and fitting go on); records who paused."""
    by = actor(account_filter(acct))
    ctl = with_db(lambda conn: control.set_paused(conn, True, reason or "paused", by))
    typer.echo(f"paused by {ctl.changed_by}: {ctl.reason}")


def resume_cmd(acct: AccountOpt = None) -> None:
    """Resume mutating actions; records who resumed."""
    by = actor(account_filter(acct))
    ctl = with_db(lambda conn: control.set_paused(conn, False, "resumed", by))
    typer.echo(f"resumed by {ctl.changed_by}")


tripwire_app = typer.Typer(help="Tripwire events.", no_args_is_help=True)


@tripwire_app.command("list")
def tripwire_list(
    all_events: Annotated[bool, typer.Option("--all", help="Include acknowledged events.")] = False,
    acct: AccountOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List open (or all) tripwire events (of ``--account``'s trials and races, when given)."""
    who = account_filter(acct)

    async def run(conn: asyncpg.Connection) -> list[dict[str, object]]:
        rows = await conn.fetch(Q.tripwire_list, all_events, who)
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
    done = with_db(lambda conn: control.ack_tripwire(conn, event_id, who, actor(who)))
    typer.echo(
        f"tripwire {event_id} acknowledged"
        if done
        else f"tripwire {event_id} was already acknowledged"
    )
