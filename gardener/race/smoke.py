"""The Gate-0 smoke race: 7 tags x 3 seeds of 500 steps under the real worker loop, then the
14 acceptance criteria, the verdict and the report.

One run: plan fresh seeds and admit the trials into a new race of kind 'smoke'
(``smoke_admit``, configured by ``smoke_config``), start the daemon
(``gardener.loop.daemon.serve``) in-process, run the probes while the trainers run, wait for
every trial to reach its last step (or the wallclock), tear down, check the criteria, record
SMOKE_DONE only if all are GREEN, and write the report.

Interrupted (SIGINT or SIGTERM, with ``handle_signals``), the run cancels whatever it was
doing, stops every trainer of the race through the backend (``stop_trials``), writes back
what the backend then observes, and records the race as ``torn_down`` with a verdict
decision whose reason names the signal (``failed`` if a trainer could not be stopped).
"""

from __future__ import annotations

import resource
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from gardener import logs
from gardener.backends.base import ACTIVE, FINAL, ServiceState
from gardener.errors import ConfigError, UserError
from gardener.ledger import db, migrate
from gardener.ledger.queries import Queries
from gardener.race import criteria as crit
from gardener.race import probes
from gardener.race.smoke_admit import PlannedTrial, admit_race, race_name
from gardener.race.smoke_config import SmokeConfig
from gardener.settings import Settings

Q = Queries("race.sql")
QS = Queries("smoke.sql")


def log() -> Any:
    """The smoke race's logger, looked up when used (after the CLI configured logging)."""
    return logs.get_logger("gardener.smoke")




@dataclass(frozen=True)
class Progress:
    """One look at the race for the live table: per trial (name, step, BPB, states)."""

    race: str
    elapsed_s: float
    rows: tuple[dict[str, Any], ...]
    phase: str

    @property
    def finished(self) -> int:
        return sum(1 for r in self.rows if r["done"])


