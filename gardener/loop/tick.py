"""One tick: find the races that need deciding, decide them with the pure core, apply.

Which races, each tick:

- crossings: a live trial whose highest step reached a rung above its recorded ``rung``.
  New samples are found by id watermark (``id >`` what was seen ``settle`` seconds ago, so a
  row committed a little after a higher id is still found) and checked at once; a
  level-triggered rescan runs at start and every ``rescan_every`` seconds, so a row
  committed late (ids are handed out before commit) or a lost notification is still seen.
  The rescan asks PostgreSQL for the crossing trials only (each trial's ``last_step``, which
  the ingest writer keeps, and the samples since the rescan before the last one; every
  sample at start), so its cost in the daemon does not grow with the fleet. Crossing races
  are decided in the same tick.
- a new sample below the architectural floor: decided at once as well.
- new samples without a crossing: the race is decided at most every ``min_interval`` (the
  core may kill a DIVERGING trial or fire a tripwire at any step), after the crossings and
  within ``soft_budget`` seconds per tick, so a crossing never waits long behind them.
- stalls: a trial that should run and has been silent longer than ``stall_after`` (looked
  for at each rescan).

Then every running race whose trials all ended is marked done (and torn down if its config
says ``auto_teardown``): the races decided in this tick, or all of them after the reconciler
saw a change, at a rescan and on resume. Mutating work stops while paused: decisions come
back from the core as HOLD and are logged once per key, and no race is finished or torn
down.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import asyncpg
import structlog

from gardener.core.config import DecisionConfig
from gardener.core.decide import decide
from gardener.core.types import Action, Decision
from gardener.ledger import control as ledger_control
from gardener.ledger.apply import (
    Applied,
    Outcome,
    action_key,
    apply_group,
    group_by_trial_rung,
)
from gardener.ledger.queries import Queries
from gardener.ledger.snapshot import (
    RaceInfo,
    SampleCache,
    base_config,
    load_snapshot,
    race_config,
)
from gardener.loop import metrics
from gardener.loop.control import TRANSIENT_DB_ERRORS, LoopState
from gardener.loop.leader import LeadershipLost
from gardener.settings import Settings

Q = Queries("loop.sql")
log = structlog.get_logger("gardener.loop.tick")  # lazy: resolved after logs.configure


@dataclass
class TickReport:
    """What one tick saw and did (the ``--once`` output and the tests read it)."""

    paused: bool = False
    crossings: list[str] = field(default_factory=list)
    decided: list[str] = field(default_factory=list)
    applied: int = 0
    held: int = 0
    duplicates: int = 0
    tripwires: int = 0
    spawned: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class Ticker:
    """The tick's state across calls: the watermark, what is pending, when races were decided."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        *,
        state: LoopState | None = None,
        account: str | None = None,
        decided_by: str = "gardener",
        backend: str = "local",
        rescan_every: float = 30.0,
        min_interval: float | None = None,
        soft_budget: float = 0.1,
        soft_share: float | None = 0.02,
        settle: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_desired_change: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.state = state
        self.account = account
        self.decided_by = decided_by
        self.backend = backend
        self.rescan_every = rescan_every
        self.min_interval = (
            max(5 * settings.poll_interval, 10.0) if min_interval is None else min_interval
        )
        self.soft_budget = soft_budget
        self.soft_share = soft_share
        self._cost: dict[str, float] = {}  # seconds the last decide of each race took
        self.clock = clock
        self.on_desired_change = on_desired_change
        self.base = base_config(settings)
        self.floor = self.base.architectural_floor_bpb
        self.watermark: int | None = None  # the highest sample id seen
        self.settle = settle
        self._marks: deque[tuple[float, int]] = deque()  # (clock, highest id seen then)
        self._last_rescan = float("-inf")
        self._last_decided: dict[str, float] = {}
        self._soft: set[str] = set()  # races with new samples, decided at most every min_interval
        self._holding: set[str] = set()  # races whose last decide held something
        self._was_paused: bool | None = None
        self._was_paused_before = False  # this tick is the first after a resume
        self.samples = SampleCache()  # per-race samples: a snapshot reads only new rows
        self.ack_window = max(120.0, 4 * rescan_every)
        self._acks_seen: set[int] | None = None  # acknowledged tripwires already acted on
        self._rescan_highs: deque[int] = deque(maxlen=2)  # the sample id at the last rescans
        # Per race: its config (with the race's settings it came from) and the lowest rung
        # boundary above each rung, built once per config rather than once per tick.
        self._configs: dict[str, tuple[Mapping[str, Any], DecisionConfig, list[int | None]]] = {}

    # -- helpers ------------------------------------------------------------------------------
    def _stopping(self) -> bool:
        return self.state is not None and self.state.stop.is_set()

    def _paused_now(self, fallback: bool) -> bool:
        return self.state.paused if self.state is not None else fallback

    def config_for(self, race: RaceInfo) -> DecisionConfig:
        return self._config_entry(race)[1]

    def _config_entry(
        self, race: RaceInfo
    ) -> tuple[Mapping[str, Any], DecisionConfig, list[int | None]]:
        held = self._configs.get(race.name)
        if held is None or held[0] != race.config:
            cfg = race_config(self.base, race)
            rungs = list(cfg.rungs)
            # A trial at rung k crossed once its step reaches the lowest boundary above k.
            above = [min(rungs[k + 1 :], default=None) for k in range(-1, len(rungs))]
            held = self._configs[race.name] = (race.config, cfg, above)
        return held

    def _soft_interval(self, name: str) -> float:
        """How long a race with new samples but no crossing waits between decides: at least
        ``min_interval``, and long enough that these decides take at most ``soft_share`` of
        the ticker's time (each race's last decide duration times the races waiting), so a
        crossing rarely arrives while one runs: 10 s at a hundred trials, about a minute for
        ten races of a thousand."""
        if self.soft_share is None:
            return self.min_interval
        share = self._cost.get(name, 0.0) * len(self._soft) / self.soft_share
        return max(self.min_interval, share)

    def _next_boundaries(self, races: dict[str, RaceInfo]) -> dict[str, list[int | None]]:
        return {name: self._config_entry(race)[2] for name, race in races.items()}

    async def _races(self, conn: asyncpg.Connection) -> dict[str, RaceInfo]:
        rows = await conn.fetch(Q.running_races)
        races = {r["name"]: RaceInfo.from_row(r) for r in rows}
        if self.account is not None:
            races = {k: v for k, v in races.items() if v.account == self.account}
        for name in set(self._configs) - set(races):
            del self._configs[name]
        for name in set(self._cost) - set(races):
            del self._cost[name]
        return races

    # -- the tick -----------------------------------------------------------------------------
    async def tick(self) -> TickReport:
        """Detect, decide, apply and finish; returns what it did."""
        started = time.perf_counter()
        report = TickReport()
        async with self.pool.acquire() as conn:
            ctl = await ledger_control.get(conn)
            if self.state is not None:
                self.state.set_paused(ctl.paused, ctl.reason, ctl.changed_by, "tick")
            paused = ctl.paused
            report.paused = paused
            races = await self._races(conn)
            self.samples.retain(set(races))
            now = self.clock()
            crossing: set[str] = set()
            # Wake-ups from here on may be new samples this tick does not see: it yields to them.
            seen_wakeups = self.state.tick_wakeup.seq if self.state is not None else 0
            high = int(await conn.fetchval(Q.max_sample_id))
            first = self.watermark is None
            rescan = first or now - self._last_rescan >= self.rescan_every
            if rescan:
                # Samples above the id seen two rescans ago (all of them at start): a row
                # committed late is read at a later rescan, and the writer's rows have already
                # moved their trial's last_step.
                mark = self._rescan_highs[0] if self._rescan_highs and not first else 0
                rows = await conn.fetch(Q.live_crossings, self._next_boundaries(races), mark)
                crossing |= {r["race"] for r in rows if r["race"] in races}
                self._rescan_highs.append(high)
                # Stalls are minutes long: looking for them at each rescan is soon enough.
                for r in await conn.fetch(Q.stalled_candidates, float(self.settings.stall_after)):
                    if r["race"] in races:
                        crossing.add(r["race"])
                self._last_rescan = now
                if first:
                    self._soft |= set(races)  # after a restart: look at every race once
            low = self._settled_watermark(now, high)
            if low is not None and high > low:
                # One row per race with new samples, whatever the number of trials that sent
                # them. A sample below the floor is looked at now, not at the next rung.
                rows = await conn.fetch(
                    Q.new_samples_by_race, low, high, self._next_boundaries(races), self.floor
                )
                rows = [r for r in rows if r["race"] in races]
                crossing |= {r["race"] for r in rows if r["crossed"] or r["below_floor"]}
                self._soft |= {r["race"] for r in rows}
            self.watermark = high
            # A race that only holds does not need deciding on every sample.
            held_again = crossing & self._holding
            crossing -= held_again
            self._soft |= held_again
            self._was_paused_before = bool(self._was_paused) and not paused
            if self._was_paused_before:
                crossing |= self._holding & set(races)  # resumed: held decisions go now
            control = self.state is None or self.state.take_control()
            if control or rescan:
                # A tripwire acknowledged: what it held goes now, not at the next rescan.
                crossing |= await self._acked(conn) & set(races)
            self._was_paused = paused
            soft_due: list[str] = []
            for name in sorted(self._soft - crossing):
                if name not in races:
                    self._soft.discard(name)
                elif now - self._last_decided.get(name, float("-inf")) >= self._soft_interval(
                    name
                ):
                    soft_due.append(name)
            report.crossings = sorted(crossing)
            # Crossings first; the other races only within a time budget, and not once a new
            # notification is waiting (it may be a crossing): they stay due for the next tick.
            soft_until = time.perf_counter() + self.soft_budget
            for name in [*sorted(crossing), *soft_due]:
                if self._stopping():
                    break
                if name not in crossing and (
                    time.perf_counter() > soft_until
                    or (self.state is not None and self.state.tick_wakeup.seq != seen_wakeups)
                ):
                    break
                self._soft.discard(name)
                self._last_decided[name] = now
                race = races[name]
                if not race.decides:
                    continue
                try:
                    began = time.perf_counter()
                    await self._decide_race(conn, race, paused, report)
                    self._cost[name] = time.perf_counter() - began
                except TRANSIENT_DB_ERRORS:
                    raise
                except LeadershipLost:
                    raise
                except Exception as exc:  # a bad race must not stop the others
                    metrics.TICK_ERRORS.inc()
                    report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                    log.exception("race_decide_failed", race=name, account=race.account)
                    self._soft.add(name)
            # Races end when trials end (the reconciler saw it) or were stopped (a decision).
            observed = self.state is None or self.state.take_observed_changed()
            if (
                not paused
                and not self._stopping()
                and (observed or rescan or report.applied or self._was_paused_before)
            ):
                # Which races may have ended: any, once the reconciler saw a trial change (or
                # at a rescan, or on resume); otherwise only those a decision was applied to.
                every = observed or rescan or self._was_paused_before
                candidates = None if every else sorted(set(report.decided))
                # A race still waiting for a decide is not finished yet, whatever its trials do.
                await self._finish_races(
                    conn, races, high, set(self._soft), report, candidates
                )
        report.seconds = time.perf_counter() - started
        metrics.TICK_SECONDS.observe(report.seconds)
        if report.decided or report.finished:
            log.debug(
                "tick",
                seconds=round(report.seconds, 4),
                crossings=report.crossings,
                decided=report.decided,
                applied=report.applied,
                held=report.held,
            )
        if self.state is not None:
            self.state.last_tick_at = time.time()
        return report

    async def _acked(self, conn: asyncpg.Connection) -> set[str]:
        """The races of tripwires acknowledged since the last look (none at the first look:
        a restarted loop looks at every race anyway)."""
        rows = await conn.fetch(Q.recent_acks, self.ack_window)
        ids = {int(r["id"]) for r in rows}
        seen, self._acks_seen = self._acks_seen, ids
        if seen is None:
            return set()
        out = {r["race"] for r in rows if int(r["id"]) not in seen and r["race"] is not None}
        for name in sorted(out):
            log.info("tripwire_acknowledged", race=name)
        return out

    def _settled_watermark(self, now: float, high: int) -> int | None:
        """Where this tick's scan starts: the highest id seen ``settle`` seconds ago.

        Ids are taken at insert and become visible at commit, so a row may appear below an
        id already seen; re-reading the last few seconds of ids finds it (a crossing found
        twice is decided once: the trial's rung moved on). Older stragglers are found by the
        rescan.
        """
        if self.watermark is None:
            self._marks.append((now, high))
            return None
        low = self._marks[0][1]
        while len(self._marks) > 1 and self._marks[1][0] <= now - self.settle:
            self._marks.popleft()
            low = self._marks[0][1]
        if self._marks[0][0] > now - self.settle:
            low = min(low, self.watermark)
        self._marks.append((now, high))
        return low

    async def decide_race(self, conn: asyncpg.Connection, race: RaceInfo) -> TickReport:
        """Decide and apply one race now (the CLI and the benchmarks use this)."""
        report = TickReport()
        paused = (await ledger_control.get(conn)).paused
        report.paused = paused
        await self._decide_race(conn, race, paused, report)
        return report

    async def _decide_race(
        self, conn: asyncpg.Connection, race: RaceInfo, paused: bool, report: TickReport
    ) -> None:
        t0 = time.perf_counter()
        snapshot = await load_snapshot(
            conn,
            race,
            paused=paused,
            expected_corpus_sha256=self.settings.corpus_sha256,
            expected_corpus=self.settings.corpus,
            cache=self.samples,
        )
        metrics.SNAPSHOT_SECONDS.observe(time.perf_counter() - t0)
        cfg = self.config_for(race)
        t0 = time.perf_counter()
        decisions = await anyio.to_thread.run_sync(decide, snapshot, cfg)
        metrics.FIT_SECONDS.observe(time.perf_counter() - t0)
        report.decided.append(race.name)
        holding = False
        changed = False
        fence = self.state.fence if self.state is not None else None
        # One trial's decisions at one rung commit together (a stop or a pause never falls
        # between a leader's MIRROR and its PROMOTE).
        for group in group_by_trial_rung(decisions):
            if self._stopping():
                break
            if any(d.mutates for d in group) and self._paused_now(paused):
                holding = True  # paused after the snapshot: it comes back as HOLD next tick
                continue
            with anyio.CancelScope(shield=True):  # a started transaction is finished
                results = await apply_group(
                    conn,
                    race.name,
                    race.account,
                    group,
                    decided_by=self.decided_by,
                    backend=self.backend,
                    fence=fence,
                )
            for d, result in zip(group, results, strict=True):
                holding |= d.action is Action.HOLD
                changed |= result.changed_desired_state
                self._record(race, result, report)
        if holding:
            self._holding.add(race.name)
        else:
            self._holding.discard(race.name)
        if changed and self.on_desired_change is not None:
            self.on_desired_change()

    def _record(self, race: RaceInfo, result: Applied, report: TickReport) -> None:
        d: Decision = result.decision
        metrics.DECISIONS.labels(d.action.value, result.outcome.value).inc()
        if result.outcome is Outcome.DUPLICATE:
            report.duplicates += 1
            return
        bound = log.bind(race=race.name, canon_name=d.canon_name, rung=d.rung, account=race.account)
        if result.outcome is Outcome.HELD:
            report.held += 1
            bound.info(
                "decision_held",
                action=action_key(d),
                reason=d.reason,
                decision_id=result.decision_id,
            )
            return
        report.applied += 1
        if d.action is Action.TRIPWIRE and d.tripwire is not None:
            report.tripwires += 1
            metrics.TRIPWIRES.labels(d.tripwire.kind).inc()
            bound.warning(
                "tripwire",
                kind=d.tripwire.kind,
                evidence=d.tripwire.evidence,
                blocks_promotions=d.tripwire.blocks_promotions,
                tripwire_id=result.tripwire_id,
            )
            return
        if d.action is Action.PRUNE:
            report.stopped.append(d.canon_name)
        report.spawned.extend(result.spawned)
        bound.info(
            "decision",
            action=d.action.value,
            seed_state=d.seed_state.value,
            reason=d.reason,
            spawned=list(result.spawned),
            decision_id=result.decision_id,
        )

    async def _finish_races(
        self,
        conn: asyncpg.Connection,
        races: dict[str, RaceInfo],
        watermark: int,
        waiting: set[str],
        report: TickReport,
        candidates: list[str] | None = None,
    ) -> None:
        """Mark done every running race (of ``candidates``, when given) whose trials all ended
        and whose every sample was decided on; tear down if asked."""
        for row in await conn.fetch(Q.finished_races, watermark, candidates):
            race = races.get(row["name"])
            if race is None or race.name in waiting:
                continue
            with anyio.CancelScope(shield=True):
                async with conn.transaction():
                    if self.state is not None and self.state.fence is not None:
                        await self.state.fence(conn)
                    if await conn.fetchval(Q.mark_race_done, race.name) is None:
                        continue
                    if race.auto_teardown:
                        await conn.execute(Q.teardown_race, race.name)
                    await conn.fetchval(
                        Q.insert_applied_decision,
                        race.name,
                        -1,
                        race.name,
                        "race_done",
                        None,
                        {"auto_teardown": race.auto_teardown},
                        "every trial stopped or finished"
                        + ("; tearing down its services" if race.auto_teardown else ""),
                        self.decided_by,
                    )
            report.finished.append(race.name)
            metrics.RACES_DONE.inc()
            log.info(
                "race_done",
                race=race.name,
                account=race.account,
                auto_teardown=race.auto_teardown,
            )
            if race.auto_teardown and self.on_desired_change is not None:
                self.on_desired_change()
