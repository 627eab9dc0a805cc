"""The level-triggered reconciler: observe, diff, take the next idempotent step per service.

``plan(desired, observed)`` is a pure function from the two states to a list of ``Step``s;
``reconcile_once`` observes the backend, plans, and runs the steps (a few at a time), keeping
per-service backoff in a ``Backoff`` the caller owns across passes, so one broken service does
not stall the rest. It never touches a service the gardener did not create (``owned`` False);
an owned service no desired spec mentions is an orphan, reported, and removed only with
``prune_orphans``. A spent request budget ends the pass early and the report says so.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

from gardener.backends.base import (
    ACTIVE,
    Backend,
    BudgetExhausted,
    EnsureOutcome,
    PermanentBackendError,
    ServiceSpec,
    ServiceState,
    Status,
    TemporaryBackendError,
)
from gardener.backends.metrics import RECONCILE_STEPS
from gardener.core.types import DesiredState
from gardener.errors import UserError

log = structlog.get_logger("gardener.backends.reconcile")
PLAN_INLINE = 2000  # services (desired and observed) planned in the event loop itself


class StepKind(StrEnum):
    CREATE = "create"  # no service yet: ensure
    START = "start"  # exists, nothing runs: ensure
    RESTART = "restart"  # crashed with retries left: ensure
    STOP = "stop"
    REMOVE = "remove"
    PRUNE_ORPHAN = "prune_orphan"  # owned, not desired, prune_orphans set: remove
    REPORT_ORPHAN = "report_orphan"  # owned, not desired: reported only
    REPORT_FAILED = "report_failed"  # desired running, failed for good: the daemon decides
    CONFLICT = "conflict"  # desired, but its name is held by a service we did not create


ACTING = frozenset(
    {StepKind.CREATE, StepKind.START, StepKind.RESTART, StepKind.STOP, StepKind.REMOVE,
     StepKind.PRUNE_ORPHAN}
)


@dataclass(frozen=True)
class Step:
    kind: StepKind
    canon_name: str
    reason: str
    spec: ServiceSpec | None = None
    observed: ServiceState | None = None

    @property
    def acts(self) -> bool:
        return self.kind in ACTING


def plan(
    desired: Sequence[ServiceSpec],
    observed: Sequence[ServiceState],
    *,
    prune_orphans: bool = False,
    name_of: Callable[[str], str] | None = None,
) -> list[Step]:
    """The next step for every service that is not where it should be (pure)."""
    owned: dict[str, ServiceState] = {}
    foreign_names: set[str] = set()
    for state in observed:
        if state.owned and state.canon_name:
            owned[state.canon_name] = state
        else:
            foreign_names.add(state.service_name)
    steps: list[Step] = []
    wanted: set[str] = set()
    for spec in desired:
        if spec.canon_name in wanted:
            raise ValueError(f"{spec.canon_name} is desired twice")
        wanted.add(spec.canon_name)
        have = owned.get(spec.canon_name)
        if have is None and name_of is not None and name_of(spec.canon_name) in foreign_names:
            if spec.desired is DesiredState.RUNNING:
                steps.append(Step(StepKind.CONFLICT, spec.canon_name,
                                  "its service name is held by a service we did not create", spec))
            continue
        step = _step_for(spec, have)
        if step is not None:
            steps.append(step)
    for canon, state in sorted(owned.items()):
        if canon in wanted or state.status is Status.REMOVED:
            continue
        kind = StepKind.PRUNE_ORPHAN if prune_orphans else StepKind.REPORT_ORPHAN
        steps.append(Step(kind, canon, "owned by the gardener, no desired trial", None, state))
    return steps


def _step_for(spec: ServiceSpec, have: ServiceState | None) -> Step | None:
    name = spec.canon_name
    if spec.desired is DesiredState.RUNNING:
        if have is None or have.status is Status.REMOVED:
            return Step(StepKind.CREATE, name, "desired running, no service", spec, have)
        if have.status is Status.STOPPED:
            return Step(StepKind.START, name, "desired running, nothing runs", spec, have)
        if have.status is Status.CRASHED:
            return Step(StepKind.RESTART, name, f"crashed ({have.raw_status})", spec, have)
        if have.status is Status.FAILED:
            return Step(StepKind.REPORT_FAILED, name, f"failed ({have.raw_status})", spec, have)
        return None  # pending, building, running, succeeded
    if spec.desired is DesiredState.STOPPED:
        if have is not None and (have.status in ACTIVE or have.status is Status.CRASHED):
            return Step(StepKind.STOP, name, f"desired stopped, is {have.status}", spec, have)
        return None
    if have is not None and have.status is not Status.REMOVED:
        return Step(StepKind.REMOVE, name, "desired removed, still exists", spec, have)
    return None


class Backoff:
    """Per-key exponential backoff on an injected clock (pure bookkeeping, no sleeping)."""

    def __init__(
        self, *, base: float = 2.0, cap: float = 300.0, jitter: float = 0.1,
        rng: random.Random | None = None,
    ) -> None:
        self.base, self.cap, self.jitter = base, cap, jitter
        self._rng = rng or random.Random()
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def ready(self, key: str, now: float) -> bool:
        return now >= self._until.get(key, float("-inf"))

    def wait(self, key: str, now: float) -> float:
        return max(0.0, self._until.get(key, now) - now)

    def failures(self, key: str) -> int:
        return self._failures.get(key, 0)

    def failure(self, key: str, now: float, retry_after: float | None = None) -> float:
        """Record a failure; returns the delay before ``key`` is tried again."""
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        delay = min(self.cap, self.base * 2 ** (n - 1))
        delay *= 1 + self.jitter * self._rng.random()
        if retry_after is not None:
            delay = max(delay, retry_after)
        self._until[key] = now + delay
        return delay

    def permanent(self, key: str, now: float) -> float:
        """A permanent error: wait the longest delay before trying again."""
        self._failures[key] = self._failures.get(key, 0) + 1
        self._until[key] = now + self.cap
        return self.cap

    def success(self, key: str) -> None:
        self._failures.pop(key, None)
        self._until.pop(key, None)


@dataclass
class StepResult:
    kind: StepKind
    canon_name: str
    outcome: str  # ensure's outcome, "stopped", "removed", "noop", or "error"
    error: str | None = None
    temporary: bool = False


@dataclass
class ReconcileReport:
    """What one pass saw and did."""

    backend: str
    observed: int = 0
    states: list[ServiceState] = field(default_factory=list)  # what observe() returned
    planned: list[Step] = field(default_factory=list)
    results: list[StepResult] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    backing_off: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)  # over this pass's step budget
    budget_exhausted: bool = False
    observe_error: str | None = None
    halted: bool = False  # may_act said no (paused, or no longer the leader): steps deferred

    @property
    def errors(self) -> list[StepResult]:
        return [r for r in self.results if r.error is not None]

    @property
    def converged(self) -> bool:
        """Nothing left to do: no acting step planned (reports only) and no observe error."""
        return self.observe_error is None and not any(s.acts for s in self.planned)

    def summary(self) -> dict[str, object]:
        return {
            "backend": self.backend, "observed": self.observed,
            "planned": len(self.planned), "done": len(self.results) - len(self.errors),
            "errors": len(self.errors), "orphans": len(self.orphans), "failed": len(self.failed),
            "conflicts": len(self.conflicts), "adopted": len(self.adopted),
            "restarted": len(self.restarted), "backing_off": len(self.backing_off),
            "deferred": len(self.deferred), "budget_exhausted": self.budget_exhausted,
            "halted": self.halted,
            "converged": self.converged,
        }


async def reconcile_once(
    desired: Sequence[ServiceSpec],
    backend: Backend,
    *,
    prune_orphans: bool = False,
    budget: int | None = None,
    backoff: Backoff | None = None,
    clock: Callable[[], float] = time.monotonic,
    concurrency: int = 4,
    may_act: Callable[[], Awaitable[bool]] | None = None,
) -> ReconcileReport:
    """One pass: observe once, plan, take at most ``budget`` acting steps (None: all).

    ``may_act`` is asked right before every mutating platform call (the daemon's: not
    paused, still the leader); when it says no, that step and every later one is deferred,
    so a pause or a lost leadership stops a pass already under way.

    A temporary error backs the service off (``retry_after`` honoured); a spent request
    budget stops the pass; a permanent error is reported and the service waits the longest
    backoff. Errors on one service never stop the others.
    """
    report = ReconcileReport(backend=backend.kind)
    backoff = backoff if backoff is not None else Backoff()
    try:
        observed = await backend.observe()
    except BudgetExhausted as exc:
        report.budget_exhausted = True
        report.observe_error = str(exc)
        log.warning("reconcile_budget_exhausted", backend=backend.kind, stage="observe")
        return report
    except TemporaryBackendError as exc:
        report.observe_error = str(exc)
        log.warning("reconcile_observe_failed", backend=backend.kind, error=str(exc))
        return report
    report.observed = len(observed)
    report.states = list(observed)
    report.adopted = sorted(s.canon_name for s in observed if s.adopted and s.canon_name)
    name_of = getattr(backend, "service_name_of", None)
    if len(desired) + len(observed) > PLAN_INLINE:
        # A fleet's plan (20-50 ms at ten thousand) runs beside the event loop, not in it.
        steps = await asyncio.to_thread(
            plan, desired, observed, prune_orphans=prune_orphans, name_of=name_of
        )
    else:
        steps = plan(desired, observed, prune_orphans=prune_orphans, name_of=name_of)
    report.planned = steps
    for step in steps:
        if step.kind in (StepKind.REPORT_ORPHAN, StepKind.PRUNE_ORPHAN):
            report.orphans.append(step.canon_name)
        elif step.kind is StepKind.REPORT_FAILED:
            report.failed.append(step.canon_name)
        elif step.kind is StepKind.CONFLICT:
            report.conflicts.append(step.canon_name)
    now = clock()
    todo: list[Step] = []
    for step in steps:
        if not step.acts:
            continue
        if not backoff.ready(step.canon_name, now):
            report.backing_off.append(step.canon_name)
        elif budget is not None and len(todo) >= budget:
            report.deferred.append(step.canon_name)
        else:
            todo.append(step)
    stop_event = asyncio.Event()
    gate = asyncio.Semaphore(max(1, concurrency))

    halted = asyncio.Event()

    async def run(step: Step) -> None:
        async with gate:
            if stop_event.is_set() or halted.is_set():
                report.deferred.append(step.canon_name)
                return
            if may_act is not None and not await may_act():
                halted.set()
                report.deferred.append(step.canon_name)
                return
            result = await _run_step(step, backend, backoff, clock, stop_event)
            report.results.append(result)
            if result.outcome == EnsureOutcome.RESTARTED.value:
                report.restarted.append(step.canon_name)
            if result.outcome == EnsureOutcome.FAILED.value:
                report.failed.append(step.canon_name)
            RECONCILE_STEPS.labels(
                backend.kind, step.kind.value, "error" if result.error else "ok"
            ).inc()

    async with asyncio.TaskGroup() as tg:
        for step in todo:
            tg.create_task(run(step))
    report.budget_exhausted = report.budget_exhausted or stop_event.is_set()
    report.halted = halted.is_set()
    log.info("reconcile_pass", **report.summary())
    return report


async def _run_step(
    step: Step, backend: Backend, backoff: Backoff, clock: Callable[[], float],
    stop_event: asyncio.Event,
) -> StepResult:
    key = step.canon_name
    try:
        if step.kind in (StepKind.CREATE, StepKind.START, StepKind.RESTART):
            assert step.spec is not None
            outcome = (await backend.ensure(step.spec)).value
        elif step.kind is StepKind.STOP:
            account = step.spec.account if step.spec else None
            outcome = "stopped" if await backend.stop(key, account=account) else "noop"
        else:
            account = step.spec.account if step.spec else backend.account
            outcome = "removed" if await backend.remove(key, account=account) else "noop"
    except BudgetExhausted as exc:
        stop_event.set()
        backoff.failure(key, clock(), exc.retry_after)
        log.warning("reconcile_budget_exhausted", canon_name=key, step=step.kind.value)
        return StepResult(step.kind, key, "error", str(exc), temporary=True)
    except TemporaryBackendError as exc:
        delay = backoff.failure(key, clock(), exc.retry_after)
        log.warning("reconcile_step_failed", canon_name=key, step=step.kind.value,
                    error=str(exc), retry_in=round(delay, 3))
        return StepResult(step.kind, key, "error", str(exc), temporary=True)
    except (PermanentBackendError, UserError) as exc:
        backoff.permanent(key, clock())
        log.error("reconcile_step_refused", canon_name=key, step=step.kind.value, error=str(exc))
        return StepResult(step.kind, key, "error", str(exc))
    backoff.success(key)
    log.info("reconcile_step", canon_name=key, step=step.kind.value, outcome=outcome)
    return StepResult(step.kind, key, outcome)
