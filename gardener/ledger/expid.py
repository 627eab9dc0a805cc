"""EXP_IDs from a PostgreSQL sequence, and the champion slots E0001..E0004.

``nextval`` never hands one id out twice; ids claimed explicitly (E0005 written in a canon
name) are skipped by the ``ON CONFLICT`` retry, so a claim never collides with them either.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from gardener.errors import (
    CrossAccountKillForbidden,
    ReusedChampionSlot,
    SlotStillOccupied,
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
    raise ReusedChampionSlot(
        f"{format_exp_id(exp_id)} is already used"
        + (f" by {holder}" if holder else f" (claimed by {row['account'] if row else '?'})")
    )


@dataclass(frozen=True)
class SlotState:
    exp_id: int
    canon_name: str | None
    running: bool


async def replace_champion_slot(
    conn: asyncpg.Connection,
    exp_id: int,
    canon_name: str,
    seed: int,
    account: str,
    *,
    force_replace: bool,
) -> SlotState:
    """Bind ``canon_name`` to a champion slot: only with ``force_replace``, only if it is free.

    Kill before spin: a slot whose trial still runs cannot be replaced.
    """
    if exp_id not in CHAMPION_SLOTS:
        raise UserError(f"{format_exp_id(exp_id)} is not a champion slot (E0001..E0004)")
    async with conn.transaction():
        row = await conn.fetchrow(Q.champion_slot_for_update, exp_id)
        assert row is not None, "champion slots are created by the first migration"
        if not force_replace:
            holder = row["canon_name"] or "reserved"
            raise ReusedChampionSlot(
                f"champion slot {format_exp_id(exp_id)} is locked ({holder}); "
                "use --force-replace after stopping its service"
            )
        if row["account"] is not None and row["account"] != account:
            raise CrossAccountKillForbidden(
                f"champion slot {format_exp_id(exp_id)} holds {row['canon_name']} of "
                f"{row['account']}, not {account}"
            )
        running = row["desired_state"] == "running" or row["observed_state"] in RUNNING_STATES
        if row["canon_name"] is not None and row["desired_state"] is not None and running:
            raise SlotStillOccupied(
                f"champion slot {format_exp_id(exp_id)} is occupied: {row['canon_name']} still "
                "runs; kill it before deploying into the slot"
            )
        await conn.execute(
            Q.rebind_champion_slot, exp_id, canon_name, seed, f"replaced by {account}"
        )
    return SlotState(exp_id, canon_name, running=False)


RUNNING_STATES = frozenset({"pending", "building", "deploying", "running", "initializing"})
