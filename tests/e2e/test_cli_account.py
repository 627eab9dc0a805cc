"""Every command takes --account; read commands filter by it, pause and resume record who;
EXP_IDs beyond E9999 pass `tri canon check` and sort by number in the tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import typer.main

from gardener.cli.app import app
from gardener.core import canon
from gardener.ledger import trials

CLI = [str(Path(sys.executable).parent / "gardener")]


def run(args: list[str], dsn: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GARDENER_", "DATABASE_"))}
    if dsn:
        env["DATABASE_URL"] = dsn
    env["GARDENER_LOG_FORMAT"] = "json"
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=60)


def leaves(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """Every command that runs (not a group), with its words."""
    subs = getattr(cmd, "commands", None)
    if subs:
        return [x for name, sub in subs.items() for x in leaves(sub, (*path, name))]
    return [(" ".join(path), cmd)]


def test_every_command_accepts_account() -> None:
    commands = leaves(typer.main.get_command(app))
    names = {name for name, _ in commands}
    readme = {"migrate", "status", "exp next", "exp claim", "canon check", "champion deploy",
              "kill", "pause", "resume", "tripwire list", "tripwire ack", "hunt status",
              "hunt prune", "hunt mirror", "railway batch-deploy", "services", "smoke-race",
              "leaderboard rank", "report", "backtest", "run"}
    assert readme <= names, readme - names
    without = [name for name, cmd in commands
               if not any("--account" in p.opts for p in cmd.params)]
    assert without == []


def test_canon_check_beyond_e9999() -> None:
    result = run(["canon", "check", "IGLA-HYBRID-FP32-WSD-E10000-seed1", "--json",
                  "--account", "acc1"])
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["ok"] and row["exp_id"] == 10000


async def test_read_commands_filter_and_pause_records_who(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    for acc, race, names in (
        ("acc1", "r1", ["IGLA-HYBRID-FP32-WSD-E9999-seed1", "IGLA-HYBRID-FP32-WSD-E10000-seed2"]),
        ("acc2", "r2", ["IGLA-HYBRID-FP32-WSD-E0007-seed3"]),
    ):
        await trials.ensure_race(conn, race, acc)
        await trials.admit(conn, race, acc, [trials.Admission(canon.parse(n), 256, 500)
                                             for n in names])
    mine = json.loads(run(["status", "--account", "acc2", "--json"], db_dsn).stdout)
    assert mine["counts"]["trials"] == 1 and mine["champion_slots"] == []
    everyone = json.loads(run(["status", "--json"], db_dsn).stdout)
    assert everyone["counts"]["trials"] == 3 and len(everyone["champion_slots"]) == 4
    hunt = json.loads(run(["hunt", "status", "--account", "acc1", "--json"], db_dsn).stdout)
    assert [r["canon_name"] for r in hunt] == ["IGLA-HYBRID-FP32-WSD-E9999-seed1",
                                               "IGLA-HYBRID-FP32-WSD-E10000-seed2"]
    board = json.loads(run(["leaderboard", "rank", "--race", "r1", "--account", "acc2",
                            "--json"], db_dsn).stdout)
    assert board["rows"] == []  # acc2 sees none of acc1's trials
    paused = run(["pause", "--reason", "deploy window", "--account", "acc2"], db_dsn)
    assert paused.returncode == 0, paused.stderr
    assert (await conn.fetchval("SELECT changed_by FROM gardener_control")).endswith("@acc2")
    resumed = run(["--account", "acc1", "resume"], db_dsn)
    assert resumed.returncode == 0, resumed.stderr
    assert (await conn.fetchval("SELECT changed_by FROM gardener_control")).endswith("@acc1")
    for args in (["migrate"], ["tripwire", "list"], ["exp", "next"], ["db", "url"]):
        result = run([*args, "--account", "acc3"], db_dsn)
        assert result.returncode == 0, (args, result.stderr)
    bad = run(["tripwire", "list", "--account", "acc9"], db_dsn)
    assert bad.returncode == 2 and "unknown account 'acc9'" in bad.stderr
