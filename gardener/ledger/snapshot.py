"""Read one race out of the ledger as the plain ``Snapshot`` the pure core decides on.

Everything ``decide`` may look at comes from here in a handful of queries (the trials with
their samples as numpy arrays in arrival order, the seeds used per variant, the tripwires,
the race's horizon and expected corpus), read in one repeatable-read transaction so the
snapshot is one consistent moment. Times are epoch seconds on the database's clock, so a
daemon on a machine with a skewed clock still sees stalls right.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from gardener.core.config import DecisionConfig, Policy
from gardener.core.types import DesiredState, Snapshot, TrialView, TripwireEvent
from gardener.errors import ConfigError
from gardener.ledger.queries import Queries
from gardener.settings import Settings

Q = Queries("loop.sql")


@dataclass(frozen=True)
class RaceInfo:
    """A race row: what the loop needs besides the snapshot (account, config, kind)."""

    name: str
    account: str
    kind: str
    status: str
    horizon: int | None
    config: Mapping[str, Any]

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RaceInfo:
        return cls(
            name=row["name"],
            account=row["account"],
            kind=row["kind"],
            status=row["status"],
            horizon=row["horizon"],
            config=dict(row["config"] or {}),
        )

    @property
    def auto_teardown(self) -> bool:
        return bool(self.config.get("auto_teardown", False))

    @property
    def decides(self) -> bool:
        """A race may opt out of decisions (``{"decide": false}``): it only collects."""
        return bool(self.config.get("decide", True))


_CONFIG_FIELDS = {f.name for f in fields(DecisionConfig)}


def _config_overrides(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = set(raw) - _CONFIG_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown decision settings {sorted(unknown)}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "policy":
            out[key] = Policy(value)
        elif isinstance(value, list):
            out[key] = tuple(value)
        else:
            out[key] = value
    return out


def base_config(settings: Settings) -> DecisionConfig:
    """The daemon-wide config: settings (stall, floor), then the optional TOML file."""
    cfg = DecisionConfig(
        stall_timeout_s=settings.stall_after, architectural_floor_bpb=settings.floor_bpb
    )
    path: Path | None = settings.decision_config
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read decision config {path}: {exc}") from None
        cfg = _with(cfg, _config_overrides(raw.get("decision", raw), str(path)))
    return cfg


def _with(cfg: DecisionConfig, overrides: dict[str, Any]) -> DecisionConfig:
    rungs = overrides.pop("rungs", None)
    if rungs is not None and "rung_rules" not in overrides:
        cfg = cfg.with_rungs(tuple(int(r) for r in rungs))
    elif rungs is not None:
        overrides["rungs"] = tuple(int(r) for r in rungs)
    try:
        return replace(cfg, **overrides) if overrides else cfg
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad decision settings {overrides}: {exc}") from None


def race_config(base: DecisionConfig, race: RaceInfo) -> DecisionConfig:
    """A race's config: the base, then its ``config.decision`` table (and ``config.rungs``)."""
    raw = dict(race.config.get("decision") or {})
    if "rungs" in race.config and "rungs" not in raw:
        raw["rungs"] = race.config["rungs"]
    if not raw:
        return base
    return _with(base, _config_overrides(raw, f"race {race.name}"))


async def race_info(conn: asyncpg.Connection, race: str) -> RaceInfo | None:
    row = await conn.fetchrow(Q.race_row, race)
    return RaceInfo.from_row(row) if row is not None else None


def _event(row: Mapping[str, Any]) -> TripwireEvent:
    return TripwireEvent(
        kind=row["kind"],
        canon_name=row["canon_name"],
        evidence=dict(row["evidence"] or {}),
        blocks_promotions=bool(row["blocks_promotions"]),
    )


@dataclass
class _TrialSamples:
    """One trial's samples as the cache holds them: arrays in arrival order, the latest time."""

    steps: np.ndarray
    bpb: np.ndarray
    last_ts: float | None


@dataclass
class _RaceSamples:
    mark: int = 0  # the highest sample id merged into the cache
    trials: dict[tuple[str, int], _TrialSamples] = field(default_factory=dict)
    # The last view of each trial with the row it came from: reused while both are unchanged.
    views: dict[tuple[str, int], tuple[Mapping[str, Any], _TrialSamples, TrialView]] = field(
        default_factory=dict
    )


@dataclass
class SampleCache:
    """Samples of the races the loop decides, kept between snapshots so a snapshot reads
    only what is new.

    Each load reads the rows above the race's id watermark and, per trial, how many samples
    the ledger holds. Ids are taken at insert and visible at commit, so a row can appear
    below the watermark later: the count then exceeds what the cache holds plus the new rows,
    and that trial is read again in full (as is a trial the cache has not seen). Samples are
    only ever inserted, so equal counts mean equal rows: the snapshot is the one a full read
    gives. After a restart the cache is empty and the first load is a full read.
    """

    races: dict[str, _RaceSamples] = field(default_factory=dict)
    full_reads: int = 0  # trials read in full (first sight, or a row behind the watermark)
    rows_read: int = 0  # rows read by id above a watermark

    def retain(self, races: set[str]) -> None:
        """Forget the races no longer decided (done, or another account's)."""
        for name in set(self.races) - races:
            del self.races[name]


def _trial_view(r: Mapping[str, Any], steps: np.ndarray, bpb: np.ndarray, silent: Any) -> TrialView:
    return TrialView(
        canon_name=r["canon_name"],
        variant=r["variant"],
        seed=int(r["seed"]),
        steps=steps,
        bpb=bpb,
        desired_state=DesiredState(r["desired_state"]),
        observed_state=r["observed_state"],
        parent=r["parent"],
        rung=int(r["rung"]),
        last_sample_at=silent,
        corpus_sha256=r["corpus_sha256"],
        corpus=r["corpus"],
        hidden_size=r["hidden_size"],
        format=r["format"],
    )


