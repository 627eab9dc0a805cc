"""How the loop is woken and steered: LISTEN on a dedicated connection, and shared state.

NOTIFY is only a hint: ``gardener_samples`` wakes the tick early, ``gardener_desired`` wakes
the reconciler when a trial's desired state changed, ``gardener_control`` flips the pause
flag at once (so a pause takes effect well within a second) and, with a tripwire
acknowledgement, makes the tick re-decide the held race at once; the tick re-reads the
flag from the table each time and finds new samples by watermark, so a lost notification
costs at most one poll interval. The listening connection lives outside the pool and is
re-opened when it drops.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
import structlog

from gardener.errors import ConfigError
from gardener.ledger import db
from gardener.ledger.control import CONTROL_CHANNEL
from gardener.loop import metrics

SAMPLES_CHANNEL = "gardener_samples"
# Errors of the connection, not of the statement: a blip to wait out, never a reason to die.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash shutdown, not yet up
)
DESIRED_CHANNEL = "gardener_desired"  # igla_race_trials.desired_state changed (0003_loop.sql)
log = structlog.get_logger("gardener.loop.control")  # lazy: resolved after logs.configure


class Wakeup:
    """A re-armable event: ``set`` from anywhere in the loop, ``wait`` with a timeout."""

    def __init__(self) -> None:
        self._event = anyio.Event()
        self.seq = 0  # counts wake-ups, so a caller can tell whether one came since it looked

    def set(self) -> None:
        self.seq += 1
        self._event.set()

    async def wait(self, seconds: float) -> bool:
        """True when woken, False on timeout; re-arms before returning (no lost wake-up)."""
        woken = False
        with anyio.move_on_after(seconds):
            await self._event.wait()
            woken = True
        if self._event.is_set():
            self._event = anyio.Event()
            woken = True
        return woken


@dataclass
class LoopState:
    """What the daemon's tasks share: role, pause flag, wake-ups, the stop signal."""

    stop: anyio.Event
    role: str = "starting"  # starting | standby | leader | stopping
    paused: bool = False
    pause_reason: str | None = None
    tick_wakeup: Wakeup = field(default_factory=Wakeup)
    reconcile_wakeup: Wakeup = field(default_factory=Wakeup)
    last_tick_at: float | None = None
    last_reconcile_at: float | None = None
    http_port: int | None = None
    started_at: float = field(default_factory=time.time)
    # Set by the leadership while leading: run first in every mutating transaction, it raises
    # LeadershipLost unless this process still holds the leadership (a fencing token).
    fence: Callable[[asyncpg.Connection], Awaitable[None]] | None = None
    # Asked right before every mutating platform call: still the leader, right now.
    still_leader: Callable[[], Awaitable[bool]] | None = None
    leader_gone: bool = False  # a standby sees the leader's lease run out

    def set_paused(self, paused: bool, reason: str | None, by: str | None, source: str) -> None:
        """Record the flag; log and wake everyone when it changed."""
        changed = paused != self.paused
        self.paused, self.pause_reason = paused, reason
        metrics.PAUSED.set(1 if paused else 0)
        if changed:
            log.info("paused" if paused else "resumed", reason=reason, changed_by=by, source=source)
            self.tick_wakeup.set()
            self.reconcile_wakeup.set()

    observed_changed: bool = False  # the reconciler wrote observed states since the last tick

    def note_observed_changed(self) -> None:
        self.observed_changed = True
        self.tick_wakeup.set()

    def take_observed_changed(self) -> bool:
        changed, self.observed_changed = self.observed_changed, False
        return changed

    control_changed: bool = False  # a gardener_control notification (pause, tripwire ack)

    def note_control(self) -> None:
        self.control_changed = True
        self.tick_wakeup.set()

    def take_control(self) -> bool:
        changed, self.control_changed = self.control_changed, False
        return changed

    def request_stop(self) -> None:
        self.stop.set()
        self.tick_wakeup.set()
        self.reconcile_wakeup.set()


class Listener:
    """LISTEN on the samples, desired and control channels; reconnect when it drops."""

    def __init__(
        self,
        dsn: str,
        state: LoopState,
        *,
        retry: float = 1.0,
        check_every: float = 5.0,
        on_samples: Callable[[], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.state = state
        self.retry = retry
        self.check_every = check_every
        self.on_samples = on_samples
        self.connected = anyio.Event()
        self.reconnects = 0

    def _samples(self, *_: Any) -> None:
        self.state.tick_wakeup.set()
        if self.on_samples is not None:
            self.on_samples()

    def _desired(self, *_: Any) -> None:
        self.state.reconcile_wakeup.set()

    def _control(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            data = {}
        if "paused" in data:
            self.state.set_paused(
                bool(data["paused"]), data.get("reason"), data.get("changed_by"), "notify"
            )
        # A tripwire acknowledgement (0004_ack_notify.sql) comes here too: the tick looks for
        # new acknowledgements and re-decides their races at once.
        self.state.note_control()

    async def run(self) -> None:
        """Listen until the stop event; a dropped connection is re-opened after ``retry`` s."""
        while not self.state.stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await db.connect(self.dsn)
                await conn.add_listener(SAMPLES_CHANNEL, self._samples)
                await conn.add_listener(CONTROL_CHANNEL, self._control)
                await conn.add_listener(DESIRED_CHANNEL, self._desired)
                row = await conn.fetchrow("SELECT paused, reason, changed_by FROM gardener_control")
                if row is not None:
                    self.state.set_paused(row["paused"], row["reason"], row["changed_by"], "read")
                self.connected.set()
                # A notification sent while we were away is lost: wake the tick to catch up.
                self.state.tick_wakeup.set()
                while not self.state.stop.is_set():
                    with anyio.move_on_after(self.check_every):
                        await self.state.stop.wait()
                    if conn.is_closed():
                        raise ConnectionError("listener connection closed")
                    with anyio.fail_after(self.check_every):
                        await conn.fetchval("SELECT 1")
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                ConnectionError,
                TimeoutError,
                ConfigError,  # db.connect: the server is unreachable right now
            ) as exc:
                self.reconnects += 1
                self.connected = anyio.Event()
                log.warning("listener_reconnect", error=str(exc) or type(exc).__name__)
                await anyio.sleep(self.retry)
            finally:
                if conn is not None and not conn.is_closed():
                    with anyio.CancelScope(shield=True):
                        try:
                            await conn.close(timeout=2)
                        except Exception:  # closing a broken connection
                            conn.terminate()
