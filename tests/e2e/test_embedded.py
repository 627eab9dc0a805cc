"""The embedded PostgreSQL as a new user meets it: nothing set, and nothing left running.

Every command that starts the embedded server holds a handle on it; the server stops when the
last process holding one exits. `gardener db start` keeps one running on purpose until
`gardener db stop`. A handle of a process that died without exiting (SIGKILL) does not keep
the server up forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from gardener.race import criteria as crit

CLI = [sys.executable, "-c", "from gardener.cli import main; main()"]


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GARDENER_", "DATABASE_"))}
    return env | {"GARDENER_DATA_DIR": str(data_dir), "GARDENER_LOG_FORMAT": "json"}


def _cli(args: list[str], data_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + args, capture_output=True, text=True, env=_env(data_dir),
                          cwd=data_dir.parent, timeout=timeout)


def _servers(pgdata: Path) -> list[int]:
    """PostgreSQL processes serving this data directory."""
    found = []
    for proc in psutil.process_iter(attrs=["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and any(str(pgdata) in part for part in cmdline):
            found.append(proc.pid)
    return found


@pytest.mark.slow
def test_a_command_leaves_no_server_running_and_db_start_keeps_one(embedded_home: Path) -> None:
    data = embedded_home / ".gardener"
    pgdata = data.resolve() / "pgdata"

    status = _cli(["status", "--json"], data)
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout)["paused"] is False
    assert _servers(pgdata) == []  # it stopped when the command exited

    # A handle of a process that is gone (a SIGKILLed daemon) is forgotten, not obeyed.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (pgdata / ".handle_pids.json").write_text(json.dumps([dead.pid]))
    assert _cli(["status"], data).returncode == 0
    assert _servers(pgdata) == []

    started = _cli(["db", "start"], data)
    assert started.returncode == 0, started.stderr[-2000:]
    assert "until `gardener db stop`" in started.stdout
    try:
        assert _servers(pgdata), "db start must leave the server running"
        assert _cli(["status"], data).returncode == 0
        assert _servers(pgdata), "a command must not stop a server started on purpose"
    finally:
        stopped = _cli(["db", "stop"], data)
    assert stopped.returncode == 0 and stopped.stdout.startswith("stopped embedded PostgreSQL")
    assert _servers(pgdata) == []
    again = _cli(["db", "stop"], data)
    assert again.returncode == 0 and again.stdout.startswith("none running")


@pytest.mark.slow
def test_the_smoke_race_on_the_embedded_server_leaves_nothing_running(
    embedded_home: Path,
) -> None:
    """The README's first command, reduced: no database variable at all."""
    data = embedded_home / ".gardener"
    args = ["smoke-race", "--tags", "WSD,h768", "--seeds-per-tag", "2", "--max-steps", "60",
            "--wallclock", "90s", "--account", "acc1", "--auto-teardown", "--json",
            "--report", str(embedded_home / "SMOKE.md")]
    res = _cli(args, data, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["smoke_done"] is True
    assert [c["status"] for c in out["criteria"]] == ["GREEN"] * 14
    assert res.stderr.splitlines()[0].startswith("ledger: starting embedded PostgreSQL in ")
    assert _servers(data.resolve() / "pgdata") == []
    assert crit.live_processes([], "gate0-smoke") == []
