"""Coverage of the fit's 95% intervals on recorded curves, fitted on prefixes of each curve.

For each curve (horizon H = its last step) and each fraction f, fit the points with
step <= f * H, predict at H, and record whether the observed final value lies in the 95%
prediction interval, plus the error of the predicted mean. Also reported: the plain
delta-method interval (``calibrate=False``), the "last observed value" predictor, the
coverage over every later observed point (not only the final one), and a 95% interval for
the coverage itself from a bootstrap over groups (seeds of one variant share their shape, so
curves are not independent). Prints JSON.

Usage: python bench/fit_coverage.py [CSV] [--plot-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gardener.core.fit import fit_many, fit_power_law

DEFAULT_CSV = str(Path(__file__).resolve().parent / "data/igla_trios_results.csv")
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
BOOTSTRAP = 2000


@dataclass(frozen=True)
class Curve:
    group: str
    run: str
    steps: np.ndarray
    values: np.ndarray


def load(path: str) -> list[Curve]:
    """Curves sorted by step, with their group (the variant without its seed)."""
    rows: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            rows[(r["group"], r["run"])].append((float(r["step"]), float(r["value"])))
    out = []
    for (group, run), pts in rows.items():
        pts.sort()
        out.append(Curve(group, run, np.array([s for s, _ in pts]), np.array([v for _, v in pts])))
    return out


def group_bootstrap(hits: list[bool], groups: list[str], seed: int = 0) -> list[float] | None:
    """95% percentile interval of the hit rate, resampling whole groups."""
    if not hits:
        return None
    by: dict[str, list[bool]] = defaultdict(list)
    for h, g in zip(hits, groups, strict=True):
        by[g].append(h)
    sums = np.array([sum(v) for v in by.values()], dtype=float)
    counts = np.array([len(v) for v in by.values()], dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), (BOOTSTRAP, len(sums)))
    rates = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    return [float(np.quantile(rates, 0.025)), float(np.quantile(rates, 0.975))]


def mean_or_none(xs: list[float] | list[bool]) -> float | None:
    return float(np.mean(xs)) if xs else None


def evaluate(curves: list[Curve], frac: float) -> dict[str, object]:
    err: list[float] = []
    width: list[float] = []
    err_last: list[float] = []
    cover: list[bool] = []
    cover_ci: list[bool] = []
    cover_naive: list[bool] = []
    cover_later: list[bool] = []
    below = 0
    groups: list[str] = []
    no_fit: dict[str, int] = defaultdict(int)
    for cv in curves:
        steps, values = cv.steps, cv.values
        horizon, final = steps[-1], values[-1]
        keep = steps <= frac * horizon
        if keep.sum() == 0 or keep.all():
            continue
        fit = fit_power_law(steps[keep], values[keep])
        naive = fit_power_law(steps[keep], values[keep], calibrate=False)
        err_last.append(abs(values[keep][-1] - final))
        if not fit.ok:
            no_fit[(fit.reason or "").split(":")[0]] += 1
            continue
        pred = fit.predict(horizon)
        err.append(abs(pred.mean - final))
        cover.append(pred.pi.contains(final))
        below += final < pred.pi.low
        groups.append(cv.group)
        cover_ci.append(pred.ci.contains(final))
        width.append(pred.pi.high - pred.pi.low)
        for s, v in zip(steps[~keep], values[~keep], strict=True):
            cover_later.append(fit.predict(s).pi.contains(v))
        if naive.ok:
            cover_naive.append(naive.predict(horizon).pi.contains(final))
    return {
        "fraction": frac,
        "n": len(err),
        "groups": len(set(groups)),
        "no_fit": dict(no_fit),
        "mae_pred_final": mean_or_none(err),
        "median_ae_pred_final": float(np.median(err)) if err else None,
        "mae_last_observed": mean_or_none(err_last),
        "coverage_pi95": mean_or_none(cover),
        "coverage_pi95_group_bootstrap_95": group_bootstrap(cover, groups),
        "misses_below_interval": int(below),
        "coverage_ci95": mean_or_none(cover_ci),
        "coverage_pi95_plain_delta": mean_or_none(cover_naive),
        "coverage_pi95_all_later_points": mean_or_none(cover_later),
        "median_pi95_width": float(np.median(width)) if width else None,
    }


def synthetic(n: int = 400, seed: int = 7) -> list[dict[str, object]]:
    """Coverage of the true mean at 1.5x, 2x and 4x the horizon, where the truth is known.

    Two families: a correct power law with AR(1) noise (rho 0.5), and a misspecified one, a
    shifted power law ``inf + a * (t + t0)**-p``, with i.i.d. noise. Both fitted on 25 points
    from step 100 to 5000.
    """
    rng = np.random.default_rng(seed)
    steps = np.linspace(100, 5000, 25)
    inf = rng.uniform(1.5, 3, n)
    a = rng.uniform(5, 50, n)
    p = rng.uniform(0.3, 0.8, n)
    t0 = rng.uniform(0, 2000, n)
    out: list[dict[str, object]] = []
    for family in ("ar1_rho0.5", "shifted_power_law"):
        shift = t0 if family == "shifted_power_law" else np.zeros(n)
        for noise in (0.002, 0.01, 0.03):
            eps = rng.standard_normal((n, steps.size))
            if family == "ar1_rho0.5":
                for j in range(1, steps.size):
                    eps[:, j] = 0.5 * eps[:, j - 1] + np.sqrt(1 - 0.25) * eps[:, j]
            mean = inf[:, None] + a[:, None] * (steps[None] + shift[:, None]) ** -p[:, None]
            values = mean + noise * eps
            fits = {cal: fit_many(steps, values, calibrate=cal) for cal in (True, False)}
            for target in (7500.0, 10_000.0, 20_000.0):
                truth = inf + a * (target + shift) ** -p
                row: dict[str, object] = {"family": family, "noise": noise, "target": target}
                for cal, fit in fits.items():
                    pr = fit.predict(target)
                    hit = ((pr.ci_low <= truth) & (truth <= pr.ci_high))[fit.ok]
                    key = "calibrated" if cal else "plain_delta"
                    row[f"coverage_ci95_{key}"] = float(hit.mean())
                    row[f"median_ci95_width_{key}"] = float(np.median(
                        (pr.ci_high - pr.ci_low)[fit.ok]))
                out.append(row)
    return out


LATE_FRACTIONS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def late_decay_curves(
    schedule: str, n: int = 400, seed: int = 3, points: int = 40,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic curves with a learning-rate schedule the power law does not know about.

    A power law ``inf + a * t**-p`` with AR(1) noise (rho 0.3) on 40 points up to step 4000,
    minus a schedule effect of depth ``D``: ``none`` (no effect), ``cosine`` (a drop growing as
    ``(1 - cos(pi t / H)) / 2``, visible from early on) or ``wsd`` (warmup-stable-decay: flat,
    then a linear drop over the last 20% of the horizon, invisible before it starts).
    """
    rng = np.random.default_rng(seed)
    horizon = 4000.0
    steps = np.linspace(horizon / points, horizon, points)
    inf = rng.uniform(2.0, 3.0, n)
    a = rng.uniform(3.0, 30.0, n)
    p = rng.uniform(0.2, 0.8, n)
    depth = rng.uniform(0.05, 0.3, n)
    noise = rng.uniform(0.005, 0.04, n)
    eps = rng.standard_normal((n, points))
    for j in range(1, points):
        eps[:, j] = 0.3 * eps[:, j - 1] + np.sqrt(1 - 0.09) * eps[:, j]
    u = steps / horizon
    if schedule == "none":
        shape = np.zeros_like(u)
    elif schedule == "cosine":
        shape = (1 - np.cos(np.pi * u)) / 2
    elif schedule == "wsd":
        shape = np.clip((u - 0.8) / 0.2, 0.0, 1.0)
    else:
        raise ValueError(schedule)
    values = (inf[:, None] + a[:, None] * steps[None] ** -p[:, None]
              - depth[:, None] * shape[None] + noise[:, None] * eps)
    return steps, values


