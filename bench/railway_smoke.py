"""Benchmark: the plan's smoke command with ``--backend railway`` against the Railway emulator.

Runs the CLI exactly as the plan writes it (plus ``--backend railway``) against the fake
Railway server in emulator mode (each deployment a real local trainer process), once with the
shipped templates (trainers POST their samples to ``/v1/samples``) and once with
``ingest = "logs"`` (the gardener tails ``deploymentLogs``). Per run: wall time, the criteria,
the Railway requests by operation, the samples by source, and how late the first step-10
sample was. Each run gets a fresh database on ``--server``. Prints one JSON document.

    .venv/bin/python bench/railway_smoke.py --server postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fake_railway import FakeRailway  # noqa: E402

PLAN = ["smoke-race", "--config", "configs/gate0-smoke.toml",
        "--tags", "WSD,BS8,GRADFIX-JEPAT,GRADFIX-NCA,EMA10,h512,h768", "--seeds-per-tag", "3",
        "--max-steps", "500", "--wallclock", "30m", "--account", "acc1", "--auto-teardown",
        "--report", "docs/SMOKE_GATE_0_REPORT.md", "--backend", "railway", "--json"]
LOGS_ONLY = """
[defaults]
repo = "${RAILWAY_GIT_REPO_OWNER}/${RAILWAY_GIT_REPO_NAME}"
branch = "${RAILWAY_GIT_BRANCH}"
start_command = "python -m gardener.trainer"
ingest = "logs"

[defaults.variables]
PYTHONUNBUFFERED = "1"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _database(server: str, drop: str | None = None) -> str:
    admin = await asyncpg.connect(server)
    try:
        if drop:
            await admin.execute(f'DROP DATABASE IF EXISTS "{drop}" WITH (FORCE)')
            return ""
        name = f"gardener_railway_bench_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    p = urlsplit(server)
    return urlunsplit((p.scheme, p.netloc, "/" + name, p.query, p.fragment))


async def _ledger_figures(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        sources = {r["source"]: int(r["n"]) for r in await conn.fetch(
            "SELECT source, count(*) AS n FROM bpb_samples GROUP BY source")}
        return {"samples_by_source": sources}
    finally:
        await conn.close()


def run(server: str, ingest: str) -> dict[str, Any]:
    dsn = anyio.run(_database, server)
    work = Path(tempfile.mkdtemp(prefix="gardener-railway-bench-"))
    (work / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "gate0-smoke.toml", work / "configs")
    try:
        with FakeRailway(step_seconds=0.05, visibility_delay=0.02, run_processes=True,
                         workdir=ROOT) as fake:
            project = fake.add_project("bench-token")
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("GARDENER_", "DATABASE_", "RAILWAY_"))}
            env.update(
                DATABASE_URL=dsn, GARDENER_DATA_DIR=str(work / "data"),
                GARDENER_LOG_FORMAT="json", GARDENER_RAILWAY_URL=fake.url,
                RAILWAY_TOKEN_ACC1="bench-token", GARDENER_RAILWAY_PROJECT_ACC1=project[0],
                GARDENER_RAILWAY_ENVIRONMENT_ACC1=project[1],
                GARDENER_INGEST_TOKEN_ACC1="bench-ingest", RAILWAY_PRIVATE_DOMAIN="127.0.0.1",
                PORT=str(_free_port()), RAILWAY_GIT_REPO_OWNER="example",
                RAILWAY_GIT_REPO_NAME="gardener", RAILWAY_GIT_BRANCH="main",
            )
            if ingest == "logs":
                (work / "logs.toml").write_text(LOGS_ONLY)
                env["GARDENER_RAILWAY_CONFIG"] = str(work / "logs.toml")
            started = time.perf_counter()
            result = subprocess.run(
                [str(Path(sys.executable).parent / "gardener"), *PLAN], cwd=work, env=env,
                capture_output=True, text=True, timeout=3600)
            wall = time.perf_counter() - started
            ops = Counter(op for op, _ in fake.calls)
            left = len(fake.processes())
        out = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
        criteria = out.get("criteria", [])
        first = next((c for c in criteria if c["number"] == 1), {})
        return {
            "ingest": ingest,
            "exit_code": result.returncode,
            "wall_s": round(wall, 1),
            "smoke_done": out.get("smoke_done"),
            "criteria": [c["status"] for c in criteria],
            "slowest_step10_s": (first.get("details") or {}).get("max_latency_s"),
            "timings": out.get("timings"),
            "railway_requests": sum(ops.values()),
            "railway_requests_by_operation": dict(sorted(ops.items())),
            "processes_left": left,
            **anyio.run(_ledger_figures, dsn),
        }
    finally:
        anyio.run(_database, server, dsn.rsplit("/", 1)[1])
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="PostgreSQL DSN that may CREATE DATABASE")
    parser.add_argument("--ingest", default="auto,logs", help="comma-separated: auto, logs")
    args = parser.parse_args()
    runs = [run(args.server, mode) for mode in args.ingest.split(",")]
    print(json.dumps({"benchmark": "railway_smoke", "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
