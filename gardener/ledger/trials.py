"""Admitting trials into the ledger and changing what they should be doing.

Admission checks everything before it writes anything, inside one transaction: a bad canon
name, L-R9, a reused seed or EXP_ID, or another account's race leaves the ledger unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from gardener.core import canon as canon_mod
from gardener.core.canon import CanonName
from gardener.errors import CrossAccountKillForbidden, SeedReused, UnknownTrial, UserError
from gardener.ledger import expid
from gardener.ledger.queries import Queries

Q = Queries("ledger.sql")


@dataclass(frozen=True)
class Admission:
    """A trial to admit: its name and what the backend needs to run it."""

    canon: CanonName
    hidden_size: int | None = None
    steps: int | None = None
    parent: str | None = None
    spawn_reason: str = "initial"
    seed_strategy: str | None = None
    variables: dict[str, Any] = field(default_factory=dict)


async def ensure_race(
    conn: asyncpg.Connection,
    name: str,
    account: str,
    *,
    kind: str = "hunt",
    horizon: int | None = None,
    config: dict[str, Any] | None = None,
) -> asyncpg.Record:
    """Create the race if it is new; refuse to add to another account's race."""
    await conn.execute(Q.ensure_race, name, account, kind, horizon, config or {})
    race = await conn.fetchrow(Q.race, name)
    assert race is not None
    if race["account"] != account:
        raise CrossAccountKillForbidden(
            f"race {name!r} belongs to {race['account']}, not {account}"
        )
    return race


async def admit(
    conn: asyncpg.Connection,
    race: str,
    account: str,
    trials: Iterable[Admission],
    *,
    backend: str = "local",
) -> list[str]:
    """Admit trials all-or-nothing; names already admitted for this account are no-ops.

    Returns the canon names newly admitted.
    """
    trials = list(trials)
    for t in trials:
        canon_mod.check_gf16_hidden(t.canon, t.hidden_size)
    new: list[str] = []
    async with conn.transaction():
        race_row = await conn.fetchrow(Q.race, race)
        if race_row is None:
            raise UserError(f"unknown race {race!r}")
        if race_row["account"] != account:
            raise CrossAccountKillForbidden(
                f"race {race!r} belongs to {race_row['account']}, not {account}"
            )
        for t in trials:
            name = str(t.canon)
            existing = await conn.fetchrow(Q.trial, name)
            if existing is not None:
                if existing["account"] != account:
                    raise CrossAccountKillForbidden(
                        f"{name} belongs to {existing['account']}, not {account}"
                    )
                continue
            owner = await conn.fetchval(Q.use_seed, t.canon.variant, t.canon.seed, name)
            if owner is None:
                holder = await conn.fetchval(Q.seed_owner, t.canon.variant, t.canon.seed)
                raise SeedReused(
                    f"seed {t.canon.seed} was already used for {t.canon.variant} by {holder} "
                    "(NEVER REUSE)"
                )
            if t.canon.exp_id is not None:
                await expid.claim_exact(conn, t.canon.exp_id, account, name, by="admit")
            await conn.execute(
                Q.insert_trial,
                name,
                race,
                account,
                t.canon.model,
                t.canon.format,
                list(t.canon.tags),
                t.canon.variant,
                t.hidden_size,
                t.canon.seed,
                t.canon.exp_id,
                t.parent,
                t.spawn_reason,
                t.seed_strategy,
                t.steps,
                t.variables,
                backend,
            )
            new.append(name)
    return new


async def get_trial(conn: asyncpg.Connection, canon_name: str) -> asyncpg.Record:
    row = await conn.fetchrow(Q.trial, canon_name)
    if row is None:
        raise UnknownTrial(f"no trial named {canon_name!r} in the ledger")
    return row


def check_owner(trial: asyncpg.Record, account: str) -> None:
    """Any mutation of another account's trial is refused."""
    if trial["account"] != account:
        raise CrossAccountKillForbidden(
            f"{trial['canon_name']} belongs to {trial['account']}; {account} may not change it"
        )


async def kill(
    conn: asyncpg.Connection, canon_name: str, account: str, *, by: str = "cli", reason: str = ""
) -> bool:
    """Ask for a trial to stop, with an audit row; returns False if it was already stopping."""
    async with conn.transaction():
        trial = await conn.fetchrow(Q.trial_for_update, canon_name)
        if trial is None:
            raise UnknownTrial(f"no trial named {canon_name!r} in the ledger")
        check_owner(trial, account)
        if trial["desired_state"] != "running":
            return False
        await conn.execute(Q.set_desired_state, canon_name, "stopped")
        await conn.fetchval(
            Q.insert_decision,
            trial["race"],
            trial["rung"],
            canon_name,
            "kill",
            trial["seed_state"],
            {"by": by},
            reason or f"killed by {by} for {account}",
            True,
            None,
            by,
        )
    return True


async def used_seeds(conn: asyncpg.Connection, variant: str) -> frozenset[int]:
    return frozenset(int(r["seed"]) for r in await conn.fetch(Q.used_seeds_of, variant))