@dataclass(frozen=True)
class Interruption:
    """What an interrupted run did: the signal, the trainers stopped, what is left."""

    signal: str
    phase: str
    status: str | None  # the race's status afterwards (None: interrupted before admission)
    stopped: tuple[str, ...] = ()
    left_running: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT)."""
        return 128 + int(signal.Signals[self.signal])

    def to_dict(self) -> dict[str, Any]:
        return {"signal": self.signal, "phase": self.phase, "status": self.status,
                "stopped": list(self.stopped), "left_running": list(self.left_running),
                "exit_code": self.exit_code}


@dataclass
class SmokeResult:
    race: str
    account: str
    planned: list[PlannedTrial]
    criteria: list[crit.Criterion]
    smoke_done: bool
    timings: dict[str, float]
    report: Path | None = None
    interrupted: Interruption | None = None
    report_note: str | None = None  # why the report is not where the config asked

    def to_dict(self) -> dict[str, Any]:
        return {
            "race": self.race,
            "account": self.account,
            "smoke_done": self.smoke_done,
            "trials": [p.name for p in self.planned],
            "seeds": sorted(p.canon.seed for p in self.planned),
            "criteria": [c.to_dict() for c in self.criteria],
            "timings": self.timings,
            "report": str(self.report) if self.report else None,
            "report_note": self.report_note,
            "interrupted": self.interrupted.to_dict() if self.interrupted else None,
        }


ServeFn = Callable[..., Awaitable[None]]
ObserveFn = Callable[[], Awaitable[Sequence[ServiceState]]]
# Stops the named trials through the backend; returns the names that were still running.
StopFn = Callable[[Sequence[str]], Awaitable[Sequence[str]]]


def default_serve() -> ServeFn:
    """The real worker loop; a clear error when this build does not have it."""
    try:
        from gardener.loop.daemon import serve
    except ImportError as exc:
        raise UserError(f"the worker loop is not available (gardener.loop.daemon): {exc}") from None
    return serve


async def progress_rows(
    conn: asyncpg.Connection, race: str, max_steps: int
) -> list[dict[str, Any]]:
    rows = []
    for r in await conn.fetch(Q.race_progress, race):
        step = r["last_step"]
        rows.append({
            "canon_name": r["canon_name"],
            "step": step,
            "bpb": r["last_bpb"],
            "samples": int(r["samples"] or 0),
            "desired": r["desired_state"],
            "observed": r["observed_state"],
            "done": (step is not None and step >= max_steps)
            or r["observed_state"] in FINAL,
        })
    return rows


async def run_smoke(
    cfg: SmokeConfig,
    settings: Settings,
    *,
    dsn: str,
    serve: ServeFn | None = None,
    observe: ObserveFn | None = None,
    stop_trials: StopFn | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    clock: Callable[[], float] = time.monotonic,
    poll_s: float = 1.0,
    name: str | None = None,
    write_report: bool = True,
    report_fallback: Path | None = None,
    handle_signals: bool = False,
    interrupt: anyio.Event | None = None,
) -> SmokeResult:
    """Run one smoke race end to end and return its criteria (the caller decides the exit).

    ``handle_signals`` turns SIGINT/SIGTERM into a clean teardown (see the module doc);
    setting ``interrupt`` does the same from inside (the signal is then called SIGINT).
    ``report_fallback`` is the directory the report goes to when its path cannot be written.
    """
    from gardener.trainer.data import describe

    serve_fn = serve or default_serve()
    t0 = clock()
    corpus_name, corpus_sha = describe(cfg.corpus)
    timings: dict[str, float] = {}
    race = name or race_name(cfg.name_prefix, now())
    planned: list[PlannedTrial] = []
    phase = ["admitting"]
    caught: list[str] = []
    admitted = [False]
    out: list[SmokeResult] = []
    interrupt = interrupt or anyio.Event()
    conn = await db.connect(dsn)
    try:
        try:
            async with anyio.create_task_group() as outer:
                with anyio.CancelScope() as body_scope:

                    async def on_interrupt() -> None:
                        await interrupt.wait()
                        if not caught:
                            caught.append("SIGINT")
                        body_scope.cancel()

                    outer.start_soon(on_interrupt)
                    if handle_signals:
                        outer.start_soon(_receive_signals, caught, interrupt, race, phase)
                    await _race(cfg, settings, conn, dsn=dsn, race=race, planned=planned,
                                serve_fn=serve_fn, observe=observe, on_progress=on_progress,
                                clock=clock, poll_s=poll_s, t0=t0, timings=timings,
                                phase=phase, admitted=admitted,
                                corpus=(corpus_name, corpus_sha), write_report=write_report,
                                report_fallback=report_fallback, out=out)
                if caught:
                    # Cancelled anywhere (admission, the race, the criteria, the report):
                    # the teardown itself must not be cut by a second signal.
                    with anyio.CancelScope(shield=True):
                        result = await _tear_down_interrupted(
                            dsn, cfg, race, planned if admitted[0] else [], caught[0],
                            phase[0], stop_trials=stop_trials, observe=observe, clock=clock,
                            t0=t0, timings=timings, poll_s=min(poll_s, 0.2))
                    out[:] = [result]
                outer.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # one error (SeedsExhausted, ...): raise it as is
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        return out[0]
    finally:
        with anyio.CancelScope(shield=True):
            await _close(conn)


async def _close(conn: asyncpg.Connection) -> None:
    """Close the run's connection; a connection cut mid-query by a cancel is terminated."""
    try:
        with anyio.move_on_after(2):
            await conn.close()
            return
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        pass
    conn.terminate()


