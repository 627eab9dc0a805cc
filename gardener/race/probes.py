"""The Gate-0 probes (criteria 5, 7, 8, 9, 10): each really attempts the forbidden thing through
the same code path as the CLI (admission, champion deploy, the hand kill, claim) and checks it
was refused and changed nothing.

Probes 5, 7, 8 and 9 run inside a transaction that is always rolled back, so whatever the code
under test did (even a wrong success) leaves the ledger as it was; probe 10 really takes
EXP_IDs (a claim is the thing under test, and the ids it takes are never handed out again).
The code path a probe exercises is a parameter (the real function by default), so a test can
hand in a broken one and see the criterion go RED.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg

from gardener.core import canon as canon_mod
from gardener.errors import (
    CrossAccountKillForbidden,
    GF16HiddenTooSmall,
    ReusedChampionSlot,
    SlotStillOccupied,
)
from gardener.ledger import db, expid, trials
from gardener.ledger.queries import Queries
from gardener.loop import hand
from gardener.race.criteria import Criterion, RaceContext, outcome

Q = Queries("race.sql")


class _Rollback(Exception):
    """Raised to leave a probe's transaction without committing anything."""


async def _in_rollback(
    conn: asyncpg.Connection, body: Callable[[], Awaitable[Criterion]]
) -> Criterion:
    result: list[Criterion] = []
    try:
        async with conn.transaction():
            result.append(await body())
            raise _Rollback
    except _Rollback:
        pass
    return result[0]


AdmitFn = Callable[..., Awaitable[list[str]]]
DeployFn = Callable[..., Awaitable[expid.SlotState]]
KillFn = Callable[..., Awaitable[Any]]
ClaimFn = Callable[[asyncpg.Connection, str, int, str], Awaitable[list[int]]]


async def probe_lr9(
    conn: asyncpg.Connection, ctx: RaceContext, *, seed: int, admit: AdmitFn = trials.admit
) -> Criterion:
    """5: admit a GF16 trial with a too small hidden size into the race; it must be refused
    with GF16HiddenTooSmall and the ledger (trials, seeds, EXP_IDs) must not move."""
    name = f"{ctx.config.lr9_probe}-seed{seed}"
    parsed = canon_mod.parse(name)
    h = ctx.config.lr9_hidden

    async def body() -> Criterion:
        before = dict(await conn.fetchrow(Q.ledger_footprint))
        err: Exception | None = None
        try:
            await admit(conn, ctx.race, ctx.account,
                        [trials.Admission(parsed, hidden_size=h, steps=ctx.max_steps)])
        except GF16HiddenTooSmall as exc:
            err = exc
        except Exception as exc:  # a different refusal is a RED, with what it was
            return outcome(5, False,
                           f"admitting {name} with h={h} raised {type(exc).__name__}: {exc}")
        after = dict(await conn.fetchrow(Q.ledger_footprint))
        if err is None:
            return outcome(5, False, f"{name} with h={h} was ADMITTED (ledger {before} -> {after})")
        if after != before:
            return outcome(5, False, f"refused, but the ledger changed: {before} -> {after}")
        return outcome(5, True, f"admitting {name} with h={h} raised GF16HiddenTooSmall ({err}); "
                  f"ledger unchanged ({after['trials']} trials)", ledger=after)

    return await _in_rollback(conn, body)


async def probe_used_slot(
    conn: asyncpg.Connection, ctx: RaceContext, *, deploy: DeployFn = expid.bind_champion_slot
) -> Criterion:
    """7: `tri champion deploy NAME --slot 4` (no --force-replace) into the used slot must
    fail with ReusedChampionSlot and change nothing, while the same deploy into an empty slot
    is taken: the refusal is about the slot being used, not about every slot."""
    slot, empty = ctx.config.used_slot, ctx.config.probe_slot
    name = ctx.expected_names[0]

    async def body() -> Criterion:
        before = dict(await conn.fetchrow(Q.champion_slot, slot))
        try:
            state = await deploy(conn, slot, name, ctx.account, force_replace=False)
        except ReusedChampionSlot as exc:
            after = dict(await conn.fetchrow(Q.champion_slot, slot))
            if after != before:
                return outcome(7, False,
                               f"refused, but slot E{slot:04d} changed: {before} -> {after}")
            refused = (f"deploying {name} into E{slot:04d} (held by "
                       f"{before['canon_name'] or 'reserved'}) raised ReusedChampionSlot: {exc}")
        except Exception as exc:
            return outcome(7, False, f"deploy raised {type(exc).__name__}: {exc}")
        else:
            return outcome(7, False, f"deploy into used slot E{slot:04d} SUCCEEDED: {state}")
        free = dict(await conn.fetchrow(Q.champion_slot, empty))
        if free["canon_name"] is not None:
            return outcome(7, False, f"{refused}; but E{empty:04d} is not empty to compare: {free}")
        try:
            taken = await deploy(conn, empty, name, ctx.account, force_replace=False)
        except Exception as exc:
            return outcome(7, False, f"{refused}; but the empty slot E{empty:04d} refused it too: "
                      f"{type(exc).__name__}: {exc}")
        return outcome(7, True, f"{refused}; the empty E{empty:04d} took it ({taken.canon_name}, "
                  "rolled back)")

    return await _in_rollback(conn, body)


