"""Replay recorded curves through the same ``decide`` the daemon uses, and score it.

Each group of the CSV is one race; its runs advance together on a simulated clock (one tick
per new sample). A run the policy prunes stops where it was; a spawn (mirror or
replacement) starts the next unused run of the group from step 0, a recorded curve standing
in for a new seed. Figures per race and averaged over races with at least two runs:

- compute: steps trained by all runs / steps to run every run of the race to its end;
- regret: the champion's final value minus the best final value of the race, where the
  champion is the best run the policy let finish; nregret: regret / (mean final - best
  final), 0 for a perfect pick and 1 for a random one; top1: the champion is the best run.

The same figures for baselines on the same races: ``full`` (no stopping), ``halving``
(synchronous successive halving, reduction factor 4, on the value at each rung) and
``median`` (the median stopping rule: stop a run whose best value so far is worse than the
median of the other runs' values at the same rung). Prediction quality per rung: the power-law
fit on the samples up to the rung predicts each run's final value; mean absolute error and
the share of finals inside the 95% prediction interval, next to the error of simply taking
the value at the rung as the prediction.
"""

from __future__ import annotations

import csv
import gzip
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from gardener.core import fit as fitmod
from gardener.core.config import DecisionConfig, Policy
from gardener.core.decide import apply_to_snapshot, decide
from gardener.core.rungs import prefix_at, rung_reached
from gardener.core.types import (
    Action,
    DesiredState,
    FloatArray,
    IntArray,
    Snapshot,
    TrialView,
    TripwireEvent,
)
from gardener.errors import UserError

HALVING_FACTOR = 4
BASELINES = ("full", "halving", "median")
_SEED_RE = re.compile(r"seed(\d+)")


@dataclass(frozen=True)
class Run:
    """One recorded curve, sorted by step, non-finite values removed."""

    name: str
    steps: IntArray
    values: FloatArray

    @property
    def final_step(self) -> int:
        return int(self.steps[-1])

    @property
    def final(self) -> float:
        return float(self.values[-1])


@dataclass(frozen=True)
class Race:
    name: str
    runs: tuple[Run, ...]
    duplicates: int = 0  # bit-identical curves left out

    @property
    def horizon(self) -> int:
        return max(r.final_step for r in self.runs)


def load_curves(path: str | Path) -> list[Race]:
    """Races from a CSV (or a gzipped one, ``.csv.gz``) with columns run, step, value and an
    optional group (lower is better). A repeated step keeps its first value; non-finite
    values are left out."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"no such file: {p}")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or ())
        missing = {"run", "step", "value"} - cols
        if missing:
            raise UserError(f"{p}: missing column(s) {', '.join(sorted(missing))}")
        has_group = "group" in cols
        data: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
        for i, row in enumerate(reader, start=2):
            try:
                step = int(float(row["step"]))
                value = float(row["value"])
            except (TypeError, ValueError):
                raise UserError(f"{p}:{i}: step and value must be numbers") from None
            if not math.isfinite(value):
                continue
            group = row["group"] if has_group else "race"
            data[group][row["run"]].setdefault(step, value)
    races = []
    for group in sorted(data):
        runs = []
        for name in sorted(data[group]):
            pts = sorted(data[group][name].items())
            runs.append(
                Run(
                    name,
                    np.array([s for s, _ in pts], dtype=np.int64),
                    np.array([v for _, v in pts], dtype=np.float64),
                )
            )
        # A bit-identical curve under another name is one run recorded twice (the daemon's
        # duplicate_run tripwire would quarantine it): keep the first name only.
        seen: set[tuple[bytes, bytes]] = set()
        unique = []
        for run in runs:
            key = (run.steps.tobytes(), run.values.tobytes())
            if key not in seen:
                seen.add(key)
                unique.append(run)
        races.append(Race(group, tuple(unique), len(runs) - len(unique)))
    if not races:
        raise UserError(f"{p}: no usable rows")
    return races


def rungs_for(race: Race, fractions: Sequence[float]) -> tuple[int, ...]:
    """Rung steps at ``fractions`` of the race's horizon (the longest run)."""
    h = race.horizon
    return tuple(sorted({max(1, round(f * h)) for f in fractions}))


