"""The Gate-0 smoke race: 7 tags x 3 seeds of 500 steps under the real worker loop, then the
14 acceptance criteria, the verdict and the report.

One run: plan fresh seeds (each tag owns seeds base..base+9; a run takes the first ones no run
used before, NEVER REUSE), admit the trials into a new race of kind 'smoke', start the daemon
(``gardener.loop.daemon.serve``) in-process, run the probes while the trainers run, wait for
every trial to reach its last step (or the wallclock), tear down, check the criteria, record
SMOKE_DONE only if all are GREEN, and write the report.
"""

from __future__ import annotations

import re
import resource
import time
import tomllib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from gardener import logs
from gardener.backends.base import ACTIVE, ServiceState
from gardener.core import canon as canon_mod
from gardener.errors import ConfigError, UserError
from gardener.ledger import db, migrate, trials
from gardener.ledger.queries import Queries
from gardener.race import criteria as crit
from gardener.settings import Settings
from gardener.trainer import spec as trainer_spec

Q = Queries("race.sql")


def log() -> Any:
    """The smoke race's logger, looked up when used (after the CLI configured logging)."""
    return logs.get_logger("gardener.smoke")


TERMINAL_OBSERVED = frozenset({"succeeded", "failed", "stopped", "removed"})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


class SeedsExhausted(UserError):
    """A tag's seed block has fewer unused seeds than the run needs (NEVER REUSE)."""


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``90``, ``90s``, ``30m`` or ``1.5h``."""
    if isinstance(text, int | float):
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"bad duration {text!r}: use e.g. 90s, 30m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@dataclass(frozen=True)
class TagSpec:
    """A tag of the smoke command and what it names: canon base and seed block."""

    spec: str
    canon: str
    seed_base: int


@dataclass(frozen=True)
class SmokeConfig:
    """``configs/gate0-smoke.toml`` after the command's flags were applied."""

    tags: tuple[str, ...]
    tag_specs: Mapping[str, TagSpec]
    name_prefix: str = "gate0-smoke"
    account: str = "acc1"
    backend: str = "local"
    seeds_per_tag: int = 3
    max_steps: int = 500
    wallclock_s: float = 1800.0
    auto_teardown: bool = True
    report: str | None = "docs/SMOKE_GATE_0_REPORT.md"
    corpus: str = "stdlib"
    rungs: tuple[int, ...] = (100, 500)
    decision: Mapping[str, Any] = field(default_factory=dict)
    criteria: crit.CriteriaConfig = field(default_factory=crit.CriteriaConfig)
    source: str = ""

    def with_overrides(self, **changes: Any) -> SmokeConfig:
        """The config with the non-None flags applied; rungs follow a changed ``max_steps``."""
        given = {k: v for k, v in changes.items() if v is not None}
        if "wallclock" in given:
            given["wallclock_s"] = parse_duration(given.pop("wallclock"))
        if "tags" in given and isinstance(given["tags"], str):
            given["tags"] = tuple(t.strip() for t in given["tags"].split(",") if t.strip())
        if "criteria" in given and isinstance(given["criteria"], Mapping):
            given["criteria"] = replace(self.criteria, **given["criteria"])
        out = replace(self, **given)
        if "max_steps" in given and "rungs" not in given:
            first = self.rungs[0] if self.rungs[0] < out.max_steps else out.max_steps // 2
            out = replace(out, rungs=(first, out.max_steps))
        out.validate()
        return out

    def validate(self) -> None:
        unknown = [t for t in self.tags if t not in self.tag_specs]
        if unknown:
            known = ", ".join(self.tag_specs)
            raise ConfigError(f"unknown smoke tag(s) {unknown} (known: {known})")
        if not self.tags:
            raise ConfigError("no smoke tags")
        if not 1 <= self.seeds_per_tag <= self.criteria.seed_block:
            raise ConfigError(
                f"--seeds-per-tag must be 1..{self.criteria.seed_block}, got {self.seeds_per_tag}"
            )
        if self.max_steps < 20:
            raise ConfigError(f"--max-steps must be at least 20, got {self.max_steps}")
        if self.backend not in ("local", "railway"):
            raise ConfigError(f"unknown backend {self.backend!r} (local or railway)")


def config_candidates() -> list[Path]:
    """Where gate0-smoke.toml is looked for: the installed wheel's copy, then the repository."""
    here = Path(__file__).resolve()
    return [here.parents[1] / "_configs" / "gate0-smoke.toml",
            here.parents[2] / "configs" / "gate0-smoke.toml"]


