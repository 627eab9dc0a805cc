"""Each Gate-0 criterion GREEN on honest ledger data and RED on data (or code) that is wrong.

The race is admitted through the smoke race's own admission (2 tags x 2 seeds, 60 steps);
samples and corpus reports are written the way ingest writes them. Probes get a broken code
path to show they can fail.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from datetime import timedelta

import anyio
import asyncpg
import pytest

from gardener.backends.base import ServiceState, Status
from gardener.core import canon
from gardener.errors import ReusedChampionSlot, UserError
from gardener.ledger import expid, trials
from gardener.loop import hand
from gardener.race import criteria as crit
from gardener.race import probes, smoke_admit, smoke_config

SHA = "a" * 64
RACE = "gate0-smoke-test"


def small_config() -> smoke_config.SmokeConfig:
    return smoke_config.load_config().with_overrides(tags="WSD,BS8", seeds_per_tag=2, max_steps=60)


async def admit(conn: asyncpg.Connection, name: str = RACE) -> tuple[
    list[smoke_admit.PlannedTrial], crit.RaceContext
]:
    cfg = small_config()
    planned = await smoke_admit.admit_race(conn, cfg, name, corpus_sha256=SHA)
    ctx = crit.RaceContext(name, "acc1", tuple(p.name for p in planned), 60, 10, "stdlib", SHA,
                           cfg.criteria)
    return planned, ctx


async def fill(
    conn: asyncpg.Connection,
    planned: list[smoke_admit.PlannedTrial],
    *,
    latency_s: float = 5.0,
    steps: range = range(10, 61, 10),
    corpus_after_s: float = 1.0,
) -> None:
    """Samples and corpus reports as ingest records them: distinct curves per trial."""
    for i, p in enumerate(planned):
        created = await conn.fetchval(
            "SELECT created_at FROM igla_race_trials WHERE canon_name = $1", p.name)
        for k, step in enumerate(steps):
            bpb = round(4.0 - 0.01 * step + 0.0137 * i, 4)
            ts = created + timedelta(seconds=latency_s + k)
            await conn.execute(
                "INSERT INTO bpb_samples (canon_name, seed, step, bpb, ts, source, ingested_at) "
                "VALUES ($1, $2, $3, $4, $5, 'local', $5)", p.name, p.canon.seed, step, bpb, ts)
        await conn.execute(
            "UPDATE igla_race_trials SET corpus = 'stdlib', corpus_sha256 = $2, "
            "corpus_reported_at = created_at + make_interval(secs => $3) WHERE canon_name = $1",
            p.name, SHA, corpus_after_s)


# ---- planning ------------------------------------------------------------------------------


async def test_runs_take_fresh_seeds_from_each_block_until_exhausted(
    conn: asyncpg.Connection,
) -> None:
    cfg = smoke_config.load_config().with_overrides(tags="WSD,h768", seeds_per_tag=3)
    seen: list[list[int]] = []
    for run in range(3):
        planned = await smoke_admit.admit_race(conn, cfg, f"r{run}", corpus_sha256=SHA)
        seen.append(sorted(p.canon.seed for p in planned))
    assert seen == [[500, 501, 502, 560, 561, 562], [503, 504, 505, 563, 564, 565],
                    [506, 507, 508, 566, 567, 568]]
    names = [r["canon_name"] for r in await conn.fetch("SELECT canon_name FROM igla_race_trials")]
    assert len(names) == len(set(names)) == 18
    assert "IGLA-HYBRID-FP32-h768-SMOKE-seed566" in names
    with pytest.raises(smoke_admit.SeedsExhausted, match=r"500\.\.509"):
        await smoke_admit.admit_race(conn, cfg, "r3", corpus_sha256=SHA)
    assert await conn.fetchval("SELECT count(*) FROM races WHERE name = 'r3'") == 0


def test_config_defaults_and_overrides() -> None:
    cfg = smoke_config.load_config()
    assert cfg.tags == ("WSD", "BS8", "GRADFIX-JEPAT", "GRADFIX-NCA", "EMA10", "h512", "h768")
    assert (cfg.seeds_per_tag, cfg.max_steps, cfg.wallclock_s) == (3, 500, 1800)
    assert cfg.account == "acc1" and cfg.auto_teardown
    assert cfg.tag_specs["GRADFIX-JEPAT"].canon == "IGLA-JEPA-T-FP32-GRADFIX-SMOKE"
    short = cfg.with_overrides(max_steps=60, wallclock="2m")
    assert short.rungs == (30, 60)
    assert cfg.with_overrides(max_steps=800).rungs == (100, 800)
    assert short.wallclock_s == 120
    with pytest.raises(UserError, match="unknown smoke tag"):
        cfg.with_overrides(tags="WSD,NOPE")


# ---- reads ---------------------------------------------------------------------------------


async def test_first_samples(conn: asyncpg.Connection) -> None:
    planned, ctx = await admit(conn)
    assert not (await crit.first_samples(conn, ctx)).green  # nothing arrived yet
    await fill(conn, planned)
    assert (await crit.first_samples(conn, ctx)).green
    await conn.execute("UPDATE bpb_samples SET ts = ts + interval '200 seconds', "
                       "ingested_at = ingested_at + interval '200 seconds' "
                       "WHERE canon_name = $1 AND step = 10", planned[0].name)
    late = await crit.first_samples(conn, ctx)
    assert not late.green and "later than 120 s" in late.evidence


async def test_lr8_tokens(conn: asyncpg.Connection) -> None:
    planned, ctx = await admit(conn)
    await fill(conn, planned)
    assert (await crit.lr8_tokens(conn, ctx)).green
    await conn.execute("UPDATE bpb_samples SET bpb = 3.12345 WHERE canon_name = $1 AND step = 20",
                       planned[1].name)
    assert not (await crit.lr8_tokens(conn, ctx)).green
    await conn.execute("UPDATE bpb_samples SET bpb = 3.1234 WHERE canon_name = $1 AND step = 20",
                       planned[1].name)
    assert (await crit.lr8_tokens(conn, ctx)).green
    await conn.execute(
        "INSERT INTO sample_quarantine (source, account, canon_name, raw, reason) VALUES "
        "('local', 'acc1', $1, 'step=30 BPB=3.12', 'L-R8: BPB token must match')",
        planned[0].name)
    red = await crit.lr8_tokens(conn, ctx)
    assert not red.green and "quarantined" in red.evidence


async def test_samples_per_seed(conn: asyncpg.Connection) -> None:
    planned, ctx = await admit(conn)
    await fill(conn, planned)
    green = await crit.samples_per_seed(conn, ctx)
    assert green.green and green.details["needed"] == 4  # 60 steps: 6 rows possible
    assert ctx.config.samples_needed(500, 10) == 40
    await conn.execute("DELETE FROM bpb_samples WHERE canon_name = $1 AND step > 30",
                       planned[2].name)
    assert not (await crit.samples_per_seed(conn, ctx)).green


async def test_one_row_per_name(conn: asyncpg.Connection) -> None:
    _, ctx = await admit(conn)
    assert (await crit.one_row_per_name(conn, ctx)).green
    extra = canon.parse("IGLA-HYBRID-FP32-WSD-SMOKE-seed509")
    await trials.admit(conn, RACE, "acc1", [trials.Admission(extra, hidden_size=256, steps=60)])
    red = await crit.one_row_per_name(conn, ctx)
    assert not red.green and "seed509" in red.evidence


async def test_leaderboard_gate0(conn: asyncpg.Connection) -> None:
    planned, ctx = await admit(conn)
    await fill(conn, planned)
    assert (await crit.leaderboard_gate0(conn, ctx)).green
    final = await conn.fetchval("SELECT bpb FROM bpb_samples WHERE canon_name = $1 AND step = 60",
                                planned[0].name)
    await conn.execute("UPDATE bpb_samples SET bpb = $2 WHERE canon_name = $1 AND step = 60",
                       planned[1].name, final)
    red = await crit.leaderboard_gate0(conn, ctx)
    assert not red.green and "share the same final BPB" in red.evidence
    await conn.execute("DELETE FROM bpb_samples WHERE step = 60")  # every trial cut at 50
    cut = await crit.leaderboard_gate0(conn, ctx)
    assert not cut.green and "ended before step 60" in cut.evidence


async def test_corpus_reported(conn: asyncpg.Connection) -> None:
    planned, ctx = await admit(conn)
    assert not (await crit.corpus_reported(conn, ctx)).green
    await fill(conn, planned)
    assert (await crit.corpus_reported(conn, ctx)).green
    await conn.execute("UPDATE igla_race_trials SET corpus_sha256 = $2 WHERE canon_name = $1",
                       planned[0].name, "b" * 64)
    assert not (await crit.corpus_reported(conn, ctx)).green
    await conn.execute("UPDATE igla_race_trials SET corpus_sha256 = $1, corpus_reported_at = "
                       "created_at + interval '300 seconds'", SHA)
    late = await crit.corpus_reported(conn, ctx)
    assert not late.green and "after" in late.evidence


async def test_no_tripwires(conn: asyncpg.Connection) -> None:
    planned, ctx = await admit(conn)
    assert (await crit.no_tripwires(conn, ctx)).green
    tid = await conn.fetchval(
        "INSERT INTO tripwire_events (kind, race, canon_name, dedupe_key, evidence) "
        "VALUES ('stalled', $1, $2, $3, '{}') RETURNING id",
        RACE, planned[0].name, f"stalled:{planned[0].name}")
    red = await crit.no_tripwires(conn, ctx)
    assert not red.green and "stalled" in red.evidence
    await conn.execute("UPDATE tripwire_events SET acknowledged_at = now() WHERE id = $1", tid)
    assert (await crit.no_tripwires(conn, ctx)).green


async def test_teardown_clean_sees_a_real_process(conn: asyncpg.Connection) -> None:
    planned, ctx = await admit(conn)
    assert not (await crit.teardown_clean(conn, ctx, observed=[])).green  # still desired running
    await conn.execute("UPDATE igla_race_trials SET desired_state = 'stopped' WHERE race = $1",
                       RACE)
    assert (await crit.teardown_clean(conn, ctx, observed=[])).green
    assert not (await crit.teardown_clean(conn, ctx, observed=None)).green
    active = ServiceState(planned[0].name, "s", "1", Status.RUNNING, "running", True)
    assert not (await crit.teardown_clean(conn, ctx, observed=[active])).green
    env = {**os.environ, "TRAIN_CANON_NAME": planned[1].name}
    proc = await anyio.open_process([sys.executable, "-c", "import time; time.sleep(30)"],
                                    env=env)
    try:
        red = await crit.teardown_clean(conn, ctx, observed=[])
        assert not red.green and f"pid {proc.pid}" in red.evidence
    finally:
        proc.kill()
        await proc.wait()
    assert (await crit.teardown_clean(conn, ctx, observed=[])).green


async def test_smoke_done_only_when_recorded_green(conn: asyncpg.Connection) -> None:
    _, ctx = await admit(conn)
    assert not (await crit.smoke_done(conn, ctx)).green
    red = [crit.Criterion(3, crit.TITLES[3], False, "short")]
    assert not await crit.record_verdict(conn, RACE, red)
    assert not (await crit.smoke_done(conn, ctx)).green
    assert await conn.fetchval("SELECT status FROM races WHERE name = $1", RACE) == "failed"
    _, ctx2 = await admit(conn, "gate0-smoke-second")
    green = [crit.Criterion(n, crit.TITLES[n], True, "ok") for n in range(1, 14)]
    assert await crit.record_verdict(conn, ctx2.race, green)
    done = await crit.smoke_done(conn, ctx2)
    assert done.green and crit.SMOKE_DONE in done.evidence


# ---- probes --------------------------------------------------------------------------------


async def test_probe_lr9(conn: asyncpg.Connection) -> None:
    _, ctx = await admit(conn)
    before = await conn.fetchval("SELECT count(*) FROM igla_race_trials")
    green = await probes.probe_lr9(conn, ctx, seed=777)
    assert green.green and "GF16HiddenTooSmall" in green.evidence

    async def no_lr9_check(c: asyncpg.Connection, race: str, account: str, ts: list) -> list[str]:
        return await trials.admit(c, race, account, [replace(t, hidden_size=512) for t in ts])

    red = await probes.probe_lr9(conn, ctx, seed=777, admit=no_lr9_check)
    assert not red.green and "ADMITTED" in red.evidence
    assert await conn.fetchval("SELECT count(*) FROM igla_race_trials") == before


async def test_probe_used_slot(conn: asyncpg.Connection) -> None:
    _, ctx = await admit(conn)
    green = await probes.probe_used_slot(conn, ctx)
    assert green.green and "ReusedChampionSlot" in green.evidence
    assert "the empty E0001 took it" in green.evidence

    async def forced(*a: object, force_replace: bool) -> expid.SlotState:
        return await expid.bind_champion_slot(*a, force_replace=True)  # type: ignore[arg-type]

    red = await probes.probe_used_slot(conn, ctx, deploy=forced)
    assert not red.green and "SUCCEEDED" in red.evidence

    async def every_slot_locked(c: asyncpg.Connection, slot: int, name: str, account: str,
                                *, force_replace: bool) -> expid.SlotState:
        """The old rule: any slot without --force-replace is refused, used or empty."""
        if not force_replace:
            raise ReusedChampionSlot(f"champion slot E{slot:04d} is locked")
        return await expid.bind_champion_slot(c, slot, name, account, force_replace=True)

    locked = await probes.probe_used_slot(conn, ctx, deploy=every_slot_locked)
    assert not locked.green and "the empty slot E0001 refused it too" in locked.evidence
    slot = await conn.fetchrow("SELECT canon_name, bpb FROM champion_slots WHERE exp_id = 4")
    assert tuple(slot) == ("IGLA-TRAIN_V2-FP32-CHAMP-seed42", 1.8921)


async def test_probe_force_replace(conn: asyncpg.Connection) -> None:
    planned, ctx = await admit(conn)
    challenger = "IGLA-TRAIN_V2-FP32-CHAMP-seed43"
    green = await probes.probe_force_replace(conn, ctx, challenger=challenger)
    assert green.green and "SlotStillOccupied" in green.evidence

    async def kill_first(c: asyncpg.Connection, slot: int, name: str, account: str,
                         *, force_replace: bool) -> expid.SlotState:
        if name == challenger:  # a deploy that stops the holder itself: not kill-before-spin
            await c.execute("UPDATE igla_race_trials SET desired_state = 'stopped', "
                            "observed_state = 'stopped' WHERE race = $1", RACE)
            await trials.admit(c, RACE, account, [trials.Admission(canon.parse(challenger))])
        return await expid.bind_champion_slot(c, slot, name, account,
                                              force_replace=force_replace)

    red = await probes.probe_force_replace(conn, ctx, challenger=challenger, deploy=kill_first)
    assert not red.green and "SUCCEEDED" in red.evidence
    # Rolled back: slot reserved again, trials still running.
    assert await conn.fetchval("SELECT canon_name FROM champion_slots WHERE exp_id = 1") is None
    assert await conn.fetchval("SELECT count(*) FROM igla_race_trials WHERE race = $1 AND "
                               "desired_state = 'running'", RACE) == len(planned)
    await conn.execute("UPDATE igla_race_trials SET desired_state = 'stopped' WHERE race = $1",
                       RACE)
    idle = await probes.probe_force_replace(conn, ctx, challenger=challenger)
    assert not idle.green and "no trial of the race is running" in idle.evidence


async def test_probe_cross_account_kill(conn: asyncpg.Connection) -> None:
    _, ctx = await admit(conn)
    green = await probes.probe_cross_account_kill(conn, ctx)
    assert green.green and "CrossAccountKillForbidden" in green.evidence

    async def unchecked_kill(c: asyncpg.Connection, name: str, account: str, **kw: str) -> list:
        owner = await c.fetchval("SELECT account FROM igla_race_trials WHERE canon_name = $1",
                                 name)
        return await hand.kill(c, name, owner, **kw)

    red = await probes.probe_cross_account_kill(conn, ctx, kill=unchecked_kill)
    assert not red.green and "killed" in red.evidence
    assert await conn.fetchval("SELECT count(*) FROM igla_race_trials WHERE account = 'acc2'") == 0
    assert await conn.fetchval("SELECT count(*) FROM gardener_decisions") == 0


async def test_probe_exp_claims(db_dsn: str, conn: asyncpg.Connection) -> None:
    _, ctx = await admit(conn)
    green = await probes.probe_exp_claims(db_dsn, ctx)
    assert green.green
    assert len(set(green.details["ids"])) == 24

    async def peek(c: asyncpg.Connection, account: str, n: int, by: str) -> list[int]:
        return [await expid.next_exp_id(c) for _ in range(n)]  # looks, never takes

    red = await probes.probe_exp_claims(db_dsn, ctx, claim=peek)
    assert not red.green and "duplicates" in red.evidence


async def test_evaluate_marks_a_missing_probe_red(conn: asyncpg.Connection) -> None:
    planned, ctx = await admit(conn)
    await fill(conn, planned)
    results = await crit.evaluate(conn, ctx, {}, observed=[])
    assert [c.number for c in results] == list(range(1, 14))
    assert not results[4].green and "did not run" in results[4].evidence
    assert results[0].green and results[1].green
