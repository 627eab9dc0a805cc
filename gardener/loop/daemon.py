"""``serve``: the whole worker loop in one anyio task group.

Tasks: signals (SIGTERM/SIGINT set the stop event), the LISTEN connection, the leader lock,
the HTTP server (ingest runs on leader and standby alike), and, once leader, the tick loop,
the reconciler and the log pump. Shutdown has one path: the stop event; the loop stops
taking new work, a decision's transaction in flight is finished (shielded), the writer is
flushed, and whatever is still running after the grace period is cancelled. A long-lived
task that returns or raises while not stopping takes the whole process down with it
(``serve`` raises), so it is never left half alive.
"""

from __future__ import annotations

import gc
import json
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import structlog

from gardener.backends.base import Backend
from gardener.errors import ConfigError, GardenerError
from gardener.ledger import db
from gardener.loop import metrics
from gardener.loop.control import TRANSIENT_DB_ERRORS, Listener, LoopState
from gardener.loop.leader import LEADER_LOCK, Leadership, new_holder, session_dsn
from gardener.loop.reconciler import LineSink, Reconciler
from gardener.loop.tick import Ticker, TickReport
from gardener.settings import Settings

log = structlog.get_logger("gardener.loop.daemon")  # lazy: resolved after logs.configure

BackendFactory = Callable[[str], Backend]
GRACE_S = 6.0  # of the 10 s a platform gives between SIGTERM and SIGKILL
CLOSE_S = 2.0
MAX_DB_FAILURES = 30  # consecutive failed ticks (about a minute) before the loop gives up
# The cyclic collector's thresholds while the loop runs. The sample cache and decide's kept
# facts hold a few hundred thousand long-lived objects at 10,000 trials; with Python's
# default (700, 10, 10) a full collection (90-115 ms) ran every few seconds, about a third of
# a crossing's CPU (docs/scale.md). Almost everything here is freed by reference counting, so
# collecting less often costs little memory.
GC_THRESHOLDS = (50_000, 20, 20)
DB_ERRORS = TRANSIENT_DB_ERRORS  # a blip: the tick is tried again, the daemon lives on


class TaskDied(GardenerError):
    """A long-lived task ended while the daemon was not stopping."""


def default_backend_factory(settings: Settings) -> BackendFactory:
    """The configured kind of backend, with each account's own credentials."""
    from gardener.backends import backend_for

    def factory(account: str) -> Backend:
        return backend_for(settings, account)

    return factory


def scope_accounts(settings: Settings) -> list[str]:
    """The accounts this daemon acts for: GARDENER_ACCOUNT (``--account``), else every one."""
    return [settings.require_account()] if settings.account else list(settings.accounts)


def make_backends(settings: Settings, factory: BackendFactory) -> dict[str, Backend]:
    out: dict[str, Backend] = {}
    for account in scope_accounts(settings):
        try:
            out[account] = factory(account)
        except ConfigError as exc:
            if settings.account:  # the one account asked for must work
                raise
            log.warning("backend_unavailable", account=account, error=str(exc))
    if not out:
        raise ConfigError("no backend for any account: check the Railway settings")
    return out


def make_writer(pool: asyncpg.Pool) -> Any:
    """Ingest's ``SampleWriter`` on the daemon's pool."""
    from gardener.ingest.writer import SampleWriter

    return SampleWriter(pool)


async def _critical(name: str, state: LoopState, fn: Callable[[], Awaitable[None]]) -> None:
    """Run a long-lived task; if it ends while not stopping, fail loudly."""
    try:
        await fn()
    except Exception:
        if not state.stop.is_set():
            log.error("task_died", task=name, exc_info=True)
        raise
    if not state.stop.is_set():
        log.error("task_died", task=name, note="returned while not stopping")
        raise TaskDied(f"the {name} task ended while the daemon was not stopping")


async def _signals(state: LoopState) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            state.request_stop()
            return


async def tick_loop(ticker: Ticker, state: LoopState, poll_interval: float) -> None:
    """Tick whenever woken (NOTIFY, a decision, resume) or every ``poll_interval``."""
    failures = 0
    while not state.stop.is_set():
        try:
            await ticker.tick()
            failures = 0
        except DB_ERRORS as exc:
            failures += 1
            metrics.DB_BLIPS.inc()
            log.warning("tick_failed", error=str(exc) or type(exc).__name__,
                        error_type=type(exc).__name__, failures=failures)
            if failures >= MAX_DB_FAILURES:
                raise
            with anyio.move_on_after(min(failures, 5)):
                await state.stop.wait()
            continue
        await state.tick_wakeup.wait(poll_interval)


