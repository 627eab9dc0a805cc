"""CPU used by an idle daemon: nothing arrives, nothing to decide; it only polls and listens.

Two cases on a fresh database: ``gardener run`` itself (local backend, empty ledger, HTTP on),
and the daemon on an in-memory backend watching ``--trials`` live trials that report nothing
(so its reconcile passes, log pump and tick queries run over a full fleet). Each is measured
from /proc as the process's user + system CPU time over ``--seconds`` after a warm-up.

    .venv/bin/python bench/idle_cpu.py --dsn postgresql://postgres@127.0.0.1/postgres

Prints one JSON object. The target: under 2% of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from decision_latency import ROOT, cpu_seconds, create_db, drop_db, populate, start_daemon

from gardener.ledger import db, migrate


async def measure(proc: subprocess.Popen[bytes], warmup: float, seconds: float) -> float:
    await asyncio.sleep(warmup)
    if proc.poll() is not None:
        raise RuntimeError(f"the daemon exited with {proc.returncode}")
    c0, t0 = cpu_seconds(proc.pid), time.monotonic()
    await asyncio.sleep(seconds)
    c1, t1 = cpu_seconds(proc.pid), time.monotonic()
    return 100.0 * (c1 - c0) / (t1 - t0)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9


async def main(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {"benchmark": "idle_cpu", "seconds": args.seconds,
                              "poll_interval_s": args.poll, "target_percent_of_core": 2.0}
    tmp = Path(tempfile.mkdtemp(prefix="gardener-idle-"))
    # 1. gardener run, empty ledger, local backend, HTTP on.
    dsn = await create_db(args.dsn)
    try:
        env = {**os.environ, "DATABASE_URL": dsn, "PORT": "0", "GARDENER_HOST": "127.0.0.1",
               "GARDENER_DATA_DIR": str(tmp / "data"), "GARDENER_LOG_FORMAT": "json",
               "GARDENER_LOG_LEVEL": "warning", "GARDENER_POLL_INTERVAL": str(args.poll)}
        with (tmp / "run.log").open("wb") as log:
            proc = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
                [str(Path(sys.executable).parent / "gardener"), "run", "--account", "acc1"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                pct = await measure(proc, args.warmup, args.seconds)
            finally:
                rc = stop(proc)
        out["gardener_run_empty"] = {"cpu_percent_of_core": round(pct, 3), "exit_code": rc}
    finally:
        await drop_db(args.dsn, dsn)
    # 2. A fleet of live trials that report nothing.
    if args.trials > 0:
        dsn = await create_db(args.dsn)
        try:
            conn = await db.connect(dsn)
            await migrate.migrate(conn)
            await populate(conn, max(1, args.trials // 100), min(100, args.trials), 450, 0)
            await conn.close()
            proc = start_daemon(dsn, tmp / "fleet.log", args.poll)
            try:
                pct = await measure(proc, args.warmup + 5.0, args.seconds)
            finally:
                rc = stop(proc)
            out["idle_fleet"] = {"live_trials": args.trials, "cpu_percent_of_core": round(pct, 3),
                                 "exit_code": rc}
        finally:
            await drop_db(args.dsn, dsn)
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    out["meets_target"] = all(
        v["cpu_percent_of_core"] < 2.0 for v in out.values() if isinstance(v, dict)
    )
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", default=os.environ.get("GARDENER_TEST_DATABASE_URL")
                    or "postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--poll", type=float, default=2.0)
    ap.add_argument("--trials", type=int, default=1000)
    print(json.dumps(asyncio.run(main(ap.parse_args())), indent=2))
