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
"""

from __future__ import annotations

from tests.fake_railway.server import FAULT_KINDS, FakeRailway

__all__ = ["FAULT_KINDS", "FakeRailway"]
