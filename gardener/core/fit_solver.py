"""The power-law solver: variable projection over a grid of exponents, closed-form 2x2 least
squares, a vectorised Levenberg-Marquardt polish and scipy's MINPACK polish for single fits.
Everything runs on standardised values, many curves (rows) at once; ``fit`` maps back."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

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

GRID_BLOCK = 1 << 18  # values (grid points x curves x points) the grid search holds at once
_P_GRID = np.geomspace(P_MIN, P_MAX, GRID_SIZE)
_LOG_P_GRID = np.log(_P_GRID)


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
            parts = [np.zeros(q.shape[:-1])] + [q[..., lo:hi].sum(axis=-1) for lo, hi in segments]
            out: FloatArray = np.cumsum(np.stack(parts, axis=-1), axis=-1)[..., pos]
            return out

        cn, sy, syy = prefix(mf_g), prefix(z_g), prefix(z_g * z_g)
        # Several grid points at once (each element computed as one at a time would: the
        # same products, sums along the same rows), as many as fit in GRID_BLOCK values.
        block = max(1, GRID_BLOCK // max(1, z_g.size))
        for g in range(0, GRID_SIZE, block):
            x = np.exp(-_P_GRID[g : g + block, None, None] * ls_g) * mf_g
            rss = _ls2(cn, prefix(x), prefix(x * x), sy, prefix(x * z_g), syy)[2]
            rss_grid[g : g + block, rows] = np.where(np.isfinite(rss), rss, np.inf)
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
