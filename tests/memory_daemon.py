"""``python -m tests.memory_daemon DSN [POLL_INTERVAL] [LOG_LEVEL]``: the real daemon on an
in-memory backend, for tests and benchmarks about the ledger rather than the trainers.

Every trial "runs" as soon as it is ensured, nothing prints logs, nothing is spawned.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import anyio

from gardener import logs
from gardener.backends.base import EnsureOutcome, LogLine, ServiceSpec, ServiceState, Status
from gardener.loop.daemon import serve
from gardener.settings import Settings


class MemoryBackend:
    kind = "memory"

    def __init__(self, account: str) -> None:
        self.account = account
        self.services: dict[str, Status] = {}

    async def observe(self) -> list[ServiceState]:
        return [ServiceState(n, n, n, s, s.value, True) for n, s in self.services.items()]

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
    anyio.run(lambda: serve(settings, dsn=dsn, backend_factory=MemoryBackend, http=False))


if __name__ == "__main__":
    main(sys.argv)
