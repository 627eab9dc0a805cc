"""Applying decisions to a real ledger: the same snapshot as the core's ``apply_to_snapshot``,
exactly once per natural key, all or nothing per decision, holds logged once."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import numpy as np
import pytest

from gardener.core import canon
from gardener.core.config import DecisionConfig, Policy
from gardener.core.decide import apply_to_snapshot, decide
from gardener.core.types import Action, Decision, NewTrial, Snapshot
from gardener.errors import SeedReused
from gardener.ledger import control, trials
from gardener.ledger.apply import Outcome, apply_decision, apply_decisions
from gardener.ledger.snapshot import RaceInfo, load_snapshot, race_info

RUNGS = (20, 40, 80, 160, 320)  # collect, halve, top3, promote, verdict
# These tests are about applying decisions, so they pin the plan's rules (policy ``seed``):
# its quotas fix what each rung decides. The gardener's own choices: tests/unit/test_decide.py.
PLAN = {"policy": "seed"}
CONFIG = DecisionConfig(policy=Policy.SEED).with_rungs(RUNGS)


def curve(offset: float, upto: int, *, start: int = 5, every: int = 5, seed: int = 0) -> list:
    """A power-law curve with a fixed offset and a little deterministic noise."""
    rng = np.random.default_rng(seed)
    steps = np.arange(start, upto + 1, every)
    bpb = 2.0 + offset + 1.2 * steps ** -0.35 + rng.normal(0, 0.0005, len(steps))
    return [(int(s), float(round(b, 4))) for s, b in zip(steps, bpb, strict=True)]


async def make_race(
    conn: asyncpg.Connection,
    name: str,
    n: int,
    *,
    account: str = "acc1",
    first_exp: int = 100,
    model: str = "HYBRID",
    config: dict | None = None,
    first_seed: int = 1000,
) -> list[str]:
    """A race of ``n`` trials of one variant with EXP_IDs, ``rungs`` from RUNGS."""
    cfg = {"rungs": list(RUNGS), "decision": dict(PLAN), **(config or {})}
    await trials.ensure_race(conn, name, account, horizon=RUNGS[-1], config=cfg)
    admissions = [
        trials.Admission(
            canon.CanonName(model, "FP32", ("WSD",), first_seed + i, first_exp + i), steps=RUNGS[-1]
        )
        for i in range(n)
    ]
    return await trials.admit(conn, name, account, admissions)


async def add_samples(
    conn: asyncpg.Connection, name: str, samples: Sequence[tuple[int, float]]
) -> None:
    seed = int(name.rsplit("seed", 1)[1])
    await conn.executemany(
        "INSERT INTO bpb_samples (canon_name, seed, step, bpb, source) VALUES ($1, $2, $3, $4, "
        "'test') ON CONFLICT DO NOTHING",
        [(name, seed, s, b) for s, b in samples],
    )


async def race_of(conn: asyncpg.Connection, name: str) -> RaceInfo:
    info = await race_info(conn, name)
    assert info is not None
    return info


def summary(snap: Snapshot) -> dict[str, tuple[int, str]]:
    return {t.canon_name: (t.rung, t.desired_state.value) for t in snap.trials}


async def test_ledger_apply_gives_the_cores_snapshot_and_decide_is_then_quiet(
    conn: asyncpg.Connection,
) -> None:
    names = await make_race(conn, "r-apply", 8)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.03 * i, 45, seed=i))
    race = await race_of(conn, "r-apply")
    snap = await load_snapshot(conn, race, paused=False)
    decisions = decide(snap, CONFIG)
    actions = {d.action for d in decisions}
    assert Action.PRUNE in actions and Action.KEEP in actions, decisions
    expected = apply_to_snapshot(snap, decisions)

    results = await apply_decisions(conn, race.name, race.account, decisions)
    assert [r.outcome for r in results] == [Outcome.APPLIED] * len(decisions)
    after = await load_snapshot(conn, race, paused=False)

    assert summary(after) == {k: v for k, v in summary(expected).items() if k in summary(after)}
    assert after.used_seeds == expected.used_seeds
    assert {e.key for e in after.open_tripwires} == {e.key for e in expected.open_tripwires}
    assert decide(after, CONFIG) == []
    pruned = {d.canon_name for d in decisions if d.action is Action.PRUNE}
    rows = await conn.fetch(
        "SELECT canon_name, desired_state, rung FROM igla_race_trials WHERE race = 'r-apply'"
    )
    assert {r["canon_name"] for r in rows if r["desired_state"] == "stopped"} == pruned
    assert all(r["rung"] == 1 for r in rows)


async def test_applying_twice_changes_nothing(conn: asyncpg.Connection) -> None:
    names = await make_race(conn, "r-twice", 6)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.04 * i, 45, seed=i))
    race = await race_of(conn, "r-twice")
    decisions = decide(await load_snapshot(conn, race, paused=False), CONFIG)
    await apply_decisions(conn, race.name, race.account, decisions)
    before = await conn.fetchval("SELECT count(*) FROM gardener_decisions")
    again = await apply_decisions(conn, race.name, race.account, decisions)
    assert {r.outcome for r in again} == {Outcome.DUPLICATE}
    assert await conn.fetchval("SELECT count(*) FROM gardener_decisions") == before
    dupes = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM gardener_decisions WHERE applied "
        "GROUP BY canon_name, rung, action HAVING count(*) > 1) d"
    )
    assert dupes == 0


async def test_mirror_admits_new_trials_with_fresh_exp_ids_and_seeds(
    conn: asyncpg.Connection,
) -> None:
    names = await make_race(conn, "r-mirror", 4, first_exp=200)
    leader = names[0]
    d = Decision(
        Action.MIRROR,
        leader,
        3,
        "mirror the leader",
        spawn=tuple(NewTrial("IGLA-HYBRID-FP32-WSD", s, "sibling", leader) for s in (999, 2001)),
    )
    result = await apply_decision(conn, "r-mirror", "acc1", d)
    assert result.outcome is Outcome.APPLIED and len(result.spawned) == 2
    rows = await conn.fetch(
        "SELECT canon_name, exp_id, seed, parent, spawn_reason, seed_strategy, steps "
        "FROM igla_race_trials WHERE parent = $1 ORDER BY seed",
        leader,
    )
    assert [r["seed"] for r in rows] == [999, 2001]
    assert all(r["exp_id"] is not None and r["exp_id"] >= 5 for r in rows)
    assert len({r["exp_id"] for r in rows}) == 2
    for r in rows:
        parsed = canon.parse(r["canon_name"])
        assert (parsed.exp_id, parsed.seed) == (r["exp_id"], r["seed"])
        assert r["spawn_reason"] == "mirror" and r["seed_strategy"] == "sibling"
        assert r["steps"] == RUNGS[-1]
    owners = await conn.fetch(
        "SELECT seed, canon_name FROM used_seeds WHERE variant = 'IGLA-HYBRID-FP32-WSD' "
        "AND seed IN (999, 2001)"
    )
    assert {o["canon_name"] for o in owners} == set(result.spawned)
    audit = await conn.fetchrow(
        "SELECT numbers, applied FROM gardener_decisions WHERE canon_name = $1 AND action = "
        "'mirror'",
        leader,
    )
    assert audit["applied"] and sorted(audit["numbers"]["spawned"]) == sorted(result.spawned)
    assert (await conn.fetchval("SELECT rung FROM igla_race_trials WHERE canon_name = $1", leader)
            == 3)


async def test_a_failing_decision_leaves_nothing_behind(conn: asyncpg.Connection) -> None:
    names = await make_race(conn, "r-atomic", 3, first_exp=300)
    taken_seed = 1001  # the second trial's seed: NEVER REUSE refuses it
    d = Decision(
        Action.REPLACE,
        names[0],
        2,
        "replace",
        spawn=(
            NewTrial("IGLA-HYBRID-FP32-WSD", 5555, "phi-anchored", names[0]),
            NewTrial("IGLA-HYBRID-FP32-WSD", taken_seed, "phi-anchored", names[0]),
        ),
    )
    trials_before = await conn.fetchval("SELECT count(*) FROM igla_race_trials")
    with pytest.raises(SeedReused):
        await apply_decision(conn, "r-atomic", "acc1", d)
    assert await conn.fetchval("SELECT count(*) FROM igla_race_trials") == trials_before
    assert await conn.fetchval("SELECT count(*) FROM gardener_decisions") == 0
    assert await conn.fetchval("SELECT count(*) FROM used_seeds WHERE seed = 5555") == 0
    assert await conn.fetchval("SELECT rung FROM igla_race_trials WHERE canon_name = $1",
                               names[0]) == -1


async def test_held_decisions_are_logged_once_and_change_nothing(
    conn: asyncpg.Connection,
) -> None:
    names = await make_race(conn, "r-held", 6, first_exp=400)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.05 * i, 45, seed=i))
    race = await race_of(conn, "r-held")
    await control.set_paused(conn, True, "test", "pytest")
    snap = await load_snapshot(conn, race, paused=True)
    decisions = decide(snap, CONFIG)
    holds = [d for d in decisions if d.action is Action.HOLD]
    assert holds and all(d.numbers["held_action"] == "prune" for d in holds)
    first = await apply_decisions(conn, race.name, race.account, decisions)
    second = await apply_decisions(conn, race.name, race.account, decisions)
    assert [r.outcome for r in first if r.decision.action is Action.HOLD] == [Outcome.HELD] * len(
        holds
    )
    assert {r.outcome for r in second} == {Outcome.DUPLICATE}
    rows = await conn.fetch(
        "SELECT action, applied, held_reason FROM gardener_decisions WHERE NOT applied"
    )
    assert len(rows) == len(holds)
    assert all(r["action"] == "hold:prune" and "paused" in r["held_reason"] for r in rows)
    assert await conn.fetchval(
        "SELECT count(*) FROM igla_race_trials WHERE race = 'r-held' AND desired_state <> "
        "'running'"
    ) == 0
    # Resumed: the same rung decisions now apply.
    await control.set_paused(conn, False, "resumed", "pytest")
    resumed = decide(await load_snapshot(conn, race, paused=False), CONFIG)
    assert {d.canon_name for d in resumed if d.action is Action.PRUNE} == {
        d.canon_name for d in holds
    }


async def test_a_tripwire_is_recorded_once_and_holds_promotion_until_acknowledged(
    conn: asyncpg.Connection,
) -> None:
    names = await make_race(conn, "r-floor", 4, first_exp=500)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.05 * i, 165, seed=i))
    # One trial reports below the architectural floor: it is quarantined and promotions wait.
    await add_samples(conn, names[3], [(170, 1.5)])
    race = await race_of(conn, "r-floor")
    decisions = decide(await load_snapshot(conn, race, paused=False), CONFIG)
    results = await apply_decisions(conn, race.name, race.account, decisions)
    events = await conn.fetch("SELECT id, kind, canon_name, blocks_promotions FROM tripwire_events")
    assert [(e["kind"], e["canon_name"]) for e in events] == [("below_floor", names[3])]
    assert events[0]["blocks_promotions"]
    held = [r.decision for r in results if r.outcome is Outcome.HELD]
    assert {d.numbers["held_action"] for d in held} >= {"promote"}
    again = decide(await load_snapshot(conn, race, paused=False), CONFIG)
    assert not [d for d in again if d.action is Action.TRIPWIRE]
    assert await control.ack_tripwire(conn, events[0]["id"], "acc1", "pytest")
    released = decide(await load_snapshot(conn, race, paused=False), CONFIG)
    assert Action.PROMOTE in {d.action for d in released}
