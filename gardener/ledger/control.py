"""The pause flag and tripwire acknowledgements: how a person steers the daemon."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from gardener.errors import CrossAccountKillForbidden, UserError
from gardener.ledger.queries import Queries

Q = Queries("ledger.sql")
CONTROL_CHANNEL = "gardener_control"


@dataclass(frozen=True)
class Control:
    paused: bool
    reason: str | None
    changed_by: str | None
    changed_at: datetime


async def get(conn: asyncpg.Connection) -> Control:
    row = await conn.fetchrow(Q.control)
    assert row is not None, "gardener_control is seeded by the first migration"
    return Control(**dict(row))


async def set_paused(conn: asyncpg.Connection, paused: bool, reason: str, by: str) -> Control:
    """Flip the flag; the table's trigger sends NOTIFY on ``gardener_control``."""
    row = await conn.fetchrow(Q.set_paused, paused, reason, by)
    assert row is not None
    return Control(**dict(row))


async def ack_tripwire(conn: asyncpg.Connection, event_id: int, account: str, by: str) -> bool:
    """Acknowledge a tripwire of the account's own trials; returns False if already acknowledged.

    A trigger (``0004_ack_notify.sql``) announces the acknowledgement on ``gardener_control``
    at commit, so a running daemon releases what the tripwire held at once.
    """
    async with conn.transaction():
        row = await conn.fetchrow(Q.tripwire_for_update, event_id)
        if row is None:
            raise UserError(f"no tripwire event with id {event_id}")
        if row["account"] is not None and row["account"] != account:
            raise CrossAccountKillForbidden(
                f"tripwire {event_id} concerns {row['canon_name'] or row['race']} of "
                f"{row['account']}, not {account}"
            )
        return await conn.fetchval(Q.ack_tripwire, event_id, by) is not None
