"""Reads behind the race view: races, one race with its fitted curves, decisions, watermarks.

Read-only, and nothing secret leaves here: trial rows are reduced to named fields (no
variables, service or deployment ids), a race's config only to its rungs. A race's computed
view is cached under the ledger's watermarks, so any number of pages watching one race cost
one read and one batch fit per change; the fits run in a worker thread, never on the loop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import anyio
import asyncpg
import numpy as np

from gardener.ledger.queries import Queries
from gardener.ledger.snapshot import RaceInfo, base_config, race_config
from gardener.settings import Settings
from gardener.view import curves

Q = Queries("view.sql")

WATERMARK_TTL_S = 0.2  # every open page shares one watermark query per this long
RACE_CACHE_SIZE = 8  # races whose computed view is kept


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def trial_state(row: Mapping[str, Any]) -> str:
    """One word for the table: pruned, stopping, or what the backend last observed."""
    if row["pruned"]:
        return "pruned"
    if row["desired_state"] != "running" and row["observed_state"] not in (
        "stopped", "removed", "succeeded", "failed"
    ):
        return f"{row['observed_state']} (stopping)"
    return str(row["observed_state"])


def decision_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": int(row["id"]),
        "race": row["race"],
        "rung": int(row["rung"]),
        "canon_name": row["canon_name"],
        "action": row["action"],
        "seed_state": row["seed_state"],
        "numbers": row["numbers"] or {},
        "reason": row["reason"],
        "applied": bool(row["applied"]),
        "held_reason": row["held_reason"],
        "decided_by": row["decided_by"],
        "decided_at": _iso(row["decided_at"]),
    }


class ViewData:
    """The view's reads over the daemon's pool, with the shared caches."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.account = settings.view_account
        self._base = base_config(settings)
        self._marks: dict[str, Any] | None = None
        self._marks_at = -1.0
        self._marks_lock = anyio.Lock()
        self._race_locks: dict[str, anyio.Lock] = {}
        # race -> (watermarks it was computed under, the view, its serialised parts)
        self._races: OrderedDict[
            str, tuple[tuple[Any, ...], dict[str, Any], dict[str, bytes]]
        ] = OrderedDict()

    async def watermarks(self) -> dict[str, Any]:
        """The ledger's change counters; one query per ``WATERMARK_TTL_S`` however many ask."""
        async with self._marks_lock:
            now = time.monotonic()
            if self._marks is None or now - self._marks_at >= WATERMARK_TTL_S:
                async with self.pool.acquire() as conn:
                    row = await conn.fetchrow(Q.watermarks)
                assert row is not None
                self._marks = {k: (int(v) if isinstance(v, int) else v) for k, v in row.items()}
                self._marks_at = time.monotonic()
            return dict(self._marks)

    async def races(self) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(Q.races, self.account)
        return [
            {
                "name": r["name"],
                "account": r["account"],
                "kind": r["kind"],
                "status": r["status"],
                "horizon": r["horizon"],
                "created_at": _iso(r["created_at"]),
                "finished_at": _iso(r["finished_at"]),
                "trials": int(r["trials"]),
                "live": int(r["live"]),
                "decisions": int(r["decisions"]),
                "last_decision_at": _iso(r["last_decision_at"]),
            }
            for r in rows
        ]

    async def race(self, name: str) -> dict[str, Any] | None:
        """One race: its rungs, trials with fits and ranks, curves and bands, tripwires."""
        held = await self._race_entry(name)
        return held[1] if held is not None else None

    async def race_part(
        self, name: str, part: str, render: Callable[[dict[str, Any]], bytes]
    ) -> bytes | None:
        """A serialised part of the race's view (``render(view)``), made once per change."""
        held = await self._race_entry(name)
        if held is None:
            return None
        _, view, parts = held
        if part not in parts:
            parts[part] = await anyio.to_thread.run_sync(render, view)
        return parts[part]

    async def _race_entry(
        self, name: str
    ) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, bytes]] | None:
        marks = await self.watermarks()
        key = (marks["samples"], marks["decisions"], marks["tripwires"], marks["trials"],
               marks["races"])
        lock = self._race_locks.setdefault(name, anyio.Lock())
        async with lock:
            held = self._races.get(name)
            if held is not None and held[0] == key:
                self._races.move_to_end(name)
                return held
            view = await self._compute(name)
            if view is None:
                return None
            entry: tuple[tuple[Any, ...], dict[str, Any], dict[str, bytes]] = (key, view, {})
            self._races[name] = entry
            self._races.move_to_end(name)
            while len(self._races) > RACE_CACHE_SIZE:
                old, _ = self._races.popitem(last=False)
                self._race_locks.pop(old, None)
            return entry

    async def _compute(self, name: str) -> dict[str, Any] | None:
        async with self.pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                race = await conn.fetchrow(Q.race, name, self.account)
                if race is None:
                    return None
                rows = await conn.fetch(Q.trials, name)
                wires = await conn.fetch(Q.tripwires, name)
        config = race_config(self._base, RaceInfo.from_row(race))
        series = [
            curves.Series(
                r["canon_name"],
                np.asarray(r["sample_steps"], dtype=np.int64),
                np.asarray(r["sample_bpbs"], dtype=np.float64),
            )
            for r in rows
        ]
        horizon = curves.horizon_of(race["horizon"], config.rungs, series)
        computed = await anyio.to_thread.run_sync(
            lambda: curves.compute(series, horizon, level=config.level)
        )
        trials = []
        for r, c in zip(rows, computed, strict=True):
            trials.append({
                "canon_name": r["canon_name"],
                "account": r["account"],
                "variant": r["variant"],
                "seed": int(r["seed"]),
                "exp_id": r["exp_id"],
                "parent": r["parent"],
                "spawn_reason": r["spawn_reason"],
                "seed_strategy": r["seed_strategy"],
                "desired_state": r["desired_state"],
                "observed_state": r["observed_state"],
                "state": trial_state(r),
                "seed_state": r["seed_state"],
                "pruned": bool(r["pruned"]),
                "rung": int(r["rung"]),
                "last_sample_at": _iso(r["last_sample_at"]),
                **c,
            })
        return {
            "race": {
                "name": race["name"],
                "account": race["account"],
                "kind": race["kind"],
                "status": race["status"],
                "horizon": horizon,
                "rungs": list(config.rungs),
                "rung_rules": [str(rule) for rule in config.rung_rules],
                "level": config.level,
                "created_at": _iso(race["created_at"]),
                "finished_at": _iso(race["finished_at"]),
            },
            "trials": trials,
            "tripwires": [
                {
                    "id": int(w["id"]),
                    "kind": w["kind"],
                    "canon_name": w["canon_name"],
                    "evidence": w["evidence"] or {},
                    "blocks_promotions": bool(w["blocks_promotions"]),
                    "fired_at": _iso(w["fired_at"]),
                    "acknowledged_by": w["acknowledged_by"],
                    "acknowledged_at": _iso(w["acknowledged_at"]),
                }
                for w in wires
            ],
        }

    async def decisions(
        self, name: str, *, after: int | None, limit: int
    ) -> list[dict[str, Any]] | None:
        """A race's decisions, oldest first: those above ``after``, else the newest ``limit``."""
        async with self.pool.acquire() as conn:
            if await conn.fetchrow(Q.race, name, self.account) is None:
                return None
            if after is None:
                rows = await conn.fetch(Q.decisions_latest, name, limit)
            else:
                rows = await conn.fetch(Q.decisions_after, name, after, limit)
        return [decision_json(r) for r in rows]