@dataclass(frozen=True)
class Outcome:
    """One method on one race."""

    compute: float
    regret: float
    nregret: float
    top1: bool
    champion: str | None
    started: int
    pruned: int
    decisions: dict[str, int] = field(default_factory=dict)
    why_kept: dict[str, int] = field(default_factory=dict)  # KEEP decisions by reason
    tripwires: dict[str, int] = field(default_factory=dict)  # tripwires fired, by kind

    def as_dict(self) -> dict[str, Any]:
        return {
            "compute": self.compute,
            "regret": self.regret,
            "nregret": self.nregret,
            "top1": self.top1,
            "champion": self.champion,
            "started": self.started,
            "pruned": self.pruned,
            "decisions": dict(self.decisions),
            "why_kept": dict(self.why_kept),
            "tripwires": dict(self.tripwires),
        }


def _outcome(
    race: Race,
    trained: dict[str, int],
    finished: Iterable[str],
    pruned: int,
    decisions: dict[str, int] | None = None,
) -> Outcome:
    """Score a replay: ``trained`` maps run name to steps trained, ``finished`` names the runs
    that reached their end."""
    by = {r.name: r for r in race.runs}
    total = sum(r.final_step for r in race.runs)
    finals = np.array([r.final for r in race.runs])
    best, mean = float(finals.min()), float(finals.mean())
    fin = sorted(finished, key=lambda n: (by[n].final, n))
    if fin:
        champ: str | None = fin[0]
        regret = by[fin[0]].final - best
    else:
        champ, regret = None, mean - best
    spread = mean - best
    nregret = regret / spread if spread > 0 else 0.0
    return Outcome(
        compute=sum(trained.values()) / total if total else 0.0,
        regret=float(regret),
        nregret=float(nregret),
        top1=champ is not None and by[champ].final == best,
        champion=champ,
        started=len(trained),
        pruned=pruned,
        decisions=dict(decisions or {}),
    )


# -- baselines ---------------------------------------------------------------------------------
def full(race: Race) -> Outcome:
    """No stopping: every run to its end."""
    return _outcome(race, {r.name: r.final_step for r in race.runs}, [r.name for r in race.runs], 0)


def _at(run: Run, boundary: int) -> tuple[int, FloatArray] | None:
    """(step reached, values so far) at the first sample at or past ``boundary``, or None when
    the run ends before it."""
    if run.final_step < boundary:
        return None
    s, v = prefix_at(run.steps, run.values, boundary)
    return int(s[-1]), v


def halving(race: Race, rungs: Sequence[int], factor: int = HALVING_FACTOR) -> Outcome:
    """Synchronous successive halving: at each rung below the horizon keep the best
    ``ceil(n / factor)`` by the value at the rung; runs that end before a rung finish."""
    alive = {r.name for r in race.runs}
    trained = {r.name: r.final_step for r in race.runs}
    by = {r.name: r for r in race.runs}
    pruned = 0
    for b in rungs:
        if b >= race.horizon:
            break
        at = {n: _at(by[n], b) for n in sorted(alive)}
        cohort = sorted((float(a[1][-1]), n) for n, a in at.items() if a is not None)
        keep = max(1, math.ceil(len(cohort) / factor))
        for _, n in cohort[keep:]:
            a = at[n]
            assert a is not None
            if a[0] < by[n].final_step:
                trained[n] = a[0]
                alive.discard(n)
                pruned += 1
    finished = [n for n in trained if trained[n] == by[n].final_step]
    return _outcome(race, trained, finished, pruned)


