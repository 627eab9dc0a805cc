"""`tri railway batch-deploy` and `tri services` against the fake Railway, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.fake_railway import FakeRailway

CLI = [sys.executable, "-c", "from gardener.cli import main; main()"]
TOKEN = "acc1-token-never-printed"
NAMES = [
    "IGLA-HYBRID-FP32-WSD-E0005-seed200",
    "IGLA-HYBRID-FP32-WSD-E0006-seed201",
    "IGLA-JEPA-T-FP32-GRADFIX-E0011-seed220",
]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeRailway]:
    with FakeRailway(step_seconds=0.005, visibility_delay=0.02, timeout_sleep=0.4) as server:
        yield server


TEMPLATES = """
[defaults]
image = "ghcr.io/example/gardener:test"
start_command = "python -m gardener.trainer"
restart_policy = "ON_FAILURE"
"""


def cli(
    args: list[str], stdin: str, dsn: str, fake: FakeRailway, project: tuple[str, str]
) -> subprocess.CompletedProcess[str]:
    templates = Path(tempfile.mkdtemp()) / "railway.toml"
    templates.write_text(TEMPLATES)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GARDENER_", "DATABASE_"))}
    env.update(
        GARDENER_RAILWAY_CONFIG=str(templates),
        DATABASE_URL=dsn,
        GARDENER_RAILWAY_URL=fake.url,
        RAILWAY_TOKEN_ACC1=TOKEN,
        GARDENER_RAILWAY_PROJECT_ACC1=project[0],
        GARDENER_RAILWAY_ENVIRONMENT_ACC1=project[1],
        GARDENER_LOG_FORMAT="json",
    )
    return subprocess.run(
        CLI + args, input=stdin, capture_output=True, text=True, env=env, timeout=90
    )


async def test_one_bad_name_and_nothing_is_deployed(
    fake: FakeRailway, db_dsn: str, conn: asyncpg.Connection
) -> None:
    project = fake.add_project(TOKEN)
    batch = "\n".join(
        [*NAMES, "IGLA-HYBRID-FP33-WSD-E0012-seed9", "IGLA-TRAIN_V2-GF16-h128-E0013-seed300"]
    )
    result = cli(
        [
            "railway",
            "batch-deploy",
            "--account",
            "acc1",
            "--validate-canon",
            "--backend",
            "railway",
        ],
        batch,
        db_dsn,
        fake,
        project,
    )
    assert result.returncode == 2
    assert "2 of 5 names refused, nothing deployed" in result.stderr
    assert "unknown format 'FP33'" in result.stderr and "L-R9" in result.stderr
    assert await conn.fetchval("SELECT count(*) FROM igla_race_trials") == 0
    assert [s for s in fake.all_services() if s.project_id == project[0]] == []


async def test_batch_is_admitted_and_deployed_once(
    fake: FakeRailway, db_dsn: str, conn: asyncpg.Connection
) -> None:
    project = fake.add_project(TOKEN)
    args = [
        "railway",
        "batch-deploy",
        "--account",
        "acc1",
        "--validate-canon",
        "--config",
        "configs/phase2-runs.toml",
        "--json",
    ]
    first = cli(args, "\n".join(NAMES) + "\n# a comment\n\n", db_dsn, fake, project)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert sorted(out["admitted"]) == sorted(NAMES)
    assert out["deploy"]["errors"] == 0
    again = cli(args, "\n".join(NAMES), db_dsn, fake, project)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["admitted"] == []
    mine = [s for s in fake.all_services() if s.project_id == project[0]]
    assert sorted(s.variables["GARDENER_CANON_NAME"] for s in mine) == sorted(NAMES)
    assert all(len(s.name) <= 32 for s in mine)
    assert {s.source.get("image") for s in mine} == {"ghcr.io/example/gardener:test"}
    exp_ids = await conn.fetch("SELECT exp_id FROM igla_race_trials ORDER BY exp_id")
    assert [r["exp_id"] for r in exp_ids] == [5, 6, 11]
    assert TOKEN not in first.stdout + first.stderr + again.stdout + again.stderr

    listed = cli(["services", "--account", "acc1", "--json"], "", db_dsn, fake, project)
    assert listed.returncode == 0, listed.stderr
    rows = {r["canon_name"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == set(NAMES)
    assert {r["desired"] for r in rows.values()} == {"running"}
    assert all(r["observed"] != "absent" and r["service"] for r in rows.values())
