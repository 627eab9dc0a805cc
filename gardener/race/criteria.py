"""The 14 Gate-0 acceptance criteria: each a real check against the ledger or the processes.

Two kinds of check:
- reads (1, 2, 3, 4, 6, 11, 12, 13, 14), here, look at what the race left in the ledger and in
  the process table, so they can be re-run at any time and go RED on bad data;
- probes (5, 7, 8, 9, 10), in ``probes.py``, really attempt the forbidden thing through the
  CLI's own code path; their outcomes come back here to be evaluated with the reads.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from gardener.backends.base import ACTIVE, ServiceState
from gardener.ledger.queries import Queries

Q = Queries("race.sql")

GREEN = "GREEN"
RED = "RED"
SMOKE_DONE = "SMOKE_DONE"

TITLES: dict[int, str] = {
    1: "a step=10 BPB line from every service within 2 minutes",
    2: "every BPB token obeys L-R8 (^BPB=\\d\\.\\d{4}$)",
    3: "bpb_samples has more than 40 rows for every seed",
    4: "igla_race_trials has one row per planned canon name",
    5: "L-R9: a GF16 trial with h < 256 is refused",
    6: "`tri leaderboard rank --gate gate-0` returns every trial with distinct BPB",
    7: "a deploy into a used champion slot fails with ReusedChampionSlot (an empty one takes it)",
    8: "--force-replace on an occupied slot fails with SlotStillOccupied",
    9: "--account acc1 --kill <acc2 trial> fails with CrossAccountKillForbidden",
    10: "concurrent `tri exp claim` calls never return the same EXP_ID",
    11: "every service reported the configured corpus within 120 s",
    12: "no tripwire fired (floor, leak, stall, duplicate curve, corpus)",
    13: "after teardown nothing is left running",
    14: "the race ends with SMOKE_DONE",
}


@dataclass(frozen=True)
class CriteriaConfig:
    """The thresholds and probe settings of ``[criteria]`` in gate0-smoke.toml."""

    seed_block: int = 10
    first_sample_within_s: float = 120.0
    first_sample_step: int = 10
    corpus_within_s: float = 120.0
    min_samples_per_seed: int = 40
    lr9_probe: str = "IGLA-TRAIN_V2-GF16-SMOKE"
    lr9_hidden: int = 128
    used_slot: int = 4
    probe_slot: int = 1
    force_replace_challenger: str = "IGLA-TRAIN_V2-FP32-CHAMP-seed43"
    claim_workers: int = 8
    claim_count: int = 3
    teardown_timeout_s: float = 60.0

    def samples_needed(self, max_steps: int, eval_every: int) -> int:
        """More than ``min_samples_per_seed`` rows; a shorter race needs more than 80% of
        the rows it can produce (a 60-step race makes 6)."""
        possible = max_steps // max(1, eval_every)
        return min(self.min_samples_per_seed, max(1, (possible * 4) // 5))


@dataclass(frozen=True)
class Criterion:
    """One criterion's outcome: GREEN or RED, the evidence a person reads, and the details."""

    number: int
    title: str
    green: bool
    evidence: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return GREEN if self.green else RED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"status": self.status}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Criterion:
        return cls(int(d["number"]), str(d["title"]), bool(d["green"]), str(d["evidence"]),
                   dict(d.get("details") or {}))


def outcome(number: int, green: bool, evidence: str, **details: Any) -> Criterion:
    """Criterion ``number`` with its title, GREEN or RED, and the evidence."""
    return Criterion(number, TITLES[number], green, evidence, details)


@dataclass(frozen=True)
class RaceContext:
    """What the read checks compare the ledger with."""

    race: str
    account: str
    expected_names: tuple[str, ...]
    max_steps: int
    eval_every: int
    corpus: str
    corpus_sha256: str | None
    config: CriteriaConfig = field(default_factory=CriteriaConfig)


# ---- reads ----------------------------------------------------------------------------------


