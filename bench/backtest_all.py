"""Backtest every visible data set by hand and print one JSON document (never a timed test).

Data sets, each replayed with ``--metric loss`` and rungs at 0.1, 0.2, 0.35, 0.5, 0.75, 1.0 of
each race's horizon (the ladder the policy is judged on):

- ``igla-groups``: bench/data/igla_trios_results.csv, one seed race per group;
- ``algoperf-config``: bench/data/algoperf_config_races.csv.gz, 60 config races;
- ``trainer-groups``: docs/curves/trainer_curves.csv, the reference trainer, one race per variant;
- ``synthetic-seeds``: seeds of one variant with persistent effects, fading transients, shared
  noise and jitter (``synthetic``).

For each: the gardener (default), the plan's rules (``seed``), the backtest's own baselines
(``full``, ``halving``, ``median``) and the peers of bench/peers.py (Optuna's SH, Hyperband and
Median pruners run by Optuna, and ASHA); which peers dominate the gardener (lower compute *and*
lower nregret). ``--sweep`` adds the gardener's frontier over its risk knob and, per peer,
whether a frontier point matches or beats it. ``--heldout`` checks the choices on data they were
not made on: the knob is chosen on one half of the races of a set (even positions) and scored on
the other half (odd), and back; the reshuffling prior is measured per set and per half.
``--plot DIR`` draws the frontier against the peers (DIR/backtest_frontier.png).

    .venv/bin/python -m pip install -e '.[bench]'
    .venv/bin/python bench/backtest_all.py --sweep --heldout --plot docs/img > /tmp/backtest.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import PEERS, run_peers

from gardener.core.config import DecisionConfig
from gardener.core.levels import level_at
from gardener.core.promotion import RESHUFFLE_PRIOR, robust_sd
from gardener.race.backtest import (
    SWEEP_LEVELS,
    Race,
    Run,
    load_curves,
    run_backtest,
)

HERE = Path(__file__).resolve().parent
DATA = {
    "igla-groups": HERE / "data/igla_trios_results.csv",
    "algoperf-config": HERE / "data/algoperf_config_races.csv.gz",
    "trainer-groups": HERE.parent / "docs/curves/trainer_curves.csv",
}
FRACTIONS = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
RESHUFFLE_FRACTIONS = (0.1, 0.2, 0.35, 0.5, 0.75)
CONFIG = DecisionConfig(metric="loss")


def synthetic(n_races: int = 12, seed: int = 7) -> list[Race]:
    """Seeds of one variant: a persistent seed effect (sd 0.02), an early transient that fades
    (sd 0.08, time constant 1500 steps), noise shared by every run at a step (sd 0.02) and
    per-run jitter (sd 0.005); every 100 steps to 10000."""
    rng = np.random.default_rng(seed)
    steps = np.arange(100, 10_001, 100, dtype=np.int64)
    races = []
    for k in range(n_races):
        n = int(rng.integers(6, 16))
        shared = rng.normal(0, 0.02, len(steps))
        runs = []
        for i in range(n):
            effect, transient = rng.normal(0, 0.02), rng.normal(0, 0.08)
            y = (
                2.5
                + 3.0 * steps**-0.4
                + effect
                + transient * np.exp(-steps / 1500)
                + shared
                + rng.normal(0, 0.005, len(steps))
            )
            runs.append(Run(f"syn{k}-seed{i}", steps, y.astype(np.float64)))
        races.append(Race(f"syn{k}", tuple(runs)))
    return races


def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether point ``a`` has both lower compute and lower nregret than ``b``."""
    return bool(a["compute"] < b["compute"] and a["nregret"] < b["nregret"])


def covers(frontier: list[dict[str, Any]], peer: dict[str, Any]) -> dict[str, Any] | None:
    """The frontier point with compute and nregret no higher than the peer's, if any."""
    ok = [
        f for f in frontier if f["compute"] <= peer["compute"] and f["nregret"] <= peer["nregret"]
    ]
    return min(ok, key=lambda f: f["compute"]) if ok else None


def evaluate(races: list[Race], sweep: bool) -> dict[str, Any]:
    """Every method on one set of races: summaries, domination, the frontier and its cover."""
    t0 = time.perf_counter()
    rep = run_backtest(
        races,
        config=CONFIG,
        rung_fractions=FRACTIONS,
        prediction=False,
        sweep=SWEEP_LEVELS if sweep else None,
    )
    t1 = time.perf_counter()
    summary = dict(rep["summary"])
    summary.update(run_peers(races, FRACTIONS))
    t2 = time.perf_counter()
    gardener = summary["gardener"]
    out: dict[str, Any] = {
        "races": gardener["races"],
        "summary": summary,
        "gardener_dominated_by": [p for p in PEERS if dominates(summary[p], gardener)],
        "no_prune": {
            r["race"]: r["methods"]["gardener"]["no_prune"]
            for r in rep["races"]
            if r["methods"]["gardener"].get("no_prune")
        },
        "seconds": {"gardener_and_baselines": round(t1 - t0, 1), "peers": round(t2 - t1, 1)},
    }
    if sweep:
        front = rep["frontier"]
        out["frontier"] = front
        out["frontier_covers"] = {p: covers(front, summary[p]) for p in PEERS}
    return out


