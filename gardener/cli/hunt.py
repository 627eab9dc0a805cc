"""``tri hunt``: look at a hunt, and prune or mirror by hand through the daemon's own code.

``prune`` runs the same ``decide`` on the same snapshot the daemon would build and applies
its PRUNE decisions with the same ``apply_decision`` (one transaction each, exactly once);
``mirror`` admits sibling seeds through ``core.seeds`` and the same apply path. Both act only
on the caller's account and refuse while the gardener is paused.
"""

from __future__ import annotations

import getpass
from typing import Annotated, Any

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from gardener.cli.common import AccountOpt, JsonOpt, account, emit, settings, with_db
from gardener.core.decide import decide
from gardener.core.seeds import PHI, RANDOM, SIBLING, SeedPicker
from gardener.core.types import Action, Decision, NewTrial
from gardener.errors import CrossAccountKillForbidden, UserError
from gardener.ledger import control, trials
from gardener.ledger.apply import Outcome, apply_decision
from gardener.ledger.queries import Queries
from gardener.ledger.snapshot import (
    RaceInfo,
    base_config,
    load_snapshot,
    race_config,
    race_info,
)

Q = Queries("loop.sql")
console = Console()
hunt_app = typer.Typer(help="Hunt races: status, prune, mirror.", no_args_is_help=True)

RungOpt = Annotated[int | None, typer.Option("--rung", help="The rung (0 = first boundary).")]
RaceOpt = Annotated[str | None, typer.Option("--race", help="Only this race.")]


def register(app: typer.Typer) -> None:
    app.add_typer(hunt_app, name="hunt")


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry in some containers
        return "unknown"


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
            await _race_for(conn, race, who)
        rows = await conn.fetch(Q.hunt_status, who, rung, race)
        out = []
        for r in rows:
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


async def _race_for(conn: asyncpg.Connection, name: str, who: str) -> RaceInfo:
    info = await race_info(conn, name)
    if info is None:
        raise UserError(f"no race named {name!r}")
    if info.account != who:
        raise CrossAccountKillForbidden(f"race {name!r} belongs to {info.account}, not {who}")
    return info


async def _races(conn: asyncpg.Connection, who: str, race: str | None) -> list[RaceInfo]:
    if race is not None:
        return [await _race_for(conn, race, who)]
    rows = await conn.fetch(Q.running_races)
    return [RaceInfo.from_row(r) for r in rows if r["account"] == who]


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
    """What the rung's rule would prune now (the daemon's own decide); --apply applies it."""
    who = account(acct)
    s = settings()
    base = base_config(s)

    async def run(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        paused = (await control.get(conn)).paused
        if apply and paused:
            raise UserError("the gardener is paused: no prune is applied (tri resume first)")
        out: list[dict[str, Any]] = []
        for info in await _races(conn, who, race):
            snap = await load_snapshot(
                conn, info, paused=False, expected_corpus_sha256=s.corpus_sha256,
                expected_corpus=s.corpus,
            )
            prunes = [
                d
                for d in decide(snap, race_config(base, info))
                if d.action is Action.PRUNE and d.rung == rung
            ]
            for d in prunes:
                if apply:
                    result = await apply_decision(
                        conn, info.name, info.account, d, decided_by=f"cli:{_who()}",
                        backend=s.backend,
                    )
                    out.append(_decision_json(d, result.outcome.value) | {"race": info.name})
                else:
                    out.append(_decision_json(d, "would prune") | {"race": info.name})
        return out

    rows = with_db(run)

    def human() -> None:
        if not rows:
            typer.echo(f"nothing to prune at rung {rung}")
            return
        table = Table("race", "trial", "outcome", "reason")
        for r in rows:
            table.add_row(r["race"], r["canon_name"], r["outcome"], r["reason"])
        console.print(table)

    emit(rows, as_json, human)


STRATEGIES = (PHI, SIBLING, RANDOM)


@hunt_app.command("mirror")
def mirror_cmd(
    leader: Annotated[str, typer.Option("--leader", help="The trial to mirror.")],
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
        if (await control.get(conn)).paused:
            raise UserError("the gardener is paused: no mirror is started (tri resume first)")
        trial = await trials.get_trial(conn, leader)
        trials.check_owner(trial, who)
        used = await trials.used_seeds(conn, trial["variant"])
        picker = SeedPicker(trial["race"], {trial["variant"]: used})
        order = (strategy,) if strategy == RANDOM else (strategy, RANDOM)
        picked = picker.pick(trial["variant"], count, leader_seed=int(trial["seed"]), order=order)
        d = Decision(
            Action.MIRROR,
            leader,
            int(trial["rung"]),
            f"mirror {leader} by hand with {len(picked)} seeds ({strategy}) for {who}",
            spawn=tuple(NewTrial(trial["variant"], sd, how, leader) for sd, how in picked),
            numbers={"by": _who(), "count": count, "strategy": strategy},
        )
        result = await apply_decision(
            conn, trial["race"], who, d, decided_by=f"cli:{_who()}", backend=s.backend
        )
        if result.outcome is Outcome.DUPLICATE:
            raise UserError(
                f"{leader} was already mirrored at rung {trial['rung']}; mirror again after "
                "its next rung"
            )
        return _decision_json(d, result.outcome.value) | {"spawned": list(result.spawned)}

    out = with_db(run)

    def human() -> None:
        typer.echo(f"mirrored {leader}: " + ", ".join(out["spawned"]))

    emit(out, as_json, human)
