"""``tri hunt``: look at a hunt, and prune or mirror by hand through the daemon's own code.

``prune`` and ``mirror`` are ``gardener.loop.hand``: the daemon's ``decide`` on the same
snapshot, applied by the same ``apply_decisions`` (a DIVERGING prune starts its replacement,
exactly once). Both act only on the caller's account and refuse while the gardener is paused.
"""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from gardener.cli.common import (
    AccountOpt,
    JsonOpt,
    account,
    actor,
    by_exp_id,
    emit,
    settings,
    with_db,
)
from gardener.core.seeds import PHI, RANDOM, SIBLING
from gardener.core.types import Decision
from gardener.errors import UserError
from gardener.ledger.apply import Outcome
from gardener.ledger.queries import Queries
from gardener.loop import hand

Q = Queries("loop.sql")
console = Console()
hunt_app = typer.Typer(help="Hunt races: status, prune, mirror.", no_args_is_help=True)

RungOpt = Annotated[int | None, typer.Option("--rung", help="The rung (0 = first boundary).")]
RaceOpt = Annotated[str | None, typer.Option("--race", help="Only this race.")]


def register(app: typer.Typer) -> None:
    app.add_typer(hunt_app, name="hunt")


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "" if x is None else format(float(x), spec)


@hunt_app.command("status")
def status_cmd(
    rung: RungOpt = None, race: RaceOpt = None, acct: AccountOpt = None, as_json: JsonOpt = False
) -> None:
    """The account's trials: state, last step and BPB, bpb_inf with its interval, delta, slope
    and the latest decision (at ``--rung`` when given)."""
    who = account(acct)

    async def run(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        if race is not None:
            await hand.races_of(conn, who, race)
        rows = await conn.fetch(Q.hunt_status, who, rung, race)
        out = []
        for r in sorted(rows, key=lambda r: (r["race"], by_exp_id(r["canon_name"]))):
            nums = r["decision_numbers"] or {}
            out.append(
                {
                    "canon_name": r["canon_name"],
                    "race": r["race"],
                    "desired_state": r["desired_state"],
                    "observed_state": r["observed_state"],
                    "rung": r["rung"],
                    "seed_state": r["seed_state"],
                    "last_step": r["last_step"],
                    "last_bpb": r["last_bpb"],
                    "bpb_inf": r["fit_bpb_inf"],
                    "bpb_inf_ci": [r["fit_ci_low"], r["fit_ci_high"]],
                    "delta": nums.get("delta"),
                    "slope": nums.get("slope"),
                    "decision": r["decision"],
                    "reason": r["decision_reason"],
                }
            )
        return out

    rows = with_db(run)

    def human() -> None:
        table = Table("trial", "state", "step", "BPB", "bpb_inf [95% CI]", "delta", "slope",
                      "seed state", "decision", title=f"{who} trials")
        for r in rows:
            lo, hi = r["bpb_inf_ci"]
            interval = (f"{_fmt(r['bpb_inf'])} [{_fmt(lo)}, {_fmt(hi)}]"
                        if r["bpb_inf"] is not None else "")
            table.add_row(
                r["canon_name"],
                f"{r['desired_state']}/{r['observed_state']}",
                "" if r["last_step"] is None else str(r["last_step"]),
                _fmt(r["last_bpb"]),
                interval,
                _fmt(r["delta"], "+.4f"),
                _fmt(r["slope"], "+.5f"),
                r["seed_state"] or "",
                r["decision"] or "",
            )
        console.print(table)

    emit(rows, as_json, human)


def _decision_json(d: Decision, outcome: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "canon_name": d.canon_name,
        "rung": d.rung,
        "action": d.action.value,
        "seed_state": d.seed_state.value,
        "reason": d.reason,
    }
    if d.spawn:
        out["seeds"] = [{"seed": s.seed, "strategy": s.seed_strategy} for s in d.spawn]
    if outcome is not None:
        out["outcome"] = outcome
    return out


@hunt_app.command("prune")
def prune_cmd(
    rung: Annotated[int, typer.Option("--rung", help="Prune at this rung (1 = second).")],
    apply: Annotated[bool, typer.Option("--apply", help="Apply; without it, only show.")] = False,
    race: RaceOpt = None,
    acct: AccountOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What the rung's rule would prune now (the daemon's own decide), with the replacements
    that go with it; --apply applies them as the daemon does."""
    who = account(acct)
    s = settings()

    async def run(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for rd in await hand.prune(conn, s, who, rung, race=race, apply=apply, by=actor(who)):
            if apply:
                for a in rd.applied:
                    row = _decision_json(a.decision, a.outcome.value) | {"race": rd.race.name}
                    out.append(row | {"spawned": list(a.spawned)})
            else:
                out += [_decision_json(d, f"would {d.action.value}") | {"race": rd.race.name}
                        for d in rd.decisions]
        return out

    rows = with_db(run)

    def human() -> None:
        if not rows:
            typer.echo(f"nothing to prune at rung {rung}")
            return
        table = Table("race", "trial", "action", "outcome", "reason")
        for r in rows:
            table.add_row(r["race"], r["canon_name"], r["action"], r["outcome"], r["reason"])
        console.print(table)

    emit(rows, as_json, human)


STRATEGIES = (PHI, SIBLING, RANDOM)


@hunt_app.command("mirror")
def mirror_cmd(
    leader: Annotated[str, typer.Option(
        "--leader", help="The trial to mirror: canon name, EXP_ID (E0005) or seed (200).")],
    count: Annotated[int, typer.Option("--count", min=1, max=32)] = 3,
    strategy: Annotated[
        str, typer.Option("--strategy", help="phi-anchored, sibling or random.")
    ] = SIBLING,
    acct: AccountOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start ``count`` new seeds of the leader's variant (NEVER REUSE; random fills in when
    the strategy runs out, e.g. a leader has only two siblings)."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}")
    who = account(acct)
    s = settings()

    async def run(conn: asyncpg.Connection) -> dict[str, Any]:
        result = await hand.mirror(conn, leader, who, count=count, strategy=strategy,
                                   by=actor(who), backend=s.backend)
        d = result.decision
        if result.outcome is Outcome.DUPLICATE:
            raise UserError(
                f"{d.canon_name} was already mirrored at rung {d.rung}; mirror again after "
                "its next rung"
            )
        return _decision_json(d, result.outcome.value) | {"spawned": list(result.spawned)}

    out = with_db(run)

    def human() -> None:
        typer.echo(f"mirrored {out['canon_name']}: " + ", ".join(out["spawned"]))

    emit(out, as_json, human)
