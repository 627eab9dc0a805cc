"""Coverage of the fit's 95% intervals on recorded curves, fitted on prefixes of each curve.

For each curve (horizon H = its last step) and each fraction f, fit the points with
step <= f * H, predict at H, and record whether the observed final value lies in the 95%
prediction interval, plus the error of the predicted mean. Also reported: the plain
delta-method interval (``calibrate=False``), the "last observed value" predictor, and the
coverage over every later observed point (not only the final one).
Prints JSON. Usage: python bench/fit_coverage.py [CSV]
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict

import numpy as np

from gardener.core.fit import fit_power_law

DEFAULT_CSV = "/work/shared/curves/igla_trios_results.csv"
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def load(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Curves by run name, sorted by step."""
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            rows[r["run"]].append((float(r["step"]), float(r["value"])))
    out = {}
    for run, pts in rows.items():
        pts.sort()
        out[run] = (np.array([s for s, _ in pts]), np.array([v for _, v in pts]))
    return out


Curves = dict[str, tuple[np.ndarray, np.ndarray]]


def evaluate(curves: Curves, frac: float) -> dict[str, float | int | None]:
    err: list[float] = []
    width: list[float] = []
    err_last: list[float] = []
    cover: list[bool] = []
    cover_ci: list[bool] = []
    cover_naive: list[bool] = []
    cover_later: list[bool] = []
    no_fit = 0
    for steps, values in curves.values():
        horizon, final = steps[-1], values[-1]
        keep = steps <= frac * horizon
        if keep.sum() == 0 or keep.all():
            continue
        fit = fit_power_law(steps[keep], values[keep])
        naive = fit_power_law(steps[keep], values[keep], calibrate=False)
        err_last.append(abs(values[keep][-1] - final))
        if not fit.ok:
            no_fit += 1
            continue
        pred = fit.predict(horizon)
        err.append(abs(pred.mean - final))
        cover.append(pred.pi.contains(final))
        cover_ci.append(pred.ci.contains(final))
        width.append(pred.pi.high - pred.pi.low)
        for s, v in zip(steps[~keep], values[~keep], strict=True):
            cover_later.append(fit.predict(s).pi.contains(v))
        if naive.ok:
            cover_naive.append(naive.predict(horizon).pi.contains(final))
    return {
        "fraction": frac,
        "n": len(err),
        "no_fit": no_fit,
        "mae_pred_final": float(np.mean(err)) if err else None,
        "median_ae_pred_final": float(np.median(err)) if err else None,
        "coverage_pi95": float(np.mean(cover)) if cover else None,
        "coverage_ci95": float(np.mean(cover_ci)) if cover_ci else None,
        "coverage_pi95_plain_delta": float(np.mean(cover_naive)) if cover_naive else None,
        "coverage_pi95_all_later_points": float(np.mean(cover_later)) if cover_later else None,
        "median_pi95_width": float(np.median(width)) if width else None,
        "mae_last_observed": float(np.mean(err_last)) if err_last else None,
    }


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CSV
    curves = load(path)
    per = [evaluate(curves, f) for f in FRACTIONS]
    result = {"csv": path, "curves": len(curves), "per_fraction": per}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
