"""Benchmark: the Gate-0 smoke race, several runs in a row on one fresh database.

Runs the real thing in-process (``run_smoke`` with the real worker loop and the local
backend), and measures per run: wall time, every criterion, the gardener process's own peak
RSS and the peak RSS of all trainers together (sampled from /proc every 0.25 s). Across runs
it checks that seeds, canon names and EXP_IDs were never reused. Prints one JSON document.

    .venv/bin/python bench/smoke_race.py --server postgresql://postgres@127.0.0.1:5432/postgres \
        --runs 3 --report docs/SMOKE_GATE_0_REPORT.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

from gardener import logs
from gardener.backends import make_backend
from gardener.ledger import db
from gardener.race import report as report_mod
from gardener.race import smoke, smoke_config
from gardener.settings import Settings
from gardener.trainer.data import describe

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss(pid: int | str) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


class MemorySampler(threading.Thread):
    """Peak RSS of this process and of all trainer processes together."""

    def __init__(self, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.stop = threading.Event()
        self.peak_self = 0
        self.peak_trainers = 0
        self.peak_trainer_count = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_self = max(self.peak_self, _rss("self"))
            total, count = 0, 0
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    env = (entry / "environ").read_bytes()
                except OSError:
                    continue
                if b"TRAIN_CANON_NAME=" in env:
                    total += _rss(entry.name)
                    count += 1
            self.peak_trainers = max(self.peak_trainers, total)
            self.peak_trainer_count = max(self.peak_trainer_count, count)
            self.stop.wait(self.every)


def _with_database(dsn: str, name: str) -> str:
    p = urlsplit(dsn)
    return urlunsplit((p.scheme, p.netloc, "/" + name, p.query, p.fragment))


async def fresh_database(server: str) -> str:
    name = f"gardener_smoke_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return _with_database(server, name)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    dsn = args.dsn or await fresh_database(args.server)
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="gardener-smoke-bench-"))
    cfg = smoke_config.load_config(args.config).with_overrides(
        tags=args.tags, seeds_per_tag=args.seeds_per_tag, max_steps=args.max_steps,
        wallclock=args.wallclock,
    )
    settings = Settings(
        database_url=dsn, data_dir=data_dir, backend="local", account=cfg.account,
        corpus=cfg.corpus, corpus_sha256=describe(cfg.corpus)[1], log_format="json",
        log_level=args.log_level,
    )
    backend = make_backend("local", cfg.account, data_dir=data_dir)
    runs: list[dict[str, Any]] = []
    last: smoke.SmokeResult | None = None
    for i in range(args.runs):
        sampler = MemorySampler()
        sampler.start()
        t0 = time.monotonic()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = await smoke.run_smoke(cfg, settings, dsn=dsn, observe=backend.observe,
                                       write_report=False)
        wall = time.monotonic() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        sampler.stop.set()
        sampler.join()
        claimed = next((c.details.get("ids", []) for c in result.criteria if c.number == 10), [])
        runs.append({
            "run": i + 1,
            "race": result.race,
            "smoke_done": result.smoke_done,
            "wall_s": round(wall, 1),
            "timings_s": {k: round(v, 1) for k, v in result.timings.items()},
            "red": [c.number for c in result.criteria if not c.green],
            "seeds": sorted(p.canon.seed for p in result.planned),
            "trials": len(result.planned),
            "exp_ids_claimed": claimed,
            "gardener_peak_rss_mb": round(sampler.peak_self / 2**20, 1),
            "trainers_peak_rss_mb": round(sampler.peak_trainers / 2**20, 1),
            "trainers_peak_concurrent": sampler.peak_trainer_count,
            "trainer_cpu_s": round((cpu1.ru_utime + cpu1.ru_stime)
                                   - (cpu0.ru_utime + cpu0.ru_stime), 1),
        })
        print(json.dumps(runs[-1]), file=sys.stderr)
        last = result
    names_by_run = [set(r["seeds"]) for r in runs]
    seeds_disjoint = all(a.isdisjoint(b) for i, a in enumerate(names_by_run)
                         for b in names_by_run[i + 1:])
    ids = [x for r in runs for x in r["exp_ids_claimed"]]
    conn = await db.connect(dsn)
    try:
        trial_names = await conn.fetchval("SELECT count(DISTINCT canon_name) FROM igla_race_trials")
        trial_rows = await conn.fetchval("SELECT count(*) FROM igla_race_trials")
        exp_total = await conn.fetchval("SELECT count(*) FROM exp_ids")
        exp_distinct = await conn.fetchval("SELECT count(DISTINCT exp_id) FROM exp_ids")
        if args.report and last is not None:
            worst = max(runs, key=lambda r: r["wall_s"])
            extra = {
                "machine": f"{os.cpu_count()} cores, {len(last.planned)} trainers at once",
                "this run": f"{runs[-1]['wall_s']} s wall, gardener peak RSS "
                            f"{runs[-1]['gardener_peak_rss_mb']} MB, trainers together peak "
                            f"{runs[-1]['trainers_peak_rss_mb']} MB",
                "runs in a row on this database": ", ".join(
                    f"{r['race']} {'SMOKE_DONE' if r['smoke_done'] else 'RED ' + str(r['red'])}"
                    f" in {r['wall_s']} s (seeds {r['seeds'][0]}..)" for r in runs),
                "slowest run": f"{worst['wall_s']} s",
            }
            await report_mod.write_report(conn, last.race, Path(args.report),
                                          criteria=last.criteria, timings=last.timings,
                                          extra=extra)
    finally:
        await conn.close()
        await backend.aclose()
    return {
        "benchmark": "smoke_race",
        "config": {"tags": list(cfg.tags), "seeds_per_tag": cfg.seeds_per_tag,
                   "max_steps": cfg.max_steps, "runs": args.runs, "cores": os.cpu_count()},
        "runs": runs,
        "all_green": all(r["smoke_done"] for r in runs),
        "seeds_never_reused": seeds_disjoint,
        "canon_names_unique": trial_names == trial_rows,
        "exp_ids_never_reused": len(ids) == len(set(ids)) and exp_total == exp_distinct,
        "max_wall_s": max(r["wall_s"] for r in runs),
        "max_gardener_rss_mb": max(r["gardener_peak_rss_mb"] for r in runs),
        "report": args.report,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default=os.environ.get(
        "GARDENER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="maintenance DSN: a fresh database is created on this server")
    ap.add_argument("--dsn", help="use this database instead of a fresh one")
    ap.add_argument("--data-dir")
    ap.add_argument("--config")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tags")
    ap.add_argument("--seeds-per-tag", type=int)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--wallclock")
    ap.add_argument("--report", help="write the last run's report here")
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args()
    logs.configure("json", args.log_level, stream=sys.stderr)
    print(json.dumps(anyio.run(main_async, args), indent=2))


if __name__ == "__main__":
    main()