async def probe_force_replace(
    conn: asyncpg.Connection,
    ctx: RaceContext,
    *,
    challenger: str,
    deploy: DeployFn = expid.bind_champion_slot,
) -> Criterion:
    """8: occupy a reserved slot with a running trial of the race (force-replace of an empty
    slot, which is allowed), then force-replace it with ``challenger``: SlotStillOccupied.

    All inside one transaction that is rolled back: the slot is reserved again afterwards,
    and no other session ever sees it bound."""
    slot = ctx.config.probe_slot

    async def body() -> Criterion:
        holder = await conn.fetchrow(Q.running_trial_of_race, ctx.race)
        if holder is None:
            return outcome(8, False, "no trial of the race is running: nothing can occupy a slot")
        before = dict(await conn.fetchrow(Q.champion_slot, slot))
        if before["canon_name"] is not None:
            return outcome(8, False, f"E{slot:04d} is not a free reserved slot: {before}")
        await deploy(conn, slot, holder["canon_name"], ctx.account, force_replace=True)
        occupied = dict(await conn.fetchrow(Q.champion_slot, slot))
        try:
            state = await deploy(conn, slot, challenger, ctx.account, force_replace=True)
        except SlotStillOccupied as exc:
            after = dict(await conn.fetchrow(Q.champion_slot, slot))
            if after != occupied:
                return outcome(8, False, f"refused, but the slot changed: {occupied} -> {after}")
            return outcome(8, True, f"E{slot:04d} held by running {holder['canon_name']} (observed "
                      f"{holder['observed_state']}); --force-replace with {challenger} raised "
                      f"SlotStillOccupied: {exc} (rolled back: E{slot:04d} reserved again)")
        except Exception as exc:
            return outcome(8, False, f"force-replace raised {type(exc).__name__}: {exc}")
        return outcome(8, False, f"force-replace of occupied E{slot:04d} SUCCEEDED: {state}")

    return await _in_rollback(conn, body)


async def probe_cross_account_kill(
    conn: asyncpg.Connection,
    ctx: RaceContext,
    *,
    victim_account: str = "acc2",
    kill: KillFn = hand.kill,
) -> Criterion:
    """9: admit a trial of ``victim_account`` in a tiny race that is never started (inside
    the rolled-back transaction), then kill it as the race's account through the CLI's
    ``hand.kill`` (the daemon's apply path)."""
    race = f"{ctx.race}-{victim_account}-probe"
    name = "IGLA-HYBRID-FP32-XACCT-SMOKE-seed1"
    parsed = canon_mod.parse(name)

    async def body() -> Criterion:
        await trials.ensure_race(conn, race, victim_account, kind="smoke", horizon=1)
        await trials.admit(conn, race, victim_account, [trials.Admission(parsed, steps=1)])
        before = dict(await conn.fetchrow(Q.trial_state, name))
        try:
            changed = await kill(conn, name, ctx.account, by="smoke-probe")
        except CrossAccountKillForbidden as exc:
            after = dict(await conn.fetchrow(Q.trial_state, name))
            if after != before:
                return outcome(9, False, f"refused, but {name} changed: {before} -> {after}")
            return outcome(9, True, f"{ctx.account} killing {name} of {victim_account} raised "
                      f"CrossAccountKillForbidden: {exc}; the trial is unchanged "
                      f"(desired {after['desired_state']})")
        except Exception as exc:
            return outcome(9, False, f"kill raised {type(exc).__name__}: {exc}")
        return outcome(9, False,
                       f"{ctx.account} killed {victim_account}'s {name} (changed={changed})")

    return await _in_rollback(conn, body)


async def probe_exp_claims(
    dsn: str, ctx: RaceContext, *, claim: ClaimFn | None = None
) -> Criterion:
    """10: ``claim_workers`` claimers on their own connections, all at once, each taking
    ``claim_count`` ids; no id may come back twice, and each is recorded for its account."""
    workers, count = ctx.config.claim_workers, ctx.config.claim_count
    do_claim: ClaimFn = claim or (lambda c, a, n, by: expid.claim(c, a, n, by))
    conns = [await db.connect(dsn) for _ in range(workers)]
    results: list[list[int]] = [[] for _ in range(workers)]
    errors: list[str] = []
    start = anyio.Event()

    async def one(i: int) -> None:
        await start.wait()
        try:
            results[i] = await do_claim(conns[i], ctx.account, count, f"smoke-probe:{ctx.race}")
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    try:
        async with anyio.create_task_group() as tg:
            for i in range(workers):
                tg.start_soon(one, i)
            start.set()
        ids = [x for r in results for x in r]
        recorded = await conns[0].fetch(Q.exp_ids_claimed, ids)
    finally:
        for c in conns:
            await c.close()
    dupes = sorted({x for x in ids if ids.count(x) > 1})
    slots = sorted(set(ids) & set(expid.CHAMPION_SLOTS))
    mine = {int(r["exp_id"]) for r in recorded if r["account"] == ctx.account}
    unrecorded = sorted(set(ids) - mine)
    if errors or dupes or slots or unrecorded or len(ids) != workers * count:
        return outcome(10, False, f"{len(ids)} ids from {workers} claimers; duplicates {dupes}, "
                  f"champion slots {slots}, not recorded {unrecorded[:5]}, errors {errors[:2]}",
                  ids=ids)
    return outcome(10, True, f"{workers} concurrent claims of {count}: {len(ids)} distinct EXP_IDs "
              f"E{min(ids):04d}..E{max(ids):04d}, each recorded for {ctx.account}", ids=sorted(ids))
