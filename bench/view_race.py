"""What one race's view costs the daemon to compute and send, by trials and samples per trial.

Runs the view's pure part (``gardener.view.curves.compute``: one ``fit_many`` over every curve,
the bands, ranks and thinning) and the JSON the two race endpoints send, on synthetic power-law
curves; the best of ``--repeat`` runs. By hand, never a timed test:

    .venv/bin/python bench/view_race.py > /tmp/view_race.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from gardener.view.curves import Series, compute


def race(n_trials: int, n_samples: int, seed: int = 0) -> list[Series]:
    rng = np.random.default_rng(seed)
    steps = np.arange(10, 10 * n_samples + 1, 10, dtype=np.int64)
    return [
        Series(f"trial-{i}", steps,
               2.0 + 0.3 * i / n_trials + 1.5 * steps ** -0.3 + rng.normal(0, 0.003, n_samples))
        for i in range(n_trials)
    ]


def measure(n_trials: int, n_samples: int, repeat: int) -> dict[str, Any]:
    series = race(n_trials, n_samples)
    horizon = 20 * n_samples
    best_compute = best_json = float("inf")
    size = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = compute(series, horizon)
        t1 = time.perf_counter()
        body = json.dumps(out, separators=(",", ":")).encode()
        t2 = time.perf_counter()
        best_compute, best_json = min(best_compute, t1 - t0), min(best_json, t2 - t1)
        size = len(body)
    return {
        "trials": n_trials,
        "samples_per_trial": n_samples,
        "compute_s": round(best_compute, 4),
        "json_s": round(best_json, 4),
        "json_kb": size // 1024,
        "fitted": sum(bool(c["fit"]["ok"]) for c in out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cases = [(21, 50), (21, 500), (250, 100), (1000, 40), (1000, 500), (5000, 40)]
    started = time.time()
    results = [measure(n, k, args.repeat) for n, k in cases]
    print(json.dumps({"bench": "view_race", "repeat": args.repeat,
                      "seconds": round(time.time() - started, 1), "results": results}, indent=2))


if __name__ == "__main__":
    main()
