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

from gardener.ledger import expid
from gardener.race import smoke_gate
from tests.fake_railway import FakeRailway

CLI = [str(Path(sys.executable).parent / "gardener")]
PHASE2 = [
    line for line in (Path(__file__).parents[1] / "data" / "seed_names.txt").read_text()
    .splitlines() if "-E00" in line
]
SKIP = ["--skip-smoke-gate", "--reason", "the emulator's trainers are the smoke test here"]
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
    args: list[str],
    stdin: str,
    dsn: str,
    fake: FakeRailway,
    project: tuple[str, str],
    *,
    token: bool = True,
    extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    templates = Path(tempfile.mkdtemp()) / "railway.toml"
    templates.write_text(TEMPLATES)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GARDENER_", "DATABASE_", "RAILWAY_"))}
    env.update(
        GARDENER_RAILWAY_CONFIG=str(templates),
        DATABASE_URL=dsn,
        GARDENER_RAILWAY_URL=fake.url,
        GARDENER_RAILWAY_PROJECT_ACC1=project[0],
        GARDENER_RAILWAY_ENVIRONMENT_ACC1=project[1],
        GARDENER_LOG_FORMAT="json",
    )
    if token:
        env["RAILWAY_TOKEN_ACC1"] = TOKEN
    env.update(extra or {})
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
        *SKIP,
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


async def ledger_state(conn: asyncpg.Connection) -> dict[str, object]:
    """Every table's row count and content digest, and every sequence's position."""
    state: dict[str, object] = {}
    for t in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                              "ORDER BY tablename"):
        name = t["tablename"]
        state[name] = tuple(await conn.fetchrow(
            f'SELECT count(*), md5(coalesce(string_agg(x::text, E\'\\n\' ORDER BY x::text), \'\'))'
            f' FROM "{name}" x'))
    for q in await conn.fetch("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'"):
        name = q["sequencename"]
        state[name] = tuple(await conn.fetchrow(f'SELECT last_value, is_called FROM "{name}"'))
    return state


BATCH = ["railway", "batch-deploy", "--validate-canon", "--config", "configs/phase2-runs.toml"]


async def test_no_smoke_race_refuses_the_batch_and_changes_nothing(
    fake: FakeRailway, db_dsn: str, conn: asyncpg.Connection
) -> None:
    project = fake.add_project(TOKEN)
    before = await ledger_state(conn)
    result = cli([*BATCH, "--account", "acc1"], "\n".join(PHASE2), db_dsn, fake, project)
    assert result.returncode == 2
    assert "SmokeGateClosed: smoke before fire: acc1 never ran a smoke race" in result.stderr
    assert await ledger_state(conn) == before
    assert [s for s in fake.all_services() if s.project_id == project[0]] == []


async def test_no_token_refuses_all_21_and_takes_no_exp_id(
    fake: FakeRailway, db_dsn: str, conn: asyncpg.Connection
) -> None:
    """The issue's case: 21 names, no Railway token: once E0005..E0025 were taken and 21
    trials admitted before the error; now nothing is written and the error names the token."""
    project = fake.add_project(TOKEN)
    assert len(PHASE2) == 21
    before = await ledger_state(conn)
    result = cli([*BATCH, "--account", "acc1", *SKIP], "\n".join(PHASE2), db_dsn, fake, project,
                 token=False)
    assert result.returncode == 2
    assert "the railway backend for acc1 needs RAILWAY_TOKEN_ACC1" in result.stderr
    assert await ledger_state(conn) == before
    assert await expid.next_exp_id(conn) == 5


async def test_a_refused_batch_for_another_account_leaves_no_race(
    fake: FakeRailway, db_dsn: str, conn: asyncpg.Connection
) -> None:
    """acc1's names under acc2: the EXP_IDs are acc1's, nothing of acc2 is left (no empty race),
    and the error says the id is used, not that it is a champion slot."""
    project = fake.add_project(TOKEN)
    ok = cli([*BATCH, "--account", "acc1", "--no-deploy", *SKIP], "\n".join(PHASE2[:3]),
             db_dsn, fake, project)
    assert ok.returncode == 0, ok.stderr
    before = await ledger_state(conn)
    other = [n.replace("-seed20", "-seed90") for n in PHASE2[:3]]  # new seeds, used EXP_IDs
    refused = cli([*BATCH, "--account", "acc2", "--race", "p2-acc2", "--backend", "local",
                   "--no-deploy", *SKIP], "\n".join(other), db_dsn, fake, project)
    assert refused.returncode == 2
    assert "ExpIdReused: E0005 is already used by IGLA-HYBRID-FP32-WSD-E0005-seed200" \
        in refused.stderr
    assert "ReusedChampionSlot" not in refused.stderr
    assert await ledger_state(conn) == before
    assert await conn.fetchval("SELECT count(*) FROM races WHERE name = 'p2-acc2'") == 0


