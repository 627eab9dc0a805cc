"""A fake Railway GraphQL API on 127.0.0.1 for tests and benchmarks.

It is a real HTTP server (starlette under uvicorn, in a thread with its own event loop) that
parses and validates every document against Railway's public schema and executes it with
graphql-core against in-memory projects, services, variables and deployments. It keeps the
rules that break naive clients: names of at most 32 characters, unique per project
(``A service named "..." already exists in this project``), a bearer token per project,
deployments that move QUEUED -> INITIALIZING -> BUILDING -> DEPLOYING -> SUCCESS and appear in
reads only after a short delay, CRASHED on demand, and deployment logs with RFC 3339
nanosecond timestamps. Faults are injected on request (scripted, or at a seeded rate): 429 with
Retry-After, 500, a timeout, an HTML body, an error in a 200, and an operation that runs on the
server while the client times out. Every request is counted.

With ``run_processes=True`` it is a local Railway emulator: a deploy starts the service's start
command as a local process group with the service's variables (and the ones Railway adds), its
output is the deployment's log, its exit ends the deployment, and a stop really stops it.
"""

from __future__ import annotations

import asyncio
import random

from gardener.backends.railway.backend import RailwayBackend
from gardener.backends.railway.client import RailwayClient, RequestBudget
from tests.fake_railway.server import FAULT_KINDS, FakeRailway

__all__ = ["FAULT_KINDS", "FakeRailway", "make_backend"]


def make_backend(
    fake: FakeRailway,
    project: tuple[str, str],
    token: str,
    *,
    account: str = "acc1",
    budget_per_hour: int = 100_000,
    timeout: float = 1.0,
    deploy_grace: float = 0.5,
    **client_kw: object,
) -> RailwayBackend:
    """A RailwayBackend pointed at the fake, with a fast (recorded) retry sleep."""
    sleeps: list[float] = []

    async def fast_sleep(delay: float) -> None:
        sleeps.append(delay)
        await asyncio.sleep(0)

    client = RailwayClient(
        token, base_url=fake.url, timeout=timeout,
        budget=RequestBudget(budget_per_hour, per_second=None), sleep=fast_sleep,
        rng=random.Random(0), label="railway-test", **client_kw,
    )
    client.sleeps = sleeps
    return RailwayBackend(
        account, client, project_id=project[0], environment_id=project[1],
        deploy_grace=deploy_grace,
    )
