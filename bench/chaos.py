"""Chaos harness: a recorded sample stream replayed into a real daemon while it is SIGKILLed,
SIGTERMed, paused and has its database sessions terminated at random moments; the final
ledger is compared with an uninterrupted run of the same stream.

The stream: recorded curves (``bench/data/igla_trios_results.csv``, 24 evaluations from step
500 to 12000 per run) of ``--trials`` runs, one trial each in one race with rungs
1000/2000/4000/8000/12000. It is posted over HTTP (``POST /v1/samples``) one rung at a time:
everything up to the next rung in one request, so each stage lands in one transaction and
both runs decide on exactly the same data; then the harness waits for the daemon to settle.
Each chaos event is given to a random stage and a random delay after its post begins:

- ``kill``: SIGKILL, then a new daemon;
- ``term``: SIGTERM (exit 0 expected), then a new one;
- ``pause``: the pause flag for 0.2-1.5 s;
- ``session``: pg_terminate_backend of every session the daemon has open (its lock session
  included: it must step down and restart).

A supervisor restarts a daemon that exits by itself (after a ``session`` event that is
expected; otherwise it is counted as a crash). The poster retries until answered 200 and
records every sample answered ``accepted`` or ``duplicate``.

Checked at the end: the applied decisions (canon name, rung, action) equal the
uninterrupted run's; no natural key twice; every sample answered 200 is in bpb_samples with
its value.

    .venv/bin/python bench/chaos.py --dsn postgresql://postgres@127.0.0.1:5432/postgres \
        --kills 50 --terms 20 --pauses 20 --sessions 10

Prints one JSON object. The platform is in memory (``tests.recording_daemon``): the harness
is about the ledger, not the trainers.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gardener.core import canon  # noqa: E402
from gardener.ledger import db, migrate, trials  # noqa: E402

RUNGS = [1000, 2000, 4000, 8000, 12000]
RACE = "chaos"
TOKEN = "chaos-ingest-token-acc1"
DATA = ROOT / "bench" / "data" / "igla_trios_results.csv"
KINDS = ("kill", "term", "pause", "session")


@dataclass
class Trial:
    canon_name: str
    run: str
    curve: list[tuple[int, float]]


@dataclass
class Outcome:
    label: str
    decisions: set[tuple[str, int, str]] = field(default_factory=set)
    duplicate_keys: int = 0
    held_rows: int = 0
    answered: dict[tuple[str, int], float] = field(default_factory=dict)
    lost: list[tuple[str, int]] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    mid_stage: int = 0  # events that came while their stage's decisions were still to come
    unsettled_stages: int = 0  # stages whose rung was not decided within the time allowed
    restarts: int = 0
    crashes: int = 0  # a daemon that exited by itself, not after a session event
    term_exit_codes: Counter[int] = field(default_factory=Counter)
    term_seconds: list[float] = field(default_factory=list)  # SIGTERM to exit
    stuck_after_signal: int = 0  # not gone 30 s after a signal (then SIGKILLed)
    non_json_lines: int = 0
    posts: int = 0
    post_retries: int = 0
    seconds: float = 0.0


def recorded_trials(n: int) -> list[Trial]:
    """``n`` recorded runs with the full 24 evaluations, in a fixed order."""
    runs: dict[str, list[tuple[int, float]]] = {}
    for row in csv.DictReader(DATA.open()):
        runs.setdefault(row["run"], []).append((int(row["step"]), float(row["value"])))
    full = sorted(r for r, c in runs.items() if len(c) == 24 and max(s for s, _ in c) == 12000)
    if len(full) < n:
        raise SystemExit(f"only {len(full)} recorded runs have 24 evaluations")
    out = []
    for i, run in enumerate(full[:n]):
        name = str(canon.CanonName("HYBRID", "FP32", ("WSD",), 7000 + i, 6000 + i))
        curve = [(s, round(min(v, 9.9999), 4)) for s, v in sorted(runs[run])]
        out.append(Trial(name, run, curve))
    return out


def with_database(dsn: str, name: str) -> str:
    p = urlsplit(dsn)
    return urlunsplit((p.scheme, p.netloc, "/" + name, p.query, p.fragment))


async def fresh_database(server_dsn: str, stream: list[Trial]) -> str:
    name = f"gardener_chaos_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = with_database(server_dsn, name)
    conn = await db.connect(dsn)
    try:
        await migrate.migrate(conn)
        await trials.ensure_race(conn, RACE, "acc1", horizon=RUNGS[-1],
                                 config={"rungs": RUNGS})
        await trials.admit(conn, RACE, "acc1", [
            trials.Admission(canon.parse(t.canon_name), steps=RUNGS[-1]) for t in stream
        ])
    finally:
        await conn.close()
    return dsn


async def drop_database(server_dsn: str, dsn: str) -> None:
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{urlsplit(dsn).path[1:]}" WITH (FORCE)')
    await admin.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Supervisor:
    """One daemon process at a time on a fixed port; restarts it when it dies."""

    def __init__(self, dsn: str, workdir: Path, port: int, outcome: Outcome) -> None:
        self.dsn, self.workdir, self.port, self.outcome = dsn, workdir, port, outcome
        self.proc: subprocess.Popen[bytes] | None = None
        self.n = 0
        self.expect_exit = False  # a session event: the daemon may step down and exit
        self.logs: list[Path] = []

    def start(self) -> None:
        self.n += 1
        log = self.workdir / f"daemon-{self.n:03d}.log"
        self.logs.append(log)
        env = {**os.environ, "PORT": str(self.port), "GARDENER_HOST": "127.0.0.1",
               "GARDENER_INGEST_TOKEN_ACC1": TOKEN, "GARDENER_POLL_INTERVAL": "0.2",
               "GARDENER_STALL_AFTER": "100000", "GARDENER_LOG_LEVEL": "info",
               "GARDENER_DATA_DIR": str(self.workdir / "data")}
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.recording_daemon", self.dsn,
                 str(self.workdir / "calls.jsonl"), "0", "0.5"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )

    async def ready(self, within: float = 30.0) -> None:
        end = time.monotonic() + within
        async with httpx.AsyncClient() as client:
            while time.monotonic() < end:
                await self.check()
                try:
                    r = await client.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2)
                    if r.json().get("role") == "leader":
                        return
                except (httpx.HTTPError, ValueError):
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("daemon not leading within 30 s")

    async def check(self) -> None:
        """Restart a daemon that exited by itself."""
        if self.proc is not None and self.proc.poll() is not None:
            if not self.expect_exit:
                self.outcome.crashes += 1
            self.expect_exit = False
            self.outcome.restarts += 1
            self.start()

    async def signal(self, sig: int) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            await self.check()
            return None
        sent = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = await asyncio.to_thread(self.proc.wait, 30)
        except subprocess.TimeoutExpired:  # counted, then ended: the run goes on
            self.outcome.stuck_after_signal += 1
            self.proc.kill()
            code = await asyncio.to_thread(self.proc.wait, 10)
        if sig == signal.SIGTERM:
            self.outcome.term_seconds.append(round(time.monotonic() - sent, 2))
        self.outcome.restarts += 1
        self.start()
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def post_stage(port: int, items: list[dict[str, Any]], outcome: Outcome) -> None:
    """Post one stage until answered 200; record what was answered accepted or duplicate."""
    body = {"samples": items}
    async with httpx.AsyncClient() as client:
        while True:
            try:
                r = await client.post(f"http://127.0.0.1:{port}/v1/samples", json=body,
                                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 200:
                break
            outcome.post_retries += 1
            await asyncio.sleep(0.1)
    outcome.posts += 1
    for item, res in zip(items, r.json()["samples"], strict=True):
        if res["status"] in ("accepted", "duplicate"):
            outcome.answered[(item["canon_name"], item["step"])] = item["bpb"]
        else:
            raise RuntimeError(f"a recorded sample was refused: {item} {res}")


async def settle(sup: Supervisor, conn: asyncpg.Connection, rung: int, outcome: Outcome,
                 quiet: float = 1.0, within: float = 90.0) -> None:
    """Until every recorded trial still running has been decided at ``rung`` (the stage's
    rung: the next stage may only come then, or both runs would not decide on the same data),
    the pause flag is off and no decision came for ``quiet`` s. A stage that does not settle
    within ``within`` s is counted (a decision the loop never made) and the run goes on."""
    last, stable_from = -1, time.monotonic()
    end = time.monotonic() + within
    while time.monotonic() < end:
        await sup.check()
        n = await conn.fetchval("SELECT count(*) FROM gardener_decisions")
        if n != last:
            last, stable_from = n, time.monotonic()
        behind = await conn.fetchval(
            "SELECT count(*) FROM igla_race_trials WHERE parent IS NULL "
            "AND desired_state = 'running' AND rung < $1", rung)
        paused = await conn.fetchval("SELECT paused FROM gardener_control")
        if not behind and not paused and time.monotonic() - stable_from >= quiet:
            return
        await asyncio.sleep(0.1)
    outcome.unsettled_stages += 1


async def fire(kind: str, sup: Supervisor, conn: asyncpg.Connection, rng: random.Random,
               outcome: Outcome) -> None:
    outcome.events[kind] += 1
    if kind == "kill":
        await sup.signal(signal.SIGKILL)
    elif kind == "term":
        code = await sup.signal(signal.SIGTERM)
        if code is not None:
            outcome.term_exit_codes[code] += 1
    elif kind == "pause":
        await conn.execute("UPDATE gardener_control SET paused = true, reason = 'chaos'")
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        await conn.execute("UPDATE gardener_control SET paused = false, reason = null")
    else:
        sup.expect_exit = True
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'gardener:%'"
        )
    if kind != "pause":
        await sup.ready()


def stages(stream: list[Trial]) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    low = 0
    for rung in RUNGS:
        out.append([{"canon_name": t.canon_name, "step": s, "bpb": b}
                    for t in stream for s, b in t.curve if low < s <= rung])
        low = rung
    return out


async def run_once(server_dsn: str, stream: list[Trial], plan: list[list[tuple[float, str]]],
                   workdir: Path, label: str, seed: int) -> Outcome:
    outcome = Outcome(label)
    rng = random.Random(seed)
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    dsn = await fresh_database(server_dsn, stream)
    conn = await asyncpg.connect(dsn)
    sup = Supervisor(dsn, workdir, free_port(), outcome)
    started = time.monotonic()
    try:
        sup.start()
        await sup.ready()
        for rung, (items, events) in enumerate(zip(stages(stream), plan, strict=True)):
            poster = asyncio.create_task(post_stage(sup.port, items, outcome))
            t0 = time.monotonic()
            counts_at_event: list[int] = []
            for delay, kind in sorted(events):
                await asyncio.sleep(max(0.0, t0 + delay - time.monotonic()))
                counts_at_event.append(
                    await conn.fetchval("SELECT count(*) FROM gardener_decisions"))
                await fire(kind, sup, conn, rng, outcome)
            await poster
            await settle(sup, conn, rung, outcome)
            # An event came before its stage had settled if decisions were still to come.
            final = await conn.fetchval("SELECT count(*) FROM gardener_decisions")
            outcome.mid_stage += sum(1 for n in counts_at_event if n < final)
        await settle(sup, conn, len(RUNGS) - 1, outcome, quiet=2.0)
    finally:
        sup.stop()
        outcome.seconds = time.monotonic() - started
    try:
        rows = await conn.fetch(
            "SELECT canon_name, rung, action, applied FROM gardener_decisions")
        applied = [(r["canon_name"], r["rung"], r["action"]) for r in rows if r["applied"]]
        outcome.decisions = set(applied)
        outcome.duplicate_keys = len(applied) - len(set(applied))
        outcome.held_rows = sum(1 for r in rows if not r["applied"])
        stored = {(r["canon_name"], r["step"]): r["bpb"]
                  for r in await conn.fetch("SELECT canon_name, step, bpb FROM bpb_samples")}
        outcome.lost = [k for k, v in outcome.answered.items() if stored.get(k) != v]
    finally:
        await conn.close()
        if os.environ.get("GARDENER_CHAOS_KEEP_DB"):
            print(f"kept {label}: {dsn}", file=sys.stderr)
        else:
            await drop_database(server_dsn, dsn)
    for log in sup.logs:
        for line in log.read_text(errors="replace").splitlines():
            try:
                json.loads(line)
            except ValueError:
                outcome.non_json_lines += 1
    return outcome


def make_plan(rng: random.Random, counts: dict[str, int], n_stages: int,
              spread: float) -> list[list[tuple[float, str]]]:
    plan: list[list[tuple[float, str]]] = [[] for _ in range(n_stages)]
    kinds = [k for k, n in counts.items() for _ in range(n)]
    rng.shuffle(kinds)
    for kind in kinds:
        plan[rng.randrange(n_stages)].append((rng.uniform(0.0, spread), kind))
    return plan


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    stream = recorded_trials(args.trials)
    rng = random.Random(args.seed)
    counts = {"kill": args.kills, "term": args.terms, "pause": args.pauses,
              "session": args.sessions}
    plan = make_plan(rng, counts, len(RUNGS), args.spread)
    if os.environ.get("GARDENER_CHAOS_PLAN"):  # a fixed plan, to replay one case by hand
        plan = [[(float(t), str(k)) for t, k in stage]
                for stage in json.loads(os.environ["GARDENER_CHAOS_PLAN"])]
    work = Path(args.workdir or f"/tmp/gardener-chaos-{uuid.uuid4().hex[:6]}")
    calm = await run_once(args.dsn, stream, [[] for _ in RUNGS], work / "calm", "calm", 0)
    chaos = await run_once(args.dsn, stream, plan, work / "chaos", "chaos", args.seed)
    missing = sorted(calm.decisions - chaos.decisions)
    extra = sorted(chaos.decisions - calm.decisions)
    actions = Counter(a for _, _, a in calm.decisions)
    return {
        "trials": args.trials, "samples": sum(len(t.curve) for t in stream), "seed": args.seed,
        "events": dict(chaos.events), "events_planned": counts,
        "events_before_stage_settled": chaos.mid_stage,
        "decisions_calm": len(calm.decisions), "decisions_chaos": len(chaos.decisions),
        "calm_actions": dict(actions),
        "same_decisions": not missing and not extra,
        "missing_in_chaos": missing[:20], "extra_in_chaos": extra[:20],
        "duplicate_keys": chaos.duplicate_keys + calm.duplicate_keys,
        "unsettled_stages": chaos.unsettled_stages + calm.unsettled_stages,
        "held_rows_chaos": chaos.held_rows,
        "answered_200": len(chaos.answered), "lost_samples": len(chaos.lost),
        "restarts": chaos.restarts, "crashes": chaos.crashes,
        "term_exit_codes": {str(k): v for k, v in chaos.term_exit_codes.items()},
        "term_seconds_max": max(chaos.term_seconds, default=None),
        "terms_over_10_s": sum(1 for t in chaos.term_seconds if t > 10),
        "stuck_after_signal": chaos.stuck_after_signal,
        "post_retries": chaos.post_retries,
        "non_json_log_lines": chaos.non_json_lines + calm.non_json_lines,
        "seconds_calm": round(calm.seconds, 1), "seconds_chaos": round(chaos.seconds, 1),
        "workdir": str(work),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default=os.environ.get(
        "GARDENER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a server where databases may be created")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--terms", type=int, default=20)
    ap.add_argument("--pauses", type=int, default=20)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--spread", type=float, default=1.0,
                    help="events fall within this many seconds of their stage's post")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=1))


if __name__ == "__main__":
    main()