async def record_smoke_done(conn: asyncpg.Connection, account: str, conf: dict) -> None:
    """A finished smoke race as the smoke command records it (race config and verdict)."""
    name = f"gate0-{account}-{smoke_gate.fingerprint(conf)}"
    await conn.execute(
        "INSERT INTO races (name, account, kind, status, config, finished_at) "
        "VALUES ($1, $2, 'smoke', 'done', $3, now())", name, account,
        {"trainer": conf, "trainer_fingerprint": smoke_gate.fingerprint(conf)})
    await conn.execute(
        "INSERT INTO gardener_decisions (race, rung, canon_name, action, numbers, reason, "
        "applied, applied_at, decided_by) VALUES ($1, -1, $1, 'verdict', $2, 'SMOKE_DONE', "
        "true, now(), 'smoke-race')", name, {"smoke_done": True})


async def test_a_smoke_race_on_the_same_trainer_opens_the_gate(
    fake: FakeRailway, db_dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    project = fake.add_project(TOKEN)
    templates = tmp_path / "railway.toml"
    templates.write_text(TEMPLATES)
    # A local smoke race proves the local trainer, not the Railway one.
    await record_smoke_done(conn, "acc1", smoke_gate.trainer_configuration("local"))
    closed = cli([*BATCH, "--account", "acc1", "--no-deploy"], NAMES[0], db_dsn, fake, project)
    assert "ran another trainer configuration" in closed.stderr
    await record_smoke_done(conn, "acc1",
                            smoke_gate.trainer_configuration("railway", templates))
    # ... and acc1's smoke race opens nothing for acc2.
    await record_smoke_done(conn, "acc2", {"backend": "railway", "trainer": {}})
    opened = cli([*BATCH, "--account", "acc1", "--no-deploy", "--json"], NAMES[0], db_dsn, fake,
                 project)
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["smoke_gate"].startswith("gate0-acc1-")


async def test_skipping_the_smoke_gate_needs_a_reason_and_is_audited(
    fake: FakeRailway, db_dsn: str, conn: asyncpg.Connection
) -> None:
    project = fake.add_project(TOKEN)
    bare = cli([*BATCH, "--account", "acc1", "--skip-smoke-gate"], NAMES[0], db_dsn, fake,
               project)
    assert bare.returncode == 2 and "--skip-smoke-gate needs --reason" in bare.stderr
    ok = cli([*BATCH, "--account", "acc1", "--no-deploy", "--skip-smoke-gate", "--reason",
              "smoke ran on the staging ledger"], NAMES[0], db_dsn, fake, project)
    assert ok.returncode == 0, ok.stderr
    row = await conn.fetchrow("SELECT reason, numbers, decided_by FROM gardener_decisions "
                              "WHERE action LIKE 'skip-smoke-gate:%'")
    assert "smoke ran on the staging ledger" in row["reason"]
    assert row["numbers"]["admitted"] == [NAMES[0]]
    assert row["decided_by"].endswith("@acc1")


async def test_champion_deploy_deploys_the_trials_service(
    fake: FakeRailway, db_dsn: str, conn: asyncpg.Connection
) -> None:
    """`tri champion deploy` binds the slot and deploys the service through the backend."""
    project = fake.add_project(TOKEN)
    champ = "IGLA-TRAIN_V2-FP32-CHAMP-seed43"
    admitted = cli([*BATCH, "--account", "acc1", "--no-deploy", *SKIP], champ, db_dsn, fake,
                   project)
    assert admitted.returncode == 0, admitted.stderr
    assert [s for s in fake.all_services() if s.project_id == project[0]] == []
    deployed = cli(["champion", "deploy", champ, "--slot", "1", "--account", "acc1"], "",
                   db_dsn, fake, project)
    assert deployed.returncode == 0, deployed.stderr
    assert "E0001 now holds IGLA-TRAIN_V2-FP32-CHAMP-seed43" in deployed.stdout
    (svc,) = [s for s in fake.all_services() if s.project_id == project[0]]
    assert svc.variables["GARDENER_CANON_NAME"] == champ
    slot = await conn.fetchrow("SELECT canon_name, seed, account FROM champion_slots "
                               "WHERE exp_id = 1")
    assert tuple(slot) == (champ, 43, "acc1")
    stolen = cli(["champion", "deploy", champ, "--slot", "4", "--force-replace", "--account",
                  "acc2"], "", db_dsn, fake, project)
    assert stolen.returncode == 2
    assert "CrossAccountKillForbidden: champion slot E0004 belongs to acc1" in stolen.stderr


async def test_a_batch_over_the_request_budget_or_without_a_template_changes_nothing(
    fake: FakeRailway, db_dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    project = fake.add_project(TOKEN)
    before = await ledger_state(conn)
    over = cli([*BATCH, "--account", "acc1", *SKIP], "\n".join(PHASE2), db_dsn, fake, project,
               extra={"GARDENER_RAILWAY_BUDGET_PER_HOUR": "50"})
    assert over.returncode == 2
    assert "21 services need about 64 Railway requests, more than acc1's budget of 50" \
        in over.stderr
    http_only = tmp_path / "http.toml"
    http_only.write_text('[defaults]\nimage = "x"\ningest = "http"\n')
    no_url = cli([*BATCH, "--account", "acc1", *SKIP], NAMES[0], db_dsn, fake, project,
                 extra={"GARDENER_RAILWAY_CONFIG": str(http_only)})
    assert no_url.returncode == 2 and "ingest = 'http' needs the gardener's URL" in no_url.stderr
    assert await ledger_state(conn) == before
