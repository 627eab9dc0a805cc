"""What a power-law fit returns: one curve's ``PowerLawFit`` or a batch's ``BatchFit``, their
predictions and intervals. A fit that is not ok carries the reason and predicts NaN."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gardener.core.fit_intervals import _predict_arrays
from gardener.core.fit_solver import BoolArray, FloatArray, IntArray


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
