"""What the page draws for one race, computed from plain arrays: fits, bands, ranks, points.

Pure (numpy and the core's fit only), so it is tested without a database and runs in a worker
thread off the event loop. Every curve of a race is fitted in one ``fit_many`` call, the same
power law and the same 95% prediction interval the decision core uses, here over every sample
so far (a decision's fit, at its rung, rides in that decision's numbers). The band is that
interval at a few dozen log-spaced steps from the first sample to the race's horizon; the
points sent are thinned log-evenly (the chart's x axis is logarithmic), always keeping the
first and the last sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gardener.core.fit import fit_many

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

BAND_POINTS = 32  # steps at which the fitted curve and its band are evaluated
MAX_POINTS = 160  # samples sent per curve at most
POINT_BUDGET = 40_000  # samples sent per race at most (a big race gets fewer per curve)
MIN_POINTS_PER_CURVE = 40
BIG_RACE = 250  # above this many trials a band is evaluated at half the steps


def budget(n_trials: int) -> tuple[int, int]:
    """(band points, samples per curve) for a race of ``n_trials``: a thousand curves stay
    light enough for a browser to draw at once."""
    band = BAND_POINTS if n_trials <= BIG_RACE else BAND_POINTS // 2
    points = max(MIN_POINTS_PER_CURVE, min(MAX_POINTS, POINT_BUDGET // max(1, n_trials)))
    return band, points


@dataclass(frozen=True)
class Series:
    """One trial's samples, sorted by step."""

    name: str
    steps: IntArray
    bpb: FloatArray


def _num(x: float, digits: int = 5) -> float | None:
    """A JSON number (rounded) or null for NaN and infinities."""
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def _nums(x: FloatArray, digits: int = 5) -> list[float | None]:
    """``_num`` over an array, vectorised (a thousand curves make this the hot spot)."""
    arr = np.round(np.asarray(x, dtype=np.float64), digits)
    out: list[float | None] = arr.tolist()
    if not np.isfinite(arr).all():
        out = [v if math.isfinite(v) else None for v in out]  # type: ignore[arg-type]
    return out


def thin(n: int, keep: int) -> IntArray:
    """Indices of at most ``keep`` of ``n`` points, log-evenly spaced, first and last kept."""
    if n <= keep:
        return np.arange(n, dtype=np.int64)
    idx = np.unique(np.round(np.geomspace(1, n, keep)).astype(np.int64) - 1)
    return idx


def horizon_of(declared: int | None, rungs: Sequence[int], series: Sequence[Series]) -> int:
    """The step the race ends at: declared, else its last rung, never below a step seen."""
    seen = max((int(s.steps[-1]) for s in series if len(s.steps)), default=0)
    base = declared or (max(rungs) if rungs else 0)
    return max(base, seen, 1)


def compute(
    series: Sequence[Series],
    horizon: int,
    *,
    level: float = 0.95,
    band_points: int | None = None,
    max_points: int | None = None,
) -> list[dict[str, Any]]:
    """Per trial (in the order given): its fit, predicted final, band and thinned points.
    ``band_points`` and ``max_points`` default to ``budget(len(series))``."""
    out: list[dict[str, Any]] = []
    if not series:
        return out
    auto_band, auto_points = budget(len(series))
    band_points = band_points or auto_band
    max_points = max_points or auto_points
    width = max(1, max(len(s.steps) for s in series))
    steps = np.full((len(series), width), np.nan)
    values = np.full((len(series), width), np.nan)
    counts = np.zeros(len(series), dtype=np.int64)
    for i, s in enumerate(series):
        n = len(s.steps)
        steps[i, :n] = s.steps
        values[i, :n] = s.bpb
        counts[i] = n
    batch = fit_many(steps, values, counts, level=level)
    final = batch.predict(float(horizon))
    # Band: log-spaced from each curve's first positive step to the horizon.
    first = np.array(
        [float(s.steps[s.steps > 0][0]) if np.any(s.steps > 0) else 1.0 for s in series]
    )
    first = np.minimum(first, float(horizon))
    frac = np.linspace(0.0, 1.0, band_points)
    grid = np.exp(np.log(first)[:, None] + frac[None, :] * np.log(horizon / first)[:, None])
    grid = np.round(grid)
    band = [batch.predict(grid[:, k]) for k in range(band_points)]
    mean_b = np.round(np.stack([b.mean for b in band], axis=1), 5)
    low_b = np.round(np.stack([b.pi_low for b in band], axis=1), 5)
    high_b = np.round(np.stack([b.pi_high for b in band], axis=1), 5)
    for i, s in enumerate(series):
        ok = bool(batch.ok[i])
        keep = thin(len(s.steps), max_points)
        item: dict[str, Any] = {
            "canon_name": s.name,
            "samples": len(s.steps),
            "last_step": int(s.steps[-1]) if len(s.steps) else None,
            "last_bpb": _num(s.bpb[-1]) if len(s.bpb) else None,
            "best_bpb": _num(np.min(s.bpb)) if len(s.bpb) else None,
            "fit": {
                "ok": ok,
                "reason": None if ok else batch.reason[i],
                "bpb_inf": _num(batch.bpb_inf[i]),
                "a": _num(batch.a[i], 6),
                "p": _num(batch.p[i], 6),
                "sigma": _num(batch.sigma[i], 6),
            },
            "predicted_final": {
                "step": int(horizon),
                "mean": _num(final.mean[i]),
                "low": _num(final.pi_low[i]),
                "high": _num(final.pi_high[i]),
                "level": level,
            } if ok else None,
            "points": {"step": s.steps[keep].tolist(), "bpb": _nums(s.bpb[keep])},
            "band": {
                "step": grid[i].astype(np.int64).tolist(),
                "mean": _nums(mean_b[i]),
                "low": _nums(low_b[i]),
                "high": _nums(high_b[i]),
            } if ok else None,
        }
        out.append(item)
    _rank(out)
    return out


def _rank(items: list[dict[str, Any]]) -> None:
    """Rank 1 is the best: by predicted final BPB where there is a fit, then by the last
    value for the trials without one; trials with no sample are not ranked."""

    def key(item: dict[str, Any]) -> tuple[int, float]:
        pred = item["predicted_final"]
        if pred is not None and pred["mean"] is not None:
            return (0, pred["mean"])
        return (1, item["last_bpb"])

    ranked = sorted((it for it in items if it["last_bpb"] is not None), key=key)
    for r, it in enumerate(ranked, start=1):
        it["rank"] = r
    for it in items:
        it.setdefault("rank", None)
