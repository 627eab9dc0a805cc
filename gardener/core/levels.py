"""A trial's level at a step and how noisy its curve is, from its own samples only.

Scale-free by construction: a level is in the units of the curve, its standard error comes from
the curve's own jitter, and nothing assumes a value range (BPB near 3, a loss near 0.1) or a
sampling pattern (every N steps, or irregular timed evaluations).

- ``level_at``: the mean of the samples in the last ``recent_fraction`` of the steps up to a
  boundary (at least ``min_points``, at most the samples up to the boundary): a local smoother
  every trial of a cohort takes over the same span of steps, so a shared schedule shifts them
  alike and leaves the ranking alone.
- ``jitter``: the sample-to-sample noise, from the median absolute second difference (blind to
  a locally linear trend, robust to a few spikes). ``var(second difference) = 6 sigma^2`` for
  independent noise, and 1.4826 turns a median absolute deviation into a standard deviation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gardener.core.rungs import prefix_at
from gardener.core.types import FloatArray, IntArray

MAD_TO_SD = 1.4826  # a normal's standard deviation per median absolute deviation
JITTER_POINTS = 32  # the jitter is read from at most the last 32 samples before the boundary
JITTER_MIN_POINTS = 6  # fewer samples tell nothing about the jitter (NaN: the cohort's is used)


@dataclass(frozen=True)
class Level:
    """A trial's smoothed value at a boundary, with the numbers behind it."""

    value: float
    se: float  # standard error of ``value`` from the curve's own jitter (NaN: unknown)
    jitter: float  # the curve's sample-to-sample noise (standard deviation; NaN: unknown)
    points: int  # samples averaged
    step_change: float  # |last sample - the one before| (NaN with one sample): a noise floor
    first_step: int
    last_step: int


def _d2_mad(tail: FloatArray) -> float:
    """The median absolute deviation of a curve tail's second differences."""
    d2 = np.diff(tail, 2)
    return median1(np.abs(d2 - median1(d2)))


def jitter(values: FloatArray) -> float:
    """Sample-to-sample noise of a curve (standard deviation); NaN with too few samples."""
    v = values[-JITTER_POINTS:]
    if len(v) < JITTER_MIN_POINTS:
        return math.nan
    # A median absolute deviation of k values is itself uncertain (relative sd about
    # 1.1/sqrt(k)): one such sd on top keeps a short curve from looking quieter than it is.
    small = 1.0 + 1.1 / math.sqrt(len(v) - 2)
    return _d2_mad(v) * MAD_TO_SD / math.sqrt(6.0) * small


def median1(a: FloatArray) -> float:
    """The median of a short 1-D array (np.median without its per-call overhead)."""
    n = len(a)
    k = n // 2
    part = np.partition(a, (k - 1, k) if n % 2 == 0 else k)
    return float(part[k]) if n % 2 else float(part[k - 1] + part[k]) / 2


def tail_jitter(values: FloatArray) -> float:
    """One curve's term of a race's typical jitter: ``jitter`` without the small-sample
    inflation (NaN when the curve is too short to count)."""
    if len(values) < JITTER_MIN_POINTS:
        return math.nan
    return _d2_mad(values[-JITTER_POINTS:]) * (MAD_TO_SD / math.sqrt(6.0))


def median_jitter(jitters: list[float]) -> float:
    """A race's typical jitter: the median of its curves' ``tail_jitter`` (NaNs skipped; 0
    when none is known)."""
    known = [j for j in jitters if not math.isnan(j)]
    return float(np.median(known)) if known else 0.0


def level_at(
    steps: IntArray,
    values: FloatArray,
    boundary: int,
    *,
    recent_fraction: float,
    min_points: int,
) -> Level | None:
    """The smoothed value of a curve at ``boundary`` (None without a sample)."""
    s, v = prefix_at(steps, values, boundary)
    if len(s) == 0:
        return None
    lo = boundary * (1.0 - recent_fraction)
    start = int(np.searchsorted(s, lo, side="left"))
    start = min(start, max(0, len(s) - min_points))
    win = v[start:]
    sd = jitter(v)
    m = len(win)
    return Level(
        value=float(np.mean(win)),
        se=sd / math.sqrt(m),
        jitter=sd,
        points=m,
        step_change=float(abs(v[-1] - v[-2])) if len(v) >= 2 else math.nan,
        first_step=int(s[start]),
        last_step=int(s[-1]),
    )
