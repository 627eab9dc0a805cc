"""Benchmark: a 21-service race reconciled against the fake Railway, without and with faults.

Prints one JSON object: for the fault-free run and for each seeded run with ``--rate`` of the
requests failing (a mix of 429 + Retry-After, 500, timeout, HTML body, error in a 200, and an
operation that runs while the client times out), the requests the server saw, passes, wall
time, services per canon name (duplicates), orphans and deployments. Target: every faulty run
converges with no duplicate and no orphan in at most twice the fault-free requests.

Run by hand: ``.venv/bin/python bench/reconcile_faults.py [--rate 0.2] [--seeds 5]``.
Retry sleeps are scaled by ``--sleep-scale`` (Retry-After: 1 s becomes 10 ms) so a run takes
seconds; the requests counted are the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gardener.backends.base import CANON_VAR, ServiceSpec, Status
from gardener.backends.railway.backend import RailwayBackend
from gardener.backends.railway.client import RailwayClient, RequestBudget
from gardener.backends.reconcile import Backoff, reconcile_once
from tests.fake_railway import FakeRailway

TAGS = ["WSD", "BS8", "GRADFIX", "EMA10", "h512", "h768", "COSINE"]


def race() -> list[ServiceSpec]:
    return [
        ServiceSpec(
            canon_name=f"IGLA-HYBRID-FP32-{tag}-SMOKE-seed{seed}", account="acc1",
            variables={"TRAIN_STEPS": "500"}, image="ghcr.io/example/gardener:bench",
            start_command="python -m gardener.trainer", race="smoke",
        )
        for tag in TAGS
        for seed in (500, 501, 502)
    ]


async def run(fake: FakeRailway, rate: float, seed: int, sleep_scale: float) -> dict[str, Any]:
    token = f"bench-{seed}-{rate}"
    project_id, environment_id = fake.add_project(token)

    async def scaled_sleep(delay: float) -> None:
        await asyncio.sleep(delay * sleep_scale)

    client = RailwayClient(
        token, base_url=fake.url, timeout=0.25, budget=RequestBudget(100_000, per_second=None),
        sleep=scaled_sleep, rng=random.Random(seed), backoff_base=0.05, backoff_max=0.5,
    )
    backend = RailwayBackend(
        "acc1", client, project_id=project_id, environment_id=environment_id, deploy_grace=1.0
    )
    desired = race()
    backoff = Backoff(base=0.05, cap=1.0, rng=random.Random(seed))
    before = fake.requests
    faults_before = sum(fake.faults_injected.values())
    fake.set_fault_rate(rate, seed=seed)
    t0 = time.perf_counter()
    passes, converged = 0, False
    try:
        for passes in range(1, 500):  # noqa: B007
            report = await reconcile_once(desired, backend, backoff=backoff)
            if report.converged:
                states = await backend.observe()
                running = {s.canon_name for s in states if s.status is Status.RUNNING}
                if running >= {d.canon_name for d in desired}:
                    converged = True
                    break
            await asyncio.sleep(0.05)
    finally:
        fake.set_fault_rate(0.0)
    wall = time.perf_counter() - t0
    services = [s for s in fake.all_services() if s.project_id == project_id]
    counts = Counter(s.variables.get(CANON_VAR) for s in services)
    wanted = {d.canon_name for d in desired}
    await backend.aclose()
    return {
        "fault_rate": rate,
        "seed": seed,
        "converged": converged,
        "passes": passes,
        "requests": fake.requests - before,
        "faults_injected": sum(fake.faults_injected.values()) - faults_before,
        "services": len(services),
        "duplicates": sum(n - 1 for c, n in counts.items() if c in wanted and n > 1),
        "orphans": sum(1 for c in counts if c not in wanted),
        "missing": len(wanted - set(counts)),
        "deployments": sum(len(s.deployments) for s in services),
        "wall_seconds": round(wall, 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sleep-scale", type=float, default=0.01)
    args = parser.parse_args()
    with FakeRailway(step_seconds=0.01, visibility_delay=0.03, timeout_sleep=0.35) as fake:
        clean = await run(fake, 0.0, 0, args.sleep_scale)
        faulty = [await run(fake, args.rate, s, args.sleep_scale) for s in range(1, args.seeds + 1)]
    ratios = [f["requests"] / clean["requests"] for f in faulty]
    out = {
        "benchmark": "reconcile_faults",
        "services": 21,
        "fault_free": clean,
        "faulty": faulty,
        "request_ratio_max": round(max(ratios), 3),
        "request_ratio_mean": round(sum(ratios) / len(ratios), 3),
        "target_met": all(
            f["converged"] and f["duplicates"] == 0 and f["orphans"] == 0 and f["missing"] == 0
            for f in faulty
        ) and max(ratios) <= 2.0,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    asyncio.run(main())
