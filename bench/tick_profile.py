"""Where a crossing tick's time goes, in-process: a ticker over ``--races`` x ``--trials`` live
trials, one crossing per tick, each phase timed (and the whole run under pyinstrument with
``--profile FILE``).

    .venv/bin/python bench/tick_profile.py --races 10 --trials 1000 --crossings 30

Prints one JSON object (milliseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
from prometheus_client import REGISTRY

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decision_latency import create_db, drop_db, insert_sample, populate

from gardener import logs
from gardener.ledger import db, migrate
from gardener.loop.tick import Ticker
from gardener.settings import Settings


def write_text(path: str, text: str) -> None:
    Path(path).write_text(text)


async def main(args: argparse.Namespace) -> dict[str, object]:
    logs.configure("json", "warning")
    dsn = await create_db(args.dsn)
    try:
        conn = await db.connect(dsn)
        await migrate.migrate(conn)
        live = await populate(conn, args.races, args.trials, 450, 0)
        pool = await db.create_pool(dsn, min_size=1, max_size=4)
        ticker = Ticker(pool, Settings(account="acc1", poll_interval=2.0))
        t0 = time.perf_counter()
        first = await ticker.tick()
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        await ticker.tick()
        idle_s = time.perf_counter() - t0
        rng = random.Random(11)
        profiler = None
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005, async_mode="enabled")
            profiler.start()
        ticks = []
        decides = 0
        sums0 = {k: REGISTRY.get_sample_value(f"gardener_{k}_seconds_sum") or 0.0
                 for k in ("snapshot", "fit", "tick")}
        cpu0 = time.process_time()
        for name, seed in live[: args.crossings]:
            await insert_sample(conn, name, seed, 500, round(2.2 + rng.uniform(0, 0.1), 4))
            t0 = time.perf_counter()
            rep = await ticker.tick()
            ticks.append(1000 * (time.perf_counter() - t0))
            assert rep.crossings, rep
            decides += len(rep.decided)
        cpu = time.process_time() - cpu0
        per_decide = {f"{k}_ms": round(1000 * ((REGISTRY.get_sample_value(
            f"gardener_{k}_seconds_sum") or 0.0) - v) / decides, 1) for k, v in sums0.items()
            if k != "tick"}
        if profiler is not None:
            profiler.stop()
            write_text(args.profile, profiler.output_text(unicode=False, show_all=False))
        a = np.asarray(ticks)
        await pool.close()
        await conn.close()
        return {
            "live_trials": args.races * args.trials,
            "races": args.races,
            "first_tick_ms": round(1000 * first_s, 1),
            "first_tick_decided": len(first.decided),
            "idle_tick_ms": round(1000 * idle_s, 1),
            "crossing_tick_ms": {"p50": round(float(np.percentile(a, 50)), 1),
                                 "p99": round(float(np.percentile(a, 99)), 1),
                                 "max": round(float(a.max()), 1)},
            "cpu_ms_per_crossing_in_process": round(1000 * cpu / len(ticks), 1),
            "decides": decides,
            "per_decide": per_decide,
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
    finally:
        await drop_db(args.dsn, dsn)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", default=os.environ.get("GARDENER_TEST_DATABASE_URL")
                    or "postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--races", type=int, default=10)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--crossings", type=int, default=30)
    ap.add_argument("--profile", help="write a pyinstrument text profile here")
    print(json.dumps(asyncio.run(main(ap.parse_args())), indent=2))
