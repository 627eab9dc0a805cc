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
  and counted in ``dropped``; negative or non-finite steps and non-finite values are a no-fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import special

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

MIN_POINTS = 4  # three parameters and at least one degree of freedom for the residual variance
P_MIN = 0.01  # exponent search range: below it t**-p is indistinguishable from a log-linear law
P_MAX = 4.0
GRID_SIZE = 16  # log-spaced exponents in the variable-projection search
LM_ITERATIONS = 20  # at most this many vectorised Levenberg-Marquardt polish steps
LM_RTOL = 1e-9  # stop a curve's polish when a step lowers its RSS by less than this share
HOLDOUT_FRACTIONS = (0.5, 0.625, 0.75, 0.875)  # rolling origins of the discrepancy check
RHO_MAX = 0.9  # cap on the lag-1 autocorrelation (factor at most 19)
SINGULAR_DET = 1e-13  # determinant of the scaled normal matrix below which a fit is singular

_P_GRID = np.geomspace(P_MIN, P_MAX, GRID_SIZE)
_LOG_P_GRID = np.log(_P_GRID)


@dataclass(frozen=True)
class Interval:
    """A closed interval; both ends are NaN when there is no fit."""

    low: float
    high: float

    def contains(self, x: float) -> bool:
        return bool(self.low <= x <= self.high)


@dataclass(frozen=True)
class Prediction:
    """The fitted curve at one step: ``ci`` for the mean curve, ``pi`` for a new observation."""

    step: float
    mean: float
    ci: Interval
    pi: Interval


_NAN_INTERVAL = Interval(float("nan"), float("nan"))


@dataclass(frozen=True)
class PowerLawFit:
    """One curve's fit. ``ok=False`` carries a reason and NaN numbers, and still predicts (NaN).

    Internally the curve is ``bpb_inf + b * (t / t_ref)**(-p)`` with ``t_ref`` the last step, so
    ``a = b * t_ref**p``; ``cov`` is the (inflated) covariance of ``(bpb_inf, b, p)``.
    """

    ok: bool
    reason: str | None
    bpb_inf: float
    a: float
    p: float
    bpb_inf_ci: Interval
    n: int
    sigma: float  # residual standard deviation (observation noise)
    level: float = 0.95
    b: float = float("nan")
    t_ref: float = float("nan")
    last_step: float = float("nan")
    cov: tuple[tuple[float, ...], ...] = ()
    df: float = 0.0  # Student-t degrees of freedom: effective sample size minus 3, at least 1
    rho: float = float("nan")  # lag-1 autocorrelation of the residuals (clipped to [0, 0.9])
    kappa: float = 0.0  # model discrepancy per unit of log-extrapolation distance
    n_holdout: int = 0  # held-out errors behind kappa (0: no discrepancy estimate)
    drift: float = 0.0  # signed mean drift per unit of log-extrapolation distance (held out)
    dropped: int = 0  # points at step 0 that were left out
    p_at_bound: bool = False

    def predict(self, step: float, level: float | None = None) -> Prediction:
        """Mean and intervals at ``step``; NaNs for a not-ok fit or a step that is not > 0."""
        lvl = self.level if level is None else level
        step = float(step)
        if not self.ok or not np.isfinite(step) or step <= 0 or not 0 < lvl < 1:
            return Prediction(step, float("nan"), _NAN_INTERVAL, _NAN_INTERVAL)
        mean, ci_lo, ci_hi, pi_lo, pi_hi = _predict_arrays(
            np.array([self.bpb_inf]),
            np.array([self.b]),
            np.array([self.p]),
            np.array([self.t_ref]),
            np.array([self.last_step]),
            np.array(self.cov, dtype=np.float64).reshape(1, 3, 3),
            np.array([self.sigma]),
            np.array([self.kappa]),
            np.array([self.drift]),
            np.array([self.df]),
            np.array([step]),
            lvl,
        )
        return Prediction(
            step,
            float(mean[0]),
            Interval(float(ci_lo[0]), float(ci_hi[0])),
            Interval(float(pi_lo[0]), float(pi_hi[0])),
        )


