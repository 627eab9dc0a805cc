"""The ledger on a real PostgreSQL: migrations, the audit trail, EXP_IDs, admission, control."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from gardener.core import canon
from gardener.errors import (
    CrossAccountKillForbidden,
    ExpIdReused,
    GF16HiddenTooSmall,
    ReusedChampionSlot,
    SeedReused,
    SlotStillOccupied,
    UnknownTrial,
)
from gardener.ledger import control, db, expid, migrate, trials
from gardener.loop import hand


async def test_migrations_apply_once_and_twice_changes_nothing(empty_db_dsn: str) -> None:
    conn = await db.connect(empty_db_dsn)
    try:
        first = await migrate.migrate(conn)
        assert first == [m.version for m in migrate.discover()]
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert await migrate.migrate(conn) == []
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
            )
            == tables
        )
        assert await migrate.pending(conn) == []
        for name in (
            "igla_race_trials",
            "bpb_samples",
            "gardener_decisions",
            "gardener_control",
            "sample_quarantine",
            "tripwire_events",
            "exp_ids",
            "used_seeds",
        ):
            assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name), name
    finally:
        await conn.close()


async def test_two_instances_migrating_at_once_apply_each_file_once(empty_db_dsn: str) -> None:
    conns = [await db.connect(empty_db_dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate.migrate(c) for c in conns))
        applied = [v for r in results for v in r]
        assert sorted(applied) == [m.version for m in migrate.discover()]
    finally:
        for c in conns:
            await c.close()


async def _decision(conn: asyncpg.Connection) -> int:
    return await conn.fetchval(
        "INSERT INTO gardener_decisions (race, rung, canon_name, action, numbers, reason, applied)"
        " VALUES ('r', 1, 'IGLA-X', 'prune', $1, 'because', true) RETURNING id",
        {"delta": 0.1},
    )


async def test_audit_trail_refuses_update_delete_and_truncate(conn: asyncpg.Connection) -> None:
    decision_id = await _decision(conn)
    for sql in (
        "UPDATE gardener_decisions SET reason = 'edited' WHERE id = $1",
        "DELETE FROM gardener_decisions WHERE id = $1",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(sql, decision_id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("TRUNCATE gardener_decisions")
    row = await conn.fetchrow(
        "SELECT reason, numbers FROM gardener_decisions WHERE id = $1", decision_id
    )
    assert row["reason"] == "because" and row["numbers"] == {"delta": 0.1}


async def test_an_applied_decision_key_is_written_once(conn: asyncpg.Connection) -> None:
    await _decision(conn)
    with pytest.raises(asyncpg.UniqueViolationError):
        await _decision(conn)


async def test_eight_concurrent_claimers_never_share_an_exp_id(pool: asyncpg.Pool) -> None:
    async def claimer(i: int) -> list[int]:
        got: list[int] = []
        async with pool.acquire() as c:
            for _ in range(100):
                got += await expid.claim(c, f"acc{i % 3 + 1}", 1, by=f"claimer{i}")
        return got

    async with pool.acquire() as c:  # an id taken explicitly must be skipped by the sequence
        await expid.claim_exact(c, 9, "acc1", None)
    results = await asyncio.gather(*(claimer(i) for i in range(8)))
    ids = [i for r in results for i in r]
    assert len(ids) == 800
    assert len(set(ids)) == 800
    assert 9 not in ids and min(ids) >= 5


async def test_next_does_not_take_and_claim_takes(conn: asyncpg.Connection) -> None:
    assert await expid.next_exp_id(conn) == 5
    assert await expid.next_exp_id(conn) == 5
    await expid.claim_exact(conn, 5, "acc1", None)
    assert await expid.next_exp_id(conn) == 6
    assert await expid.claim(conn, "acc1", 2) == [6, 7]
    assert await expid.next_exp_id(conn) == 8


async def test_exp_ids_go_past_e9999(conn: asyncpg.Connection) -> None:
    """E<EXP_ID:04> is a minimum width: the sequence, explicit claims and sorting go on."""
    await conn.execute("SELECT setval('exp_id_seq', 9998)")
    assert await expid.next_exp_id(conn) == 9999
    assert await expid.claim(conn, "acc1", 3) == [9999, 10000, 10001]
    await expid.claim_exact(conn, 10003, "acc1", "IGLA-HYBRID-FP32-WSD-E10003-seed1")
    assert await expid.next_exp_id(conn) == 10002
    assert await expid.claim(conn, "acc1", 2) == [10002, 10004]
    ordered = await conn.fetchval("SELECT array_agg(exp_id ORDER BY exp_id) FROM exp_ids")
    assert ordered[-6:] == [9999, 10000, 10001, 10002, 10003, 10004]


async def test_next_exp_id_skips_a_run_of_explicit_claims(conn: asyncpg.Connection) -> None:
    for i in (5, 6, 7, 9):
        await expid.claim_exact(conn, i, "acc1", None)
    assert await expid.next_exp_id(conn) == 8


async def test_a_claim_skips_a_long_run_of_explicit_ids_in_a_few_statements(
    conn: asyncpg.Connection,
) -> None:
    """Ids admitted by name ahead of the sequence (a fleet named E0010..E2009) are skipped in
    one step: a claim per taken id was 1.3 s of round trips at 10,000."""
    await conn.execute(
        "INSERT INTO exp_ids (exp_id, account, claimed_by) "
        "SELECT g, 'acc1', 'admit' FROM generate_series(7, 2006) g"
    )
    queries: list[str] = []

    def logged(record: object) -> None:
        queries.append(str(record))

    conn.add_query_logger(logged)
    try:
        assert await expid.claim(conn, "acc1", 4) == [5, 6, 2007, 2008]
    finally:
        conn.remove_query_logger(logged)
    assert len(queries) < 20
    await expid.claim_exact(conn, 2010, "acc1", None)
    assert await expid.claim(conn, "acc1", 2) == [2009, 2011]


async def test_the_pool_plans_without_jit(pool: asyncpg.Pool) -> None:
    """The loop's queries take milliseconds; JIT compiling one (the rescan's stall check at
    10,000 trials) took 180 ms."""
    assert await pool.fetchval("SHOW jit") == "off"


@pytest.mark.parametrize("slot", [1, 2, 3, 4])
async def test_champion_slots_are_locked(conn: asyncpg.Connection, slot: int) -> None:
    with pytest.raises(ReusedChampionSlot, match=f"E000{slot}"):
        await expid.claim_exact(conn, slot, "acc1", None)


async def _race(conn: asyncpg.Connection, name: str = "r1", account: str = "acc1") -> None:
    await trials.ensure_race(conn, name, account, kind="hunt")


def _adm(name: str, hidden: int | None = 256) -> trials.Admission:
    return trials.Admission(canon=canon.parse(name), hidden_size=hidden, steps=500)


async def test_admission_is_all_or_nothing(conn: asyncpg.Connection) -> None:
    await _race(conn)
    await trials.admit(conn, "r1", "acc1", [_adm("IGLA-HYBRID-FP32-WSD-E0005-seed200")])
    before = await conn.fetchval("SELECT count(*) FROM igla_race_trials")
    with pytest.raises(SeedReused, match="NEVER REUSE"):
        await trials.admit(
            conn,
            "r1",
            "acc1",
            [
                _adm("IGLA-HYBRID-FP32-WSD-E0006-seed201"),
                _adm("IGLA-HYBRID-FP32-WSD-E0007-seed200"),
            ],
        )
    assert await conn.fetchval("SELECT count(*) FROM igla_race_trials") == before
    assert await conn.fetchval("SELECT count(*) FROM exp_ids WHERE exp_id = 6") == 0


async def test_admission_refuses_gf16_below_256_and_champion_exp_ids(
    conn: asyncpg.Connection,
) -> None:
    await _race(conn)
    with pytest.raises(GF16HiddenTooSmall):
        await trials.admit(conn, "r1", "acc1", [_adm("IGLA-TRAIN_V2-GF16-CHAMP-seed300", 128)])
    with pytest.raises(ReusedChampionSlot):
        await trials.admit(conn, "r1", "acc1", [_adm("IGLA-HYBRID-FP32-WSD-E0004-seed7")])
    await trials.admit(conn, "r1", "acc1", [_adm("IGLA-HYBRID-FP32-WSD-E0010-seed7")])
    with pytest.raises(ExpIdReused, match="already used by IGLA-HYBRID-FP32-WSD-E0010-seed7"):
        await trials.admit(conn, "r1", "acc1", [_adm("IGLA-HYBRID-FP32-BS8-E0010-seed8")])
    assert await conn.fetchval("SELECT count(*) FROM igla_race_trials") == 1


async def test_readmitting_the_same_name_is_a_no_op(conn: asyncpg.Connection) -> None:
    await _race(conn)
    names = [_adm("IGLA-HYBRID-FP32-WSD-SMOKE-seed500")]
    assert await trials.admit(conn, "r1", "acc1", names) == ["IGLA-HYBRID-FP32-WSD-SMOKE-seed500"]
    assert await trials.admit(conn, "r1", "acc1", names) == []


async def test_cross_account_mutations_are_refused_and_change_nothing(
    conn: asyncpg.Connection,
) -> None:
    await _race(conn, "r2", "acc2")
    await trials.admit(conn, "r2", "acc2", [_adm("IGLA-HYBRID-FP32-WSD-SMOKE-seed501")])
    with pytest.raises(CrossAccountKillForbidden):
        await hand.kill(conn, "IGLA-HYBRID-FP32-WSD-SMOKE-seed501", "acc1")
    with pytest.raises(CrossAccountKillForbidden):
        await trials.admit(conn, "r2", "acc1", [_adm("IGLA-HYBRID-FP32-WSD-SMOKE-seed502")])
    with pytest.raises(CrossAccountKillForbidden):
        await trials.ensure_race(conn, "r2", "acc1")
    row = await trials.get_trial(conn, "IGLA-HYBRID-FP32-WSD-SMOKE-seed501")
    assert row["desired_state"] == "running"
    assert await conn.fetchval("SELECT count(*) FROM gardener_decisions") == 0
    assert len(await hand.kill(conn, "IGLA-HYBRID-FP32-WSD-SMOKE-seed501", "acc2")) == 1
    assert await hand.kill(conn, "IGLA-HYBRID-FP32-WSD-SMOKE-seed501", "acc2") == []
    assert await conn.fetchval(
        "SELECT count(*) FROM gardener_decisions WHERE action = 'prune' AND applied") == 1


async def _stop(conn: asyncpg.Connection, name: str) -> None:
    await hand.kill(conn, name, "acc1")
    await conn.execute(
        "UPDATE igla_race_trials SET observed_state = 'stopped' WHERE canon_name = $1", name
    )


async def test_force_replace_of_an_occupied_slot_is_refused(conn: asyncpg.Connection) -> None:
    await _race(conn)
    champ, challenger = "IGLA-TRAIN_V2-FP32-CHAMP-seed43", "IGLA-TRAIN_V2-FP32-CHAMP-seed44"
    await trials.admit(conn, "r1", "acc1", [_adm(champ), _adm(challenger)])
    await _stop(conn, challenger)
    with pytest.raises(ReusedChampionSlot):
        await expid.bind_champion_slot(conn, 4, champ, "acc1", force_replace=False)
    state = await expid.bind_champion_slot(conn, 1, champ, "acc1", force_replace=False)
    assert state.changed and state.replaced is None  # an empty slot takes it
    with pytest.raises(SlotStillOccupied, match="kill it"):
        await expid.bind_champion_slot(conn, 1, challenger, "acc1", force_replace=True)
    with pytest.raises(CrossAccountKillForbidden, match="belongs to acc1"):
        await expid.bind_champion_slot(conn, 1, challenger, "acc2", force_replace=True)
    await _stop(conn, champ)
    state = await expid.bind_champion_slot(conn, 1, challenger, "acc1", force_replace=True)
    assert (state.canon_name, state.replaced) == (challenger, champ)
    assert await conn.fetchval(
        "SELECT desired_state FROM igla_race_trials WHERE canon_name = $1", challenger
    ) == "running"  # bound: the trial's service is wanted again
    audit = await conn.fetch(
        "SELECT canon_name, action FROM gardener_decisions WHERE action LIKE 'champion:%' "
        "ORDER BY id")
    assert [(r["canon_name"], r["action"]) for r in audit] == [
        (champ, "champion:E0001"), (challenger, "champion:E0001")]


async def test_another_account_cannot_take_a_champion_slot(conn: asyncpg.Connection) -> None:
    """Issue 11, finding 4: acc2 force-replacing E0004 with its own E0005 is refused, and so
    is acc1 binding a name that is not an admitted trial or is another account's."""
    await _race(conn, "r2", "acc2")
    mine = "IGLA-HYBRID-FP32-WSD-E0005-seed1"
    await trials.admit(conn, "r2", "acc2", [_adm(mine)])
    before = dict(await conn.fetchrow("SELECT * FROM champion_slots WHERE exp_id = 4"))
    assert before["account"] == "acc1"
    with pytest.raises(CrossAccountKillForbidden, match="E0004 belongs to acc1, not acc2"):
        await expid.bind_champion_slot(conn, 4, mine, "acc2", force_replace=True)
    with pytest.raises(CrossAccountKillForbidden, match="belongs to acc2"):
        await expid.bind_champion_slot(conn, 4, mine, "acc1", force_replace=True)
    with pytest.raises(UnknownTrial, match="admit it first"):
        await expid.bind_champion_slot(
            conn, 4, "IGLA-HYBRID-FP32-WSD-E0099-seed9", "acc1", force_replace=True)
    after = dict(await conn.fetchrow("SELECT * FROM champion_slots WHERE exp_id = 4"))
    assert after == before
    assert await conn.fetchval("SELECT count(*) FROM gardener_decisions") == 0


