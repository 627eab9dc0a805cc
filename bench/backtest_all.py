"""Backtest every scenario by hand and print one JSON document (never a timed test).

Scenarios: the recorded IGLA curves (one race per group) on two rung ladders; the same
curves as one mixed race; two halves of the groups (a leave-half-out check: a change is
chosen on half A and reported on half B); the reference trainer's recorded curves
(docs/curves/trainer_curves.csv, one race per variant, on both ladders, and as one mixed
race); synthetic races with persistent seed effects, early transients
that fade, shared noise and per-run jitter. ``--plot DIR`` also draws compute against
nregret for every method (docs/img/backtest_*.png).

    .venv/bin/python bench/backtest_all.py --plot docs/img > /tmp/backtest.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from gardener.race.backtest import Race, Run, load_curves, run_backtest

CURVES = Path(__file__).resolve().parent / "data/igla_trios_results.csv"
TRAINER_CURVES = Path(__file__).resolve().parent.parent / "docs/curves/trainer_curves.csv"
LADDERS = {
    "octaves": (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0),
    "linear": (0.1, 0.2, 0.4, 0.6, 0.8, 1.0),
}


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


def one_race(races: list[Race]) -> list[Race]:
    return [Race("all", tuple(r for race in races for r in race.runs))]


def run(name: str, races: list[Race], ladder: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    rep = run_backtest(races, rung_fractions=LADDERS[ladder], prediction=False)
    return {
        "scenario": name,
        "ladder": ladder,
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": rep["summary"],
    }


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = ("igla-groups", "igla-one-race", "synthetic", "trainer-groups", "trainer-one-race")
    shown = [r for r in results if r["scenario"] in wanted and r["ladder"] == "octaves"]
    cols = min(3, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), sharey=False)
    marks = {"gardener": "o", "seed": "s", "full": "^", "halving": "v", "median": "D"}
    flat = list(np.atleast_1d(axes).ravel())
    for ax in flat[len(shown):]:
        ax.set_visible(False)
    for ax, r in zip(flat, shown, strict=False):
        for method, s in r["summary"].items():
            ax.scatter(s["compute"], s["nregret"], marker=marks.get(method, "x"), s=60,
                       label=method)
            ax.annotate(method, (s["compute"], s["nregret"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
        ax.set_title(f"{r['scenario']} ({r['ladder']} rungs)", fontsize=10)
        ax.set_xlabel("compute (share of running everything)")
        ax.set_ylabel("nregret (0 best pick, 1 random)")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
    fig.suptitle("backtest: lower-left is better", fontsize=11)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "backtest_tradeoff.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--curves", type=Path, default=CURVES)
    ap.add_argument("--trainer-curves", type=Path, default=TRAINER_CURVES)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    races = load_curves(args.curves)
    multi = [r for r in races if len(r.runs) >= 2]
    half_a, half_b = multi[0::2], multi[1::2]
    results = [
        run("igla-groups", races, "octaves"),
        run("igla-groups", races, "linear"),
        run("igla-groups-half-a", half_a, "octaves"),
        run("igla-groups-half-b", half_b, "octaves"),
        run("igla-one-race", one_race(races), "octaves"),
        run("synthetic", synthetic(), "octaves"),
    ]
    if args.trainer_curves.exists():
        trainer = load_curves(args.trainer_curves)
        results += [
            run("trainer-groups", trainer, "octaves"),
            run("trainer-groups", trainer, "linear"),
            run("trainer-one-race", one_race(trainer), "octaves"),
        ]
    if args.plot:
        plot(results, args.plot)
    json.dump({"results": results}, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
