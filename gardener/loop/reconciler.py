"""Hand the desired state to the backends, write back what they observe, pump their logs.

A pass (every ``interval`` seconds, and at once when the desired state changed) builds one
``ServiceSpec`` per trial from the ledger (``TRAIN_*`` variables from ``trainer_variables``,
the trial's stored variables on top, its identity last; a Railway trial through its service
template), calls ``reconcile_once`` per account, and writes ``observed_state`` /
``service_id`` / ``deployment_id`` back (only what changed; a finished state only once the
service's log was read to its end, so a race never ends before its last samples are in).
While paused it only observes: no create, stop or remove, and the flag (with the leadership)
is asked again right before every platform call, so a pass under way stops at once. One
account's failure (a bad token, an outage) is that account's alone: logged, counted in
``gardener_account_errors`` / ``gardener_account_failing``, and retried slowly while the others
go on. The log pump tails the services and hands the lines to the ingest writer; the cursors
of backends that pay for a read (Railway) are persisted in ``log_cursors``, so a restart
resumes them; a local log is read again from its start and the writer's unique key makes the
re-delivery a no-op.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import asyncpg
import structlog

from gardener.backends.base import (
    FINAL,
    Backend,
    BackendError,
    LogLine,
    PermanentBackendError,
    ServiceSpec,
    ServiceState,
    Status,
    TemporaryBackendError,
)
from gardener.backends.railway.templates import (
    INGEST_URL_VAR,
    Templates,
    load_templates,
    trainer_spec,
)
from gardener.backends.reconcile import Backoff, ReconcileReport, reconcile_once
from gardener.core import canon as canon_mod
from gardener.core.config import DEFAULT_RUNGS
from gardener.core.types import DesiredState
from gardener.errors import GardenerError
from gardener.ledger.apply import IDENTITY_VARIABLES
from gardener.ledger.queries import Queries
from gardener.loop import metrics
from gardener.loop.control import TRANSIENT_DB_ERRORS, LoopState
from gardener.loop.leader import LeadershipLost
from gardener.settings import Settings
from gardener.trainer.spec import ModelsConfig, load_models_config, trainer_variables

Q = Queries("loop.sql")
QC = Queries("cursors.sql")
log = structlog.get_logger("gardener.loop.reconciler")  # lazy: resolved after logs.configure

_STARTED = frozenset({"created", "deployed", "restarted"})
# Railway log reads come out of the account's request budget: follow them slowly (trainers
# there should also POST their samples to /v1/samples).
RAILWAY_LOG_INTERVAL = 30.0
RAILWAY_MAX_LOG_INTERVAL = 300.0
# Passes woken early are this many times their own duration apart (at most 1/20 of a core).
PASS_SPACING = 20.0
QUIET_TAILS_PER_S = 200.0
# A pass yields to the event loop after this much work in one piece: a pass over ten thousand
# trials took 50-100 ms of CPU (the first, building every spec, 300 ms), and every crossing
# arriving meanwhile waited for it.
TURN_S = 0.01


class _Turns:
    """Lets the event loop run during a long loop: ``await turns.give()`` per item costs a
    clock read, and yields once every ``TURN_S``."""

    def __init__(self) -> None:
        self.until = time.perf_counter() + TURN_S

    async def give(self) -> None:
        now = time.perf_counter()
        if now >= self.until:
            await anyio.lowlevel.checkpoint()
            self.until = time.perf_counter() + TURN_S


class AccountUnavailable(BackendError):
    """An account's backend could not even be observed: that account is backed off."""


class LineSink(Protocol):
    """Where log lines go: the ingest ``SampleWriter``."""

    def submit_lines(
        self, canon_name: str, lines: Sequence[str], source: str
    ) -> Awaitable[Any]: ...