def median_rule(race: Race, rungs: Sequence[int]) -> Outcome:
    """The median stopping rule at each rung but the first and the last: stop a run whose
    best value so far is worse than the median of the other runs' values at that rung."""
    alive = {r.name for r in race.runs}
    trained = {r.name: r.final_step for r in race.runs}
    by = {r.name: r for r in race.runs}
    pruned = 0
    for b in rungs[1:]:
        if b >= race.horizon:
            break
        at = {r.name: _at(r, b) for r in race.runs if trained[r.name] >= b or r.name in alive}
        values = {n: float(a[1][-1]) for n, a in at.items() if a is not None}
        for n in sorted(alive):
            a = at.get(n)
            if a is None:
                continue
            others = [v for m, v in values.items() if m != n]
            if not others:
                continue
            if float(a[1].min()) > float(np.median(others)) and a[0] < by[n].final_step:
                trained[n] = a[0]
                alive.discard(n)
                pruned += 1
    finished = [n for n in trained if trained[n] == by[n].final_step]
    return _outcome(race, trained, finished, pruned)


# -- the decide-driven replay ------------------------------------------------------------------
@dataclass
class _SimTrial:
    run: Run
    offset: int  # the simulated time at which it started
    view: TrialView  # identity, rung and desired state as recorded; samples filled per tick
    stopped_at: int | None = None  # its own step when pruned

    def visible(self, now: int) -> int:
        """How many of its samples exist at simulated time ``now``."""
        limit = now - self.offset
        if self.stopped_at is not None:
            limit = min(limit, self.stopped_at)
        return int(np.searchsorted(self.run.steps, limit, side="right"))


def _seed_of(name: str, fallback: int, taken: set[int]) -> int:
    m = _SEED_RE.search(name)
    seed = int(m.group(1)) if m else fallback
    while seed in taken:
        seed += 100_003  # recorded seeds can repeat across file versions; keep them distinct
    return seed % 2**32


def simulate(
    race: Race, config: DecisionConfig, *, initial: int | None = None, max_ticks: int = 100_000
) -> Outcome:
    """Replay one race through ``decide``; ``initial`` runs start, the rest wait as the pool
    that spawns draw from (default: all start)."""
    variant = race.name
    n0 = len(race.runs) if initial is None else max(1, min(initial, len(race.runs)))
    pool = list(race.runs[n0:])
    sims: dict[str, _SimTrial] = {}
    taken: set[int] = set()
    for i, run in enumerate(race.runs[:n0]):
        seed = _seed_of(run.name, 10_000 + i, taken)
        taken.add(seed)
        view = TrialView(run.name, variant, seed, run.steps[:0], run.values[:0])
        sims[run.name] = _SimTrial(run, 0, view)
    used = {variant: frozenset(taken)}
    counts: dict[str, int] = defaultdict(int)
    why_kept: dict[str, int] = defaultdict(int)
    tripwires: dict[str, int] = defaultdict(int)
    pruned = 0
    now = 0
    since = 0  # samples that arrived since the last call of ``decide``
    opened: tuple[TripwireEvent, ...] = ()
    for _ in range(max_ticks):
        nxt = [
            s.offset + int(s.run.steps[k])
            for s in sims.values()
            if s.stopped_at is None and (k := s.visible(now)) < len(s.run.steps)
        ]
        if not nxt:
            break
        now = min(nxt)
        since += nxt.count(now)
        # Like the daemon: decide at once when a trial crosses a rung, otherwise about once
        # per round of evaluations (as many new samples as there are live trials).
        live = [s for s in sims.values() if s.stopped_at is None]
        crossed = any(
            (k := s.visible(now)) and rung_reached(config, int(s.run.steps[k - 1])) > s.view.rung
            for s in live
        )
        if not crossed and since < len(live):
            continue
        since = 0
        trials = []
        for s in sims.values():
            k = s.visible(now)
            trials.append(replace(s.view, steps=s.run.steps[:k], bpb=s.run.values[:k]))
        snap = Snapshot(
            race.name,
            float(now),
            tuple(trials),
            used_seeds=used,
            horizon=race.horizon,
            open_tripwires=opened,  # a tripwire fires once, as in the ledger
        )
        decisions = decide(snap, config)
        for d in decisions:
            counts[d.action.value] += 1
            if d.action is Action.KEEP and d.numbers.get("keep_why"):
                why_kept[str(d.numbers["keep_why"])] += 1
            elif d.action is Action.TRIPWIRE:
                tripwires[str(d.numbers.get("kind"))] += 1
            elif d.action is Action.HOLD:
                why_kept["held"] += 1
        after = apply_to_snapshot(snap, decisions)
        used = dict(after.used_seeds)
        opened = after.open_tripwires
        for t in after.trials:
            if t.canon_name in sims:
                s = sims[t.canon_name]
                if (
                    t.desired_state is DesiredState.STOPPED
                    and s.view.desired_state is DesiredState.RUNNING
                ):
                    k = s.visible(now)
                    own = int(s.run.steps[k - 1]) if k else 0
                    if own < s.run.final_step:
                        s.stopped_at = own
                        pruned += 1
                s.view = replace(t, steps=s.view.steps, bpb=s.view.bpb)
            elif pool:
                run = pool.pop(0)
                sims[t.canon_name] = _SimTrial(run, now, replace(t))
    trained = {}
    finished = []
    for s in sims.values():
        if s.stopped_at is not None:
            trained[s.run.name] = s.stopped_at
        else:
            k = s.visible(now)
            trained[s.run.name] = int(s.run.steps[k - 1]) if k else 0
            if k == len(s.run.steps):
                finished.append(s.run.name)
    out = _outcome(race, trained, finished, pruned, counts)
    return replace(out, why_kept=dict(why_kept), tripwires=dict(tripwires))