async def first_samples(conn: asyncpg.Connection, ctx: RaceContext) -> Criterion:
    """1: every trial has its step-10 sample, stamped within the limit of its admission."""
    limit = ctx.config.first_sample_within_s
    step = ctx.config.first_sample_step
    rows = await conn.fetch(Q.first_sample_latency, ctx.race, step)
    missing = [r["canon_name"] for r in rows if r["at_step"] == 0]
    late = [(r["canon_name"], float(r["latency_s"])) for r in rows
            if r["at_step"] and float(r["latency_s"]) > limit]
    lat = [float(r["latency_s"]) for r in rows if r["at_step"]]
    if not rows:
        return outcome(1, False, "the race has no trials")
    if missing or late:
        parts = []
        if missing:
            parts.append(f"{len(missing)} without step {step}: {', '.join(missing[:3])}")
        if late:
            parts.append(f"{len(late)} later than {limit:.0f} s: "
                         + ", ".join(f"{n} {s:.1f} s" for n, s in late[:3]))
        return outcome(1, False, "; ".join(parts), missing=missing, late=late)
    return outcome(1, True, f"step {step} from all {len(rows)} trials; slowest {max(lat):.1f} s, "
              f"median {sorted(lat)[len(lat) // 2]:.1f} s after admission (limit {limit:.0f} s)",
              max_latency_s=max(lat))


async def lr8_tokens(conn: asyncpg.Connection, ctx: RaceContext) -> Criterion:
    """2: no BPB token of the race was quarantined, and every stored value has 4 decimals."""
    rejected = await conn.fetch(Q.quarantined_bpb_tokens, ctx.race)
    bad = await conn.fetch(Q.bpb_not_four_decimals, ctx.race)
    total = await conn.fetchval(
        "SELECT count(*) FROM bpb_samples b JOIN igla_race_trials t "
        "ON t.canon_name = b.canon_name AND t.seed = b.seed WHERE t.race = $1", ctx.race)
    if rejected or bad:
        parts = []
        if rejected:
            r0 = rejected[0]
            parts.append(f"{len(rejected)} BPB line(s) quarantined, e.g. {r0['raw']!r} "
                         f"({r0['reason']})")
        if bad:
            b0 = bad[0]
            parts.append(f"{len(bad)} stored value(s) not of the form d.dddd, e.g. "
                         f"{b0['canon_name']} step {b0['step']} = {b0['bpb']!r}")
        return outcome(2, False, "; ".join(parts), quarantined=len(rejected), malformed=len(bad))
    if not total:
        return outcome(2, False, "no samples stored for the race: nothing obeyed L-R8")
    return outcome(2, True, f"{total} samples, all d.dddd; no BPB line of the race in quarantine",
              samples=int(total))


async def samples_per_seed(conn: asyncpg.Connection, ctx: RaceContext) -> Criterion:
    """3: more than the threshold of rows for every trial (seed)."""
    need = ctx.config.samples_needed(ctx.max_steps, ctx.eval_every)
    rows = await conn.fetch(Q.samples_per_trial, ctx.race)
    if not rows:
        return outcome(3, False, "the race has no trials")
    short = [(r["canon_name"], int(r["samples"])) for r in rows if int(r["samples"]) <= need]
    counts = [int(r["samples"]) for r in rows]
    if short:
        return outcome(3, False, f"{len(short)} trial(s) with at most {need} rows: "
                  + ", ".join(f"{n} ({k})" for n, k in short[:3]), short=short, needed=need)
    return outcome(3, True, f"every one of {len(rows)} seeds has more than {need} rows "
              f"(min {min(counts)}, max {max(counts)})", needed=need, min_rows=min(counts))


async def one_row_per_name(conn: asyncpg.Connection, ctx: RaceContext) -> Criterion:
    """4: the race's rows are exactly the planned canon names, each once."""
    names = [r["canon_name"] for r in await conn.fetch(Q.trial_names, ctx.race)]
    expected = sorted(ctx.expected_names)
    extra = sorted(set(names) - set(expected))
    missing = sorted(set(expected) - set(names))
    if len(names) != len(expected) or extra or missing or len(set(names)) != len(names):
        return outcome(4, False, f"{len(names)} rows for {len(expected)} planned names; missing "
                  f"{missing[:3]}, unexpected {extra[:3]}", missing=missing, extra=extra)
    return outcome(4, True, f"{len(names)} rows, one per planned canon name", rows=len(names))