def build_spec(
    row: Mapping[str, Any], settings: Settings, models: ModelsConfig | None
) -> ServiceSpec:
    """One trial's desired service: trainer variables, stored overrides, identity last."""
    name = row["canon_name"]
    stored = {str(k): str(v) for k, v in dict(row["variables"] or {}).items()}
    variables: dict[str, str] = {}
    parsed: canon_mod.CanonName | None = None
    if models is not None:
        try:
            parsed = canon_mod.parse(name, models=(*canon_mod.DEFAULT_MODELS, *models.models))
            steps = int(row["steps"] or row["horizon"] or DEFAULT_RUNGS[-1])
            variables = trainer_variables(
                parsed,
                steps=steps,
                corpus=settings.corpus,
                models=models,
                hidden_size=row["hidden_size"],
            )
        except GardenerError as exc:
            log.error("spec_variables_failed", canon_name=name, error=str(exc))
    identity = {k: variables[k] for k in IDENTITY_VARIABLES if k in variables}
    merged = {**variables, **stored, **identity}
    desired = DesiredState(row["desired_state"])
    kind = row.get("backend") or settings.backend
    if kind == "railway":
        try:  # a Railway service needs its source, start command and ingest from the template
            return trainer_spec(
                name, row["account"], merged, _railway_templates(settings.railway_config),
                desired=desired, race=row["race"], parsed=parsed,
            )
        except GardenerError as exc:
            log.error("spec_template_failed", canon_name=name, error=str(exc))
    return ServiceSpec(
        canon_name=name,
        account=row["account"],
        desired=desired,
        variables=merged,
        race=row["race"],
    )


@functools.cache
def _railway_templates(path: Path | None) -> Templates:
    return load_templates(path)