async def serve(
    settings: Settings,
    *,
    dsn: str | None = None,
    backend_factory: BackendFactory | None = None,
    stop: anyio.Event | None = None,
    install_signal_handlers: bool = True,
    http: bool = True,
    state: LoopState | None = None,
    reconcile_interval: float = 15.0,
    log_interval: float = 2.0,
) -> None:
    """Run the worker loop until ``stop`` is set (or SIGTERM/SIGINT); see the module doc.

    ``state`` may be passed to watch the loop from outside (its ``stop`` is then used).
    """
    if state is None:
        state = LoopState(stop=stop or anyio.Event())
    elif stop is not None:
        state.stop = stop
    holder = new_holder()
    dsn = session_dsn(dsn or db.resolve_dsn(settings)[0], holder)
    factory = backend_factory or default_backend_factory(settings)
    pool = await db.create_pool(dsn, min_size=1, max_size=8)
    writer = make_writer(pool)
    await writer.start()
    backends: dict[str, Backend] = {}
    worker_done = anyio.Event()
    log.info("starting", pid=_pid(), accounts=scope_accounts(settings), backend=settings.backend)
    gc_before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        async with anyio.create_task_group() as tg:
            if install_signal_handlers:
                tg.start_soon(_signals, state)

            async def relay_stop() -> None:
                await state.stop.wait()
                state.request_stop()

            tg.start_soon(relay_stop)
            listener = Listener(dsn, state)
            leadership = Leadership(dsn, state, key=LEADER_LOCK, pool=pool, holder=holder)
            tg.start_soon(_critical, "listener", state, listener.run)
            tg.start_soon(_critical, "leader", state, leadership.run)
            if http:
                from gardener.loop import http as http_mod

                sock = http_mod.bind(settings.host, settings.port)
                state.http_port = int(sock.getsockname()[1])
                app = http_mod.make_app(state, pool, extra_routes=[
                    *http_mod.ingest_routes(writer, settings),
                    *http_mod.view_routes(pool, settings, state),
                ])
                tg.start_soon(
                    _critical, "http", state, lambda: http_mod.serve_http(app, sock, state)
                )
                log.info("http_listening", host=settings.host, port=state.http_port)

            async def work() -> None:
                try:
                    await _first_of(state.stop, leadership.became_leader)
                    if state.stop.is_set():
                        return
                    backends.update(make_backends(settings, factory))
                    await _lead(pool, settings, state, backends, writer, reconcile_interval,
                                log_interval)
                finally:
                    worker_done.set()

            tg.start_soon(_critical, "worker", state, work)
            await state.stop.wait()
            state.role = "stopping"
            with anyio.move_on_after(GRACE_S):
                await worker_done.wait()
            if not worker_done.is_set():
                log.warning("shutdown_grace_exceeded", grace_s=GRACE_S)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(CLOSE_S):
                await writer.close()
            for b in backends.values():
                with anyio.move_on_after(1.0):
                    await b.aclose()
            closed = False
            with anyio.move_on_after(1.0):
                await pool.close()
                closed = True
            if not closed:
                pool.terminate()
        gc.set_threshold(*gc_before)
        log.info("stopped", role=state.role)


async def _first_of(*events: anyio.Event) -> None:
    """Return when any of the events is set."""
    async with anyio.create_task_group() as tg:

        async def waiter(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(waiter, event)


async def _lead(
    pool: asyncpg.Pool,
    settings: Settings,
    state: LoopState,
    backends: dict[str, Backend],
    writer: LineSink,
    reconcile_interval: float,
    log_interval: float,
) -> None:
    ticker = Ticker(
        pool,
        settings,
        state=state,
        account=settings.account,
        backend=settings.backend,
        on_desired_change=state.reconcile_wakeup.set,
    )
    reconciler = Reconciler(
        pool,
        settings,
        state,
        backends,
        writer,
        interval=reconcile_interval,
        log_interval=log_interval,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            _critical, "tick", state, lambda: tick_loop(ticker, state, settings.poll_interval)
        )
        tg.start_soon(_critical, "reconcile", state, reconciler.run)
        tg.start_soon(_critical, "logs", state, reconciler.pump_logs)


async def run_once(
    settings: Settings,
    *,
    dsn: str | None = None,
    backend_factory: BackendFactory | None = None,
    reconcile: bool = True,
) -> dict[str, Any]:
    """``gardener run --once``: one tick (and one reconcile pass) if the lock is free."""
    dsn = dsn or db.resolve_dsn(settings)[0]
    pool = await db.create_pool(dsn, min_size=1, max_size=4)
    lock_conn = await db.connect(dsn)
    try:
        if not await lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK):
            log.info("standby", note="another gardener run holds the leader lock")
            return {"role": "standby"}
        state = LoopState(stop=anyio.Event())
        state.role = "leader"
        ticker = Ticker(pool, settings, state=state, account=settings.account,
                        backend=settings.backend)
        started = time.perf_counter()
        report: TickReport = await ticker.tick()
        out: dict[str, Any] = {"role": "leader", "tick": report.as_dict()}
        if reconcile:
            backends = make_backends(settings, backend_factory or default_backend_factory(settings))
            try:
                rec = Reconciler(pool, settings, state, backends, None)
                reports = await rec.pass_once()
                out["reconcile"] = {
                    acc: (r.summary() if r is not None else "paused: observed only")
                    for acc, r in reports.items()
                }
            finally:
                for b in backends.values():
                    await b.aclose()
        out["seconds"] = time.perf_counter() - started
        return json.loads(json.dumps(out, default=str))
    finally:
        await lock_conn.close()
        await pool.close()


def _pid() -> int:
    import os

    return os.getpid()
