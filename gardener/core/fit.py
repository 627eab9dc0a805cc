"""Power-law fit of a BPB curve, ``BPB(t) = bpb_inf + a * t**(-p)``, with real intervals.

Why this shape:
- Variable projection: for a fixed exponent ``p`` the model is linear in ``bpb_inf`` and ``a``,
  so a grid over ``log p`` with closed-form 2x2 least squares finds the global optimum cheaply
  for many curves at once; a vectorised Levenberg-Marquardt step polishes it, and the single
  fit adds scipy's MINPACK LM on top.
- Intervals are delta-method intervals with a Student-t quantile on the residual variance.
  Real curves break the i.i.d. assumption in two ways, and each gets a remedy estimated from
  the curve itself (nothing is tuned to one data set):
  1. autocorrelated residuals: the parameter covariance is inflated by ``(1+rho)/(1-rho)``,
     the effective-sample-size factor of an AR(1) process with the residuals' lag-1
     autocorrelation ``rho``;
  2. a misspecified model: a discrepancy variance ``kappa**2 * log(t / t_last)**2`` grows with
     the log-distance of extrapolation. ``kappa`` comes from a rolling-origin check inside the
     observed prefix: fit the first half (5/8, 3/4, 7/8) of the points, measure how fast the
     later points drift from that fit, and estimate the drift variance beyond what noise and
     parameter uncertainty explain (DerSimonian-Laird moment estimator). The same check
     gives the signed mean drift ``mu``: the interval is the union of the one around the power
     law and the one around the power law moved by ``mu * log(t / t_last)``, so it widens on
     the side the held-out points left on (one-sided misses came from curves that fall faster
     than a decelerating power law allows).
- The confidence interval (``ci``) is for the mean curve; the prediction interval (``pi``)
  also holds the observation noise and is the one to use for "where will this run's observed
  value land".
- Nothing here raises on a curve: short, non-finite, flat or degenerate curves return a fit
  with ``ok=False`` and a reason. Points at step 0 are dropped (``t**(-p)`` is undefined there)
  and counted in ``dropped``; negative, non-finite or out-of-range steps (above the ledger's
  bigint) and non-finite values are a no-fit.

The pieces: ``fit_solver`` (grid, least squares, polish), ``fit_intervals`` (residual
statistics, the discrepancy check, predictions), ``fit_results`` (what a fit returns); this
module holds the entry points, the engine that ties them together, and the sanity check of a
point prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import special

from gardener.core.fit_intervals import _discrepancy, _holdout_origins, _stats
from gardener.core.fit_results import (
    BatchFit,
    BatchPrediction,
    Interval,
    PowerLawFit,
    Prediction,
    _no_fit,
)
from gardener.core.fit_solver import (
    GRID_SIZE,
    MIN_POINTS,
    P_MAX,
    P_MIN,
    FloatArray,
    IntArray,
    _lm_polish,
    _profile_fit,
    _scipy_polish,
)

# The largest step the ledger can hold (bigint): beyond it a step is corrupt, not a step.
MAX_STEP = 2**63 - 1

__all__ = [
    "GRID_SIZE",
    "MIN_POINTS",
    "P_MAX",
    "P_MIN",
    "BatchFit",
    "BatchPrediction",
    "Interval",
    "PowerLawFit",
    "Prediction",
    "fit_many",
    "fit_power_law",
    "insane_prediction",
]


# ----------------------------------------------------------------------------------------------
# Sanity of a point prediction


def insane_prediction(values: npt.ArrayLike, predicted: float) -> str | None:
    """Why a power-law point prediction is not to be used, or None when it is plausible.

    A lower-is-better metric of a training curve is never below zero, and an extrapolation
    that promises more further improvement than the whole range the curve has shown so far
    (below ``best - (worst - best)``) is the fit running off, not evidence: the policy then
    ranks on observed levels instead. Scale-free: both limits come from the curve itself.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not np.isfinite(predicted):
        return "no fit: the prediction is not finite"
    if len(v) == 0:
        return "no fit: no finite values"
    best, worst = float(v.min()), float(v.max())
    if predicted < 0 <= best:
        return f"no fit: prediction {predicted:.4g} below zero"
    if predicted < best - (worst - best):
        return (
            f"no fit: prediction {predicted:.4g} far below the curve's best {best:.4g} "
            f"(more than its whole range {worst - best:.4g} further)"
        )
    return None


# ----------------------------------------------------------------------------------------------
# Public entry points


def fit_power_law(
    steps: Sequence[float] | npt.ArrayLike, values: Sequence[float] | npt.ArrayLike,
    *, level: float = 0.95, calibrate: bool = True,
) -> PowerLawFit:
    """Fit one curve; never raises on the data (a bad curve gives ``ok=False`` and a reason).

    ``calibrate=False`` gives the plain delta-method intervals (i.i.d. residuals, a correct
    model): no autocorrelation inflation and no discrepancy term. It exists for comparison.
    """
    try:
        t = np.asarray(steps, dtype=np.float64).ravel()
        y = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        return _no_fit(f"not numeric: {exc}")
    if t.shape != y.shape:
        return _no_fit(f"steps and values differ in length ({t.size} vs {y.size})")
    if not 0 < level < 1:
        return _no_fit(f"level must be in (0, 1), got {level}")
    batch = _fit_batch(t[None, :], y[None, :], np.array([t.size]), level, True, calibrate)
    return batch.fit(0)