class Reconciler:
    """The reconcile task and the log pump, one backend per account."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        state: LoopState,
        backends: Mapping[str, Backend],
        sink: LineSink | None,
        *,
        interval: float = 10.0,
        log_interval: float = 2.0,
        max_log_interval: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.state = state
        self.backends = dict(backends)
        self.sink = sink
        self.interval = interval
        self.log_interval = log_interval
        self.clock = clock
        self.backoffs = {acc: Backoff() for acc in backends}
        # A failing account (a bad token, an outage) is tried again slowly: 30 s doubling to
        # 10 minutes, while the other accounts go on every pass.
        self.account_backoff = Backoff(base=30.0, cap=600.0)
        self.cursors: dict[str, str | None] = {}
        self._cursors_loaded = False
        self.drained: set[str] = set()  # services in a final state whose log was read to the end
        self.known: dict[str, tuple[str, Status]] = {}  # canon_name -> (account, status)
        self.posting: set[str] = set()  # trainers that POST their samples: log read at the end
        self._specs: dict[tuple[Any, ...], ServiceSpec] = {}
        self._tail_due: dict[str, tuple[float, float]] = {}  # name -> (next tail, interval)
        self.max_log_interval = max_log_interval
        try:
            self.models: ModelsConfig | None = load_models_config()
        except GardenerError as exc:
            log.error("models_config_unavailable", error=str(exc))
            self.models = None

    async def run(self) -> None:
        """Reconcile every ``interval`` and whenever the desired state changed, but not more
        than one pass in ``PASS_SPACING`` times the last one's duration: a pass reads the
        whole fleet, and with thousands of trials a decision that stops one lands every
        second (a few milliseconds apart at a hundred trials, a few seconds at ten thousand).
        A database blip (a lost connection, a client error) is waited out, not fatal."""
        while not self.state.stop.is_set():
            started = time.perf_counter()
            try:
                await self.pass_once()
            except TRANSIENT_DB_ERRORS as exc:
                metrics.DB_BLIPS.inc()
                log.warning("reconcile_db_blip", error=str(exc) or type(exc).__name__,
                            error_type=type(exc).__name__)
                with anyio.move_on_after(1.0):
                    await self.state.stop.wait()
                continue
            rest = min(self.interval, PASS_SPACING * (time.perf_counter() - started))
            with anyio.move_on_after(rest):
                await self.state.stop.wait()
            await self.state.reconcile_wakeup.wait(self.interval - rest)

    async def pass_once(self) -> dict[str, ReconcileReport | None]:
        """One pass over every account; returns each account's report (None when paused)."""
        started = time.perf_counter()
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(Q.desired_trials_keyed, None)
        by_account: dict[str, list[Mapping[str, Any]]] = {acc: [] for acc in self.backends}
        for r in rows:
            if r["account"] in by_account:
                by_account[r["account"]].append(r)
        reports: dict[str, ReconcileReport | None] = {}
        now = self.clock()
        for acc, backend in self.backends.items():
            if self.state.stop.is_set():
                break
            if not self.account_backoff.ready(acc, now):
                continue  # failing: tried again slowly, the other accounts go on
            try:
                reports[acc] = await self._pass_account(acc, backend, by_account[acc])
            except LeadershipLost:
                raise
            except (GardenerError, OSError, TimeoutError) as exc:
                # One account's failure (a bad token, an outage) is that account's alone; a
                # bug (any other exception) still stops the daemon loudly.
                delay = self.account_backoff.failure(acc, now)
                metrics.ACCOUNT_FAILING.labels(acc).set(1)
                metrics.ACCOUNT_ERRORS.labels(acc, type(exc).__name__).inc()
                log.error("account_failed", account=acc, backend=backend.kind,
                          error=str(exc) or type(exc).__name__, error_type=type(exc).__name__,
                          retry_in_s=round(delay, 1))
            else:
                if self.account_backoff.failures(acc):
                    log.info("account_recovered", account=acc)
                self.account_backoff.success(acc)
                metrics.ACCOUNT_FAILING.labels(acc).set(0)
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        self.state.last_reconcile_at = time.time()
        return reports

    async def may_act(self) -> bool:
        """Asked right before every mutating platform call: not stopping, not paused, and
        (in the daemon) still the leader."""
        if self.state.stop.is_set() or self.state.paused:
            return False
        still = self.state.still_leader
        return still is None or await still()

    async def _pass_account(
        self, acc: str, backend: Backend, mine: list[Mapping[str, Any]]
    ) -> ReconcileReport | None:
        if self.state.paused:
            observed = await self._observe_only(backend)
            report = None
        else:
            specs: list[ServiceSpec] = []
            turns = _Turns()
            for r in mine:
                specs.append(self._spec(r))
                await turns.give()
            self.posting.update(sp.canon_name for sp in specs if INGEST_URL_VAR in sp.variables)
            report = await reconcile_once(
                specs, backend, backoff=self.backoffs[acc], may_act=self.may_act
            )
            if report.observe_error is not None and report.observed == 0 and not (
                report.budget_exhausted
            ):
                raise AccountUnavailable(report.observe_error)
            observed = report.states if report.observe_error is None else None
            for result in report.results:  # just started: follow its log from now on
                if result.error is None and result.outcome in _STARTED:
                    self.known.setdefault(result.canon_name, (acc, Status.PENDING))
                    self.drained.discard(result.canon_name)
        if observed is not None:
            await self._write_observed(mine, observed, acc)
        return report

    def _spec(self, row: Mapping[str, Any]) -> ServiceSpec:
        """``build_spec``, cached on the row's contents: a pass over a thousand unchanged
        trials costs dictionary look-ups, not a thousand variable tables."""
        text = row.get("variables_text")  # the jsonb as PostgreSQL prints it: a cheap key
        key = (
            row["canon_name"],
            row["desired_state"],
            row["steps"],
            row["horizon"],
            row["hidden_size"],
            text if text is not None else json.dumps(row["variables"] or {}, sort_keys=True,
                                                      default=str),
        )
        spec = self._specs.get(key)
        if spec is None:
            if len(self._specs) > 100_000:
                self._specs.clear()
            if text is not None:
                row = {**row, "variables": json.loads(text)}
            spec = self._specs[key] = build_spec(row, self.settings, self.models)
        return spec

    async def _observe_only(self, backend: Backend) -> list[ServiceState] | None:
        try:
            return await backend.observe()
        except TemporaryBackendError as exc:
            log.warning("observe_failed", backend=backend.kind, error=str(exc))
            return None

    async def _write_observed(
        self, rows: Sequence[Mapping[str, Any]], observed: Sequence[ServiceState], account: str
    ) -> None:
        seen = {s.canon_name: s for s in observed if s.owned and s.canon_name}
        turns = _Turns()
        for name, s in seen.items():
            self.known[name] = (account, s.status)
            if s.status not in FINAL:
                self.drained.discard(name)  # started again: follow its log again
            await turns.give()
        updates: list[tuple[str, str, str | None, str | None]] = []
        for r in rows:
            await turns.give()
            name = r["canon_name"]
            st = seen.get(name)
            new: tuple[str, str | None, str | None]
            if st is not None:
                if self.sink is not None and st.status in FINAL and name not in self.drained:
                    continue  # "finished" is written once its last log lines are in the ledger
                new = (st.status.value, st.service_id, st.deployment_id)
            elif r["desired_state"] == "removed" or (
                r["service_id"] is not None and r["observed_state"] != "pending"
            ):
                new = ("removed" if r["desired_state"] == "removed" else "stopped", None, None)
            else:
                continue  # never created yet
            old = (r["observed_state"], r["service_id"], r["deployment_id"])
            if new[0] != old[0] or (new[1] and new[1] != old[1]) or (new[2] and new[2] != old[2]):
                updates.append((name, *new))
        if updates:
            async with self.pool.acquire() as conn, conn.transaction():
                if self.state.fence is not None:
                    await self.state.fence(conn)
                await conn.executemany(Q.set_observed, updates)
            self.state.note_observed_changed()  # a trial may have finished: the race may be done

    # -- logs ---------------------------------------------------------------------------------
    def _drained(self, name: str, status: Status) -> None:
        if status in FINAL and name not in self.drained:
            self.drained.add(name)
            self.state.reconcile_wakeup.set()  # its final state can be written now

    def _intervals(self, kind: str) -> tuple[float, float]:
        """(interval after lines, longest interval when quiet) for a backend: a Railway
        tail is one API request out of an hourly budget, a local one a file read."""
        # However many services are quiet, they cost at most QUIET_TAILS_PER_S tails a second
        # (ten thousand quiet services: each looked at every 50 s rather than every 8 s).
        fleet = len(self.known) / QUIET_TAILS_PER_S
        if kind == "railway":
            return (max(self.log_interval, RAILWAY_LOG_INTERVAL),
                    max(self.max_log_interval, RAILWAY_MAX_LOG_INTERVAL, fleet))
        return (self.log_interval, max(self.max_log_interval, fleet))

    async def pump_logs(self) -> None:
        """Tail the known services and feed the writer; a quiet service is tailed less often
        (``log_interval`` doubling up to ``max_log_interval``), one that talks at once again."""
        if self.sink is None:
            return
        while not self.state.stop.is_set():
            try:
                await self.pump_once(respect_backoff=True)
            except TRANSIENT_DB_ERRORS as exc:  # the cursors' table: tried again next round
                metrics.DB_BLIPS.inc()
                log.warning("pump_db_blip", error=str(exc) or type(exc).__name__,
                            error_type=type(exc).__name__)
            with anyio.move_on_after(self.log_interval):
                await self.state.stop.wait()

    async def pump_once(self, concurrency: int = 8, *, respect_backoff: bool = False) -> int:
        """One round of tails; returns the number of lines handed over."""
        if self.sink is None:
            return 0
        total = 0
        gate = anyio.Semaphore(concurrency)
        now = self.clock()

        if not self._cursors_loaded:
            await self._load_cursors()
        saved: list[tuple[str, str, str]] = []

        async def one(name: str, account: str, status: Status) -> None:
            nonlocal total
            backend = self.backends.get(account)
            if backend is None or self.state.stop.is_set():
                return
            async with gate:
                try:
                    lines = await backend.tail(name, self.cursors.get(name))
                except PermanentBackendError as exc:  # no log to read, and there never will be
                    log.warning("tail_failed", canon_name=name, error=str(exc), permanent=True)
                    self._drained(name, status)
                    return
                except Exception as exc:  # one tail's trouble stops neither it nor the others
                    log.warning("tail_failed", canon_name=name, error=str(exc) or
                                type(exc).__name__, error_type=type(exc).__name__)
                    return
                base, most = self._intervals(backend.kind)
                if not lines:
                    _, quiet = self._tail_due.get(name, (now, base / 2))
                    quiet = min(quiet * 2, most)
                    self._tail_due[name] = (now + quiet, quiet)
                    self._drained(name, status)
                    return
                self._tail_due[name] = (now + base, base)
                assert self.sink is not None
                try:
                    await self.sink.submit_lines(name, split_redrawn(lines), f"{backend.kind}-log")
                except Exception as exc:  # not written: the cursor stays, the lines come again
                    log.warning("tail_submit_failed", canon_name=name, error=str(exc) or
                                type(exc).__name__, error_type=type(exc).__name__)
                    return
                self.cursors[name] = lines[-1].cursor
                if backend.kind != "local":  # a local log is a file read from its start cheaply
                    saved.append((name, backend.kind, lines[-1].cursor))
                total += len(lines)
                metrics.LOG_LINES.labels(backend.kind).inc(len(lines))

        due_now = []
        for name, (account, status) in list(self.known.items()):
            if name in self.drained or (name in self.posting and status not in FINAL):
                continue  # a posting trainer's log is only the fallback, read at its end
            due, _ = self._tail_due.get(name, (now, 0.0))
            if respect_backoff and due > now and status not in FINAL:
                continue
            due_now.append((name, account, status))
        # A few workers take the due services in turn: a task per service would cost more
        # than the tail itself with ten thousand quiet services.
        todo = iter(due_now)

        async def worker() -> None:
            for name, account, status in todo:
                await one(name, account, status)

        async with anyio.create_task_group() as tg:
            for _ in range(min(concurrency, len(due_now))):
                tg.start_soon(worker)
        if saved:
            await self._save_cursors(saved)
        return total

    async def _load_cursors(self) -> None:
        """The cursors a previous run persisted, for the backends that pay for a re-read."""
        kinds = sorted({b.kind for b in self.backends.values()} - {"local"})
        try:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(QC.load_cursors, kinds) if kinds else []
        except (asyncpg.PostgresError, *TRANSIENT_DB_ERRORS) as exc:
            log.warning("log_cursors_unavailable", error=str(exc) or type(exc).__name__)
            return
        for r in rows:
            self.cursors.setdefault(r["canon_name"], r["cursor"])
        self._cursors_loaded = True

    async def _save_cursors(self, saved: list[tuple[str, str, str]]) -> None:
        try:
            async with self.pool.acquire() as conn:
                await conn.execute(QC.save_cursors, *map(list, zip(*saved, strict=True)))
        except (asyncpg.PostgresError, *TRANSIENT_DB_ERRORS) as exc:
            # Kept in memory; at worst a restart reads these lines again (a no-op write).
            log.warning("log_cursors_not_saved", error=str(exc) or type(exc).__name__)


def split_redrawn(lines: Sequence[LogLine]) -> list[str]:
    """The messages of ``lines``, a message redrawn with bare ``\r`` (a progress bar) split
    into its pieces, so a sample printed after one is still seen."""
    out: list[str] = []
    for ln in lines:
        if "\r" in ln.message:
            out.extend(p for p in ln.message.split("\r") if p)
        else:
            out.append(ln.message)
    return out
