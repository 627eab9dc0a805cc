"""``python -m tests.memory_daemon DSN [POLL_INTERVAL] [LOG_LEVEL]``: the real daemon on an
in-memory backend, for tests and benchmarks about the ledger rather than the trainers.

Every trial "runs" as soon as it is ensured, nothing prints logs, nothing is spawned. The
trials the ledger already wants running are running when the daemon starts (as after a
restart of a daemon whose services live on), so a fleet of ten thousand is not created anew.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterable

import anyio
import asyncpg

from gardener import logs
from gardener.backends.base import EnsureOutcome, LogLine, ServiceSpec, ServiceState, Status
from gardener.loop import daemon
from gardener.loop.daemon import serve
from gardener.settings import Settings


class MemoryBackend:
    kind = "memory"

    def __init__(self, account: str, running: Iterable[str] = ()) -> None:
        self.account = account
        self.services: dict[str, Status] = dict.fromkeys(running, Status.RUNNING)
        # A service's state is made again only when its status changed (a platform's listing
        # is parsed once): ten thousand new states per observe took 20-100 ms of the loop.
        self._states: dict[str, ServiceState] = {}

    async def observe(self) -> list[ServiceState]:
        out = []
        for n, s in self.services.items():
            state = self._states.get(n)
            if state is None or state.status is not s:
                state = self._states[n] = ServiceState(n, n, n, s, s.value, True)
            out.append(state)
        return out

    async def ensure(self, spec: ServiceSpec) -> EnsureOutcome:
        self.services[spec.canon_name] = Status.RUNNING
        return EnsureOutcome.CREATED

    async def stop(self, name: str, *, account: str | None = None) -> bool:
        self.services[name] = Status.STOPPED
        return True

    async def remove(self, name: str, *, account: str | None = None) -> bool:
        return self.services.pop(name, None) is not None

    async def tail(self, name: str, cursor: str | None = None) -> list[LogLine]:
        return []

    async def logs(self, name: str, *, poll_interval: float = 2.0) -> AsyncIterator[LogLine]:
        for line in await self.tail(name):
            yield line

    async def aclose(self) -> None:
        pass


def main(argv: list[str]) -> None:
    dsn = argv[1]
    poll = float(argv[2]) if len(argv) > 2 else 0.2
    level = argv[3] if len(argv) > 3 else "info"
    settings = Settings(account="acc1", poll_interval=poll)
    logs.configure("json", level)
    if os.environ.get("GARDENER_BENCH_LEADER_KEY"):
        # A benchmark on a shared server: a test elsewhere that ends every holder of the
        # usual leader key on the whole server (code before 0008's fix) must not end this one.
        daemon.LEADER_LOCK = int(os.environ["GARDENER_BENCH_LEADER_KEY"])

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            running = [r["canon_name"] for r in await conn.fetch(
                "SELECT canon_name FROM igla_race_trials WHERE desired_state = 'running' "
                "AND account = $1", settings.account)]
        finally:
            await conn.close()
        await serve(settings, dsn=dsn, backend_factory=lambda acc: MemoryBackend(acc, running),
                    http=False)

    anyio.run(run)


if __name__ == "__main__":
    main(sys.argv)