def fit_many(
    steps: npt.ArrayLike, values: npt.ArrayLike, counts: npt.ArrayLike | None = None,
    *, level: float = 0.95, calibrate: bool = True,
) -> BatchFit:
    """Fit many curves at once, one per row of 2-D ``steps``/``values``.

    Ragged curves: give ``counts`` (row ``i`` uses its first ``counts[i]`` entries), or pad
    with NaN steps (a NaN step marks padding; a non-finite value at a real step is a no-fit).
    ``steps`` may be 1-D and shared by every row.
    """
    y = np.atleast_2d(np.asarray(values, dtype=np.float64))
    t = np.asarray(steps, dtype=np.float64)
    t = np.broadcast_to(t, y.shape) if t.ndim == 1 else np.atleast_2d(t)
    if t.shape != y.shape:
        raise ValueError(f"steps {t.shape} and values {y.shape} differ in shape")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if counts is None:
        present = ~np.isnan(t)
        # Padding is at the end of a row by convention; move present points first, in order.
        order = np.argsort(~present, axis=1, kind="stable")
        t = np.take_along_axis(t, order, axis=1)
        y = np.take_along_axis(y, order, axis=1)
        cnt = present.sum(axis=1)
    else:
        cnt = np.broadcast_to(np.asarray(counts, dtype=np.int64), (y.shape[0],))
        cnt = np.clip(cnt, 0, y.shape[1])
    return _fit_batch(t, y, cnt, level, False, calibrate)


# ----------------------------------------------------------------------------------------------
# The engine: every step is vectorised over curves (rows) and points (columns).


def _fit_batch(
    t_in: FloatArray, y_in: FloatArray, counts: IntArray, level: float, polish_scipy: bool,
    calibrate: bool,
) -> BatchFit:
    with np.errstate(all="ignore"):
        return _fit_batch_impl(t_in, y_in, counts, level, polish_scipy, calibrate)