async def _receive_signals(
    caught: list[str], interrupt: anyio.Event, race: str, phase: list[str]
) -> None:
    """SIGINT/SIGTERM: interrupt the run (once); a repeated signal only says to wait."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            sig = signal.Signals(signum).name
            if caught:
                log().warning("smoke_signal_ignored", race=race, signal=sig,
                              note="already tearing down, this takes a few seconds")
                continue
            caught.append(sig)
            log().warning("smoke_interrupted", race=race, signal=sig, phase=phase[0])
            interrupt.set()


async def _race(
    cfg: SmokeConfig,
    settings: Settings,
    conn: asyncpg.Connection,
    *,
    dsn: str,
    race: str,
    planned: list[PlannedTrial],
    serve_fn: ServeFn,
    observe: ObserveFn | None,
    on_progress: Callable[[Progress], None] | None,
    clock: Callable[[], float],
    poll_s: float,
    t0: float,
    timings: dict[str, float],
    phase: list[str],
    admitted: list[bool],
    corpus: tuple[str, str],
    write_report: bool,
    report_fallback: Path | None,
    out: list[SmokeResult],
) -> None:
    """The run without its interruption handling; appends its result to ``out``."""
    corpus_name, corpus_sha = corpus
    await migrate.migrate(conn)
    with anyio.CancelScope(shield=True):  # one transaction: committed or not, never half
        planned.extend(await admit_race(conn, cfg, race, corpus_sha256=corpus_sha,
                                        railway_config=settings.railway_config))
        admitted[0] = True
    phase[0] = "running"
    timings["admitted_s"] = clock() - t0
    log().info("smoke_admitted", race=race, trials=len(planned),
               seeds=sorted(p.canon.seed for p in planned))
    ctx = crit.RaceContext(
        race=race, account=cfg.account, expected_names=tuple(p.name for p in planned),
        max_steps=cfg.max_steps, eval_every=int(planned[0].variables["TRAIN_EVAL_EVERY"]),
        corpus=corpus_name, corpus_sha256=corpus_sha, config=cfg.criteria,
    )
    probed: dict[int, crit.Criterion] = {}
    stop = anyio.Event()
    deadline = t0 + cfg.wallclock_s

    async def daemon() -> None:  # the race's page (address printed); ingest where trainers post
        from gardener.race.page import serve_with_page

        await serve_with_page(serve_fn, settings, race, dsn=dsn, stop=stop,
                              install_signal_handlers=False,
                              public=serves_ingest(cfg, settings))

    async def run_probes() -> None:
        pconn = await db.connect(dsn)
        try:
            while clock() < deadline:  # probe while the trainers really run
                rows = await progress_rows(pconn, race, cfg.max_steps)
                if any(r["samples"] for r in rows):
                    break
                await anyio.sleep(poll_s)
            victim = _other_account(settings, cfg.account)
            checks: dict[int, Callable[[], Awaitable[crit.Criterion]]] = {
                5: lambda: probes.probe_lr9(pconn, ctx, seed=planned[0].canon.seed),
                7: lambda: probes.probe_used_slot(pconn, ctx),
                8: lambda: probes.probe_force_replace(
                    pconn, ctx, challenger=cfg.criteria.force_replace_challenger),
                9: lambda: probes.probe_cross_account_kill(pconn, ctx, victim_account=victim),
                10: lambda: probes.probe_exp_claims(dsn, ctx),
            }
            for n, check in checks.items():
                try:
                    probed[n] = await check()
                except (asyncpg.PostgresError, OSError, UserError) as exc:
                    # The probe itself broke: RED with what happened, the race goes on.
                    probed[n] = crit.Criterion(n, crit.TITLES[n], False,
                                               f"the probe failed: {type(exc).__name__}: {exc}")
            timings["probes_done_s"] = clock() - t0
        finally:
            with anyio.CancelScope(shield=True):
                await _close(pconn)

    async def watch() -> None:
        while True:
            rows = await progress_rows(conn, race, cfg.max_steps)
            if on_progress:
                on_progress(Progress(race, clock() - t0, tuple(rows), phase[0]))
            if rows and all(r["done"] for r in rows) and len(probed) == 5:
                timings["trained_s"] = clock() - t0
                break
            if clock() >= deadline:
                timings["trained_s"] = clock() - t0
                log().warning("smoke_wallclock_exceeded", race=race,
                              wallclock_s=cfg.wallclock_s)
                break
            await anyio.sleep(poll_s)
        if cfg.auto_teardown:
            phase[0] = "teardown"
            stopped = await conn.fetch(Q.stop_race_trials, race, "stopped")
            log().info("smoke_teardown", race=race, stopping=len(stopped))
            await _wait_gone(conn, ctx, observe, clock, cfg.criteria.teardown_timeout_s,
                             poll_s, on_progress, t0)
            timings["torn_down_s"] = clock() - t0
        stop.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon)
        tg.start_soon(run_probes)
        await watch()
    phase[0] = "criteria"
    if on_progress:
        rows = await progress_rows(conn, race, cfg.max_steps)
        on_progress(Progress(race, clock() - t0, tuple(rows), phase[0]))
    observed = await observe() if observe is not None else None
    results = await crit.evaluate(conn, ctx, probed, observed=observed)
    timings["checked_s"] = clock() - t0
    with anyio.CancelScope(shield=True):
        ok = await crit.record_verdict(conn, race, results, timings=timings)
    phase[0] = "report"
    results.append(await crit.smoke_done(conn, ctx))
    timings["total_s"] = clock() - t0
    result = SmokeResult(race, cfg.account, planned, results, ok and results[-1].green, timings)
    out.append(result)
    if write_report and cfg.report:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        extra = {"gardener process peak RSS": f"{peak:.0f} MB (the worker loop, probes "
                 "and this command; trainers are separate processes)"}
        result.report, result.report_note = await _write_report(
            conn, race, Path(cfg.report), report_fallback, criteria=results, timings=timings,
            extra=extra)
    log().info("smoke_finished", race=race, smoke_done=result.smoke_done,
               red=[c.number for c in results if not c.green], report=str(result.report),
               **timings)


async def _write_report(
    conn: asyncpg.Connection, race: str, path: Path, fallback: Path | None, **kw: Any
) -> tuple[Path | None, str | None]:
    """The report at ``path``, else in ``fallback`` (no write access, a read-only checkout);
    a report that cannot be written anywhere is a note, never a crash: the race is recorded."""
    from gardener.race import report as report_mod

    tried: list[str] = []
    for where in (path, None if fallback is None else fallback / path.name):
        if where is None or (tried and where == path):
            continue
        try:
            written = await report_mod.write_report(conn, race, where, **kw)
        except OSError as exc:
            tried.append(f"{where}: {exc.strerror or exc}")
            log().warning("smoke_report_not_written", race=race, path=str(where),
                          error=str(exc))
            continue
        note = None if not tried else f"{path} could not be written ({tried[0]}), so the " \
            f"report went to {written}"
        return written, note
    return None, ("the report could not be written (" + "; ".join(tried) + "); "
                  f"`gardener report --race {race} --out PATH` writes it from the ledger")


async def _tear_down_interrupted(
    dsn: str,
    cfg: SmokeConfig,
    race: str,
    planned: Sequence[PlannedTrial],
    sig: str,
    phase: str,
    *,
    stop_trials: StopFn | None,
    observe: ObserveFn | None,
    clock: Callable[[], float],
    t0: float,
    timings: dict[str, float],
    poll_s: float,
) -> SmokeResult:
    """After a signal: every trainer of the race stopped, the ledger told, the race marked."""
    names = [p.name for p in planned]
    timings["interrupted_s"] = clock() - t0
    if not planned:  # nothing was admitted: nothing runs, nothing to mark
        log().warning("smoke_interrupted_before_admission", race=race, signal=sig)
        return SmokeResult(race, cfg.account, [], [], False, timings,
                           interrupted=Interruption(sig, phase, None))
    conn = await db.connect(dsn)
    try:
        await conn.fetch(Q.stop_race_trials, race, "stopped")  # no reconciler restarts them
        stopped: Sequence[str] = ()
        if stop_trials is not None:
            with anyio.move_on_after(cfg.criteria.teardown_timeout_s):
                stopped = await stop_trials(names)
        end = clock() + cfg.criteria.teardown_timeout_s
        left = crit.live_processes(names, race)
        while left and clock() < end:
            await anyio.sleep(poll_s)
            left = crit.live_processes(names, race)
        if observe is not None:  # what the worker loop would have written back
            for s in await observe():
                if s.canon_name in names:
                    await conn.execute(QS.set_trial_observed, race, s.canon_name, s.status.value)
        left_names = tuple(sorted({str(p["canon_name"]) for p in left}))
        timings["torn_down_s"] = clock() - t0
        status = "failed" if left_names else "torn_down"
        reason = (f"SMOKE INTERRUPTED by {sig} during {phase} after "
                  f"{timings['interrupted_s']:.1f} s: {len(stopped)} running trainer(s) stopped"
                  + (f", still running: {', '.join(left_names)}" if left_names else
                     ", none left running"))
        numbers = {"smoke_done": False, "interrupted": sig, "phase": phase, "criteria": [],
                   "stopped": sorted(stopped), "left_running": list(left_names),
                   "timings": {k: round(v, 2) for k, v in timings.items()}}
        async with conn.transaction():
            recorded = await conn.fetchval(Q.insert_race_verdict, race, numbers, reason,
                                           "smoke-race")
            if recorded is not None:  # a verdict already recorded stays the race's verdict
                await conn.execute(Q.set_race_status, race, status)
            final = await conn.fetchval(QS.race_status, race)
        log().warning("smoke_torn_down", race=race, signal=sig, phase=phase, status=final,
                      stopped=len(stopped), left_running=list(left_names))
        return SmokeResult(race, cfg.account, list(planned), [], False, timings,
                           interrupted=Interruption(sig, phase, final, tuple(sorted(stopped)),
                                                    left_names))
    finally:
        await conn.close()


def serves_ingest(cfg: SmokeConfig, settings: Settings) -> bool:
    """Whether the race's worker loop listens for samples: when Railway trainers are told the
    gardener's address (``RAILWAY_PRIVATE_DOMAIN``...) and the account has an ingest token."""
    if cfg.backend != "railway" or settings.ingest_token(cfg.account) is None:
        return False
    import os

    from gardener.backends.railway.templates import gardener_ingest_url, load_templates

    tpl = load_templates(settings.railway_config).default
    if tpl.ingest == "logs" or gardener_ingest_url(tpl.ingest_url, os.environ) is None:
        return False
    import socket

    with socket.socket() as probe:  # a gardener already serving there takes the samples
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", settings.port)) != 0


