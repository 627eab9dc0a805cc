"""Leadership: a PostgreSQL session advisory lock, a lease with a deadline, a fencing token.

Only the holder ticks, applies and reconciles; a second ``gardener run`` on the same database
stands by (it still serves HTTP ingest, which is idempotent) and retries
``pg_try_advisory_lock`` every ``retry`` seconds. The lock alone is not enough: when the
leader is cut off from the server (a partition), the server keeps its session, and the lock,
until TCP gives up, hours later. So the leader also renews a lease (``gardener_leader``, one
row, migration 0007) every ``renew_every`` seconds with a deadline ``ttl`` seconds ahead, and
its lock session asks the server for short TCP keepalives. A standby that sees the deadline
pass says so (``/readyz``, ``gardener_leader_gone``), ends the stale lock session
(``pg_terminate_backend``) and takes the lock.

Each new leader raises the lease's ``epoch``: its fencing token. ``fence(conn)`` runs first in
every mutating transaction and locks the row FOR SHARE with that epoch, so once a new leader
has raised it, the old one commits nothing; ``still_leader()`` is asked before every platform
call. A leader also stops on its own once it has not renewed within ``ttl`` (its clock, from
before the renewal was sent, so before the server's deadline): it raises ``LeadershipLost``
and the process exits non-zero for the platform to restart it.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import asyncpg
import structlog

from gardener.errors import ConfigError, GardenerError
from gardener.ledger import db
from gardener.loop import metrics
from gardener.loop.control import LoopState

LEADER_LOCK = 0x6761_7264_6C64  # "gardld": the advisory lock key of the loop's leader
log = structlog.get_logger("gardener.loop.leader")  # lazy: resolved after logs.configure

# The lock session's TCP on the server side: a peer that stops answering is dropped within
# about 10 s instead of the kernel's default two hours.
KEEPALIVE_SETTINGS = {
    "tcp_keepalives_idle": "3",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "9000",
}


class LeadershipLost(GardenerError):
    """This process no longer holds the leadership (or cannot tell): stop acting at once."""


_DB_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    ConnectionError,
    TimeoutError,
    ConfigError,
)

_ACQUIRE = """
UPDATE gardener_leader
   SET epoch = epoch + 1, holder = $1, backend_pid = pg_backend_pid(), renewed_at = now(),
       deadline = now() + make_interval(secs => $2)
RETURNING epoch
"""
_RENEW = """
UPDATE gardener_leader SET renewed_at = now(), deadline = now() + make_interval(secs => $2)
 WHERE epoch = $1
RETURNING epoch
"""
_LEASE = """
SELECT epoch, holder, backend_pid, deadline IS NOT NULL AND deadline < now() AS expired,
       extract(epoch FROM now() - renewed_at)::float8 AS age
  FROM gardener_leader
"""
# Every session of a leader whose lease ran out: the one holding the lock (a bigint key is
# split into classid and objid) and the others it opened under its application_name (one of
# them may hold the lease row FOR SHARE in a transaction that will never end by itself). In
# this database only: pg_locks and pg_stat_activity span the server, where other ledgers'
# leaders hold the same key.
_END_HOLDER = """
SELECT pg_terminate_backend(a.pid)
  FROM pg_stat_activity a
 WHERE a.pid <> pg_backend_pid()
   AND a.datname = current_database()
   AND (a.pid IN (SELECT l.pid FROM pg_locks l
                   WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                     AND l.database = (SELECT oid FROM pg_database
                                        WHERE datname = current_database())
                     AND l.classid::bigint = ($1::bigint >> 32)
                     AND l.objid::bigint = ($1::bigint & 4294967295))
        OR ($2::text IS NOT NULL AND a.application_name = $2))
"""


def new_holder() -> str:
    """This process's name in the lease and in ``application_name`` (63 bytes at most)."""
    host = socket.gethostname()[:24]
    return f"gardener:{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[:63]


