"""The CLI as a user meets it: one clear line for a user error, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import asyncpg
import pytest

from gardener.core import canon
from gardener.ledger import trials

CLI = [sys.executable, "-c", "from gardener.cli import main; main()"]


def run(args: list[str], dsn: str | None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GARDENER_", "DATABASE_"))}
    if dsn:
        environ["DATABASE_URL"] = dsn
    environ.update(env)
    return subprocess.run(CLI + args, capture_output=True, text=True, env=environ, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]


def test_bad_canon_name_is_one_line_naming_the_part() -> None:
    result = run(["canon", "check", "IGLA-HYBRID-FP33-WSD-E0005-seed200"], None)
    assert_one_line_error(result, "unknown format 'FP33'")


def test_missing_account_is_one_line(db_dsn: str) -> None:
    assert_one_line_error(run(["exp", "claim"], db_dsn), "no account")
    assert_one_line_error(run(["exp", "claim", "--account", "acc9"], db_dsn), "unknown account")


async def test_claims_and_slots_through_the_cli(db_dsn: str) -> None:
    first = run(["exp", "claim", "--account", "acc1", "--count", "2", "--json"], db_dsn)
    assert first.returncode == 0, first.stderr
    assert '"E0005"' in first.stdout and '"E0006"' in first.stdout
    nxt = run(["exp", "next", "--account", "acc1"], db_dsn)
    assert nxt.stdout.strip() == "E0007"
    assert_one_line_error(
        run(["exp", "claim", "--account", "acc1", "--exp-id", "4"], db_dsn), "ReusedChampionSlot"
    )
    assert_one_line_error(
        run(["champion", "deploy", "IGLA-TRAIN_V2-FP32-CHAMP-seed43", "--slot", "4",
             "--account", "acc1"], db_dsn),
        "ReusedChampionSlot: champion slot E0004 is locked",
    )


async def test_cross_account_kill_is_refused_and_changes_nothing(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    await trials.ensure_race(conn, "r2", "acc2")
    name = "IGLA-HYBRID-FP32-WSD-SMOKE-seed505"
    await trials.admit(conn, "r2", "acc2", [trials.Admission(canon.parse(name), 256, 500)])
    result = run(["kill", name, "--account", "acc1"], db_dsn)
    assert_one_line_error(result, "CrossAccountKillForbidden")
    row = await trials.get_trial(conn, name)
    assert row["desired_state"] == "running"
    ok = run(["kill", name, "--account", "acc2"], db_dsn)
    assert ok.returncode == 0 and "stop requested" in ok.stdout


def test_migrate_reports_where_and_is_idempotent(db_dsn: str) -> None:
    result = run(["migrate"], db_dsn)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout and "PostgreSQL at" in result.stdout
    assert "postgres@" not in result.stdout


@pytest.mark.slow
def test_embedded_database_when_no_url(embedded_home: object) -> None:
    data_dir = str(embedded_home)
    try:
        result = run(["migrate"], None, GARDENER_DATA_DIR=data_dir)
        assert result.returncode == 0, result.stderr
        assert "embedded PostgreSQL in" in result.stdout and "applied 0001_ledger" in result.stdout
        status = run(["status", "--json"], None, GARDENER_DATA_DIR=data_dir)
        assert '"next_exp_id": "E0005"' in status.stdout
    finally:
        run(["db", "stop"], None, GARDENER_DATA_DIR=data_dir)