# -- prediction quality -----------------------------------------------------------------------
def prediction_rows(race: Race, rungs: Sequence[int], level: float = 0.95) -> list[dict[str, Any]]:
    """Per rung and run: the power-law prediction of the run's final value from the samples
    up to the rung, whether the final fell inside the prediction interval, and the error of
    the value at the rung taken as the prediction."""
    out = []
    for i, b in enumerate(rungs):
        for run in race.runs:
            if run.final_step <= b:
                continue
            s, v = prefix_at(run.steps, run.values, b)
            if int(s[-1]) >= run.final_step:
                continue
            f = fitmod.fit_power_law(s, v, level=level)
            pred = f.predict(run.final_step)
            ok = f.ok and fitmod.insane_prediction(v, pred.mean) is None
            out.append(
                {
                    "race": race.name,
                    "rung": i,
                    "fraction": b / race.horizon,
                    "run": run.name,
                    "fit_ok": ok,
                    "abs_err": abs(pred.mean - run.final) if ok else None,
                    "covered": pred.pi.contains(run.final) if ok else None,
                    "abs_err_last": abs(float(v[-1]) - run.final),
                }
            )
    return out


def summarize_prediction(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[r["rung"]].append(r)
    out = []
    for rung in sorted(by):
        rs = by[rung]
        ok = [r for r in rs if r["fit_ok"]]
        out.append(
            {
                "rung": rung,
                "fraction": float(np.mean([r["fraction"] for r in rs])),
                "runs": len(rs),
                "fitted": len(ok),
                "mae": float(np.mean([r["abs_err"] for r in ok])) if ok else None,
                "coverage": float(np.mean([r["covered"] for r in ok])) if ok else None,
                "mae_last_value": float(np.mean([r["abs_err_last"] for r in rs])),
            }
        )
    return out


# -- the whole backtest ------------------------------------------------------------------------
# Denser from 0.8 to 0.9, where the frontier is steep (the reshuffling term turns from dominant
# to small over that range of the knob's quantile).
SWEEP_LEVELS = (0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.875, 0.9, 0.95, 0.99, 0.999)


def knob_config(base: DecisionConfig, knob: float) -> DecisionConfig:
    """The gardener's one risk knob as a config: ``prune_level`` from 0.5 up (how sure a
    prune must be); below 0.5 every trial below the cut goes and the cut deepens instead
    (``reduction_factor`` grows as ``0.5 / knob``)."""
    if knob >= 0.5:
        return replace(base, prune_level=knob)
    return replace(base, prune_level=0.5, reduction_factor=base.reduction_factor * 0.5 / knob)


def why_nothing_pruned(out: Outcome, race: Race, rungs: Sequence[int]) -> str | None:
    """Why a replay pruned nothing, in words (None when it pruned, or had one run)."""
    if out.pruned or len(race.runs) < 2:
        return None
    parts = []
    if out.tripwires:
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(out.tripwires.items()))
        parts.append(f"tripwires fired ({kinds})")
    held = out.why_kept.get("held", 0)
    if held:
        parts.append(f"{held} decisions held by a tripwire")
    below = [r for r in rungs if r < race.horizon]
    if not below:
        parts.append("no rung before the horizon")
    enough = [r for r in race.runs if r.final_step >= min(below, default=race.horizon)]
    if len(enough) < 2:
        parts.append("fewer than two runs reach the first rung")
    kept = {k: v for k, v in out.why_kept.items() if k != "held"}
    if kept:
        top = ", ".join(f"{k} x{v}" for k, v in sorted(kept.items(), key=lambda kv: -kv[1]))
        parts.append(f"kept: {top}")
    return "; ".join(parts) or "no trial reached a deciding rung"


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        k: float(np.mean([v[k] for v in rows])) if rows else None
        for k in ("compute", "regret", "nregret", "top1")
    }
    out["races"] = len(rows)
    return out