def _fit_batch_impl(
    t_in: FloatArray, y_in: FloatArray, counts: IntArray, level: float, polish_scipy: bool,
    calibrate: bool,
) -> BatchFit:
    if y_in.shape[1] == 0:  # no points at all: one empty column keeps the shapes valid
        t_in = np.full((y_in.shape[0], 1), np.nan)
        y_in = t_in.copy()
        counts = np.zeros(y_in.shape[0], dtype=np.int64)
    n_rows, width = y_in.shape
    col = np.arange(width)[None, :]
    inside = col < counts[:, None]
    reason: list[str | None] = [None] * n_rows

    bad_t = inside & ~np.isfinite(t_in)
    bad_y = inside & ~np.isfinite(y_in)
    neg_t = inside & np.isfinite(t_in) & ((t_in < 0) | (t_in > MAX_STEP))
    zero_t = inside & (t_in == 0)
    use = inside & ~bad_t & ~bad_y & ~neg_t & ~zero_t
    dropped = zero_t.sum(axis=1).astype(np.int64)

    # Sort each row by step; unused entries go last.
    key = np.where(use, t_in, np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    t = np.take_along_axis(np.where(use, t_in, 1.0), order, axis=1)
    y = np.take_along_axis(np.where(use, y_in, 0.0), order, axis=1)
    m = np.take_along_axis(use, order, axis=1)
    n = m.sum(axis=1).astype(np.int64)

    t_ref = np.where(n > 0, np.max(np.where(m, t, 0.0), axis=1), 1.0)
    t_ref = np.where(t_ref > 0, t_ref, 1.0)
    log_s = np.where(m, np.log(t / t_ref[:, None]), 0.0)
    distinct = np.where(
        n > 0, 1 + np.sum(m[:, 1:] & (np.diff(t, axis=1) > 0), axis=1), 0
    )

    # Standardise each curve: the fit runs on unit-scale values and is mapped back at the end.
    nn = np.maximum(n, 1)
    y_mean = np.sum(np.where(m, y, 0.0), axis=1) / nn
    y_dev = np.where(m, y - y_mean[:, None], 0.0)
    y_scale = np.sqrt(np.sum(y_dev**2, axis=1) / nn)
    flat = ~(y_scale > 1e-12 * np.maximum(1.0, np.abs(y_mean)))
    z = np.where(m, y_dev / np.where(flat, 1.0, y_scale)[:, None], 0.0)

    n_bad_t, n_bad_y, n_neg = bad_t.sum(axis=1), bad_y.sum(axis=1), neg_t.sum(axis=1)
    suspect = (n_bad_t > 0) | (n_bad_y > 0) | (n_neg > 0) | (n < MIN_POINTS) | (distinct < 3)
    suspect |= flat | ~np.isfinite(y_scale)
    for i in np.flatnonzero(suspect).tolist():
        if n_bad_t[i] or n_bad_y[i]:
            reason[i] = f"non-finite values: {int(n_bad_t[i])} steps, {int(n_bad_y[i])} values"
        elif n_neg[i]:
            reason[i] = f"steps below 0 or above {MAX_STEP}: {int(n_neg[i])}"
        elif n[i] < MIN_POINTS:
            extra = f" ({int(dropped[i])} at step 0 dropped)" if dropped[i] else ""
            reason[i] = f"fewer than {MIN_POINTS} usable points: {int(n[i])}{extra}"
        elif distinct[i] < 3:
            reason[i] = f"fewer than 3 distinct steps: {int(distinct[i])}"
        elif flat[i] or not np.isfinite(y_scale[i]):
            reason[i] = "constant curve: no trend to fit" if flat[i] else "values overflow"
    ok = np.array([r is None for r in reason], dtype=bool)
    m = m & ok[:, None]
    n_fit = np.where(ok, n, 0)

    # Full fit: grid, parabolic refinement in log p, Levenberg-Marquardt polish.
    # One grid pass serves the full fit and the held-out origins of the discrepancy check.
    ks_head = _holdout_origins(n_fit) if calibrate else np.zeros((n_rows, 0), dtype=np.int64)
    c_all, b_all, p_all = _profile_fit(log_s, z, m, np.concatenate([n_fit[:, None], ks_head], 1))
    c, b, p = c_all[:, 0], b_all[:, 0], p_all[:, 0]
    c, b, p = _lm_polish(log_s, z, m, c, b, p, ok)
    if polish_scipy:
        for i in np.flatnonzero(ok).tolist():
            c[i], b[i], p[i] = _scipy_polish(log_s[i, m[i]], z[i, m[i]], c[i], b[i], p[i])

    st = _stats(log_s, z, m, c, b, p, calibrate)
    for i in np.flatnonzero(ok).tolist():
        if not b[i] > 0:
            reason[i] = "no decreasing trend: the best fit has a = 0"
        elif st.singular[i]:
            reason[i] = "singular fit: the parameters are not identifiable from these points"
    ok = np.array([r is None for r in reason], dtype=bool)

    # Rolling-origin discrepancy check inside the observed prefix.
    if calibrate:
        heads = (ks_head, c_all[:, 1:], b_all[:, 1:], p_all[:, 1:])
        kappa2, n_hold, drift_z = _discrepancy(t, log_s, z, m, heads, ok)
    else:
        kappa2, n_hold = np.zeros(n_rows), np.zeros(n_rows, dtype=np.int64)
        drift_z = np.zeros(n_rows)

    # Back to the original units.
    scale = np.where(ok, y_scale, np.nan)
    bpb_inf = y_mean + scale * c
    b_out = scale * b
    sigma = scale * st.sigma
    kappa = scale * np.sqrt(kappa2)
    drift = scale * drift_z
    d = np.stack([scale, scale, np.ones_like(scale)], axis=1)
    cov = st.cov * d[:, :, None] * d[:, None, :]
    a = b_out * np.power(t_ref, p)
    df = np.maximum(n - 3, 1.0)
    q = special.stdtrit(df, 0.5 + level / 2)  # the Student-t quantile
    half = q * np.sqrt(cov[:, 0, 0])
    last_step = t_ref

    numbers = np.stack([bpb_inf, b_out, p, sigma, kappa, drift, half, a], axis=1)
    finite = np.isfinite(numbers).all(axis=1) & np.isfinite(cov.reshape(n_rows, 9)).all(axis=1)
    for i in np.flatnonzero(ok & ~finite).tolist():
        reason[i] = "non-finite result: the curve is too extreme to fit in floating point"
    ok = np.array([r is None for r in reason], dtype=bool)
    nanv = np.where(ok, 1.0, np.nan)

    return BatchFit(
        ok=ok,
        reason=reason,
        bpb_inf=bpb_inf * nanv,
        a=a * nanv,
        p=p * nanv,
        bpb_inf_low=(bpb_inf - half) * nanv,
        bpb_inf_high=(bpb_inf + half) * nanv,
        n=n,
        sigma=sigma * nanv,
        b=b_out * nanv,
        t_ref=t_ref,
        last_step=last_step,
        cov=cov * nanv[:, None, None],
        df=df,
        rho=st.rho * nanv,
        kappa=kappa * nanv,
        n_holdout=np.where(ok, n_hold, 0).astype(np.int64),
        dropped=dropped,
        p_at_bound=ok & ((p <= P_MIN * (1 + 1e-9)) | (p >= P_MAX * (1 - 1e-9))),
        level=level,
        drift=drift * nanv,
    )
