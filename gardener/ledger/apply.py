"""Apply the core's decisions to the ledger: one transaction per trial and rung, exactly once.

Each decision's transaction holds everything it changes: the audit row in
``gardener_decisions``, the desired state, the trial's rung / seed state / fit columns, and
for mirrors and replacements the new trials with their EXP_IDs and seeds. The natural key
(canon name, rung, action) has a unique index, so the audit insert (last, ``ON CONFLICT DO
NOTHING``) decides: if the row already exists, this transaction is rolled back and the
decision counts as applied before; a process killed between any two statements leaves
either all of a decision or none of it. The decisions of one trial at one rung (a leader's
MIRROR and PROMOTE) are applied together by ``apply_group``, each as a savepoint of one
transaction, so a crash, SIGTERM or pause never leaves one of them written and the other
lost.

The changes mirror ``gardener.core.decide.apply_to_snapshot`` exactly: HOLD changes nothing
but its own audit row (logged once per key, ``applied = false``); TRIPWIRE records the event;
every other action raises the trial's rung to the decision's; PRUNE stops the trial; MIRROR
and REPLACE admit the spawned trials (same variant, a fresh seed, the parent's settings).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import asyncpg
import numpy as np

from gardener.core.canon import CanonName
from gardener.core.types import Action, Decision, SeedState, TripwireEvent
from gardener.errors import GardenerError
from gardener.ledger import expid, trials
from gardener.ledger.queries import Queries

Q = Queries("loop.sql")

# Variables that name one trial: a spawned trial never inherits them from its parent.
IDENTITY_VARIABLES = frozenset({"TRAIN_CANON_NAME", "TRAIN_SEED", "TRAIN_EXP_ID"})


class Outcome(StrEnum):
    APPLIED = "applied"  # committed now
    HELD = "held"  # logged as held now (first time for this key)
    DUPLICATE = "duplicate"  # applied (or held) before: nothing changed


@dataclass(frozen=True)
class Applied:
    """What applying one decision did."""

    decision: Decision
    outcome: Outcome
    decision_id: int | None = None
    spawned: tuple[str, ...] = ()
    tripwire_id: int | None = None

    @property
    def changed_desired_state(self) -> bool:
        """Whether the reconciler has new work (a trial to stop or to start)."""
        return self.outcome is Outcome.APPLIED and (
            self.decision.action is Action.PRUNE or bool(self.spawned)
        )


class _AlreadyApplied(GardenerError):
    """Raised inside the transaction to roll it back when the audit row already exists."""


def json_safe(value: Any) -> Any:
    """Numbers for a jsonb column: NaN and infinities become null, numpy becomes Python."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def action_key(d: Decision) -> str:
    """The action column of the audit row: the third part of the natural key."""
    return d.key[2]


def tripwire_dedupe_key(race: str, event: TripwireEvent) -> str:
    """One row per condition: the event key; a race-wide event is scoped to its race."""
    return event.key if event.canon_name else f"{event.key}:{race}"


def held_reason(d: Decision) -> str:
    return d.reason.split("; would have:", 1)[0]


def _fit_columns(numbers: Mapping[str, Any]) -> tuple[float | None, ...]:
    fit = numbers.get("fit")
    if not isinstance(fit, Mapping) or not fit.get("ok"):
        return (None, None, None, None, None)
    ci = fit.get("bpb_inf_ci") or [None, None]
    return (fit.get("bpb_inf"), ci[0], ci[1], fit.get("p"), fit.get("a"))


async def _exists(conn: asyncpg.Connection, d: Decision) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM gardener_decisions WHERE canon_name = $1 AND rung = $2"
            " AND action = $3 AND applied)",
            d.canon_name,
            d.rung,
            action_key(d),
        )
    )


async def _spawn(
    conn: asyncpg.Connection,
    race: str,
    account: str,
    d: Decision,
    parents: dict[str, asyncpg.Record],
    backend: str,
    decided_by: str,
) -> list[str]:
    """Admit the decision's new trials: the parent's variant and settings, a fresh seed."""
    names: list[str] = []
    for nt in d.spawn:
        parent = parents.get(nt.parent)
        if parent is None:
            parent = await conn.fetchrow(Q.trial_row_for_update, nt.parent)
            if parent is None:
                raise GardenerError(f"{d.action.value}: parent {nt.parent} is not in the ledger")
            parents[nt.parent] = parent
        exp_id = None
        if parent["exp_id"] is not None:
            (exp_id,) = await expid.claim(conn, account, 1, by=decided_by)
        canon = CanonName(
            parent["model"],
            parent["format"],
            tuple(parent["tags"]),
            int(nt.seed),
            exp_id,
            models=(parent["model"],),
        )
        variables = {
            k: v for k, v in dict(parent["variables"] or {}).items() if k not in IDENTITY_VARIABLES
        }
        admitted = await trials.admit(
            conn,
            race,
            account,
            [
                trials.Admission(
                    canon=canon,
                    hidden_size=parent["hidden_size"],
                    steps=parent["steps"],
                    parent=nt.parent,
                    spawn_reason=d.action.value,
                    seed_strategy=nt.seed_strategy,
                    variables=variables,
                )
            ],
            backend=parent["backend"] or backend,
        )
        names.extend(admitted)
    return names