async def leaderboard_gate0(conn: asyncpg.Connection, ctx: RaceContext) -> Criterion:
    """6: the same ranking the CLI prints has every trial, with distinct final BPB, each
    taken at the race's last step (a trial cut short, e.g. by the wallclock, has none)."""
    from gardener.race import leaderboard

    board = await leaderboard.rank(conn, "gate-0", race=ctx.race)
    finals = [r.final_bpb for r in board.rows if r.final_bpb is not None]
    short = [r.canon_name for r in board.rows if (r.final_step or 0) < ctx.max_steps]
    n = len(ctx.expected_names)
    ok = (len(board.rows) == n and len(finals) == n and len(set(finals)) == n
          and board.verdict.passed and not short)
    why = "; ".join(board.verdict.reasons)
    if short:
        why += f"; {len(short)} trial(s) ended before step {ctx.max_steps}: {short[0]}"
    if not ok:
        return outcome(6, False, f"{len(board.rows)} rows, {len(set(finals))} distinct final BPB "
                  f"(need {n}); {why}", rows=len(board.rows))
    return outcome(6, True, f"{len(board.rows)} rows, {len(set(finals))} distinct final BPB "
              f"(best {min(finals):.4f}, worst {max(finals):.4f})", rows=len(board.rows))


async def corpus_reported(conn: asyncpg.Connection, ctx: RaceContext) -> Criterion:
    """11: every trial reported the configured corpus (name and sha256) within the limit."""
    limit = ctx.config.corpus_within_s
    rows = await conn.fetch(Q.corpus_reports, ctx.race)
    if not rows:
        return outcome(11, False, "the race has no trials")
    problems: list[str] = []
    for r in rows:
        if r["corpus_sha256"] is None:
            problems.append(f"{r['canon_name']}: no corpus reported")
        elif r["corpus"] != ctx.corpus or (
            ctx.corpus_sha256 is not None and r["corpus_sha256"] != ctx.corpus_sha256
        ):
            problems.append(f"{r['canon_name']}: {r['corpus']} {str(r['corpus_sha256'])[:12]}")
        elif r["latency_s"] is None or float(r["latency_s"]) > limit:
            problems.append(f"{r['canon_name']}: reported after {r['latency_s']} s")
    if problems:
        return outcome(11, False, f"{len(problems)} trial(s) off: " + "; ".join(problems[:3]),
                  problems=problems)
    slowest = max(float(r["latency_s"]) for r in rows)
    sha = (ctx.corpus_sha256 or "")[:12]
    return outcome(11, True, f"all {len(rows)} reported corpus={ctx.corpus} sha256={sha}..., the "
              f"slowest after {slowest:.1f} s", max_latency_s=slowest)


async def no_tripwires(conn: asyncpg.Connection, ctx: RaceContext) -> Criterion:
    """12: no open tripwire event names the race or one of its trials."""
    rows = await conn.fetch(Q.open_tripwires_of_race, ctx.race)
    if rows:
        kinds = sorted({r["kind"] for r in rows})
        first = rows[0]
        return outcome(12, False, f"{len(rows)} open tripwire(s) ({', '.join(kinds)}), e.g. "
                  f"{first['dedupe_key']}: {first['evidence']}", kinds=kinds, count=len(rows))
    return outcome(12, True, "no open tripwire event for the race or any of its trials")


def live_processes(
    names: Iterable[str], race: str, proc: Path = Path("/proc")
) -> list[dict[str, Any]]:
    """Processes (not zombies) whose environment names one of ``names`` or the race.

    Trainers carry ``TRAIN_CANON_NAME``, and services the gardener starts carry the
    ``GARDENER_CANON_NAME`` / ``GARDENER_RACE`` marker, whichever process group they are in.
    """
    wanted = {n.encode() for n in names}
    race_b = race.encode()
    found: list[dict[str, Any]] = []
    me = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            stat = (entry / "stat").read_text()
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
        if state in ("Z", "X"):
            continue
        hit = None
        for item in env.split(b"\0"):
            key, _, value = item.partition(b"=")
            if key in (b"TRAIN_CANON_NAME", b"GARDENER_CANON_NAME") and value in wanted:
                hit = value.decode()
                break
            if key == b"GARDENER_RACE" and value == race_b:
                hit = race
                break
        if hit is not None:
            found.append({"pid": int(entry.name), "state": state, "name": hit,
                          "pgid": os.getpgid(int(entry.name)) if _alive(int(entry.name)) else None})
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


