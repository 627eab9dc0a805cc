"""Leadership: one PostgreSQL session advisory lock on a dedicated connection.

Only the holder ticks, applies and reconciles; a second ``gardener run`` on the same database
stands by (it still serves HTTP ingest, which is idempotent), retries ``pg_try_advisory_lock``
every ``retry`` seconds, and takes over within about that long once the leader's session
ends (PostgreSQL releases a session lock when its connection dies). A leader whose lock
connection breaks cannot know whether it still holds the lock, so it raises
``LeadershipLost`` and the process exits non-zero for the platform to restart it.
"""

from __future__ import annotations

import anyio
import asyncpg
import structlog

from gardener.errors import ConfigError, GardenerError
from gardener.ledger import db
from gardener.loop import metrics
from gardener.loop.control import LoopState

LEADER_LOCK = 0x6761_7264_6C64  # "gardld": the advisory lock key of the loop's leader
log = structlog.get_logger("gardener.loop.leader")  # lazy: resolved after logs.configure


class LeadershipLost(GardenerError):
    """The lock connection broke while leading: stop acting at once."""


_DB_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    ConnectionError,
    TimeoutError,
    ConfigError,
)


class Leadership:
    """Acquire and hold the leader lock; ``became_leader`` is set once it is held."""

    def __init__(
        self,
        dsn: str,
        state: LoopState,
        *,
        key: int = LEADER_LOCK,
        retry: float = 1.0,
        check_every: float = 2.0,
    ) -> None:
        self.dsn = dsn
        self.state = state
        self.key = key
        self.retry = retry
        self.check_every = check_every
        self.became_leader = anyio.Event()

    async def run(self) -> None:
        """Stand by until the lock is ours, then hold it until the stop event."""
        conn: asyncpg.Connection | None = None
        announced_standby = False
        try:
            while not self.state.stop.is_set():
                try:
                    if conn is None or conn.is_closed():
                        conn = await db.connect(self.dsn)
                    got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key)
                except _DB_ERRORS as exc:
                    log.warning("leader_lock_unavailable", error=str(exc) or type(exc).__name__)
                    await _drop(conn)
                    conn = None
                    got = False
                if got:
                    break
                if not announced_standby:
                    self.state.role = "standby"
                    metrics.LEADER.set(0)
                    log.info("standby", retry_s=self.retry)
                    announced_standby = True
                with anyio.move_on_after(self.retry):
                    await self.state.stop.wait()
            if self.state.stop.is_set():
                return
            assert conn is not None
            self.state.role = "leader"
            metrics.LEADER.set(1)
            log.info("leader_acquired", after_standby=announced_standby)
            self.became_leader.set()
            while not self.state.stop.is_set():
                with anyio.move_on_after(self.check_every):
                    await self.state.stop.wait()
                if self.state.stop.is_set():
                    break
                try:
                    with anyio.fail_after(self.check_every * 2):
                        await conn.fetchval("SELECT 1")
                except _DB_ERRORS as exc:
                    metrics.LEADER.set(0)
                    log.error("leader_lost", error=str(exc) or type(exc).__name__)
                    raise LeadershipLost(f"the leader lock connection broke: {exc}") from exc
        finally:
            await _drop(conn)


async def _drop(conn: asyncpg.Connection | None) -> None:
    """Close a connection (which releases the session lock); never raise."""
    if conn is None or conn.is_closed():
        return
    with anyio.CancelScope(shield=True):
        try:
            await conn.close(timeout=2)
        except Exception:  # a broken connection: terminate it
            conn.terminate()
