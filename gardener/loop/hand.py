"""What a person does by hand, through the daemon's own decide and apply.

- ``prune``: the same ``decide`` on the same snapshot the daemon builds; the rung's PRUNE
  decisions are applied together with the REPLACE decisions that go with them (a DIVERGING
  kill starts its replacement, as in the daemon).
- ``kill``: a PRUNE decision of the person's (and, asked for, its REPLACE), applied by
  ``apply_decisions``: audit row, stop, exactly once by the natural key.
- ``mirror``: a MIRROR decision whose seeds come from ``core.seeds`` (NEVER REUSE).
- ``champion_deploy``: the slot is bound with its audit row (owner checked, kill before
  spin), then the trial's service is deployed through the backend with the reconciler's spec.

Every action checks the account that owns what it changes and refuses while paused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from gardener.backends.base import Backend
from gardener.backends.reconcile import ReconcileReport, reconcile_once
from gardener.core.decide import decide
from gardener.core.seeds import RANDOM, REPLACE_ORDER, SeedPicker
from gardener.core.types import Action, Decision, NewTrial, SeedState
from gardener.errors import CrossAccountKillForbidden, GardenerPaused, UnknownTrial, UserError
from gardener.ledger import control, expid, trials
from gardener.ledger.apply import Applied, apply_decisions
from gardener.ledger.queries import Queries
from gardener.ledger.snapshot import RaceInfo, base_config, load_snapshot, race_config, race_info
from gardener.settings import Settings

Q = Queries("ledger.sql")
QL = Queries("loop.sql")
_EXP_REF = re.compile(r"^E(\d{4,})$", re.IGNORECASE)


async def refuse_if_paused(conn: asyncpg.Connection, what: str) -> None:
    ctl = await control.get(conn)
    if ctl.paused:
        raise GardenerPaused(
            f"the gardener is paused ({ctl.reason} by {ctl.changed_by}): no {what} is applied "
            "(tri resume first)"
        )


async def resolve_trial(conn: asyncpg.Connection, ref: str, account: str) -> asyncpg.Record:
    """A trial named by its canon name, its EXP_ID (``E0005``) or its seed (``200``, among the
    account's trials; refused when several trials share it)."""
    ref = ref.strip()
    m = _EXP_REF.match(ref)
    if m:
        row = await conn.fetchrow(Q.trial_by_exp_id, int(m.group(1)))
        if row is None:
            raise UnknownTrial(f"no trial holds EXP_ID {ref.upper()}")
        return row
    if ref.isdigit():
        rows = await conn.fetch(Q.trials_by_seed, account, int(ref))
        if not rows:
            raise UnknownTrial(f"{account} has no trial with seed {ref}")
        running = [r for r in rows if r["desired_state"] == "running"]
        pool = running or rows
        if len(pool) > 1:
            names = ", ".join(r["canon_name"] for r in pool[:4])
            raise UserError(f"seed {ref} names {len(pool)} trials of {account} ({names}): "
                            "give the canon name or the EXP_ID")
        return pool[0]
    return await trials.get_trial(conn, ref)


async def races_of(conn: asyncpg.Connection, account: str, race: str | None) -> list[RaceInfo]:
    """The account's running races, or the one named (refused if another account's)."""
    if race is not None:
        info = await race_info(conn, race)
        if info is None:
            raise UserError(f"no race named {race!r}")
        if info.account != account:
            raise CrossAccountKillForbidden(f"race {race!r} belongs to {info.account}, not "
                                            f"{account}")
        return [info]
    rows = await conn.fetch(QL.running_races)
    return [RaceInfo.from_row(r) for r in rows if r["account"] == account]


@dataclass(frozen=True)
class RaceDecisions:
    race: RaceInfo
    decisions: tuple[Decision, ...]
    applied: tuple[Applied, ...] = ()


def prunes_at(decisions: list[Decision], rung: int) -> list[Decision]:
    """The rung's PRUNE decisions and every decision that goes with them: the REPLACE of a
    killed DIVERGING trial (same trial, same rung)."""
    pruned = {d.canon_name for d in decisions if d.action is Action.PRUNE and d.rung == rung}
    return [d for d in decisions if d.canon_name in pruned and d.rung == rung
            and d.action in (Action.PRUNE, Action.REPLACE)]


async def prune(
    conn: asyncpg.Connection,
    settings: Settings,
    account: str,
    rung: int,
    *,
    race: str | None = None,
    apply: bool = False,
    by: str = "cli",
) -> list[RaceDecisions]:
    """What the daemon's ``decide`` prunes at ``rung`` now; with ``apply``, applied as the
    daemon applies it."""
    if apply:
        await refuse_if_paused(conn, "prune")
    base = base_config(settings)
    out: list[RaceDecisions] = []
    for info in await races_of(conn, account, race):
        snap = await load_snapshot(conn, info, paused=False,
                                   expected_corpus_sha256=settings.corpus_sha256,
                                   expected_corpus=settings.corpus)
        chosen = prunes_at(decide(snap, race_config(base, info)), rung)
        done: list[Applied] = []
        if apply and chosen:
            done = await apply_decisions(conn, info.name, info.account, chosen,
                                         decided_by=f"cli:{by}", backend=settings.backend)
        out.append(RaceDecisions(info, tuple(chosen), tuple(done)))
    return out


def _seed_state(value: str | None) -> SeedState:
    try:
        return SeedState(value) if value else SeedState.UNKNOWN
    except ValueError:
        return SeedState.UNKNOWN


async def kill(
    conn: asyncpg.Connection,
    ref: str,
    account: str,
    *,
    by: str = "cli",
    reason: str = "",
    replace: bool = False,
    backend: str = "local",
) -> list[Applied]:
    """Stop one of the account's trials as the daemon stops one (a PRUNE decision, applied
    once); with ``replace`` a fresh seed of its variant takes its place. Returns what was
    applied: nothing when the trial was already stopping."""
    trial = await resolve_trial(conn, ref, account)
    trials.check_owner(trial, account)
    await refuse_if_paused(conn, "kill")
    name = trial["canon_name"]
    if trial["desired_state"] != "running":
        return []
    rung = int(trial["rung"])
    state = _seed_state(trial["seed_state"])
    numbers = {"by": by, "cause": "hand", "account": account}
    why = reason or f"killed by hand by {by} for {account}"
    decisions = [Decision(Action.PRUNE, name, rung, f"kill now: {why}", state, numbers)]
    if replace:
        used = await trials.used_seeds(conn, trial["variant"])
        picker = SeedPicker(trial["race"], {trial["variant"]: used})
        picked = picker.pick(trial["variant"], 1, leader_seed=None, order=REPLACE_ORDER)
        decisions.append(Decision(
            Action.REPLACE, name, rung, f"replace the killed trial with seed {picked[0][0]}",
            state, numbers, tuple(NewTrial(trial["variant"], s, how, name) for s, how in picked),
        ))
    return await apply_decisions(conn, trial["race"], account, decisions,
                                 decided_by=f"cli:{by}", backend=trial["backend"] or backend)


async def mirror(
    conn: asyncpg.Connection,
    ref: str,
    account: str,
    *,
    count: int,
    strategy: str,
    by: str = "cli",
    backend: str = "local",
) -> Applied:
    """Start ``count`` new seeds of the leader's variant as a MIRROR decision (random fills in
    when the strategy runs out, e.g. a leader has only two siblings)."""
    trial = await resolve_trial(conn, ref, account)
    trials.check_owner(trial, account)
    await refuse_if_paused(conn, "mirror")
    leader = trial["canon_name"]
    used = await trials.used_seeds(conn, trial["variant"])
    picker = SeedPicker(trial["race"], {trial["variant"]: used})
    order = (strategy,) if strategy == RANDOM else (strategy, RANDOM)
    picked = picker.pick(trial["variant"], count, leader_seed=int(trial["seed"]), order=order)
    d = Decision(
        Action.MIRROR,
        leader,
        int(trial["rung"]),
        f"mirror {leader} by hand with {len(picked)} seeds ({strategy}) for {account}",
        _seed_state(trial["seed_state"]),
        spawn=tuple(NewTrial(trial["variant"], sd, how, leader) for sd, how in picked),
        numbers={"by": by, "count": count, "strategy": strategy},
    )
    (result,) = await apply_decisions(conn, trial["race"], account, [d],
                                      decided_by=f"cli:{by}", backend=trial["backend"] or backend)
    return result


@dataclass(frozen=True)
class ChampionDeployed:
    slot: expid.SlotState
    deploy: ReconcileReport | None


async def champion_deploy(
    conn: asyncpg.Connection,
    settings: Settings,
    ref: str,
    slot: int,
    account: str,
    *,
    force_replace: bool,
    by: str = "cli",
    backend_for: Callable[[str, str], Backend] | None = None,
) -> ChampionDeployed:
    """Bind the trial to the slot (every check before any write), then deploy its service
    through its backend (``backend_for(kind, account)``; None: only bind, the daemon's
    reconciler deploys it on its next pass)."""
    name = ref.strip()
    if name.isdigit() or _EXP_REF.match(name):  # a canon name goes as is: the slot's own
        name = (await resolve_trial(conn, name, account))["canon_name"]  # checks come first
    await refuse_if_paused(conn, "champion deploy")
    state = await expid.bind_champion_slot(
        conn, slot, name, account, force_replace=force_replace, by=by)
    if backend_for is None:
        return ChampionDeployed(state, None)
    from gardener.loop.reconciler import build_spec
    from gardener.trainer.spec import load_models_config

    row = next(r for r in await conn.fetch(QL.desired_trials, account)
               if r["canon_name"] == name)
    kind = row["backend"] or settings.backend
    spec = build_spec(row, settings.model_copy(update={"backend": kind}), load_models_config())
    backend = backend_for(kind, account)
    try:
        report = await reconcile_once([spec], backend)
    finally:
        await backend.aclose()
    return ChampionDeployed(state, report)
