"""Ledger figures: migration time on an empty database, and EXP_ID claim throughput.

Prints JSON. ``python bench/ledger_basics.py [--dsn URL] [--claimers 8] [--claims 500]``
uses a throwaway database on the server (created and dropped here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from gardener.ledger import db, expid, migrate  # noqa: E402


def with_db(dsn: str, name: str) -> str:
    p = urlsplit(dsn)
    return urlunsplit((p.scheme, p.netloc, "/" + name, p.query, p.fragment))


async def main(dsn: str, claimers: int, claims: int) -> dict[str, object]:
    name = f"gardener_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        target = with_db(dsn, name)
        conn = await db.connect(target)
        t0 = time.perf_counter()
        applied = await migrate.migrate(conn)
        migrate_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        await migrate.migrate(conn)
        again_s = time.perf_counter() - t0
        await conn.close()

        pool = await db.create_pool(target, min_size=claimers, max_size=claimers)

        async def claimer(i: int) -> list[int]:
            got: list[int] = []
            async with pool.acquire() as c:
                for _ in range(claims):
                    got += await expid.claim(c, "acc1", 1, by=f"bench{i}")
            return got

        total = claimers * claims
        if total > 9990:
            raise SystemExit("claimers x claims must stay below the 9,995 free EXP_IDs")
        t0 = time.perf_counter()
        results = await asyncio.gather(*(claimer(i) for i in range(claimers)))
        claim_s = time.perf_counter() - t0
        ids = [x for r in results for x in r]
        await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return {
        "benchmark": "ledger_basics",
        "migrations": applied,
        "migrate_empty_s": round(migrate_s, 4),
        "migrate_again_s": round(again_s, 4),
        "claimers": claimers,
        "claims": total,
        "duplicates": total - len(set(ids)),
        "claims_per_s": round(total / claim_s, 1),
        "seconds": round(claim_s, 3),
        "load_avg_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dsn", default=os.environ.get(
        "GARDENER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--claimers", type=int, default=8)
    ap.add_argument("--claims", type=int, default=500)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args.dsn, args.claimers, args.claims)), indent=2))