def synthetic_late_decay() -> list[dict[str, object]]:
    """PI coverage of the observed final value, fitted on prefixes, per schedule and fraction."""
    out: list[dict[str, object]] = []
    for schedule in ("none", "cosine", "wsd"):
        steps, values = late_decay_curves(schedule)
        final = values[:, -1]
        for frac in LATE_FRACTIONS:
            k = int(np.sum(steps <= frac * steps[-1]))
            row: dict[str, object] = {"schedule": schedule, "fraction": frac}
            for cal in (True, False):
                fit = fit_many(steps[:k], values[:, :k], calibrate=cal)
                pr = fit.predict(steps[-1])
                ok = fit.ok
                hit = ((pr.pi_low <= final) & (final <= pr.pi_high))[ok]
                key = "calibrated" if cal else "plain_delta"
                row[f"coverage_pi95_{key}"] = float(hit.mean())
                if cal:
                    row["fitted"] = int(ok.sum())
                    row["misses_below"] = int((final < pr.pi_low)[ok].sum())
                    row["misses_above"] = int((final > pr.pi_high)[ok].sum())
                    row["median_pi95_width"] = float(np.median((pr.pi_high - pr.pi_low)[ok]))
            out.append(row)
    return out


def plot_bands(curves: list[Curve], path: Path, frac: float = 0.5) -> None:
    """A few real curves, fitted on the points up to ``frac`` of their horizon, with bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen: list[Curve] = []
    seen: set[str] = set()
    for cv in sorted(curves, key=lambda c: (-len(c.steps), c.run)):
        if cv.group not in seen and len(cv.steps) >= 20:
            chosen.append(cv)
            seen.add(cv.group)
        if len(chosen) == 4:
            break
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    for ax, cv in zip(axes.ravel(), chosen, strict=False):
        keep = cv.steps <= frac * cv.steps[-1]
        fit = fit_power_law(cv.steps[keep], cv.values[keep])
        grid = np.linspace(cv.steps[0], cv.steps[-1], 200)
        ax.plot(cv.steps[keep], cv.values[keep], "o", ms=4, color="C0", label="fitted points")
        ax.plot(cv.steps[~keep], cv.values[~keep], "x", ms=5, color="C3", label="later points")
        if fit.ok:
            preds = [fit.predict(s) for s in grid]
            ax.plot(grid, [p.mean for p in preds], color="k", lw=1.2, label="fit")
            ax.fill_between(grid, [p.pi.low for p in preds], [p.pi.high for p in preds],
                            color="C1", alpha=0.25, label="95% prediction interval")
            ax.fill_between(grid, [p.ci.low for p in preds], [p.ci.high for p in preds],
                            color="C0", alpha=0.45, label="95% CI of the mean curve")
            lo = min(cv.values.min(), fit.predict(cv.steps[-1]).pi.low)
            hi = max(cv.values.max(), fit.predict(cv.steps[-1]).pi.high)
            ax.set_ylim(lo - 0.05, hi + 0.05)
        ax.axvline(cv.steps[keep][-1], color="grey", ls=":", lw=1)
        ax.set_title(f"{cv.run}\n{'fit: ' + (fit.reason or '') if not fit.ok else ''}"
                     f"p={fit.p:.2f} sigma={fit.sigma:.3f} rho={fit.rho:.2f} "
                     f"kappa={fit.kappa:.3f} drift={fit.drift:+.3f}", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("validation BPB")
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle(f"Power-law fits on the first {frac:.0%} of real curves, extrapolated to the end")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coverage(per: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = [r["fraction"] for r in per if r["coverage_pi95"] is not None and r["n"] >= 20]
    rows = [r for r in per if r["fraction"] in fr]
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.plot(fr, [r["coverage_pi95"] for r in rows], "o-", label="calibrated 95% PI")
    lo = [r["coverage_pi95_group_bootstrap_95"][0] for r in rows]  # type: ignore[index]
    hi = [r["coverage_pi95_group_bootstrap_95"][1] for r in rows]  # type: ignore[index]
    ax.fill_between(fr, lo, hi, alpha=0.2, label="group bootstrap 95%")
    ax.plot(fr, [r["coverage_pi95_plain_delta"] for r in rows], "s--", label="plain delta method")
    ax.axhspan(0.90, 0.98, color="green", alpha=0.08, label="target band")
    ax.axhline(0.95, color="green", lw=0.8)
    ax.set_xlabel("fraction of the horizon seen by the fit")
    ax.set_ylabel("share of final values inside the interval")
    ax.set_ylim(0.4, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="?", default=DEFAULT_CSV)
    ap.add_argument("--plot-dir", type=Path, default=None)
    args = ap.parse_args()
    curves = load(args.csv)
    per = [evaluate(curves, f) for f in FRACTIONS]
    result = {
        "csv": args.csv,
        "curves": len(curves),
        "groups": len({c.group for c in curves}),
        "per_fraction": per,
        "synthetic_known_truth": synthetic(),
        "synthetic_late_decay": synthetic_late_decay(),
    }
    if args.plot_dir is not None:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
        plot_bands(curves, args.plot_dir / "fit_bands.png")
        plot_coverage(per, args.plot_dir / "fit_coverage.png")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
