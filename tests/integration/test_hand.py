"""Hand actions go through the daemon's decide and apply: a prune of a DIVERGING trial starts
its replacement, a kill is a PRUNE decision applied once, a mirror takes a seed or EXP_ID."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from gardener.core.config import DecisionConfig
from gardener.core.decide import decide
from gardener.core.types import Action
from gardener.errors import GardenerPaused, UnknownTrial, UserError
from gardener.ledger import control, trials
from gardener.ledger.snapshot import load_snapshot
from gardener.loop import hand
from gardener.settings import Settings
from tests.integration.test_apply import RUNGS, add_samples, curve, make_race, race_of

CLI = [str(Path(sys.executable).parent / "gardener")]
CONFIG = DecisionConfig().with_rungs(RUNGS)


def run(args: list[str], dsn: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GARDENER_", "DATABASE_"))}
    env.update(DATABASE_URL=dsn, GARDENER_LOG_FORMAT="json")
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=60)


async def diverging_race(conn: asyncpg.Connection) -> tuple[list[str], str]:
    """Three trials past rung 1 (already decided there); the third one drifts away."""
    names = await make_race(conn, "div", 3)
    for i, name in enumerate(names):
        samples = curve(0.01 * i, 70, seed=i)
        if i == 2:
            samples = [(s, round(b + 0.004 * s, 4)) for s, b in samples]
        await add_samples(conn, name, samples)
    await conn.execute("UPDATE igla_race_trials SET rung = 1 WHERE race = 'div'")
    return names, names[2]


async def test_a_hand_prune_of_a_diverging_trial_replaces_it(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    _, bad = await diverging_race(conn)
    info = await race_of(conn, "div")
    before = decide(await load_snapshot(conn, info, paused=False), CONFIG)
    assert {(d.action, d.canon_name) for d in before} >= {(Action.PRUNE, bad),
                                                          (Action.REPLACE, bad)}
    result = run(["hunt", "prune", "--rung", "1", "--apply", "--account", "acc1",
                  "--race", "div"], db_dsn)
    assert result.returncode == 0, result.stderr
    assert await conn.fetchval(
        "SELECT desired_state FROM igla_race_trials WHERE canon_name = $1", bad) == "stopped"
    child = await conn.fetchrow(
        "SELECT canon_name, spawn_reason, seed_strategy FROM igla_race_trials WHERE parent = $1",
        bad)
    assert child is not None and child["spawn_reason"] == "replace"
    applied = await conn.fetch("SELECT action FROM gardener_decisions WHERE canon_name = $1 "
                               "AND applied ORDER BY id", bad)
    assert [r["action"] for r in applied] == ["prune", "replace"]
    after = decide(await load_snapshot(conn, info, paused=False), CONFIG)
    assert not [d for d in after if d.canon_name == bad and d.mutates]
    again = run(["hunt", "prune", "--rung", "1", "--apply", "--account", "acc1",
                 "--race", "div"], db_dsn)
    assert again.returncode == 0, again.stderr
    assert await conn.fetchval("SELECT count(*) FROM igla_race_trials WHERE parent = $1",
                               bad) == 1  # exactly once


async def test_kill_is_the_daemons_prune_and_can_replace(conn: asyncpg.Connection) -> None:
    names = await make_race(conn, "k", 2)
    done = await hand.kill(conn, names[0], "acc1", by="alice@acc1", replace=True)
    assert [a.decision.action for a in done] == [Action.PRUNE, Action.REPLACE]
    (child,) = done[1].spawned
    assert (await trials.get_trial(conn, child))["parent"] == names[0]
    assert await hand.kill(conn, names[0], "acc1") == []  # already stopping: nothing twice
    await control.set_paused(conn, True, "maintenance", "bob")
    with pytest.raises(GardenerPaused, match="maintenance"):
        await hand.kill(conn, names[1], "acc1")
    assert (await trials.get_trial(conn, names[1]))["desired_state"] == "running"


async def test_a_trial_is_named_by_seed_exp_id_or_name(conn: asyncpg.Connection) -> None:
    names = await make_race(conn, "m", 2, first_exp=10000, first_seed=200)
    assert (await hand.resolve_trial(conn, "200", "acc1"))["canon_name"] == names[0]
    assert (await hand.resolve_trial(conn, "E10001", "acc1"))["canon_name"] == names[1]
    assert (await hand.resolve_trial(conn, names[1], "acc1"))["canon_name"] == names[1]
    with pytest.raises(UnknownTrial, match="acc2 has no trial with seed 200"):
        await hand.resolve_trial(conn, "200", "acc2")
    with pytest.raises(UnknownTrial, match="E9999"):
        await hand.resolve_trial(conn, "E9999", "acc1")
    mirrored = await hand.mirror(conn, "200", "acc1", count=3, strategy="sibling")
    assert len(mirrored.spawned) == 3
    assert {int(n.rsplit("seed", 1)[1]) for n in mirrored.spawned} >= {199}  # 201 is taken
    await make_race(conn, "m2", 1, first_exp=20000, first_seed=200, model="NCA")
    with pytest.raises(UserError, match="seed 200 names 2 trials"):
        await hand.resolve_trial(conn, "200", "acc1")


async def test_cli_mirror_by_seed_and_the_plans_kill_form(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    names = await make_race(conn, "p", 2, first_seed=200)
    mirrored = run(["hunt", "mirror", "--leader", "200", "--count", "2", "--account", "acc1"],
                   db_dsn)
    assert mirrored.returncode == 0, mirrored.stderr
    assert f"mirrored {names[0]}" in mirrored.stdout
    killed = run(["--account", "acc1", "--kill", names[1]], db_dsn)
    assert killed.returncode == 0, killed.stderr
    assert f"{names[1]}: stop requested" in killed.stdout
    refused = run(["--account", "acc2", "--kill", names[0]], db_dsn)
    assert refused.returncode != 0 and "CrossAccountKillForbidden" in refused.stderr
    assert (await trials.get_trial(conn, names[0]))["desired_state"] == "running"


async def test_prune_without_apply_changes_nothing(conn: asyncpg.Connection) -> None:
    _, bad = await diverging_race(conn)
    shown = await hand.prune(conn, Settings(), "acc1", 1, race="div")
    assert {(d.action, d.canon_name) for rd in shown for d in rd.decisions} >= {
        (Action.PRUNE, bad), (Action.REPLACE, bad)}
    assert await conn.fetchval("SELECT count(*) FROM gardener_decisions") == 0