async def apply_decision(
    conn: asyncpg.Connection,
    race: str,
    account: str,
    d: Decision,
    *,
    decided_by: str = "gardener",
    backend: str = "local",
) -> Applied:
    """Apply one decision in one transaction; a decision applied before changes nothing."""
    numbers = json_safe(d.numbers)
    seed_state = None if d.seed_state is SeedState.UNKNOWN else d.seed_state.value
    if d.action is Action.HOLD:
        held_id = await conn.fetchval(
            Q.insert_held_decision,
            race,
            d.rung,
            d.canon_name,
            action_key(d),
            seed_state,
            numbers,
            d.reason,
            held_reason(d),
            decided_by,
        )
        return Applied(d, Outcome.HELD if held_id else Outcome.DUPLICATE, held_id)
    try:
        async with conn.transaction():
            if await _exists(conn, d):
                raise _AlreadyApplied
            tripwire_id = None
            spawned: list[str] = []
            if d.action is Action.TRIPWIRE:
                event = d.tripwire
                if event is None:
                    raise GardenerError(f"tripwire decision without an event: {d}")
                tripwire_id = await conn.fetchval(
                    Q.insert_tripwire,
                    event.kind,
                    race,
                    event.canon_name,
                    tripwire_dedupe_key(race, event),
                    json_safe(event.evidence),
                    event.blocks_promotions,
                )
            else:
                parents: dict[str, asyncpg.Record] = {}
                row = await conn.fetchrow(Q.trial_row_for_update, d.canon_name)
                if row is not None:
                    parents[d.canon_name] = row
                    await conn.execute(
                        Q.record_decided, d.canon_name, d.rung, seed_state, *_fit_columns(numbers)
                    )
                    if d.action is Action.PRUNE:
                        await conn.execute(Q.stop_trial, d.canon_name)
                if d.spawn:
                    spawned = await _spawn(
                        conn, race, account, d, parents, backend, decided_by
                    )
                    numbers = {**numbers, "spawned": spawned}
            decision_id = await conn.fetchval(
                Q.insert_applied_decision,
                race,
                d.rung,
                d.canon_name,
                action_key(d),
                seed_state,
                numbers,
                d.reason,
                decided_by,
            )
            if decision_id is None:  # another writer committed the same key meanwhile
                raise _AlreadyApplied
    except _AlreadyApplied:
        return Applied(d, Outcome.DUPLICATE)
    return Applied(d, Outcome.APPLIED, decision_id, tuple(spawned), tripwire_id)


Fence = Callable[[asyncpg.Connection], Awaitable[None]]


def group_by_trial_rung(decisions: Iterable[Decision]) -> list[list[Decision]]:
    """The decisions of one trial at one rung, together, in the order each group first
    appears (a rung leader's MIRROR and PROMOTE both raise its rung: written apart, a crash
    between them would leave the second never decided again)."""
    groups: dict[tuple[str, int], list[Decision]] = {}
    for d in decisions:
        groups.setdefault((d.canon_name, d.rung), []).append(d)
    return list(groups.values())


async def apply_group(
    conn: asyncpg.Connection,
    race: str,
    account: str,
    group: Sequence[Decision],
    *,
    decided_by: str = "gardener",
    backend: str = "local",
    fence: Fence | None = None,
) -> list[Applied]:
    """Apply decisions in one transaction, in order: all or none of them (the loop and
    ``apply_decisions`` pass one trial's decisions at one rung). ``fence``
    runs first inside it (the daemon's leadership check), so a process that is no longer the
    leader commits nothing. The trial rows are locked first, in name order, as the ingest
    writer locks them, so the two never deadlock."""
    async with conn.transaction():
        if fence is not None:
            await fence(conn)
        names = sorted({d.canon_name for d in group if d.action is not Action.HOLD})
        if len(names) > 1:
            await conn.execute(Q.lock_trials_in_order, names)
        return [
            await apply_decision(conn, race, account, d, decided_by=decided_by, backend=backend)
            for d in group
        ]


async def apply_decisions(
    conn: asyncpg.Connection,
    race: str,
    account: str,
    decisions: Iterable[Decision],
    *,
    decided_by: str = "gardener",
    backend: str = "local",
) -> list[Applied]:
    """Apply decisions in the core's order (tripwires, kills and replacements, then rung
    decisions), one transaction per trial and rung (``group_by_trial_rung``)."""
    out: list[Applied] = []
    for group in group_by_trial_rung(decisions):
        out += await apply_group(
            conn, race, account, group, decided_by=decided_by, backend=backend
        )
    return out
