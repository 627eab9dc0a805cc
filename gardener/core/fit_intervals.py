"""Intervals of the power-law fit: residual statistics with the AR(1) inflation, the
rolling-origin discrepancy check, and the delta-method predictions (``fit`` module doc)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special

from gardener.core.fit_solver import (
    HOLDOUT_FRACTIONS,
    MIN_POINTS,
    RHO_MAX,
    BoolArray,
    FloatArray,
    IntArray,
    _gram,
    _inv3_scaled,
    _quad,
)


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
