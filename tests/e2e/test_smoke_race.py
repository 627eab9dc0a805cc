"""A reduced smoke race for real: the CLI, the worker loop, trainer subprocesses, PostgreSQL.

2 tags x 2 seeds of 60 steps, twice in a row on one database: both runs end with SMOKE_DONE,
the second takes the next seeds of each block, nothing is left running, and a run that
needs more seeds than a block has left is refused before anything starts. Ctrl-C in the middle
of a race stops every trainer and marks the race.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from gardener.backends import local
from gardener.backends.base import ACTIVE
from gardener.ledger import trials
from gardener.race import criteria as crit
from gardener.race import smoke

CLI = [sys.executable, "-c", "from gardener.cli import main; main()"]


def run(args: list[str], dsn: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GARDENER_", "DATABASE_"))}
    env |= {"DATABASE_URL": dsn, "GARDENER_DATA_DIR": str(data_dir),
            "GARDENER_LOG_FORMAT": "json"}
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=110)


@pytest.mark.slow
async def test_reduced_smoke_race_twice_in_a_row(db_dsn: str, tmp_path: Path) -> None:
    args = ["smoke-race", "--tags", "WSD,h768", "--seeds-per-tag", "2", "--max-steps", "60",
            "--wallclock", "90s", "--account", "acc1", "--auto-teardown", "--json"]
    seeds: list[list[int]] = []
    for i in range(2):
        report = tmp_path / f"r{i}" / "SMOKE.md"
        res = run([*args, "--report", str(report)], db_dsn, tmp_path / "data")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        out = json.loads(res.stdout)
        assert out["smoke_done"] is True
        assert [c["status"] for c in out["criteria"]] == ["GREEN"] * 14
        seeds.append(out["seeds"])
        text = report.read_text()
        assert "14/14 GREEN" in text and crit.SMOKE_DONE in text
        # What was decided at each rung, and why nothing was killed or mirrored.
        assert "### Rung 1 — step 60 (verdict)" in text and "- 4 decisions: 4 verdict" in text
        assert "no trial is killed as DIVERGING" in text and "no leader is mirrored" in text
        assert (report.parent / "img" / "smoke_curves.png").stat().st_size > 10_000
        assert (report.parent / "img" / "smoke_fits.png").stat().st_size > 10_000
        assert '"event": "smoke_finished"' in res.stderr  # JSON logs off a terminal
    assert seeds == [[500, 501, 560, 561], [502, 503, 562, 563]]
    assert crit.live_processes([], "gate0-smoke") == []

    conn = await asyncpg.connect(db_dsn)
    try:
        rows = await conn.fetch("SELECT name, status FROM races ORDER BY created_at")
        assert [r["status"] for r in rows] == ["done", "done"]
        assert await conn.fetchval("SELECT count(*) FROM igla_race_trials") == 8
        states = {r["observed_state"] for r in await conn.fetch(
            "SELECT DISTINCT observed_state FROM igla_race_trials")}
        assert not states & ACTIVE, states  # the loop wrote back the teardown
        dup = await conn.fetchval("SELECT count(*) - count(DISTINCT exp_id) FROM exp_ids")
        assert dup == 0 and await conn.fetchval("SELECT count(*) FROM exp_ids") == 4 + 2 * 24
        # The probes left no trace: champion slots as migrated, no acc2 trial.
        assert await conn.fetchval(
            "SELECT count(*) FROM champion_slots WHERE canon_name IS NOT NULL") == 1
        assert await conn.fetchval(
            "SELECT count(*) FROM igla_race_trials WHERE account <> 'acc1'") == 0
    finally:
        await conn.close()

    board = run(["leaderboard", "rank", "--gate", "gate-0", "--race", rows[1]["name"], "--json"],
                db_dsn, tmp_path / "data")
    assert board.returncode == 0, board.stderr
    ranked = json.loads(board.stdout)
    assert ranked["passed"] and len(ranked["rows"]) == 4
    finals = [r["final_bpb"] for r in ranked["rows"]]
    assert finals == sorted(finals) and len(set(finals)) == 4

    spent = run([*args[:3], "--seeds-per-tag", "7", *args[5:]], db_dsn, tmp_path / "data")
    assert spent.returncode == 2
    assert "SeedsExhausted" in spent.stderr and "has 6 unused seed(s)" in spent.stderr
    assert "--seeds-per-tag 6 takes what is left" in spent.stderr


@pytest.mark.slow
async def test_sigint_tears_the_race_down(db_dsn: str, tmp_path: Path) -> None:
    """Ctrl-C mid-race: every trainer's process group is gone, the race is marked torn_down
    with the signal as its reason, the command says so in one line and exits 130."""
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GARDENER_", "DATABASE_"))}
    env |= {"DATABASE_URL": db_dsn, "GARDENER_DATA_DIR": str(data), "GARDENER_LOG_FORMAT": "json"}
    args = ["smoke-race", "--tags", "WSD,h768", "--seeds-per-tag", "2", "--max-steps", "5000",
            "--wallclock", "90s"]
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with out_path.open("wb") as out_f, err_path.open("wb") as err_f:
        # Run outside a checkout: the default report goes to the data directory.
        proc = await asyncio.create_subprocess_exec(*CLI, *args, stdout=out_f, stderr=err_f,
                                                    env=env, cwd=tmp_path)
    conn = await asyncpg.connect(db_dsn)
    try:
        samples = 0
        for _ in range(300):  # the first samples of the race's trainers, at most 60 s
            samples = await conn.fetchval(
                "SELECT count(*) FROM bpb_samples b JOIN igla_race_trials t USING (canon_name)")
            if samples or proc.returncode is not None:
                break
            await asyncio.sleep(0.2)
        assert samples, "no sample arrived"
        records = [json.loads(p.read_text()) for p in (data / "local").glob("*.json")]
        assert len(records) == 4 and all(r["pgid"] for r in records)
        assert all(local._group_alive(r["pgid"]) for r in records)  # really running
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), timeout=60)
        out, err = out_path.read_text(), err_path.read_text()
        assert proc.returncode == 130, out[-2000:] + err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(
            "interrupted (SIGINT) during running: 4 running trainer(s) stopped, none left running")
        assert "marked torn_down in the ledger" in last
        first = err.splitlines()[0]
        report = data.resolve() / "reports" / "SMOKE_GATE_0_REPORT.md"
        # The ledger line names this test's own database (whatever host or socket serves it).
        assert first.startswith("ledger: PostgreSQL at ")
        assert f"{urlsplit(db_dsn).path}; trainers:" in first, first
        assert f"report: {report}" in first
        assert not report.exists() and not (tmp_path / "docs").exists()  # cut before the report
        # Nothing of the race is left: no process in any trainer's group, none naming a trial.
        assert [r["pgid"] for r in records if local._group_alive(r["pgid"])] == []
        names = [r["canon_name"] for r in records]
        race = await conn.fetchval("SELECT name FROM races")
        assert crit.live_processes(names, race) == []
        assert await conn.fetchval("SELECT status FROM races") == "torn_down"
        reason = await conn.fetchval(
            "SELECT reason FROM gardener_decisions WHERE action = 'verdict' AND canon_name = $1",
            race)
        assert reason.startswith("SMOKE INTERRUPTED by SIGINT during running")
        states = await conn.fetch("SELECT desired_state, observed_state FROM igla_race_trials")
        assert {(r["desired_state"], r["observed_state"]) for r in states} == {
            ("stopped", "stopped")}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await conn.close()


async def test_report_falls_back_when_its_path_cannot_be_written(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """A report path that cannot be written sends the report to the fallback directory; with
    no writable place at all the run still ends, with a note saying how to get the report."""
    await trials.ensure_race(conn, "r-fallback", "acc1", kind="smoke", horizon=60)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    written, note = await smoke._write_report(conn, "r-fallback", blocked / "R.md",
                                              tmp_path / "fallback")
    assert written == tmp_path / "fallback" / "R.md" and written.is_file()
    assert note is not None and note.startswith(f"{blocked / 'R.md'} could not be written")
    assert "# Gate-0 smoke race report: `r-fallback`" in written.read_text()
    written, note = await smoke._write_report(conn, "r-fallback", blocked / "R.md",
                                              blocked / "fb")
    assert written is None and note is not None
    assert "gardener report --race r-fallback --out PATH" in note
