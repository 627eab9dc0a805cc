"""The leaderboard from ledger rows, its gate verdicts, and the report built on it."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import numpy as np
import pytest

from gardener.core import canon
from gardener.errors import UserError
from gardener.ledger import trials
from gardener.race import criteria as crit
from gardener.race import leaderboard, report


async def make_race(conn: asyncpg.Connection, race: str, names: list[str], *, kind: str = "hunt",
                    horizon: int = 100, config: dict | None = None) -> None:
    await trials.ensure_race(conn, race, "acc1", kind=kind, horizon=horizon,
                             config=config or {"rungs": [30, horizon]})
    await trials.admit(conn, race, "acc1",
                       [trials.Admission(canon.parse(n), hidden_size=256, steps=horizon)
                        for n in names])


async def samples(conn: asyncpg.Connection, name: str, values: dict[int, float]) -> None:
    seed = canon.parse(name).seed
    await conn.executemany(
        "INSERT INTO bpb_samples (canon_name, seed, step, bpb) VALUES ($1, $2, $3, $4)",
        [(name, seed, s, v) for s, v in values.items()])


def curve(final: float, n: int = 10, step: int = 10) -> dict[int, float]:
    """A decreasing curve that ends at ``final`` with its minimum one step earlier."""
    vals = {k * step: round(final + 1.5 / k, 4) for k in range(1, n)}
    vals[(n - 1) * step] = round(final - 0.01, 4)  # best, before the end
    vals[n * step] = final
    return vals


async def test_gate0_ranks_final_bpb_not_best(conn: asyncpg.Connection) -> None:
    names = [f"IGLA-HYBRID-FP32-WSD-SMOKE-seed{s}" for s in (500, 501, 502)]
    await make_race(conn, "smoke-a", names, kind="smoke")
    await samples(conn, names[0], curve(3.30))
    await samples(conn, names[1], curve(3.10))
    await samples(conn, names[2], curve(3.20))
    board = await leaderboard.rank(conn, "gate-0", race="smoke-a")
    assert [r.canon_name for r in board.rows] == [names[1], names[2], names[0]]
    top = board.rows[0]
    assert (top.rank, top.final_bpb, top.best_bpb, top.final_step, top.samples) == (
        1, 3.10, 3.09, 100, 10)
    assert board.verdict.passed
    md = leaderboard.markdown(board)
    assert "| 1 | `IGLA-HYBRID-FP32-WSD-SMOKE-seed501` | 3.1000 | 100 | 3.0900 |" in md
    assert "gate-0 PASSES" in md


async def test_gate0_fails_on_missing_or_shared_bpb(conn: asyncpg.Connection) -> None:
    names = [f"IGLA-HYBRID-FP32-BS8-SMOKE-seed{s}" for s in (510, 511, 512)]
    await make_race(conn, "smoke-b", names, kind="smoke")
    await samples(conn, names[0], curve(3.3))
    await samples(conn, names[1], curve(3.3))
    board = await leaderboard.rank(conn, "gate-0", race="smoke-b")
    assert not board.verdict.passed
    assert board.rows[-1].canon_name == names[2] and board.rows[-1].final_bpb is None
    reasons = " ".join(board.verdict.reasons)
    assert "without a final BPB" in reasons and "share the same final BPB" in reasons


async def test_gate2_and_gate_final_quorum(conn: asyncpg.Connection) -> None:
    good = [f"IGLA-HYBRID-FP32-WSD-E{10 + s:04d}-seed{s}" for s in (43, 44, 45)]
    other = ["IGLA-NCA-FP32-GRADFIX-E0100-seed43", "IGLA-NCA-FP32-GRADFIX-E0101-seed44"]
    await make_race(conn, "hunt", good + other)
    for n, v in zip(good, (1.80, 1.84, 1.60), strict=True):
        await samples(conn, n, curve(v))
    for n in other:
        await samples(conn, n, curve(1.70))
    g2 = await leaderboard.rank(conn, "gate-2", race="hunt")
    assert g2.verdict.passed
    assert any("IGLA-HYBRID-FP32-WSD" in r and "3/3" in r for r in g2.verdict.reasons)
    gf = await leaderboard.rank(conn, "gate-final", race="hunt")
    assert not gf.verdict.passed and len(gf.rows) == 5
    # One seed above the threshold breaks the quorum.
    await conn.execute("UPDATE bpb_samples SET bpb = 1.86 WHERE canon_name = $1 AND step = 100",
                       good[1])
    assert not (await leaderboard.rank(conn, "gate-2", race="hunt")).verdict.passed


async def test_unknown_gate_or_race_is_a_user_error(conn: asyncpg.Connection) -> None:
    with pytest.raises(UserError, match="unknown gate"):
        await leaderboard.rank(conn, "gate-9")
    with pytest.raises(UserError, match="unknown race"):
        await leaderboard.rank(conn, "gate-0", race="nope")
    assert await leaderboard.latest_race(conn) is None


async def test_report_from_the_ledger_with_decisions_and_plots(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    names = [f"IGLA-HYBRID-FP32-h512-SMOKE-seed{s}" for s in (550, 551, 552)]
    await make_race(conn, "smoke-r", names, kind="smoke", horizon=200,
                    config={"rungs": [50, 200], "backend": "local", "corpus": "stdlib"})
    rng = np.random.default_rng(0)
    for i, n in enumerate(names):
        steps = np.arange(10, 201, 10)
        vals = 3.2 + 0.1 * i + 2.0 * steps ** -0.5 + rng.normal(0, 0.005, steps.size)
        await samples(conn, n, {int(s): round(float(v), 4) for s, v in zip(steps, vals,
                                                                           strict=True)})
    for n, action, rung, reason in (
        (names[0], "keep", 0, "keep: rung 0 (collect)"),
        (names[2], "prune", 0, "prune: rank 3/3 | worst"),
        (names[1], "mirror", 0, "mirror the rung-0 leader"),
    ):
        await conn.execute(
            "INSERT INTO gardener_decisions (race, rung, canon_name, action, reason, applied) "
            "VALUES ('smoke-r', $1, $2, $3, $4, true)", rung, n, action, reason)
    green = [crit.Criterion(k, crit.TITLES[k], True, f"ok {k}") for k in range(1, 14)]
    green[2] = crit.Criterion(3, crit.TITLES[3], False, "short | rows")
    await crit.record_verdict(conn, "smoke-r", green)

    out = tmp_path / "docs" / "R.md"
    assert await report.write_report(conn, "smoke-r", out) == out
    text = out.read_text()
    assert "## Acceptance criteria: 12/14 GREEN" in text  # 13 recorded + 14 re-checked
    assert "| 3 | bpb_samples has more than 40 rows for every seed | 🔴 RED | short \\| rows |" \
        in text
    assert "| 14 | the race ends with SMOKE_DONE | 🔴 RED |" in text
    assert "prune: rank 3/3 \\| worst" in text and "## Decisions (4)" in text
    assert "fit at 50: mean [95% PI]" in text
    for img in ("smoke_curves.png", "smoke_fits.png"):
        data = (out.parent / "img" / img).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"](img/{img})" in text
    with pytest.raises(UserError, match="unknown race"):
        await report.write_report(conn, "missing", out)


async def test_gates_need_the_horizon_and_no_open_tripwire(conn: asyncpg.Connection) -> None:
    """The issue's case: three seeds with one sample each at step 100 of an 81000-step race,
    one of them a 0.05 leak, passed gate-2; now none counts, and `GATE-FINAL` is a gate."""
    names = [f"IGLA-HYBRID-FP32-WSD-E00{40 + s}-seed{s}" for s in (43, 44, 45)]
    await make_race(conn, "g2", names, horizon=81000)
    for name, value in zip(names, (1.80, 1.81, 0.05), strict=True):
        await samples(conn, name, {100: value})
    await conn.execute(
        "INSERT INTO tripwire_events (kind, race, canon_name, dedupe_key) "
        "VALUES ('leak', 'g2', $1, 'leak:' || $1)", names[2])
    board = await leaderboard.rank(conn, "gate-2", race="g2")
    assert not board.verdict.passed
    assert "3 trial(s) do not count" in "; ".join(board.verdict.reasons)
    assert not any(r.counted for r in board.rows)
    final = await leaderboard.rank(conn, "GATE-FINAL", race="g2")
    assert final.gate == "gate-final" and not final.verdict.passed
    # At the horizon, the two clean seeds count and the one with an open tripwire does not.
    for name, value in zip(names, (1.80, 1.81, 1.79), strict=True):
        await samples(conn, name, {81000: value})
    board = await leaderboard.rank(conn, "Gate-2", race="g2")
    assert [r.counted for r in sorted(board.rows, key=lambda r: r.seed)] == [True, True, False]
    assert not board.verdict.passed and "1 open tripwire(s)" in "; ".join(board.verdict.reasons)
    await conn.execute("UPDATE tripwire_events SET acknowledged_at = now(), "
                       "acknowledged_by = 'alice'")
    assert (await leaderboard.rank(conn, "gate-2", race="g2")).verdict.passed
    with pytest.raises(UserError, match="unknown gate 'gate-9'"):
        await leaderboard.rank(conn, "gate-9", race="g2")


async def test_gate0_needs_every_trial_at_the_horizon(conn: asyncpg.Connection) -> None:
    names = [f"IGLA-HYBRID-FP32-EMA10-SMOKE-seed{s}" for s in (540, 541)]
    await make_race(conn, "smoke-h", names, kind="smoke", horizon=100)
    await samples(conn, names[0], curve(3.3))
    await samples(conn, names[1], {10: 3.9, 50: 3.5})
    board = await leaderboard.rank(conn, "gate-0", race="smoke-h")
    assert not board.verdict.passed
    assert "step 50, short of the horizon 100" in "; ".join(board.verdict.reasons)
