"""Throughput of the HTTP path: httpx (keep-alive) -> uvicorn -> POST /v1/samples -> PostgreSQL.

The server is a separate process (this script with ``--serve``): a real uvicorn on
127.0.0.1 serving ``gardener.ingest.http.routes`` over a ``SampleWriter``, as the daemon
mounts them. The client posts batches of structured samples (and, in a second phase, raw
lines) from a few keep-alive connections and counts what the answers say was accepted.
Runs in a throwaway database, dropped at the end. Prints JSON.

    .venv/bin/python bench/ingest_http.py [--dsn URL] [--trials 100] [--batches 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_lines import (
    DEFAULT_DSN,
    add_trials,
    backend_cpu,
    cpu_delta,
    drop_database,
    loadavg,
    make_database,
    proc_cpu,
)

TOKEN = "bench-token-acc1"


async def serve(dsn: str, port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette

    from gardener.ingest.http import routes
    from gardener.ingest.writer import SampleWriter
    from gardener.ledger import db
    from gardener.settings import Settings

    os.environ["GARDENER_INGEST_TOKEN_ACC1"] = TOKEN
    pool = await db.create_pool(dsn, min_size=2, max_size=4)
    async with SampleWriter(pool) as writer:
        app = Starlette(routes=routes(writer, Settings(accounts=("acc1",))))
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off"
        )
        await uvicorn.Server(config).serve()
    await pool.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_up(base: str, proc: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient(base_url=base) as c:
        for _ in range(300):
            if proc.returncode is not None:
                raise RuntimeError("the server exited")
            try:
                await c.post("/v1/samples", json={})
                return
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    raise RuntimeError("the server did not come up")


async def post_all(base: str, bodies: list[bytes], connections: int) -> tuple[float, int, int]:
    """Post every body over ``connections`` keep-alive connections; (seconds, accepted, other)."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    accepted = other = 0
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal accepted, other
            while not queue.empty():
                body = queue.get_nowait()
                r = await client.post("/v1/samples", content=body, headers=headers)
                r.raise_for_status()
                counts = r.json()["counts"]
                accepted += counts.get("accepted", 0)
                other += sum(v for k, v in counts.items() if k != "accepted")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        return time.perf_counter() - t0, accepted, other


async def run(args: argparse.Namespace) -> dict[str, object]:
    from gardener.ledger import db

    name, dsn = await make_database(args.dsn)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", "--dsn", dsn, "--port", str(port)
    )
    try:
        conn = await db.connect(dsn)
        try:
            trials = await add_trials(conn, args.trials)
        finally:
            await conn.close()
        base = f"http://127.0.0.1:{port}"
        await wait_up(base, proc)
        rng = random.Random(3)
        per = args.batch_size
        # Structured: each batch carries one step of `per` trials... spread over all trials.
        structured: list[bytes] = []
        step = 0
        while len(structured) < args.batches:
            items = []
            for k in range(per):
                t = trials[(len(structured) * per + k) % len(trials)]
                items.append(
                    {
                        "canon_name": t,
                        "step": step + k // len(trials),
                        "bpb": round(rng.uniform(1.9, 3.5), 4),
                    }
                )
            step += per // len(trials) + 1
            structured.append(json.dumps({"samples": items}).encode())
        # Raw lines: one trial per batch, `per` consecutive steps.
        lines_bodies: list[bytes] = []
        base_step = 10_000_000
        for b in range(args.batches):
            t = trials[b % len(trials)]
            first = base_step + (b // len(trials)) * per
            lines = [f"step={first + k} BPB={rng.uniform(1.9, 3.5):.4f}" for k in range(per)]
            lines_bodies.append(json.dumps({"canon_name": t, "lines": lines}).encode())

        load_before = loadavg()
        conn = await db.connect(dsn)
        try:
            cpu: dict[str, dict[str, float]] = {}
            for phase, bodies in (("structured", structured), ("lines", lines_bodies)):
                pg0, srv0, cli0 = (
                    await backend_cpu(conn, name),
                    proc_cpu(proc.pid),
                    time.process_time(),
                )
                secs, acc, other = await post_all(base, bodies, args.connections)
                cpu[phase] = {
                    "seconds": secs,
                    "accepted": acc,
                    "other": other,
                    "client_cpu_s": time.process_time() - cli0,
                    "server_cpu_s": proc_cpu(proc.pid) - srv0,
                    "postgres_cpu_s": cpu_delta(pg0, await backend_cpu(conn, name)),
                }
        finally:
            await conn.close()
        load_after = loadavg()
        s_secs, s_acc, s_other = (cpu["structured"][k] for k in ("seconds", "accepted", "other"))
        l_secs, l_acc, l_other = (cpu["lines"][k] for k in ("seconds", "accepted", "other"))
        total = args.batches * per
        assert s_acc == total and l_acc == total, (s_acc, s_other, l_acc, l_other)
        conn = await db.connect(dsn)
        try:
            stored = await conn.fetchval("SELECT count(*) FROM bpb_samples")
        finally:
            await conn.close()
        assert stored == 2 * total
        s_rate, l_rate = total / s_secs, total / l_secs
        return {
            "bench": "ingest_http",
            "batch_size": per,
            "batches": args.batches,
            "connections": args.connections,
            "structured_seconds": round(s_secs, 3),
            "structured_samples_per_s": round(s_rate),
            "lines_seconds": round(l_secs, 3),
            "lines_samples_per_s": round(l_rate),
            # CPU seconds of the three processes (httpx client, uvicorn server, PostgreSQL
            # backends) per phase: what the work costs, whatever else the machine runs.
            "cpu": {
                phase: {k: round(v, 3) for k, v in c.items() if k.endswith("cpu_s")}
                for phase, c in cpu.items()
            },
            "target_samples_per_s": 10_000,
            "meets_target": min(s_rate, l_rate) >= 10_000,
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        }
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        await drop_database(args.dsn, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("GARDENER_BENCH_DSN", DEFAULT_DSN))
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        from gardener import logs

        logs.configure("console", "warning", stream=sys.stderr)
        asyncio.run(serve(args.dsn, args.port))
        return
    from gardener import logs

    logs.configure("console", "warning", stream=sys.stderr)  # stdout is the JSON answer
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
