"""What one crossing costs as a function of its race's size, and what the fleet around it adds.

Races of ``--sizes`` live trials (45 samples each, decided at rung 0) are loaded into one
database, with ``--filler`` more live trials in other races (the rest of the fleet). For each
race, ``--repeat`` times: one trial gets a sample, then the loop's steps are timed one by one:
the race's snapshot from the sample cache (wall and this process's CPU), ``decide`` on it (CPU),
and the whole tick that finds and decides the crossing (wall and CPU). The per-trial cost is
the slope of a straight line through the medians.

    .venv/bin/python bench/race_cost.py --sizes 100 250 500 1000 --filler 5000

Prints one JSON object (milliseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decision_latency import create_db, drop_db, insert_sample, populate

from gardener import logs
from gardener.core.decide import decide
from gardener.ledger import db, migrate
from gardener.ledger.snapshot import load_snapshot
from gardener.loop.tick import Ticker
from gardener.settings import Settings


def cpu() -> float:
    return time.thread_time()  # this thread only: the loop runs here, decide is called here


async def main(args: argparse.Namespace) -> dict[str, object]:
    logs.configure("json", "warning")
    dsn = await create_db(args.dsn)
    try:
        conn = await db.connect(dsn)
        await migrate.migrate(conn)
        live: dict[str, list[tuple[str, int]]] = {}
        for k, size in enumerate(args.sizes):
            rows = await populate(conn, 1, size, 450, 0, first=k)
            live[f"bench-{k}"] = rows
        if args.filler:
            await populate(conn, max(1, args.filler // 1000), min(1000, args.filler), 450, 0,
                           first=len(args.sizes))
        await conn.execute("VACUUM ANALYZE")
        pool = await db.create_pool(dsn, min_size=1, max_size=4)
        ticker = Ticker(pool, Settings(account="acc1", poll_interval=2.0), min_interval=1e9)
        while (await ticker.tick()).decided:  # start-up: the rescan, every race looked at once
            pass
        races = await ticker._races(conn)
        out = []
        for k, size in enumerate(args.sizes):
            race = races[f"bench-{k}"]
            cfg = ticker.config_for(race)
            await load_snapshot(conn, race, paused=False, cache=ticker.samples)  # first sight
            snap_ms, snap_cpu, decide_cpu, tick_ms, tick_cpu = [], [], [], [], []
            for i, (name, seed) in enumerate(live[race.name][: args.repeat]):
                await insert_sample(conn, name, seed, 460 + i, 2.3)
                w, c = time.perf_counter(), cpu()
                snap = await load_snapshot(conn, race, paused=False, cache=ticker.samples)
                snap_ms.append(1000 * (time.perf_counter() - w))
                snap_cpu.append(1000 * (cpu() - c))
                c = cpu()
                decide(snap, cfg)
                decide_cpu.append(1000 * (cpu() - c))
            for name, seed in live[race.name][args.repeat : 2 * args.repeat]:
                await insert_sample(conn, name, seed, 500, 2.3)  # a crossing: rung 1
                w, c = time.perf_counter(), time.process_time()
                rep = await ticker.tick()
                tick_ms.append(1000 * (time.perf_counter() - w))
                tick_cpu.append(1000 * (time.process_time() - c))
                assert rep.crossings == [race.name], rep

            def med(x: list[float]) -> float:
                return round(float(np.median(x)), 2)

            out.append({"trials": size, "snapshot_ms": med(snap_ms),
                        "snapshot_cpu_ms": med(snap_cpu), "decide_cpu_ms": med(decide_cpu),
                        "crossing_tick_ms": med(tick_ms), "crossing_tick_cpu_ms": med(tick_cpu)})
        await pool.close()
        await conn.close()
        sizes = np.asarray([o["trials"] for o in out], dtype=float)

        def per_trial(key: str) -> dict[str, float]:
            slope, icpt = np.polyfit(sizes, [o[key] for o in out], 1)
            return {"ms_per_trial": round(float(slope), 4), "ms_fixed": round(float(icpt), 2)}

        return {
            "benchmark": "race_cost",
            "filler_trials": args.filler,
            "repeat": args.repeat,
            "races": out,
            "linear_fit": {k: per_trial(k) for k in (
                "snapshot_ms", "snapshot_cpu_ms", "decide_cpu_ms", "crossing_tick_ms",
                "crossing_tick_cpu_ms")},
            "cpus": os.cpu_count(),
            "load_avg": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        await drop_db(args.dsn, dsn)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", default=os.environ.get("GARDENER_TEST_DATABASE_URL")
                    or "postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 250, 500, 1000])
    ap.add_argument("--filler", type=int, default=0, help="live trials in other races")
    ap.add_argument("--repeat", type=int, default=9)
    print(json.dumps(asyncio.run(main(ap.parse_args())), indent=2))
