"""The plan's smoke command with ``--backend railway`` against the Railway emulator.

The fake Railway server runs each deployment's start command as a real local process with
the service's variables (the trainer, as the repository's Dockerfile would), and stops it on
``deploymentStop``. The gardener creates the services, sets their variables, deploys them;
the trainers POST their samples to the race's own ``/v1/samples`` (the address from
``RAILWAY_PRIVATE_DOMAIN`` and ``PORT``, the account's ingest token); the worker loop decides,
stops, tears down, and all 14 criteria are GREEN. The shipped ``configs/railway.toml`` is used
as it is: the trainer is built from the gardener's repository (Railway's git variables).
Afterwards the smoke gate is open for a Phase-2 batch of the same account and trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.fake_railway import FakeRailway

ROOT = Path(__file__).parents[2]
CLI = [str(Path(sys.executable).parent / "gardener")]
TOKEN = "acc1-railway-token"
INGEST = "acc1-ingest-token"
PLAN = ["smoke-race", "--config", "configs/gate0-smoke.toml",
        "--tags", "WSD,BS8,GRADFIX-JEPAT,GRADFIX-NCA,EMA10,h512,h768", "--seeds-per-tag", "3",
        "--max-steps", "500", "--wallclock", "30m", "--account", "acc1", "--auto-teardown",
        "--report", "docs/SMOKE_GATE_0_REPORT.md"]


@pytest.fixture
def emulator() -> Iterator[FakeRailway]:
    with FakeRailway(step_seconds=0.05, visibility_delay=0.02, run_processes=True,
                     workdir=ROOT) as fake:
        yield fake


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(args: list[str], cwd: Path, env: dict, stdin: str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def environment(dsn: str, fake: FakeRailway, project: tuple[str, str], data: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GARDENER_", "DATABASE_", "RAILWAY_"))}
    env.update(
        DATABASE_URL=dsn, GARDENER_DATA_DIR=str(data), GARDENER_LOG_FORMAT="json",
        GARDENER_RAILWAY_URL=fake.url, RAILWAY_TOKEN_ACC1=TOKEN,
        GARDENER_RAILWAY_PROJECT_ACC1=project[0], GARDENER_RAILWAY_ENVIRONMENT_ACC1=project[1],
        GARDENER_INGEST_TOKEN_ACC1=INGEST,
        # What Railway sets for a gardener deployed from GitHub, with private networking.
        RAILWAY_PRIVATE_DOMAIN="127.0.0.1", PORT=str(free_port()),
        RAILWAY_GIT_REPO_OWNER="example", RAILWAY_GIT_REPO_NAME="gardener",
        RAILWAY_GIT_BRANCH="main",
    )
    return env


@pytest.mark.slow
async def test_the_plans_smoke_command_on_railway_is_green(
    emulator: FakeRailway, db_dsn: str, tmp_path: Path
) -> None:
    project = emulator.add_project(TOKEN)
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "gate0-smoke.toml", tmp_path / "configs")
    env = environment(db_dsn, emulator, project, tmp_path / "data")
    result = cli([*PLAN, "--backend", "railway", "--json"], tmp_path, env, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = json.loads(result.stdout)
    assert [c["status"] for c in out["criteria"]] == ["GREEN"] * 14, out["criteria"]
    assert out["smoke_done"] and len(out["trials"]) == 21
    assert (tmp_path / "docs" / "SMOKE_GATE_0_REPORT.md").is_file()

    services = [s for s in emulator.all_services() if s.project_id == project[0]]
    assert sorted(s.variables["GARDENER_CANON_NAME"] for s in services) == sorted(out["trials"])
    assert {s.source.get("repo") for s in services} == {"example/gardener"}
    assert {s.settings.get("startCommand") for s in services} == {"python -m gardener.trainer"}
    assert all(s.variables["GARDENER_INGEST_URL"] == f"http://127.0.0.1:{env['PORT']}"
               "/v1/samples" for s in services)
    assert all(s.deployments and s.deployments[-1].process is not None for s in services)
    assert emulator.processes() == []  # every trainer exited or was stopped
    ops = Counter(op for op, _ in emulator.calls)
    assert ops["ServiceCreate"] == 21
    # Samples came over HTTP; the log was read at most about once per service, at its end.
    assert ops["DeploymentLogs"] <= 3 * 21, ops
    assert INGEST not in result.stdout + result.stderr and TOKEN not in result.stderr

    conn = await asyncpg.connect(db_dsn)
    try:
        by_source = dict(await conn.fetch(
            "SELECT source, count(*) FROM bpb_samples GROUP BY source"))
        assert by_source.get("http", 0) >= 21 * 40, by_source
        per_trial = await conn.fetchval(
            "SELECT min(n) FROM (SELECT count(*) AS n FROM bpb_samples WHERE source = 'http' "
            "GROUP BY canon_name) x")
        assert per_trial > 40
    finally:
        await conn.close()

    # Smoke before fire: the same account and trainer may now deploy a Phase-2 batch.
    names = "IGLA-HYBRID-FP32-WSD-E0105-seed200\nIGLA-HYBRID-FP32-BS8-E0106-seed210"
    batch = cli(["railway", "batch-deploy", "--account", "acc1", "--validate-canon", "--config",
                 str(ROOT / "configs" / "phase2-runs.toml"), "--no-deploy", "--json"],
                tmp_path, env, stdin=names)
    assert batch.returncode == 0, batch.stderr
    assert json.loads(batch.stdout)["smoke_gate"] == out["race"]