@dataclass(frozen=True)
class BatchPrediction:
    """Predictions for every curve of a batch at one step each (NaN where a fit is not ok)."""

    step: FloatArray
    mean: FloatArray
    ci_low: FloatArray
    ci_high: FloatArray
    pi_low: FloatArray
    pi_high: FloatArray


@dataclass(frozen=True, eq=False)
class BatchFit:
    """Fits of many curves as arrays; row ``i`` matches ``fit_power_law`` on curve ``i``."""

    ok: BoolArray
    reason: list[str | None]
    bpb_inf: FloatArray
    a: FloatArray
    p: FloatArray
    bpb_inf_low: FloatArray
    bpb_inf_high: FloatArray
    n: IntArray
    sigma: FloatArray
    b: FloatArray
    t_ref: FloatArray
    last_step: FloatArray
    cov: FloatArray  # (N, 3, 3) covariance of (bpb_inf, b, p)
    df: FloatArray
    rho: FloatArray
    kappa: FloatArray
    n_holdout: IntArray
    dropped: IntArray
    p_at_bound: BoolArray
    level: float = 0.95
    drift: FloatArray | None = None  # signed held-out drift rate; None means zeros

    def __len__(self) -> int:
        return int(self.ok.shape[0])

    def predict(self, step: float | FloatArray, level: float | None = None) -> BatchPrediction:
        """Predict every curve at ``step`` (a scalar, or one step per curve)."""
        lvl = self.level if level is None else level
        t = np.broadcast_to(np.asarray(step, dtype=np.float64), self.ok.shape).copy()
        mean, ci_lo, ci_hi, pi_lo, pi_hi = _predict_arrays(
            self.bpb_inf, self.b, self.p, self.t_ref, self.last_step, self.cov,
            self.sigma, self.kappa, self._drift(), self.df, t, lvl,
        )
        bad = ~self.ok | ~np.isfinite(t) | (t <= 0) | (not 0 < lvl < 1)
        for arr in (mean, ci_lo, ci_hi, pi_lo, pi_hi):
            arr[bad] = np.nan
        return BatchPrediction(t, mean, ci_lo, ci_hi, pi_lo, pi_hi)

    def _drift(self) -> FloatArray:
        return np.zeros_like(self.kappa) if self.drift is None else self.drift

    def fit(self, i: int) -> PowerLawFit:
        """Row ``i`` as a ``PowerLawFit``."""
        if not self.ok[i]:
            return _no_fit(self.reason[i] or "no fit", int(self.n[i]), int(self.dropped[i]),
                           self.level)
        return PowerLawFit(
            ok=True,
            reason=None,
            bpb_inf=float(self.bpb_inf[i]),
            a=float(self.a[i]),
            p=float(self.p[i]),
            bpb_inf_ci=Interval(float(self.bpb_inf_low[i]), float(self.bpb_inf_high[i])),
            n=int(self.n[i]),
            sigma=float(self.sigma[i]),
            level=self.level,
            b=float(self.b[i]),
            t_ref=float(self.t_ref[i]),
            last_step=float(self.last_step[i]),
            cov=tuple(tuple(float(v) for v in row) for row in self.cov[i]),
            df=float(self.df[i]),
            rho=float(self.rho[i]),
            kappa=float(self.kappa[i]),
            n_holdout=int(self.n_holdout[i]),
            drift=float(self._drift()[i]),
            dropped=int(self.dropped[i]),
            p_at_bound=bool(self.p_at_bound[i]),
        )


def _no_fit(reason: str, n: int = 0, dropped: int = 0, level: float = 0.95) -> PowerLawFit:
    nan = float("nan")
    return PowerLawFit(False, reason, nan, nan, nan, _NAN_INTERVAL, n, nan, level=level,
                       dropped=dropped)


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
    neg_t = inside & np.isfinite(t_in) & (t_in < 0)
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
            reason[i] = f"negative steps: {int(n_neg[i])}"
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