async def _cached_trials(
    conn: asyncpg.Connection, race: str, cache: SampleCache
) -> tuple[list[Mapping[str, Any]], list[TrialView]]:
    """The race's trials with their samples from the cache, topped up from the ledger (inside
    the caller's repeatable-read transaction). The cache changes only once every query has
    answered, so a failed or cancelled load leaves it as it was."""
    rows = await conn.fetch(Q.snapshot_trials_meta, race)
    held = cache.races.get(race, _RaceSamples())
    new: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    mark = held.mark
    if race in cache.races:
        tail = await conn.fetch(Q.race_samples_after, race, held.mark)
        cache.rows_read += len(tail)
        for b in tail:
            new.setdefault((b["canon_name"], int(b["seed"])), []).append(b)
        if tail:
            mark = max(mark, int(tail[-1]["id"]))
    # One pass over the rows: a trial whose row and samples are unchanged (most of a race at
    # every crossing) gets its last view back at once; the others are settled after the full
    # reads of the trials whose samples the cache cannot prove it holds.
    held_trials, held_views = held.trials, held.views
    now_held: dict[tuple[str, int], _TrialSamples] = {}
    now_views: dict[tuple[str, int], tuple[Mapping[str, Any], _TrialSamples, TrialView]] = {}
    views: list[TrialView | None] = []
    later: list[tuple[int, tuple[str, int]]] = []  # (position, key): view made below
    again: list[str] = []
    for i, r in enumerate(rows):
        key = (r["canon_name"], int(r["seed"]))
        have = held_trials.get(key)
        add = new.get(key)
        n = int(r["n_samples"])
        if have is not None and len(have.steps) + (len(add) if add else 0) == n:
            if add:
                last = max(b["ts"] for b in add)
                have = _TrialSamples(
                    np.concatenate([have.steps, np.asarray([b["step"] for b in add], np.int64)]),
                    np.concatenate([have.bpb, np.asarray([b["bpb"] for b in add], np.float64)]),
                    last if have.last_ts is None else max(have.last_ts, last),
                )
            now_held[key] = have
            seen = held_views.get(key)
            # A row compares equal to a row with the same values (asyncpg's Record).
            if seen is not None and seen[1] is have and seen[0] == r:
                now_views[key] = seen
                views.append(seen[2])
                continue
        elif n == 0:
            now_held[key] = _TrialSamples(
                np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64), None
            )
        else:
            again.append(key[0])
        views.append(None)
        later.append((i, key))
    if again:
        for f in await conn.fetch(Q.trial_samples_full, race, again):
            now_held[(f["canon_name"], int(f["seed"]))] = _TrialSamples(
                np.asarray(f["sample_steps"], dtype=np.int64),
                np.asarray(f["sample_bpbs"], dtype=np.float64),
                f["last_ts"],
            )
            if f["max_id"] is not None:
                mark = max(mark, int(f["max_id"]))
        cache.full_reads += len(again)
    for i, key in later:
        r, s = rows[i], now_held[key]
        silent = r["last_sample_epoch"]
        if silent is None:
            silent = s.last_ts if s.last_ts is not None else r["fallback_epoch"]
        view = _trial_view(r, s.steps, s.bpb, silent)
        now_views[key] = (r, s, view)
        views[i] = view
    cache.races[race] = _RaceSamples(mark, now_held, now_views)
    return list(rows), [v for v in views if v is not None]


async def load_snapshot(
    conn: asyncpg.Connection,
    race: RaceInfo,
    *,
    paused: bool,
    expected_corpus_sha256: str | None = None,
    expected_corpus: str | None = None,
    now: float | None = None,
    cache: SampleCache | None = None,
) -> Snapshot:
    """The race as the core sees it, read in one consistent transaction.

    The corpus check uses the race's pinned sha256 (else ``expected_corpus_sha256``) and,
    when no sha is pinned, the configured corpus name (``expected_corpus``).

    With a ``cache`` (the loop keeps one), only the samples new since the race's last
    snapshot are read; the snapshot is the same as a full read's.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        db_now = float(await conn.fetchval(Q.now_epoch))
        if cache is None:
            rows = await conn.fetch(Q.snapshot_trials, race.name)
            trials = tuple(
                _trial_view(
                    r,
                    np.asarray(r["sample_steps"], dtype=np.int64),
                    np.asarray(r["sample_bpbs"], dtype=np.float64),
                    r["silent_since"],
                )
                for r in rows
            )
        else:
            rows, views = await _cached_trials(conn, race.name, cache)
            trials = tuple(views)
        variants = sorted({r["variant"] for r in rows})
        seed_rows = await conn.fetch(Q.used_seeds_for, variants) if variants else []
        events = await conn.fetch(Q.race_tripwires, race.name)
    used = {r["variant"]: frozenset(int(s) for s in r["seeds"]) for r in seed_rows}
    open_events = tuple(_event(e) for e in events if e["acknowledged_at"] is None)
    reviewed = frozenset(_event(e).key for e in events if e["acknowledged_at"] is not None)
    horizon = race.horizon or max((int(r["max_steps"] or 0) for r in rows), default=0) or None
    expected = race.config.get("corpus_sha256") or expected_corpus_sha256
    return Snapshot(
        race=race.name,
        now=db_now if now is None else now,
        trials=trials,
        used_seeds=used,
        open_tripwires=open_events,
        paused=paused,
        horizon=horizon,
        expected_corpus_sha256=expected,
        expected_corpus=race.config.get("corpus") or expected_corpus,
        reviewed_tripwires=reviewed - {e.key for e in open_events},
    )
