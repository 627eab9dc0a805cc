"""``python -m tests.recording_daemon DSN CALLS_FILE [DELAY] [RECONCILE_INTERVAL]``: the real
daemon (HTTP included, settings from the environment) on an in-memory platform that appends
every mutating call to ``CALLS_FILE`` as a JSON line with its wall-clock start and pid, so a
test can tell which process called the platform when. The services themselves are kept in
``CALLS_FILE.services.json``: like a real platform's, they outlive a daemon that is killed.

With ``GARDENER_TEST_RESTLESS=1`` every service is seen stopped again at each observe, so
the reconciler calls ``ensure`` on every pass: a steady stream of platform calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import anyio

from gardener import logs
from gardener.backends.base import EnsureOutcome, ServiceSpec, ServiceState, Status
from gardener.loop.daemon import serve
from gardener.settings import Settings
from tests.memory_daemon import MemoryBackend


class RecordingBackend(MemoryBackend):
    """The in-memory platform, its services kept in a file and every mutating call recorded
    (logs: none, as the in-memory one)."""

    def __init__(self, account: str, calls: str, delay: float) -> None:
        self.account = account
        self.calls = calls
        self.delay = delay
        self.restless = os.environ.get("GARDENER_TEST_RESTLESS") == "1"
        # The platform outlives the daemon (as Railway's services do): kept in a file.
        self.state = calls + ".services.json"
        try:
            with open(self.state) as fh:
                self.services = {n: Status(s) for n, s in json.load(fh).items()}
        except FileNotFoundError:
            self.services = {}

    def _save(self) -> None:
        tmp = self.state + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({n: s.value for n, s in self.services.items()}, fh)
        os.replace(tmp, self.state)

    def _record(self, verb: str, name: str) -> None:
        with open(self.calls, "a") as fh:
            fh.write(json.dumps({"t": time.time(), "pid": os.getpid(), "verb": verb,
                                 "name": name}) + "\n")

    async def observe(self) -> list[ServiceState]:
        status = {n: (Status.STOPPED if self.restless else s) for n, s in self.services.items()}
        return [ServiceState(n, n, n, s, s.value, True) for n, s in status.items()]

    async def ensure(self, spec: ServiceSpec) -> EnsureOutcome:
        self._record("ensure", spec.canon_name)
        await asyncio.sleep(self.delay)
        self.services[spec.canon_name] = Status.RUNNING
        self._save()
        return EnsureOutcome.CREATED

    async def stop(self, name: str, *, account: str | None = None) -> bool:
        self._record("stop", name)
        await asyncio.sleep(self.delay)
        self.services[name] = Status.STOPPED
        self._save()
        return True

    async def remove(self, name: str, *, account: str | None = None) -> bool:
        self._record("remove", name)
        gone = self.services.pop(name, None) is not None
        self._save()
        return gone


def main(argv: list[str]) -> None:
    dsn, calls = argv[1], argv[2]
    delay = float(argv[3]) if len(argv) > 3 else 0.0
    interval = float(argv[4]) if len(argv) > 4 else 15.0
    settings = Settings(account="acc1")
    logs.configure("json", settings.log_level)
    anyio.run(lambda: serve(
        settings, dsn=dsn, backend_factory=lambda acc: RecordingBackend(acc, calls, delay),
        reconcile_interval=interval,
    ))


if __name__ == "__main__":
    main(sys.argv)