def session_dsn(dsn: str, holder: str) -> str:
    """``dsn`` with the session settings of a daemon's every connection: its holder name as
    ``application_name`` (so a successor can end them all) and short TCP keepalives (so the
    server drops them within seconds of a partition, not hours)."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.setdefault("application_name", holder)
    for name, value in KEEPALIVE_SETTINGS.items():
        if name != "tcp_user_timeout":  # PostgreSQL 12+: set on the lock session only
            query.setdefault(name, value)
    return urlunsplit(parts._replace(query=urlencode(query)))
_FENCE = "SELECT epoch FROM gardener_leader WHERE epoch = $1 FOR SHARE"


class Leadership:
    """Acquire and hold the leadership; ``became_leader`` is set once it is held."""

    def __init__(
        self,
        dsn: str,
        state: LoopState,
        *,
        key: int = LEADER_LOCK,
        retry: float = 1.0,
        renew_every: float = 2.0,
        ttl: float = 10.0,
        pool: asyncpg.Pool | None = None,
        holder: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.state = state
        self.key = key
        self.retry = retry
        self.renew_every = renew_every
        self.ttl = ttl
        self.pool = pool  # for still_leader(): a check on its own connection
        self.became_leader = anyio.Event()
        self.holder = holder or new_holder()
        self.epoch: int | None = None
        self._valid_until = 0.0  # monotonic: the lease is ours for sure until then

    # -- the fencing token ------------------------------------------------------------------
    def valid(self) -> bool:
        """Whether this process may still act, by its own clock (no query)."""
        return self.epoch is not None and time.monotonic() < self._valid_until

    async def fence(self, conn: asyncpg.Connection) -> None:
        """Run first inside a mutating transaction: raise unless the lease is still ours,
        and hold the row FOR SHARE until commit, so no new leader takes it meanwhile."""
        if not self.valid():
            metrics.FENCED.labels("transaction").inc()
            raise LeadershipLost("the leader lease ran out before this transaction")
        if await conn.fetchval(_FENCE, self.epoch) is None:
            metrics.FENCED.labels("transaction").inc()
            self._valid_until = 0.0
            raise LeadershipLost(f"another process leads now (our epoch was {self.epoch})")

    async def still_leader(self) -> bool:
        """Right before a platform call: the lease is ours by our clock and by the ledger."""
        if not self.valid():
            metrics.FENCED.labels("platform").inc()
            return False
        if self.pool is None:
            return True
        wait = min(2.0, self.ttl / 4)
        try:  # asyncpg's own timeouts: a cancelled query would leave the connection busy
            async with self.pool.acquire(timeout=wait) as conn:
                current = await conn.fetchval("SELECT epoch FROM gardener_leader", timeout=wait)
        except _DB_ERRORS:
            metrics.FENCED.labels("platform").inc()
            return False
        if current != self.epoch or not self.valid():
            metrics.FENCED.labels("platform").inc()
            return False
        return True

    # -- the task ---------------------------------------------------------------------------
    async def _connect(self) -> asyncpg.Connection:
        conn = await db.connect(self.dsn)
        try:
            for name, value in KEEPALIVE_SETTINGS.items():
                await conn.execute(f"SET {name} = {int(value)}")
        except asyncpg.PostgresError as exc:  # an old server without tcp_user_timeout
            log.warning("leader_keepalive_unset", error=str(exc))
        return conn

    async def _standby_look(self, conn: asyncpg.Connection) -> None:
        """The lock is taken: if its holder's lease ran out, say so and end its session."""
        row = await conn.fetchrow(_LEASE)
        if row is None:
            return
        if row["age"] is not None:
            metrics.LEASE_AGE.set(float(row["age"]))
        gone = bool(row["expired"])
        if gone != self.state.leader_gone:
            self.state.leader_gone = gone
            metrics.LEADER_GONE.set(1 if gone else 0)
            if gone:
                log.warning("leader_gone", holder=row["holder"], epoch=row["epoch"],
                            lease_age_s=round(float(row["age"] or 0), 1))
        if gone:
            ended = await conn.fetch(_END_HOLDER, self.key, row["holder"])
            if ended:
                log.warning("leader_session_ended", holder=row["holder"], sessions=len(ended))

    async def run(self) -> None:
        """Stand by until the lock is ours, then hold and renew it until the stop event."""
        conn: asyncpg.Connection | None = None
        announced_standby = False
        try:
            while not self.state.stop.is_set():
                got = False
                try:
                    if conn is None or conn.is_closed():
                        conn = await self._connect()
                    got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key))
                    if got:
                        sent = time.monotonic()
                        # Waits for a deposed leader's fenced transaction to end; one that
                        # never ends (its session cut off) is ended by the next look.
                        with anyio.fail_after(self.ttl):
                            epoch = await conn.fetchval(_ACQUIRE, self.holder, self.ttl)
                        self.epoch = int(epoch)
                        self._valid_until = sent + self.ttl
                    else:
                        await self._standby_look(conn)
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
            self.state.leader_gone = False
            self.state.fence = self.fence
            self.state.still_leader = self.still_leader
            metrics.LEADER.set(1)
            metrics.LEADER_GONE.set(0)
            log.info("leader_acquired", after_standby=announced_standby, epoch=self.epoch)
            self.became_leader.set()
            while not self.state.stop.is_set():
                with anyio.move_on_after(self.renew_every):
                    await self.state.stop.wait()
                if self.state.stop.is_set():
                    break
                sent = time.monotonic()
                try:
                    with anyio.fail_after(max(0.5, self._valid_until - sent)):
                        renewed = await conn.fetchval(_RENEW, self.epoch, self.ttl)
                except _DB_ERRORS as exc:
                    self._lost(f"the lease could not be renewed: {exc or type(exc).__name__}")
                if renewed is None:
                    self._lost(f"another process leads now (our epoch was {self.epoch})")
                self._valid_until = sent + self.ttl
        finally:
            await _drop(conn)

    def _lost(self, why: str) -> NoReturn:
        self._valid_until = 0.0
        metrics.LEADER.set(0)
        log.error("leader_lost", error=why, epoch=self.epoch)
        raise LeadershipLost(why)


async def _drop(conn: asyncpg.Connection | None) -> None:
    """Close a connection (which releases the session lock); never raise."""
    if conn is None or conn.is_closed():
        return
    with anyio.CancelScope(shield=True):
        try:
            with anyio.move_on_after(3):
                await conn.close(timeout=2)
                return
        except Exception:  # a broken connection: terminate it
            pass
        conn.terminate()