def _other_account(settings: Settings, account: str) -> str:
    others = [a for a in settings.accounts if a != account]
    if not others:
        raise ConfigError("criterion 9 needs a second account (GARDENER_ACCOUNTS)")
    return "acc2" if "acc2" in others else others[0]


async def _wait_gone(
    conn: asyncpg.Connection,
    ctx: crit.RaceContext,
    observe: ObserveFn | None,
    clock: Callable[[], float],
    limit_s: float,
    poll_s: float,
    on_progress: Callable[[Progress], None] | None,
    t0: float,
) -> None:
    """Until no process of the race lives, observe() shows none of it active, and the worker
    loop has written back what it saw (no trial the ledger still believes running), or
    until the time limit."""
    end = clock() + limit_s
    names = set(ctx.expected_names)
    while clock() < end:
        procs = crit.live_processes(ctx.expected_names, ctx.race)
        active = []
        if observe is not None:
            active = [s for s in await observe() if s.canon_name in names and s.status in ACTIVE]
        if on_progress:
            rows = await progress_rows(conn, ctx.race, ctx.max_steps)
            on_progress(Progress(ctx.race, clock() - t0, tuple(rows), "teardown"))
        believed = [r["canon_name"] for r in await conn.fetch(Q.race_states, ctx.race)
                    if r["observed_state"] in ACTIVE]
        if not procs and not active and not believed:
            return
        await anyio.sleep(poll_s)
    log().warning("smoke_teardown_timeout", race=ctx.race, timeout_s=limit_s)
