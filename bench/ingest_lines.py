"""Throughput of the log-line path: trainer lines -> parse -> SampleWriter -> PostgreSQL.

Many concurrent sources (one per trial, like the daemon's log tails) submit chunks of lines
through the real writer; the clock runs from the first submit to the last commit. The same
rows are then loaded with one raw COPY into the emptied table, the upper bound a batched
writer can approach, and the writer's rate is reported as a share of it. Runs in a throwaway
database on the given server, dropped at the end. Prints JSON.

    .venv/bin/python bench/ingest_lines.py [--dsn URL] [--trials 200] [--steps 2500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from gardener.ingest import metrics
from gardener.ingest.parse import parse_lines
from gardener.ingest.writer import SampleWriter
from gardener.ledger import db, migrate

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def with_database(dsn: str, name: str) -> str:
    p = urlsplit(dsn)
    return urlunsplit((p.scheme, p.netloc, "/" + name, p.query, p.fragment))


async def make_database(server_dsn: str) -> tuple[str, str]:
    name = f"gardener_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(server_dsn, name)
    conn = await db.connect(dsn)
    try:
        await migrate.migrate(conn)
    finally:
        await conn.close()
    return name, dsn


async def drop_database(server_dsn: str, name: str) -> None:
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def add_trials(conn: asyncpg.Connection, n: int, account: str = "acc1") -> list[str]:
    """n trials in one race (a direct insert: admission rules are not what is measured)."""
    names = [f"IGLA-HYBRID-FP32-BENCH-E{1000 + i:04d}-seed{i}" for i in range(n)]
    await conn.execute("INSERT INTO races (name, account) VALUES ('bench', $1)", account)
    await conn.executemany(
        "INSERT INTO igla_race_trials (canon_name, race, account, model, format, tags, variant,"
        " seed, exp_id) VALUES ($1, 'bench', $2, 'HYBRID', 'FP32', '{BENCH}',"
        " 'HYBRID-FP32-BENCH', $3, $4)",
        [(name, account, i, 1000 + i) for i, name in enumerate(names)],
    )
    return names


def trainer_lines(steps: int, rng: random.Random) -> list[str]:
    """A plausible curve printed like the trainer prints it."""
    a, p, inf = rng.uniform(2, 4), rng.uniform(0.3, 0.6), rng.uniform(1.9, 2.3)
    return [
        f"step={s} BPB={min(9.9999, inf + a * (s + 1) ** -p + rng.gauss(0, 0.003)):.4f}"
        for s in range(0, steps * 10, 10)
    ]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def run(args: argparse.Namespace) -> dict[str, object]:
    name, dsn = await make_database(args.dsn)
    pool = await db.create_pool(dsn, min_size=2, max_size=4)
    try:
        async with pool.acquire() as conn:
            trials = await add_trials(conn, args.trials)
            seeds = dict(await conn.fetch("SELECT canon_name, seed FROM igla_race_trials"))
        rng = random.Random(7)
        curves = {t: trainer_lines(args.steps, rng) for t in trials}
        total = sum(len(v) for v in curves.values())

        t0 = time.perf_counter()
        for lines in curves.values():
            parse_lines(lines)
        parse_s = time.perf_counter() - t0

        load_before = loadavg()
        batches_before = metrics.BATCH_SECONDS._sum.get()
        async with SampleWriter(pool, max_batch=args.max_batch, max_latency=0.05) as writer:

            async def tail(trial: str) -> int:
                lines = curves[trial]
                accepted = 0
                for k in range(0, len(lines), args.chunk):
                    res = await writer.submit_lines(trial, lines[k : k + args.chunk], "bench")
                    accepted += res.count("accepted")
                return accepted

            t0 = time.perf_counter()
            accepted = sum(await asyncio.gather(*(tail(t) for t in trials)))
            write_s = time.perf_counter() - t0
        in_batches = metrics.BATCH_SECONDS._sum.get() - batches_before
        load_after = loadavg()

        async with pool.acquire() as conn:
            stored = await conn.fetchval("SELECT count(*) FROM bpb_samples")
            assert stored == total == accepted, (stored, total, accepted)
            summaries = await conn.fetchval(
                "SELECT count(*) FROM igla_race_trials WHERE last_step = $1", (args.steps - 1) * 10
            )
            assert summaries == args.trials
            # The same rows by one raw COPY into the emptied table.
            records = []
            for trial, lines in curves.items():
                seed = seeds[trial]
                for line in lines:
                    step_t, bpb_t = line.split()
                    records.append((trial, seed, int(step_t[5:]), float(bpb_t[4:]), "bench"))
            await conn.execute("TRUNCATE bpb_samples")
            await conn.execute("VACUUM ANALYZE bpb_samples")
            t0 = time.perf_counter()
            await conn.copy_records_to_table(
                "bpb_samples",
                records=records,
                columns=["canon_name", "seed", "step", "bpb", "source"],
            )
            copy_s = time.perf_counter() - t0
        rate, copy_rate = total / write_s, total / copy_s
        return {
            "bench": "ingest_lines",
            "samples": total,
            "trials": args.trials,
            "chunk_lines": args.chunk,
            "max_batch": args.max_batch,
            "parse_only_per_s": round(total / parse_s),
            "writer_seconds": round(write_s, 3),
            "writer_samples_per_s": round(rate),
            "seconds_inside_batches": round(in_batches, 3),
            "raw_copy_seconds": round(copy_s, 3),
            "raw_copy_samples_per_s": round(copy_rate),
            "share_of_raw_copy": round(rate / copy_rate, 3),
            "target_samples_per_s": 50_000,
            "meets_target": rate >= 50_000,
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        }
    finally:
        await pool.close()
        await drop_database(args.dsn, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("GARDENER_BENCH_DSN", DEFAULT_DSN))
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--steps", type=int, default=2500, help="samples per trial")
    ap.add_argument("--chunk", type=int, default=500, help="lines per submit (one log fetch)")
    ap.add_argument("--max-batch", type=int, default=10_000)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