def _profile_fit(
    log_s: FloatArray, z: FloatArray, m: BoolArray, ks: IntArray,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Variable projection over the p grid for the prefixes of ``ks[i, j]`` points of row ``i``.

    For each p the best ``(c, b >= 0)`` is closed form from five sums, so every prefix of every
    curve costs one ``exp`` per grid point. Rows that share their prefixes (curves of the same
    length) are processed together, summing each segment between prefix ends once.
    Returns ``(c, b, p)`` of shape ``ks.shape``.
    """
    width = z.shape[1]
    mf = m.astype(np.float64)
    zm = z * mf
    rss_grid = np.full((GRID_SIZE, *ks.shape), np.inf)
    keys, inverse = np.unique(np.clip(ks, 0, width), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    for gi, key in enumerate(keys):
        rows = np.flatnonzero(inverse == gi)
        bounds = np.unique(np.concatenate([[0], key]))
        pos = np.searchsorted(bounds, key)
        segments = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
        ls_g, mf_g, z_g = log_s[rows], mf[rows], zm[rows]

        def prefix(q: FloatArray, segments: list[tuple[int, int]] = segments,
                   pos: IntArray = pos) -> FloatArray:
            parts = [np.zeros(q.shape[0])] + [q[:, lo:hi].sum(axis=1) for lo, hi in segments]
            out: FloatArray = np.cumsum(np.stack(parts, axis=1), axis=1)[:, pos]
            return out

        cn, sy, syy = prefix(mf_g), prefix(z_g), prefix(z_g * z_g)
        for g, pg in enumerate(_P_GRID):
            x = np.exp(-pg * ls_g) * mf_g
            rss = _ls2(cn, prefix(x), prefix(x * x), sy, prefix(x * z_g), syy)[2]
            rss_grid[g, rows] = np.where(np.isfinite(rss), rss, np.inf)
    best = np.argmin(rss_grid, axis=0)
    # Parabolic refinement in log p through the best grid point and its neighbours.
    g0 = np.clip(best, 1, GRID_SIZE - 2)
    r_m = np.take_along_axis(rss_grid, (g0 - 1)[None], axis=0)[0]
    r_0 = np.take_along_axis(rss_grid, g0[None], axis=0)[0]
    r_p = np.take_along_axis(rss_grid, (g0 + 1)[None], axis=0)[0]
    h = _LOG_P_GRID[1] - _LOG_P_GRID[0]
    curv = r_m - 2 * r_0 + r_p
    shift = np.where(curv > 0, 0.5 * h * (r_m - r_p) / np.where(curv > 0, curv, 1.0), 0.0)
    shift = np.where(np.isfinite(shift), np.clip(shift, -h, h), 0.0)
    interior = (best > 0) & (best < GRID_SIZE - 1)
    p = np.exp(np.where(interior, _LOG_P_GRID[g0] + shift, _LOG_P_GRID[best]))
    rss_best = np.min(rss_grid, axis=0)
    # Exact (c, b) at the refined exponent; back to the grid point where refinement is worse.
    c = np.empty(ks.shape)
    b = np.empty(ks.shape)
    col = np.arange(width)[None, :]
    for j in range(ks.shape[1]):
        pref = m & (col < ks[:, j : j + 1])
        cj, bj, rj = _solve_cb(log_s, z, pref, p[:, j])
        # Tolerance: the grid's closed-form RSS carries rounding of order eps * sum(z**2).
        slack = 1e-9 * rss_best[:, j] + 1e-12 * ks[:, j]
        worse = np.flatnonzero(interior[:, j] & ~(rj <= rss_best[:, j] + slack))
        if worse.size:
            pg = _P_GRID[best[worse, j]]
            cj[worse], bj[worse], _ = _solve_cb(log_s[worse], z[worse], pref[worse], pg)
            p[worse, j] = pg
        c[:, j], b[:, j] = cj, bj
    return c, b, p


def _gram(cols: tuple[FloatArray, FloatArray, FloatArray]) -> FloatArray:
    """``J^T J`` of a stack of Jacobians given as three (N, M) columns, shape (N, 3, 3)."""
    out = np.empty((cols[0].shape[0], 3, 3))
    for i in range(3):
        for j in range(i, 3):
            out[:, i, j] = out[:, j, i] = np.sum(cols[i] * cols[j], axis=1)
    return out


def _quad(g: tuple[FloatArray, FloatArray, FloatArray], cov: FloatArray) -> FloatArray:
    """``g^T cov g`` per row, for three (N,) or (N, M) gradient parts and (N, 3, 3) ``cov``."""
    shape = np.broadcast_shapes(*(gi.shape for gi in g))
    out = np.zeros(shape)
    extra = (slice(None),) + (None,) * (len(shape) - 1)
    for i in range(3):
        for j in range(3):
            out += g[i] * g[j] * cov[:, i, j][extra]
    return out


def _ls2(
    cn: FloatArray, sx: FloatArray, sxx: FloatArray, sy: FloatArray, sxy: FloatArray,
    syy: FloatArray,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Least squares of y on (1, x) with b >= 0, from sums; returns (c, b, rss)."""
    nn = np.maximum(cn, 1.0)
    det = cn * sxx - sx * sx
    good = det > 1e-12 * np.maximum(cn * sxx, 1e-300)
    b = np.where(good, (cn * sxy - sx * sy) / np.where(good, det, 1.0), 0.0)
    b = np.maximum(b, 0.0)
    c = (sy - b * sx) / nn
    rss = syy - 2 * c * sy - 2 * b * sxy + cn * c * c + 2 * c * b * sx + b * b * sxx
    return c, b, np.maximum(rss, 0.0)


def _solve_cb(
    log_s: FloatArray, z: FloatArray, m: BoolArray, p: FloatArray,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """The exact best ``(c, b >= 0)`` of each row at exponent ``p[i]``, and its RSS."""
    mf = m.astype(np.float64)
    x = np.exp(-p[:, None] * log_s) * mf
    zm = z * mf
    c, b, _ = _ls2(mf.sum(1), x.sum(1), (x * x).sum(1), zm.sum(1), (x * zm).sum(1),
                   (zm * zm).sum(1))
    r = (z - c[:, None] - b[:, None] * x) * mf
    return c, b, np.sum(r * r, axis=1)


def _lm_polish(
    log_s: FloatArray, z: FloatArray, m: BoolArray, c: FloatArray, b: FloatArray, p: FloatArray,
    active: BoolArray,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Vectorised Levenberg-Marquardt on (c, b, p), keeping b >= 0 and p in range."""
    c, b, p = c.copy(), b.copy(), p.copy()
    rows = np.flatnonzero(active & (b > 0))
    if rows.size == 0:
        return c, b, p
    ls, zz, mf = log_s[rows], z[rows], m[rows].astype(np.float64)
    cc, bb, pp = c[rows], b[rows], p[rows]

    lam = np.full(rows.shape, 1e-3)
    rss, x, r = _rss_of(ls, zz, mf, cc, bb, pp)
    act = np.arange(rows.size)
    for _ in range(LM_ITERATIONS):
        if act.size == 0:
            break
        xa, ra, la, ma, ba = x[act], r[act], ls[act], mf[act], bb[act]
        cols = (ma, xa, -ba[:, None] * xa * la)
        jtj = _gram(cols)
        jtr = np.stack([np.sum(col * ra, axis=1) for col in cols], axis=1)
        for i in range(3):
            jtj[:, i, i] *= 1.0 + lam[act]
        inv, _ = _inv3_scaled(jtj)
        step = np.sum(inv * jtr[:, None, :], axis=2)
        step = np.where(np.isfinite(step), step, 0.0)
        c_new = cc[act] + step[:, 0]
        b_new = np.maximum(ba + step[:, 1], 0.0)
        p_new = np.clip(pp[act] + step[:, 2], P_MIN, P_MAX)
        rss_new, x_new, r_new = _rss_of(la, zz[act], ma, c_new, b_new, p_new)
        better = rss_new < rss[act]
        up = act[better]
        cc[up], bb[up], pp[up] = c_new[better], b_new[better], p_new[better]
        x[up], r[up] = x_new[better], r_new[better]
        rel = np.where(better, (rss[act] - rss_new) / np.maximum(rss[act], 1e-300), 0.0)
        rss[up] = rss_new[better]
        lam[act] = np.where(better, lam[act] / 3.0, lam[act] * 4.0)
        keep = np.where(better, rel > LM_RTOL, lam[act] < 1e8) & (bb[act] > 0)
        act = act[keep]
    c[rows], b[rows], p[rows] = cc, bb, pp
    return c, b, p


def _rss_of(
    ls: FloatArray, zz: FloatArray, mf: FloatArray, c: FloatArray, b: FloatArray, p: FloatArray,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Residual sum of squares per row, with the basis ``x`` and residuals it came from."""
    x = np.exp(-p[:, None] * ls) * mf
    r = (zz - c[:, None] - b[:, None] * x) * mf
    out = np.sum(r * r, axis=1)
    return np.where(np.isfinite(out), out, np.inf), x, r


def _scipy_polish(
    log_s: FloatArray, z: FloatArray, c: float, b: float, p: float,
) -> tuple[float, float, float]:
    """MINPACK Levenberg-Marquardt from the batched optimum; kept only if feasible and better."""
    if not b > 0:
        return c, b, p

    def resid(th: FloatArray) -> FloatArray:
        out: FloatArray = th[0] + th[1] * np.exp(-th[2] * log_s) - z
        return out

    def jac(th: FloatArray) -> FloatArray:
        x = np.exp(-th[2] * log_s)
        return np.stack([np.ones_like(x), x, -th[1] * x * log_s], axis=1)

    x0 = np.array([c, b, p])
    if z.size < 3:
        return c, b, p
    from scipy import optimize  # only the single-curve polish needs it: keeps start-up light

    try:
        res = optimize.least_squares(resid, x0, jac=jac, method="lm", xtol=1e-12, ftol=1e-12,
                                     gtol=1e-12, max_nfev=200)
    except (ValueError, np.linalg.LinAlgError):
        return c, b, p
    th = res.x
    old = float(np.sum(resid(x0) ** 2))
    new = float(np.sum(resid(th) ** 2)) if np.all(np.isfinite(th)) else np.inf
    if new < old and th[1] >= 0 and P_MIN <= th[2] <= P_MAX:
        return float(th[0]), float(th[1]), float(th[2])
    return c, b, p


def _inv3_scaled(a: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Inverse of a stack of symmetric 3x3 matrices after unit-diagonal scaling.

    Returns the inverses (NaN where singular) and the determinant of the scaled matrix, which
    is 1 for orthogonal columns and 0 for collinear ones: a scale-free singularity test.
    """
    diag = np.stack([a[:, 0, 0], a[:, 1, 1], a[:, 2, 2]], axis=1)
    dinv = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 0.0)
    s = a * dinv[:, :, None] * dinv[:, None, :]
    c00 = s[:, 1, 1] * s[:, 2, 2] - s[:, 1, 2] * s[:, 2, 1]
    c01 = s[:, 0, 2] * s[:, 2, 1] - s[:, 0, 1] * s[:, 2, 2]
    c02 = s[:, 0, 1] * s[:, 1, 2] - s[:, 0, 2] * s[:, 1, 1]
    c11 = s[:, 0, 0] * s[:, 2, 2] - s[:, 0, 2] * s[:, 2, 0]
    c12 = s[:, 0, 2] * s[:, 1, 0] - s[:, 0, 0] * s[:, 1, 2]
    c22 = s[:, 0, 0] * s[:, 1, 1] - s[:, 0, 1] * s[:, 1, 0]
    det = s[:, 0, 0] * c00 + s[:, 1, 0] * c01 + s[:, 2, 0] * c02
    adj = np.stack(
        [np.stack([c00, c01, c02], 1), np.stack([c01, c11, c12], 1),
         np.stack([c02, c12, c22], 1)], 1,
    )
    good = (det > SINGULAR_DET) & (diag > 0).all(axis=1)
    inv_s = adj / np.where(good, det, np.nan)[:, None, None]
    inv = inv_s * dinv[:, :, None] * dinv[:, None, :]
    return inv, np.where(np.isfinite(det), det, 0.0)


@dataclass(frozen=True, eq=False)
class _Stats:
    sigma: FloatArray
    rho: FloatArray
    inflation: FloatArray
    cov: FloatArray
    singular: BoolArray


def _stats(
    log_s: FloatArray, z: FloatArray, m: BoolArray, c: FloatArray, b: FloatArray, p: FloatArray,
    autocorrelation: bool = True,
) -> _Stats:
    """Residual variance, lag-1 autocorrelation and inflated covariance of ``(c, b, p)``."""
    mf = m.astype(np.float64)
    n = mf.sum(axis=1)
    x = np.exp(-p[:, None] * log_s) * mf
    r = (z - c[:, None] - b[:, None] * x) * mf
    rss = np.sum(r * r, axis=1)
    sigma2 = rss / np.maximum(n - 3, 1)
    pair = mf[:, 1:] * mf[:, :-1]
    lag1 = np.sum(r[:, 1:] * r[:, :-1] * pair, axis=1)
    rho = np.where(rss > 0, lag1 / np.where(rss > 0, rss, 1.0), 0.0)
    # First-order small-sample bias of the lag-1 estimate: E[rho_hat] ~ rho - (1 + 3 rho) / n.
    rho = rho + (1 + 3 * rho) / np.maximum(n, 1)
    rho = np.clip(np.where(np.isfinite(rho), rho, 0.0), 0.0, RHO_MAX)
    if not autocorrelation:
        rho = np.zeros_like(rho)
    inflation = (1 + rho) / (1 - rho)
    jtj = _gram((mf, x, -b[:, None] * x * log_s))
    inv, _ = _inv3_scaled(jtj)
    cov = inv * (sigma2 * inflation)[:, None, None]
    singular = np.asarray(~np.isfinite(inv.reshape(len(n), 9)).all(axis=1), dtype=bool)
    return _Stats(np.sqrt(sigma2), rho, inflation, cov, singular)


def _holdout_origins(n: IntArray) -> IntArray:
    """Rolling origins (number of points fitted) per curve; 0 where there is nothing to hold out.

    Duplicates (short curves round several fractions to the same origin) are also zeroed.
    """
    fr = np.array(HOLDOUT_FRACTIONS)
    ks = np.maximum(np.floor(n[:, None] * fr[None, :]).astype(np.int64), MIN_POINTS)
    ks = np.where(ks < n[:, None], ks, 0)
    for j in range(1, ks.shape[1]):
        dup = (ks[:, :j] == ks[:, j : j + 1]).any(axis=1)
        ks[:, j] = np.where(dup, 0, ks[:, j])
    return ks


def _discrepancy(
    t: FloatArray, log_s: FloatArray, z: FloatArray, m: BoolArray,
    heads: tuple[IntArray, FloatArray, FloatArray, FloatArray], ok: BoolArray,
) -> tuple[FloatArray, IntArray, FloatArray]:
    """Estimate kappa**2 from rolling origins inside the observed prefix.

    The discrepancy model: beyond the last fitted point the true curve drifts away from the
    fitted power law by ``kappa * xi * log(t / t_last)`` with ``xi ~ N(0, 1)``, one draw per
    extrapolation. For each origin k, the first k points are fitted and the drift rate ``s_k``
    of the later points' errors is measured by least squares on their log-distance (averaging
    the tail, so observation noise does not hide a systematic drift). Without discrepancy,
    ``s_k`` has variance ``V_k`` from noise and parameter uncertainty alone; with it,
    ``V_k + kappa**2``. The between-origin variance is then the DerSimonian-Laird moment
    estimate with a known zero mean and weights ``1 / V_k``:
    ``kappa**2 = max(0, (sum s_k**2 / V_k - K) / sum 1 / V_k)``, so informative origins
    count more. Curves too short to hold out anything get kappa = 0 and ``n_holdout = 0``.

    Also returned: the signed drift ``mu = sum w_k s_k / sum w_k``. A zero-mean ``kappa`` says
    how far the curve may leave the power law, not on which side; curves that fall faster
    than any decelerating power law (``p`` at its lower bound, a learning-rate decay) leave
    it on one side every time, and ``mu`` carries that side into the interval.
    """
    n_rows, width = z.shape
    ks, c_all, b_all, p_all = heads
    valid = ok[:, None] & (ks > 0)
    count = np.zeros(n_rows, dtype=np.int64)
    n_orig = ks.shape[1]
    slopes = np.zeros((n_rows, n_orig))
    within = np.ones((n_rows, n_orig))
    used = np.zeros((n_rows, n_orig), dtype=bool)
    if not valid.any():
        return np.zeros(n_rows), count, np.zeros(n_rows)
    col = np.arange(width)[None, :]
    for j in range(n_orig):
        rows = valid[:, j]
        if not rows.any():
            continue
        k = ks[:, j : j + 1]
        head = m & (col < k) & rows[:, None]
        c, b, p = c_all[:, j], b_all[:, j], p_all[:, j]
        st = _stats(log_s, z, head, c, b, p)
        usable = rows & (b > 0) & ~st.singular
        t_origin = np.take_along_axis(t, np.clip(k - 1, 0, width - 1), axis=1)
        tail = m & (col >= k) & usable[:, None] & (t > t_origin)
        dist = np.where(tail, np.log(t / t_origin), 0.0)
        ss = np.sum(dist**2, axis=1)
        has = usable & (ss > 0)
        w = dist / np.where(has, ss, 1.0)[:, None]
        x = np.exp(-p[:, None] * log_s)
        err = np.where(tail, z - c[:, None] - b[:, None] * x, 0.0)
        slope = np.sum(w * err, axis=1)
        gw = (np.sum(w, axis=1), np.sum(w * x, axis=1), -b * np.sum(w * x * log_s, axis=1))
        var_param = _quad(gw, np.nan_to_num(st.cov))
        var_noise = st.sigma**2 * st.inflation * np.sum(w * w, axis=1)
        v = var_param + var_noise
        has = has & np.isfinite(slope) & np.isfinite(v) & (v > 0)
        slopes[:, j] = np.where(has, slope, 0.0)
        within[:, j] = np.where(has, v, 1.0)
        used[:, j] = has
        count += np.where(has, tail.sum(axis=1), 0)
    wk = np.where(used, 1.0 / within, 0.0)
    origins = used.sum(axis=1)
    w_sum = wk.sum(axis=1)
    q_stat = np.sum(wk * slopes**2, axis=1)
    safe = np.where(w_sum > 0, w_sum, np.inf)
    # DerSimonian-Laird with a known zero mean: E[sum w s^2] = K + kappa^2 * sum w.
    kappa2 = np.maximum(q_stat - origins, 0.0) / safe
    # The signed, inverse-variance weighted mean drift rate: the side the curve leaves on.
    drift = np.sum(wk * slopes, axis=1) / safe
    return kappa2, count, drift


def _predict_arrays(
    c: FloatArray, b: FloatArray, p: FloatArray, t_ref: FloatArray, last: FloatArray,
    cov: FloatArray, sigma: FloatArray, kappa: FloatArray, drift: FloatArray, df: FloatArray,
    t: FloatArray, level: float,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]:
    """Mean, CI and PI at ``t``: delta method + extrapolation discrepancy, Student-t quantile.

    The intervals are the union of the symmetric one around the power law and the same one
    moved by the held-out drift ``drift * log(t / t_last)``: the mean stays the power law's,
    the interval widens only on the side the curve was seen to leave on.
    """
    with np.errstate(all="ignore"):
        log_s = np.log(t / t_ref)
        x = np.exp(-p * log_s)
        mean = c + b * x
        var_mean = _quad((np.ones_like(x), x, -b * x * log_s), cov)
        dist = np.maximum(np.log(t / last), 0.0)
        var_disc = (kappa * dist) ** 2
        q = special.stdtrit(df, 0.5 + level / 2) if 0 < level < 1 else np.full_like(df, np.nan)
        ci = q * np.sqrt(np.maximum(var_mean, 0.0) + var_disc)
        pi = q * np.sqrt(np.maximum(var_mean, 0.0) + var_disc + sigma**2)
        down = np.maximum(-drift, 0.0) * dist
        up = np.maximum(drift, 0.0) * dist
    return mean, mean - ci - down, mean + ci + up, mean - pi - down, mean + pi + up
