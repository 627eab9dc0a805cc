"""``gardener run`` as a process, against a real PostgreSQL and a real HTTP port.

SIGTERM exits 0 within 10 s; a second instance stands by and takes over when the leader is
SIGKILLed; a pause takes effect within a second; real trainers (the local backend) produce
samples that become decisions, and the race ends and is torn down; and a daemon SIGKILLed
again and again while it applies a race with many rung crossings leaves a ledger with no
duplicate and no lost decision.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from gardener.core import canon
from gardener.core.decide import decide
from gardener.ledger import trials
from gardener.ledger.snapshot import base_config, load_snapshot, race_config, race_info
from gardener.settings import Settings
from tests.integration.test_apply import add_samples, curve, make_race

ROOT = Path(__file__).resolve().parents[2]
# The CLI installed beside the interpreter running the tests, whatever its environment.
GARDENER = str(Path(sys.executable).parent / "gardener")


class Daemon:
    """One daemon process: its JSON log file, its HTTP port, signals."""

    def __init__(self, dsn: str, tmp: Path, name: str, argv: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = tmp / f"{name}.log"
        self.argv = argv or [GARDENER, "run", "--account", "acc1"]
        self.env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "PORT": "0",
            "GARDENER_HOST": "127.0.0.1",
            "GARDENER_DATA_DIR": str(tmp / "data"),
            "GARDENER_LOG_FORMAT": "json",
            "GARDENER_POLL_INTERVAL": "0.5",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self._out = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._out, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=ROOT)
        return self

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    async def wait_event(self, name: str, within: float = 30.0, after: int = 0) -> dict[str, Any]:
        end = time.monotonic() + within
        while time.monotonic() < end:
            found = [e for e in self.events()[after:] if e.get("event") == name]
            if found:
                return found[0]
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: "
                                     f"{self.log_path.read_text()[-3000:]}")
            await anyio.sleep(0.05)
        raise AssertionError(f"no {name} event in {within}s: {self.log_path.read_text()[-3000:]}")

    async def port(self) -> int:
        return int((await self.wait_event("http_listening"))["port"])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def daemons() -> Any:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.ensure_dead()


async def readyz(port: int) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    return dict(r.json())


async def wait_role(port: int, role: str, within: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        try:
            if (await readyz(port)).get("role") == role:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        await anyio.sleep(0.05)
    raise AssertionError(f"not {role} within {within}s")


@pytest.mark.slow
async def test_sigterm_exits_zero_within_ten_seconds_and_http_answers(
    db_dsn: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    d = Daemon(db_dsn, tmp_path, "a").start()
    daemons.append(d)
    port = await d.port()
    await wait_role(port, "leader", 20)
    async with httpx.AsyncClient() as client:
        health = await client.get(f"http://127.0.0.1:{port}/healthz")
        ready = await client.get(f"http://127.0.0.1:{port}/readyz")
        metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    assert health.status_code == 200 and health.json()["status"] == "alive"
    body = ready.json()
    assert ready.status_code == 200 and body["ready"] and body["pending_migrations"] == []
    assert "gardener_leader 1.0" in metrics and "gardener_paused 0.0" in metrics
    assert "gardener_tick_seconds_count" in metrics
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0
    assert time.monotonic() - started < 10
    names = [e["event"] for e in d.events()]
    assert "shutdown_requested" in names and names[-1] == "stopped"


@pytest.mark.slow
async def test_a_second_instance_stands_by_and_takes_over_when_the_leader_is_killed(
    db_dsn: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    a = Daemon(db_dsn, tmp_path, "a").start()
    daemons.append(a)
    port_a = await a.port()
    await wait_role(port_a, "leader", 20)
    b = Daemon(db_dsn, tmp_path, "b").start()
    daemons.append(b)
    port_b = await b.port()
    await wait_role(port_b, "standby", 20)
    await b.wait_event("standby")
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://127.0.0.1:{port_b}/metrics")).text
    assert "gardener_leader 0.0" in metrics
    assert (await readyz(port_b))["ready"]  # a standby is ready: it serves ingest
    a.signal(signal.SIGKILL)
    a.wait(10)
    took = await wait_role(port_b, "leader", 15)
    assert took < 5.0, took
    event = await b.wait_event("leader_acquired")
    assert event["after_standby"] is True
    b.signal(signal.SIGTERM)
    assert b.wait(10) == 0


@pytest.mark.slow
async def test_pause_takes_effect_within_a_second(
    db_dsn: str, tmp_path: Path, daemons: list[Daemon], conn: asyncpg.Connection
) -> None:
    d = Daemon(db_dsn, tmp_path, "a").start()
    daemons.append(d)
    port = await d.port()
    await wait_role(port, "leader", 20)
    for paused in (True, False):
        await conn.execute("UPDATE gardener_control SET paused = $1, reason = 'by hand'", paused)
        started = time.monotonic()
        while (await readyz(port))["paused"] is not paused:
            assert time.monotonic() - started < 1.0, "pause flag not seen within a second"
            await anyio.sleep(0.02)
    events = [e["event"] for e in d.events()]
    assert "paused" in events and "resumed" in events
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0


@pytest.mark.slow
async def test_real_trainers_samples_become_decisions_and_the_race_ends(
    db_dsn: str, tmp_path: Path, daemons: list[Daemon], conn: asyncpg.Connection
) -> None:
    rungs = [40, 80, 120]
    await trials.ensure_race(conn, "e2e", "acc1", horizon=120,
                             config={"rungs": rungs, "auto_teardown": True})
    names = await trials.admit(conn, "e2e", "acc1", [
        trials.Admission(canon.CanonName("HYBRID", "FP32", ("WSD",), 70 + i, 60 + i), steps=120)
        for i in range(4)
    ])
    d = Daemon(db_dsn, tmp_path, "a", env={"GARDENER_INGEST_TOKEN_ACC1": "t0ken"}).start()
    daemons.append(d)
    port = await d.port()
    # Samples posted over HTTP land too (step 5: the trainer evaluates every 10 steps).
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"http://127.0.0.1:{port}/v1/samples",
            json={"canon_name": names[0], "lines": ["step=5 BPB=5.1234"]},
            headers={"Authorization": "Bearer t0ken"},
        )
    assert r.status_code == 200, r.text
    await d.wait_event("race_done", within=90)
    race = await conn.fetchrow("SELECT status FROM races WHERE name = 'e2e'")
    assert race["status"] == "done"
    assert await conn.fetchval(
        "SELECT bpb FROM bpb_samples WHERE canon_name = $1 AND step = 5", names[0]
    ) == 5.1234
    per_trial = await conn.fetch(
        "SELECT canon_name, count(*) AS n, max(step) AS last FROM bpb_samples GROUP BY canon_name"
    )
    assert {r["canon_name"] for r in per_trial} >= set(names)
    rows = await conn.fetch("SELECT canon_name, rung, action FROM gardener_decisions WHERE applied")
    # Each trial was decided at the highest rung its samples had reached when the tick ran.
    decided = {r["canon_name"]: r for r in rows}
    assert set(names) <= set(decided)
    assert {r["rung"] for r in await conn.fetch(
        "SELECT rung FROM igla_race_trials")} <= {1, 2} and any(
        r["action"] == "verdict" for r in rows)
    decision_events = [e for e in d.events() if e.get("event") == "decision"]
    assert decision_events and all(
        {"race", "canon_name", "rung", "account"} <= set(e) for e in decision_events
    )
    # Torn down: every trial desired removed, and the reconciler removes the processes.
    assert {r["desired_state"] for r in await conn.fetch(
        "SELECT desired_state FROM igla_race_trials")} == {"removed"}
    end = time.monotonic() + 30
    while time.monotonic() < end:
        states = {r["observed_state"] for r in await conn.fetch(
            "SELECT observed_state FROM igla_race_trials")}
        if states == {"removed"}:
            break
        await anyio.sleep(0.2)
    assert states == {"removed"}
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0




async def _invariants(conn: asyncpg.Connection, race_names: list[str]) -> dict[str, int]:
    """No duplicate, no lost decision: every effect has its audit row and every audit row its
    effect; and the core has nothing left to decide."""
    dupes = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM gardener_decisions GROUP BY canon_name, rung, "
        "action, applied HAVING count(*) > 1) d"
    )
    assert dupes == 0
    trials_rows = await conn.fetch("SELECT * FROM igla_race_trials")
    audit = await conn.fetch("SELECT * FROM gardener_decisions WHERE applied")
    by_trial: dict[str, list[asyncpg.Record]] = {}
    for a in audit:
        by_trial.setdefault(a["canon_name"], []).append(a)
    spawned_in_audit: list[str] = []
    for a in audit:
        spawned_in_audit.extend((a["numbers"] or {}).get("spawned", []))
    assert len(spawned_in_audit) == len(set(spawned_in_audit))
    for t in trials_rows:
        rows = [a for a in by_trial.get(t["canon_name"], [])
                if not a["action"].startswith("tripwire:")]
        assert t["rung"] == max((a["rung"] for a in rows), default=-1), t["canon_name"]
        pruned = any(a["action"] == "prune" for a in rows)
        assert (t["desired_state"] == "stopped") == pruned, t["canon_name"]
        if t["parent"] is not None:
            assert t["canon_name"] in spawned_in_audit, t["canon_name"]
    names = {t["canon_name"] for t in trials_rows}
    assert set(spawned_in_audit) <= names
    seeds = {(r["variant"], r["seed"]) for r in await conn.fetch("SELECT * FROM used_seeds")}
    # Every trial's seed is used; the only others are the champions', used from the start.
    champions = {(r["variant"], r["seed"]) for r in await conn.fetch(
        "SELECT variant, seed FROM used_seeds WHERE variant LIKE '%-CHAMP'")}
    assert seeds == {(t["variant"], t["seed"]) for t in trials_rows} | champions
    with_exp = [t for t in trials_rows if t["exp_id"] is not None]
    bound = await conn.fetch("SELECT exp_id, canon_name FROM exp_ids WHERE exp_id >= 5")
    assert {(t["exp_id"], t["canon_name"]) for t in with_exp} <= {
        (b["exp_id"], b["canon_name"]) for b in bound
    }
    base = base_config(Settings())
    for name in race_names:
        info = await race_info(conn, name)
        assert info is not None
        left = decide(await load_snapshot(conn, info, paused=False), race_config(base, info))
        assert left == [], (name, left[:3])
    return {"decisions": len(audit), "trials": len(trials_rows)}


@pytest.mark.slow
async def test_sigkill_at_random_moments_leaves_no_duplicate_and_no_lost_decision(
    db_dsn: str, tmp_path: Path, daemons: list[Daemon], conn: asyncpg.Connection
) -> None:
    rng = random.Random(20261126)
    # A daemon on an in-memory backend: the test is about the ledger, not the trainers.
    argv = [sys.executable, "-m", "tests.memory_daemon", db_dsn, "0.2", "info"]
    races: dict[str, list[str]] = {}
    for k in range(3):
        races[f"chaos-{k}"] = await make_race(
            conn, f"chaos-{k}", 20, first_exp=2000 + 100 * k, first_seed=1000 + 100 * k
        )
    kills = 0
    mid_apply = 0
    # Each stage brings every trial past one more rung, so the daemon started for it has work,
    # and it is killed at a random moment shortly after its first decision (a fast daemon may
    # finish a stage within a few tenths of a second).
    for stage, upto in enumerate((25, 45, 85, 165)):
        for k, names in enumerate(races.values()):
            for i, name in enumerate(names):
                await add_samples(conn, name, curve(0.01 * i, upto, seed=k * 100 + i))
        d = Daemon(db_dsn, tmp_path, f"chaos-{stage}", argv=argv).start()
        daemons.append(d)
        await d.wait_event("leader_acquired", within=30)
        try:  # kill while it applies
            await d.wait_event("decision", within=5)
            await anyio.sleep(rng.uniform(0.0, 0.2))
            applying = True
        except AssertionError:
            applying = False
        d.signal(signal.SIGKILL)
        d.wait(10)
        kills += 1
        mid_apply += int(applying)
    for k, names in enumerate(races.values()):
        for i, name in enumerate(names):
            await add_samples(conn, name, curve(0.01 * i, 325, seed=k * 100 + i))
    # A last daemon runs to completion, then the ledger must be whole.
    final = Daemon(db_dsn, tmp_path, "final", argv=argv).start()
    daemons.append(final)
    await final.wait_event("leader_acquired", within=30)
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < 2.0:
        n = await conn.fetchval("SELECT count(*) FROM gardener_decisions")
        if n != last:
            last, quiet_since = n, time.monotonic()
        await anyio.sleep(0.1)
    final.signal(signal.SIGTERM)
    assert final.wait(10) == 0
    counts = await _invariants(conn, list(races))
    assert kills == 4 and mid_apply == 4, (kills, mid_apply)
    assert counts["decisions"] >= 60  # every trial decided


def tri(dsn: str, tmp: Path, *args: str, account: str = "acc1") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": dsn, "GARDENER_DATA_DIR": str(tmp / "data"),
           "GARDENER_LOG_LEVEL": "warning"}
    return subprocess.run([GARDENER, *args, "--account", account], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
async def test_run_once_and_the_hunt_commands(
    db_dsn: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    names = await make_race(conn, "hunt", 6, first_exp=3000, first_seed=3000)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.05 * i, 45, seed=i))
    shown = json.loads(tri(db_dsn, tmp_path, "hunt", "prune", "--rung", "1", "--json").stdout)
    assert shown and {r["outcome"] for r in shown} == {"would prune"}
    assert await conn.fetchval("SELECT count(*) FROM gardener_decisions") == 0
    refused = tri(db_dsn, tmp_path, "hunt", "prune", "--rung", "1", "--race", "hunt",
                  account="acc2")
    assert refused.returncode != 0 and "CrossAccountKillForbidden" in refused.stderr
    await conn.execute("UPDATE gardener_control SET paused = true")
    paused = tri(db_dsn, tmp_path, "hunt", "prune", "--rung", "1", "--apply")
    assert paused.returncode != 0 and "paused" in paused.stderr
    await conn.execute("UPDATE gardener_control SET paused = false")
    applied = json.loads(
        tri(db_dsn, tmp_path, "hunt", "prune", "--rung", "1", "--apply", "--json").stdout)
    assert [r["canon_name"] for r in applied] == [r["canon_name"] for r in shown]
    assert {r["outcome"] for r in applied} == {"applied"}
    stopped = {r["canon_name"] for r in await conn.fetch(
        "SELECT canon_name FROM igla_race_trials WHERE desired_state = 'stopped'")}
    assert stopped == {r["canon_name"] for r in shown}
    mirrored = json.loads(tri(db_dsn, tmp_path, "hunt", "mirror", "--leader", names[0],
                              "--count", "2", "--strategy", "phi-anchored", "--json").stdout)
    assert len(mirrored["spawned"]) == 2
    assert {s["strategy"] for s in mirrored["seeds"]} == {"phi-anchored"}
    status = json.loads(tri(db_dsn, tmp_path, "hunt", "status", "--json").stdout)
    assert {r["canon_name"] for r in status} == set(names) | set(mirrored["spawned"])
    assert all(r["bpb_inf"] is not None for r in status if r["canon_name"] in stopped)
    # One tick and one reconcile pass from the command line: the kept trials get their
    # rung-1 KEEP, and the live trials (3 kept, 2 mirrors) are started on the local backend.
    once = tri(db_dsn, tmp_path, "run", "--once")
    try:
        assert once.returncode == 0, once.stderr
        out = json.loads(once.stdout)
        assert out["role"] == "leader" and out["tick"]["decided"] == ["hunt"]
        assert out["tick"]["applied"] == 6 - len(shown)
        assert out["reconcile"]["acc1"]["done"] == 6 - len(shown) + 2
    finally:
        from gardener.backends.local import LocalBackend

        await LocalBackend("acc1", tmp_path / "data").teardown()
    keeps = await conn.fetch("SELECT canon_name FROM gardener_decisions WHERE action = 'keep'")
    assert {k["canon_name"] for k in keeps} == set(names) - stopped
