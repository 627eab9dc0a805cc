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
from dataclasses import dataclass, fields, replace
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


async def load_snapshot(
    conn: asyncpg.Connection,
    race: RaceInfo,
    *,
    paused: bool,
    expected_corpus_sha256: str | None = None,
    now: float | None = None,
) -> Snapshot:
    """The race as the core sees it, read in one consistent transaction."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        db_now = float(await conn.fetchval(Q.now_epoch))
        rows = await conn.fetch(Q.snapshot_trials, race.name)
        variants = sorted({r["variant"] for r in rows})
        seed_rows = await conn.fetch(Q.used_seeds_for, variants) if variants else []
        events = await conn.fetch(Q.race_tripwires, race.name)
    trials = tuple(
        TrialView(
            canon_name=r["canon_name"],
            variant=r["variant"],
            seed=int(r["seed"]),
            steps=np.asarray(r["sample_steps"], dtype=np.int64),
            bpb=np.asarray(r["sample_bpbs"], dtype=np.float64),
            desired_state=DesiredState(r["desired_state"]),
            observed_state=r["observed_state"],
            parent=r["parent"],
            rung=int(r["rung"]),
            last_sample_at=r["silent_since"],
            corpus_sha256=r["corpus_sha256"],
            hidden_size=r["hidden_size"],
            format=r["format"],
        )
        for r in rows
    )
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
        reviewed_tripwires=reviewed - {e.key for e in open_events},
    )