async def teardown_clean(
    conn: asyncpg.Connection,
    ctx: RaceContext,
    *,
    observed: Sequence[ServiceState] | None,
    processes: list[dict[str, Any]] | None = None,
) -> Criterion:
    """13: no process of the race alive, no service of the race active in the backend's
    ``observe()``, and no trial the ledger still wants running."""
    procs = live_processes(ctx.expected_names, ctx.race) if processes is None else processes
    names = set(ctx.expected_names)
    active = [] if observed is None else [
        s for s in observed if s.canon_name in names and s.status in ACTIVE]
    wanted = [r["canon_name"] for r in await conn.fetch(Q.race_states, ctx.race)
              if r["desired_state"] == "running"]
    if procs or active or wanted or observed is None:
        parts = []
        if procs:
            parts.append(f"{len(procs)} live process(es), e.g. pid {procs[0]['pid']} "
                         f"({procs[0]['name']})")
        if active:
            parts.append(f"{len(active)} service(s) active in observe(), e.g. "
                         f"{active[0].canon_name} {active[0].status}")
        if wanted:
            parts.append(f"{len(wanted)} trial(s) still desired running")
        if observed is None:
            parts.append("the backend could not be observed")
        return outcome(13, False, "; ".join(parts), processes=procs, active=len(active))
    seen = sum(1 for s in observed if s.canon_name in names)
    return outcome(13, True, f"no live process of the race; observe() lists {seen} of its "
                   "services, none active; every trial desired stopped", observed=seen)


async def smoke_done(conn: asyncpg.Connection, ctx: RaceContext) -> Criterion:
    """14: the ledger records SMOKE_DONE for the race: the verdict decision and status done."""
    status = await conn.fetchval("SELECT status FROM races WHERE name = $1", ctx.race)
    verdict = await conn.fetchrow(Q.race_verdict, ctx.race)
    done = verdict is not None and bool((verdict["numbers"] or {}).get("smoke_done"))
    if status == "done" and done:
        assert verdict is not None
        return outcome(14, True, f"verdict #{verdict['id']}: {verdict['reason']}; race status done")
    return outcome(14, False, f"race status {status!r}; verdict "
              f"{verdict['reason'] if verdict else 'not recorded'}")


async def record_verdict(
    conn: asyncpg.Connection,
    race: str,
    criteria: Sequence[Criterion],
    *,
    by: str = "smoke-race",
    timings: dict[str, float] | None = None,
) -> bool:
    """Write the race's verdict decision and status: SMOKE_DONE only when all are GREEN."""
    red = [c.number for c in criteria if not c.green]
    ok = not red
    reason = (f"{SMOKE_DONE}: all {len(criteria)} checked criteria GREEN" if ok
              else f"SMOKE FAILED: criteria {', '.join(map(str, red))} RED")
    numbers = {"smoke_done": ok, "criteria": [c.to_dict() for c in criteria],
               "timings": {k: round(v, 2) for k, v in (timings or {}).items()}}
    async with conn.transaction():
        await conn.fetchval(Q.insert_race_verdict, race, numbers, reason, by)
        await conn.execute(Q.set_race_status, race, "done" if ok else "failed")
    return ok


READS: dict[int, Callable[[asyncpg.Connection, RaceContext], Awaitable[Criterion]]] = {
    1: first_samples,
    2: lr8_tokens,
    3: samples_per_seed,
    4: one_row_per_name,
    6: leaderboard_gate0,
    11: corpus_reported,
    12: no_tripwires,
}


async def evaluate(
    conn: asyncpg.Connection,
    ctx: RaceContext,
    probes: dict[int, Criterion],
    *,
    observed: Sequence[ServiceState] | None,
) -> list[Criterion]:
    """Criteria 1..13 in order: the reads now, the probes' outcomes as given (a probe that
    did not run is RED)."""
    out: list[Criterion] = []
    for n in range(1, 14):
        if n in READS:
            out.append(await READS[n](conn, ctx))
        elif n == 13:
            out.append(await teardown_clean(conn, ctx, observed=observed))
        else:
            out.append(probes.get(n) or outcome(n, False, "the probe did not run"))
    return out