def load_config(path: str | Path | None = None) -> SmokeConfig:
    """Read and validate the smoke config (an explicit path, else the first candidate)."""
    if path is None:
        found = next((p for p in config_candidates() if p.is_file()), None)
        if found is None:
            raise ConfigError("gate0-smoke.toml not found in "
                              + ", ".join(map(str, config_candidates())))
        path = found
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: Mapping[str, Any], source: str = "") -> SmokeConfig:
    where = source or "smoke config"
    race = dict(raw.get("race", {}))
    specs: dict[str, TagSpec] = {}
    for spec, entry in dict(raw.get("tags", {})).items():
        try:
            specs[spec] = TagSpec(spec, str(entry["canon"]), int(entry["seed_base"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: tag {spec!r}: bad or missing {exc}") from None
        try:
            canon_mod.parse(f"{specs[spec].canon}-seed{specs[spec].seed_base}")
        except UserError as exc:
            raise ConfigError(f"{where}: tag {spec!r}: {exc}") from None
    from gardener.core.config import DecisionConfig

    bad_decision = set(dict(raw.get("decision", {}))) - set(DecisionConfig.__dataclass_fields__)
    if bad_decision:
        raise ConfigError(f"{where}: unknown [decision] keys {sorted(bad_decision)}")
    known = {f.name for f in crit.CriteriaConfig.__dataclass_fields__.values()}
    c_raw = dict(raw.get("criteria", {}))
    bad = set(c_raw) - known
    if bad:
        raise ConfigError(f"{where}: unknown [criteria] keys {sorted(bad)}")
    try:
        cfg = SmokeConfig(
            tags=tuple(race.get("tags", list(specs))),
            tag_specs=specs,
            name_prefix=str(race.get("name_prefix", "gate0-smoke")),
            account=str(race.get("account", "acc1")),
            backend=str(race.get("backend", "local")),
            seeds_per_tag=int(race.get("seeds_per_tag", 3)),
            max_steps=int(race.get("max_steps", 500)),
            wallclock_s=parse_duration(race.get("wallclock", "30m")),
            auto_teardown=bool(race.get("auto_teardown", True)),
            report=race.get("report"),
            corpus=str(race.get("corpus", "stdlib")),
            rungs=tuple(int(r) for r in race.get("rungs", (100, 500))),
            decision=dict(raw.get("decision", {})),
            criteria=crit.CriteriaConfig(**c_raw),
            source=where,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    cfg.validate()
    return cfg


# ---- planning and admission -----------------------------------------------------------------


@dataclass(frozen=True)
class PlannedTrial:
    tag: str
    canon: canon_mod.CanonName
    hidden_size: int
    variables: dict[str, str]

    @property
    def name(self) -> str:
        return str(self.canon)


async def plan(conn: asyncpg.Connection, cfg: SmokeConfig) -> list[PlannedTrial]:
    """The run's trials: per tag, the first ``seeds_per_tag`` seeds of its block not used yet."""
    models = trainer_spec.load_models_config()
    block = cfg.criteria.seed_block
    out: list[PlannedTrial] = []
    for tag in cfg.tags:
        ts = cfg.tag_specs[tag]
        base = canon_mod.parse(f"{ts.canon}-seed{ts.seed_base}")
        used = {int(r["seed"]) for r in await conn.fetch(
            Q.used_seeds_in_block, base.variant, ts.seed_base, ts.seed_base + block - 1)}
        free = [s for s in range(ts.seed_base, ts.seed_base + block) if s not in used]
        if len(free) < cfg.seeds_per_tag:
            raise SeedsExhausted(
                f"tag {tag}: seed block {ts.seed_base}..{ts.seed_base + block - 1} of "
                f"{base.variant} has {len(free)} unused seed(s), the run needs "
                f"{cfg.seeds_per_tag} (NEVER REUSE; used: {sorted(used)})"
            )
        for seed in free[: cfg.seeds_per_tag]:
            c = base.with_seed(seed)
            hidden = trainer_spec.hidden_size_for(c, models)
            variables = trainer_spec.trainer_variables(
                c, steps=cfg.max_steps, corpus=cfg.corpus, models=models)
            out.append(PlannedTrial(tag, c, hidden, variables))
    return out


def race_name(prefix: str, now: datetime) -> str:
    return f"{prefix}-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}"


async def admit_race(
    conn: asyncpg.Connection, cfg: SmokeConfig, name: str, *, corpus_sha256: str | None
) -> list[PlannedTrial]:
    """Plan and admit in one transaction, serialised with other smoke runs by an advisory lock,
    so two runs at once can never pick the same seeds."""
    async with conn.transaction():
        await conn.execute(Q.advisory_lock_smoke)
        if await conn.fetchval("SELECT 1 FROM races WHERE name = $1", name):
            raise UserError(f"race {name!r} already exists")
        planned = await plan(conn, cfg)
        config = {
            "smoke": True,
            "tags": list(cfg.tags),
            "seeds_per_tag": cfg.seeds_per_tag,
            "max_steps": cfg.max_steps,
            "rungs": list(cfg.rungs),
            "decision": dict(cfg.decision),
            "corpus": cfg.corpus,
            "corpus_sha256": corpus_sha256,
            "backend": cfg.backend,
            "source": cfg.source,
        }
        await trials.ensure_race(conn, name, cfg.account, kind="smoke", horizon=cfg.max_steps,
                                 config=config)
        await trials.admit(
            conn, name, cfg.account,
            [trials.Admission(p.canon, hidden_size=p.hidden_size, steps=cfg.max_steps,
                              spawn_reason="smoke", seed_strategy="smoke-block",
                              variables=p.variables) for p in planned],
            backend=cfg.backend,
        )
    return planned


# ---- the run --------------------------------------------------------------------------------


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


@dataclass
class SmokeResult:
    race: str
    account: str
    planned: list[PlannedTrial]
    criteria: list[crit.Criterion]
    smoke_done: bool
    timings: dict[str, float]
    report: Path | None = None

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
        }


ServeFn = Callable[..., Awaitable[None]]
ObserveFn = Callable[[], Awaitable[Sequence[ServiceState]]]


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
            or r["observed_state"] in TERMINAL_OBSERVED,
        })
    return rows


async def run_smoke(
    cfg: SmokeConfig,
    settings: Settings,
    *,
    dsn: str,
    serve: ServeFn | None = None,
    observe: ObserveFn | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    clock: Callable[[], float] = time.monotonic,
    poll_s: float = 1.0,
    name: str | None = None,
    write_report: bool = True,
) -> SmokeResult:
    """Run one smoke race end to end and return its criteria (the caller decides the exit)."""
    from gardener.trainer.data import describe

    serve_fn = serve or default_serve()
    t0 = clock()
    corpus_name, corpus_sha = describe(cfg.corpus)
    timings: dict[str, float] = {}
    conn = await db.connect(dsn)
    try:
        await migrate.migrate(conn)
        race = name or race_name(cfg.name_prefix, now())
        planned = await admit_race(conn, cfg, race, corpus_sha256=corpus_sha)
        timings["admitted_s"] = clock() - t0
        log().info("smoke_admitted", race=race, trials=len(planned),
                 seeds=sorted(p.canon.seed for p in planned))
        ctx = crit.RaceContext(
            race=race, account=cfg.account, expected_names=tuple(p.name for p in planned),
            max_steps=cfg.max_steps, eval_every=int(planned[0].variables["TRAIN_EVAL_EVERY"]),
            corpus=corpus_name, corpus_sha256=corpus_sha, config=cfg.criteria,
        )
        probes: dict[int, crit.Criterion] = {}
        stop = anyio.Event()
        phase = ["running"]
        deadline = t0 + cfg.wallclock_s

        async def daemon() -> None:
            await serve_fn(settings, dsn=dsn, stop=stop, install_signal_handlers=False, http=False)

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
                    5: lambda: crit.probe_lr9(pconn, ctx, seed=planned[0].canon.seed),
                    7: lambda: crit.probe_used_slot(pconn, ctx),
                    8: lambda: crit.probe_force_replace(
                        pconn, ctx, challenger=cfg.criteria.force_replace_challenger),
                    9: lambda: crit.probe_cross_account_kill(pconn, ctx, victim_account=victim),
                    10: lambda: crit.probe_exp_claims(dsn, ctx),
                }
                for n, check in checks.items():
                    try:
                        probes[n] = await check()
                    except (asyncpg.PostgresError, OSError, UserError) as exc:
                        # The probe itself broke: RED with what happened, the race goes on.
                        probes[n] = crit.Criterion(n, crit.TITLES[n], False,
                                                   f"the probe failed: {type(exc).__name__}: {exc}")
                timings["probes_done_s"] = clock() - t0
            finally:
                await pconn.close()

        async def watch() -> None:
            while True:
                rows = await progress_rows(conn, race, cfg.max_steps)
                if on_progress:
                    on_progress(Progress(race, clock() - t0, tuple(rows), phase[0]))
                if rows and all(r["done"] for r in rows) and len(probes) == 5:
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
        observed = await observe() if observe is not None else None
        results = await crit.evaluate(conn, ctx, probes, observed=observed)
        timings["checked_s"] = clock() - t0
        ok = await crit.record_verdict(conn, race, results, timings=timings)
        results.append(await crit.smoke_done(conn, ctx))
        timings["total_s"] = clock() - t0
        result = SmokeResult(race, cfg.account, planned, results, ok and results[-1].green, timings)
        if write_report and cfg.report:
            from gardener.race import report as report_mod

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            extra = {"gardener process peak RSS": f"{peak:.0f} MB (the worker loop, probes "
                     "and this command; trainers are separate processes)"}
            result.report = await report_mod.write_report(
                conn, race, Path(cfg.report), criteria=results, timings=timings, extra=extra)
        log().info("smoke_finished", race=race, smoke_done=result.smoke_done,
                 red=[c.number for c in results if not c.green], **timings)
        return result
    finally:
        await conn.close()


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
                    if r["observed_state"] in crit.RUNNING_OBSERVED]
        if not procs and not active and not believed:
            return
        await anyio.sleep(poll_s)
    log().warning("smoke_teardown_timeout", race=ctx.race, timeout_s=limit_s)
