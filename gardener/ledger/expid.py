"""EXP_IDs from a PostgreSQL sequence, and the champion slots E0001..E0004.

``nextval`` never hands one id out twice; ids claimed explicitly (E0005 written in a canon
name) are skipped by the ``ON CONFLICT`` retry, so a claim never collides with them either.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from gardener.core.types import ACTIVE
from gardener.errors import (
    CrossAccountKillForbidden,
    ExpIdReused,
    ReusedChampionSlot,
    SlotStillOccupied,
    UnknownTrial,
    UserError,
)
from gardener.ledger.queries import Queries

Q = Queries("ledger.sql")
CHAMPION_SLOTS = range(1, 5)


def format_exp_id(exp_id: int) -> str:
    return f"E{exp_id:04d}"


async def next_exp_id(conn: asyncpg.Connection) -> int:
    """The id a claim would take now, without taking it."""
    value = await conn.fetchval(Q.next_exp_id)
    if value is None:
        raise UserError("EXP_IDs are exhausted (E2147483647 reached)")
    return int(value)


async def claim(
    conn: asyncpg.Connection, account: str, count: int = 1, by: str = "cli"
) -> list[int]:
    """Take ``count`` fresh ids for ``account``; concurrent claimers never share one."""
    if count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    taken: list[int] = []
    async with conn.transaction():
        while len(taken) < count:
            try:
                value = await conn.fetchval(Q.claim_from_sequence, account, by)
            except asyncpg.SequenceGeneratorLimitExceededError:
                raise UserError("EXP_IDs are exhausted (E2147483647 reached)") from None
            if value is not None:
                taken.append(int(value))
            else:
                # Taken explicitly: move the sequence to just below the next free id, so a
                # run of ids claimed by name (ten thousand admitted as E0010..E10009) costs
                # two statements, not a claim per id (1.3 s of round trips at 10,000).
                await conn.execute(Q.skip_to_exp_id, await next_exp_id(conn) - 1)
    return taken


async def claim_exact(
    conn: asyncpg.Connection, exp_id: int, account: str, canon_name: str | None, by: str = "cli"
) -> int:
    """Take one named id (from a canon name, or ``--exp-id``); refuse slots and used ids.

    An id the same account claimed earlier and has not bound to a name yet is bound now.
    """
    if exp_id in CHAMPION_SLOTS:
        raise ReusedChampionSlot(
            f"{format_exp_id(exp_id)} is a locked champion slot; deploy champions with "
            "`tri champion deploy --slot N --force-replace`"
        )
    got = await conn.fetchval(Q.claim_exact_exp_id, exp_id, account, canon_name, by)
    if got is not None:
        return int(got)
    row = await conn.fetchrow(Q.exp_id_row, exp_id)
    if row is not None and canon_name is not None and row["canon_name"] == canon_name:
        return exp_id
    if (
        row is not None
        and row["canon_name"] is None
        and canon_name is not None
        and row["account"] == account
        and await conn.fetchval(Q.bind_exp_id, exp_id, canon_name, account) is not None
    ):
        return exp_id
    holder = row["canon_name"] if row is not None else None
    raise ExpIdReused(
        f"{format_exp_id(exp_id)} is already used"
        + (f" by {holder}" if holder else f" (claimed by {row['account'] if row else '?'})")
    )


@dataclass(frozen=True)
class SlotState:
    exp_id: int
    canon_name: str | None
    replaced: str | None  # the previous holder, when there was one
    changed: bool  # False: the slot already held this trial


async def bind_champion_slot(
    conn: asyncpg.Connection,
    exp_id: int,
    canon_name: str,
    account: str,
    *,
    force_replace: bool,
    by: str = "cli",
) -> SlotState:
    """Bind an admitted trial of ``account`` to a champion slot ``account`` owns, in one
    transaction with its audit row, and ask for the trial to run.

    An empty slot takes the trial; a used one only with ``force_replace`` and only once its
    holder is stopped (kill before spin). Every check runs before the first write.
    """
    slot = format_exp_id(exp_id)
    if exp_id not in CHAMPION_SLOTS:
        raise UserError(f"{slot} is not a champion slot (E0001..E0004)")
    async with conn.transaction():
        row = await conn.fetchrow(Q.champion_slot_for_update, exp_id)
        assert row is not None, "champion slots are created by the first migration"
        if row["owner"] != account:
            raise CrossAccountKillForbidden(
                f"champion slot {slot} belongs to {row['owner']}, not {account}"
            )
        if row["canon_name"] == canon_name:
            return SlotState(exp_id, canon_name, None, changed=False)
        if row["canon_name"] is not None and not force_replace:
            raise ReusedChampionSlot(
                f"champion slot {slot} is locked ({row['canon_name']}); "
                "use --force-replace after stopping its service"
            )
        running = row["desired_state"] == "running" or row["observed_state"] in ACTIVE
        if row["canon_name"] is not None and row["desired_state"] is not None and running:
            raise SlotStillOccupied(
                f"champion slot {slot} is occupied: {row['canon_name']} still "
                "runs; kill it before deploying into the slot"
            )
        trial = await conn.fetchrow(Q.trial_for_update, canon_name)
        if trial is None:
            raise UnknownTrial(
                f"no trial named {canon_name!r} in the ledger: admit it first "
                "(tri railway batch-deploy), then deploy it into a slot"
            )
        if trial["account"] != account:
            raise CrossAccountKillForbidden(
                f"{canon_name} belongs to {trial['account']}; {account} may not deploy it"
            )
        await conn.execute(
            Q.rebind_champion_slot, exp_id, canon_name, trial["seed"], trial["best_bpb"],
            f"deployed by {by} for {account}",
        )
        await conn.execute(Q.set_desired_state, canon_name, "running")
        replaced = row["canon_name"]
        await conn.fetchval(
            Q.insert_decision,
            trial["race"],
            trial["rung"],
            canon_name,
            f"champion:{slot}",
            trial["seed_state"],
            {"slot": slot, "replaced": replaced, "by": by},
            f"deployed into champion slot {slot} by {by} for {account}"
            + (f", replacing {replaced}" if replaced else ""),
            True,
            None,
            by,
        )
    return SlotState(exp_id, canon_name, replaced, changed=True)

