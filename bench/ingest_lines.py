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
import sys
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


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process on this machine has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def backend_cpu(conn: asyncpg.Connection, database: str) -> dict[int, float]:
    """CPU seconds of every server process connected to ``database`` (the server must run on
    this machine; elsewhere the figures are 0)."""
    pids = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", database)
    return {r["pid"]: proc_cpu(r["pid"]) for r in pids}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


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
        async with pool.acquire() as conn:
            pg_before = await backend_cpu(conn, name)
        py_before = time.process_time()
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
        py_cpu = time.process_time() - py_before
        in_batches = metrics.BATCH_SECONDS._sum.get() - batches_before
        load_after = loadavg()
        async with pool.acquire() as conn:
            pg_cpu = cpu_delta(pg_before, await backend_cpu(conn, name))

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
            me = await conn.fetchval("SELECT pg_backend_pid()")
            copy_pg_before, copy_py_before = proc_cpu(me), time.process_time()
            t0 = time.perf_counter()
            await conn.copy_records_to_table(
                "bpb_samples",
                records=records,
                columns=["canon_name", "seed", "step", "bpb", "source"],
            )
            copy_s = time.perf_counter() - t0
            copy_py_cpu = time.process_time() - copy_py_before
            copy_pg_cpu = proc_cpu(me) - copy_pg_before
        rate, copy_rate = total / write_s, total / copy_s
        cpu_rate = total / (py_cpu + pg_cpu) if py_cpu + pg_cpu else None
        copy_cpu_rate = total / (copy_py_cpu + copy_pg_cpu) if copy_py_cpu + copy_pg_cpu else None
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
            # CPU seconds spent (this process + its server backends): what the work costs,
            # whatever else the machine runs; samples per CPU-second of the two together.
            "writer_cpu_client_s": round(py_cpu, 3),
            "writer_cpu_server_s": round(pg_cpu, 3),
            "writer_samples_per_cpu_s": round(cpu_rate) if cpu_rate else None,
            "raw_copy_cpu_client_s": round(copy_py_cpu, 3),
            "raw_copy_cpu_server_s": round(copy_pg_cpu, 3),
            "raw_copy_samples_per_cpu_s": round(copy_cpu_rate) if copy_cpu_rate else None,
            "cpu_share_of_raw_copy": (
                round(cpu_rate / copy_cpu_rate, 3) if cpu_rate and copy_cpu_rate else None
            ),
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
    from gardener import logs

    logs.configure("console", "warning", stream=sys.stderr)  # stdout is the JSON answer
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