def run_backtest(
    races: Sequence[Race],
    *,
    config: DecisionConfig | None = None,
    policies: Sequence[str] = (Policy.GARDENER.value, Policy.SEED.value),
    rungs: Sequence[int] | None = None,
    rung_fractions: Sequence[float] | None = None,
    initial: int | None = None,
    prediction: bool = True,
    sweep: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Every policy and baseline on every race; the JSON-ready report. ``sweep``: the
    gardener again at each of these knob values (``knob_config``), as ``frontier``."""
    base = config or DecisionConfig()
    if Policy.GARDENER.value in policies or sweep:
        base = replace(base, record_fits=False)  # its decisions never use the fit
    methods = [*policies, *BASELINES]
    race_rows: list[dict[str, Any]] = []
    pred_rows: list[dict[str, Any]] = []
    sweep_rows: dict[float, list[dict[str, Any]]] = {k: [] for k in sweep or ()}
    for race in races:
        if rung_fractions:
            rs = rungs_for(race, rung_fractions)
        elif rungs:
            rs = tuple(sorted(set(rungs)))
        else:
            rs = base.rungs
        row: dict[str, Any] = {
            "race": race.name,
            "runs": len(race.runs),
            "duplicates_dropped": race.duplicates,
            "horizon": race.horizon,
            "rungs": list(rs),
            "methods": {},
        }
        for pol in policies:
            cfg = replace(base.with_rungs(tuple(rs)), policy=Policy(pol))
            if pol == Policy.SEED.value:
                cfg = replace(cfg, record_fits=True)
            out = simulate(race, cfg, initial=initial)
            row["methods"][pol] = out.as_dict() | {"no_prune": why_nothing_pruned(out, race, rs)}
        row["methods"]["full"] = full(race).as_dict()
        row["methods"]["halving"] = halving(race, rs).as_dict()
        row["methods"]["median"] = median_rule(race, rs).as_dict()
        if len(race.runs) >= 2:
            for knob in sweep_rows:
                cfg = knob_config(replace(base.with_rungs(tuple(rs)), policy=Policy.GARDENER), knob)
                sweep_rows[knob].append(simulate(race, cfg, initial=initial).as_dict())
        race_rows.append(row)
        if prediction:
            pred_rows.extend(prediction_rows(race, rs, base.level))
    scored = [r for r in race_rows if r["runs"] >= 2]
    summary = {m: _summary([r["methods"][m] for r in scored]) for m in methods}
    report: dict[str, Any] = {
        "metric": base.metric,
        "summary": summary,
        "races": race_rows,
        "prediction": summarize_prediction(pred_rows) if prediction else [],
    }
    if sweep:
        report["frontier"] = [
            {"knob": k, **{m: v for m, v in _summary(rows).items() if m != "regret"}}
            for k, rows in sweep_rows.items()
        ]
    return report


def dominated_by(summary: dict[str, dict[str, Any]], method: str) -> list[str]:
    """The baselines that beat ``method`` on both compute and nregret."""
    me = summary[method]
    return [
        b
        for b in BASELINES
        if b in summary
        and summary[b]["compute"] < me["compute"]
        and summary[b]["nregret"] < me["nregret"]
    ]