async def test_champion_seeds_are_used_seeds(conn: asyncpg.Connection) -> None:
    """NEVER REUSE from the first migration on: the champion's seed 42 is taken."""
    await _race(conn)
    with pytest.raises(SeedReused, match=r"seed 42 .* IGLA-TRAIN_V2-FP32-CHAMP-seed42"):
        await trials.admit(conn, "r1", "acc1", [_adm("IGLA-TRAIN_V2-FP32-CHAMP-seed42")])
    assert await trials.used_seeds(conn, "IGLA-TRAIN_V2-FP32-CHAMP") == frozenset({42})
    assert await conn.fetchval("SELECT count(*) FROM igla_race_trials") == 0


async def test_an_ordinary_used_exp_id_is_not_a_champion_slot_error(
    conn: asyncpg.Connection,
) -> None:
    await expid.claim_exact(conn, 5, "acc1", None)
    with pytest.raises(ExpIdReused, match="E0005 is already used") as info:
        await expid.claim_exact(conn, 5, "acc2", None)
    assert not isinstance(info.value, ReusedChampionSlot)


async def test_pause_flag_sends_notify(conn: asyncpg.Connection, db_dsn: str) -> None:
    got: asyncio.Queue[str] = asyncio.Queue()
    listener = await db.connect(db_dsn)
    try:
        await listener.add_listener(control.CONTROL_CHANNEL, lambda *args: got.put_nowait(args[3]))
        await conn.execute("UPDATE gardener_control SET paused = true, reason = 'by hand'")
        payload = json.loads(await asyncio.wait_for(got.get(), 5))
        assert payload["paused"] is True and payload["reason"] == "by hand"
        ctl = await control.set_paused(conn, False, "resumed", "tester")
        assert ctl.paused is False
        assert json.loads(await asyncio.wait_for(got.get(), 5))["paused"] is False
    finally:
        await listener.close()


async def test_samples_are_unique_per_step(conn: asyncpg.Connection) -> None:
    sql = (
        "INSERT INTO bpb_samples (canon_name, seed, step, bpb) VALUES ('n', 1, $1, $2)"
        " ON CONFLICT DO NOTHING"
    )
    await conn.execute(sql, 10, 2.5)
    await conn.execute(sql, 10, 2.4)
    assert await conn.fetchval("SELECT bpb FROM bpb_samples WHERE step = 10") == 2.5
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(sql, -1, 2.5)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(sql, 11, float("nan"))