def reshuffle_ratios(races: list[Race]) -> dict[str, Any]:
    """How far a trial's centred level moves from the share ``f`` of the horizon to its end,
    over the cohort's spread squared (median over races), and the constant ``k`` of the
    shipped form ``k * (1 - f)^2`` that fits each share."""
    out: dict[str, Any] = {}
    for f in RESHUFFLE_FRACTIONS:
        ratios = []
        for race in races:
            b = max(1, round(f * race.horizon))
            runs = [r for r in race.runs if r.final_step > b]
            if len(runs) < 4:
                continue
            now = np.array([_level(r, b) for r in runs])
            end = np.array([_level(r, r.final_step) for r in runs])
            spread = robust_sd(now)
            if spread > 0:
                moved = (end - np.median(end)) - (now - np.median(now))
                ratios.append(robust_sd(moved) ** 2 / spread**2)
        if ratios:
            med = float(np.median(ratios))
            out[str(f)] = {"races": len(ratios), "median": med, "k": med / (1 - f) ** 2}
    ks = [v["k"] for v in out.values()]
    out["k_median"] = float(np.median(ks)) if ks else None
    out["shipped_k"] = RESHUFFLE_PRIOR
    return out


def _level(run: Run, step: int) -> float:
    lv = level_at(run.steps, run.values, step, recent_fraction=0.25, min_points=3)
    return lv.value if lv is not None else math.nan


def heldout(name: str, races: list[Race]) -> dict[str, Any]:
    """Choose the knob on one half of the races and score it on the other, both ways. The
    choice: among the frontier points no peer dominates on the choosing half, the one with
    the lowest compute + nregret (a balanced pick; no peer figure of the scoring half is
    used)."""
    multi = [r for r in races if len(r.runs) >= 2]
    halves = {"even": multi[0::2], "odd": multi[1::2]}
    evals = {h: evaluate(rs, sweep=True) for h, rs in halves.items()}
    out: dict[str, Any] = {
        "halves": {},
        "frontiers": {
            h: {"races": ev["races"], "frontier": ev["frontier"],
                "peers": {p: ev["summary"][p] for p in PEERS},
                "gardener": ev["summary"]["gardener"]}
            for h, ev in evals.items()
        },
    }
    for pick, score in (("even", "odd"), ("odd", "even")):
        ev = evals[pick]
        ok = [
            f for f in ev["frontier"] if not any(dominates(ev["summary"][p], f) for p in PEERS)
        ]
        chosen = min(ok, key=lambda f: f["compute"] + f["nregret"])["knob"] if ok else None
        target = evals[score]
        point = next((f for f in target["frontier"] if f["knob"] == chosen), None)
        out["halves"][f"chosen_on_{pick}_scored_on_{score}"] = {
            "knob": chosen,
            "default_knob": CONFIG.prune_level,
            "point": point,
            "dominated_by": [p for p in PEERS if point and dominates(target["summary"][p], point)],
            "default_on_scoring_half": target["summary"]["gardener"],
            "default_dominated_by": target["gardener_dominated_by"],
        }
        out["reshuffle_" + pick] = reshuffle_ratios(halves[pick])
    return out


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [k for k, v in results.items() if "frontier" in v]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 4.2), squeeze=False)
    marks = {
        "seed": "s", "halving": "v", "median": "D", "optuna_sh": "P", "optuna_hb": "X",
        "optuna_median": "*", "asha": "^",
    }
    for ax, name in zip(axes[0], shown, strict=True):
        r = results[name]
        front = sorted(r["frontier"], key=lambda f: f["compute"])
        ax.plot([f["compute"] for f in front], [f["nregret"] for f in front], "-o", color="C0",
                ms=4, label="gardener --sweep")
        g = r["summary"]["gardener"]
        ax.scatter(g["compute"], g["nregret"], s=120, facecolor="none", edgecolor="C0", lw=2,
                   label="gardener (default)")
        for m, mk in marks.items():
            s = r["summary"].get(m)
            if s and s["compute"] is not None:
                ax.scatter(s["compute"], s["nregret"], marker=mk, s=60, label=m)
        ax.set_title(f"{name} ({r['races']} races)", fontsize=10)
        ax.set_xlabel("compute (share of running everything)")
        ax.set_ylabel("nregret (0 best pick, 1 random)")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("--metric loss, rungs at 0.1 0.2 0.35 0.5 0.75 1: lower-left is better",
                 fontsize=11)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "backtest_frontier.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sweep", action="store_true", help="add the gardener's frontier")
    ap.add_argument("--heldout", action="store_true", help="choose on half, score on half")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    sets: dict[str, list[Race]] = {
        name: load_curves(path) for name, path in DATA.items() if path.exists()
    }
    sets["synthetic-seeds"] = synthetic()
    results = {name: evaluate(races, args.sweep) for name, races in sets.items()}
    elapsed = time.perf_counter() - t0
    doc: dict[str, Any] = {
        "metric": CONFIG.metric,
        "rung_fractions": FRACTIONS,
        "default": {"prune_level": CONFIG.prune_level, "reduction_factor": CONFIG.reduction_factor},
        "results": results,
        "seconds_total": round(elapsed, 1),
    }
    if args.heldout:
        doc["heldout"] = {
            name: heldout(name, sets[name]) for name in ("igla-groups", "algoperf-config")
            if name in sets
        }
        doc["reshuffle"] = {name: reshuffle_ratios(races) for name, races in sets.items()}
    if args.plot:
        plot(results, args.plot)
    json.dump(doc, sys.stdout, indent=2, default=lambda x: None if x != x else x)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
