"""Seed states: each trial against the leader at the same steps.

delta = trial BPB - leader BPB at their last common step; slope = least-squares trend of the
delta over the last ``slope_window`` common points, per step. The plan's table, made total:

- LEADING: the leader itself, or delta < -tied_band (ahead of the leader).
- TIED: |delta| <= tied_band.
- DIVERGING: behind, a full slope window, and slope > +diverging_slope per step: kill now.
- CATCHING_UP: behind by at most parallel_losing_delta, or further behind but closing
  (the delta shrinks by more than the tied band across the window).
- PARALLEL_LOSING: behind by more than parallel_losing_delta and not closing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gardener.core.config import DecisionConfig
from gardener.core.types import FloatArray, IntArray, SeedState


@dataclass(frozen=True)
class StateReading:
    """A seed state with the numbers behind it."""

    state: SeedState
    delta: float | None
    slope: float | None
    common_points: int
    closing: bool = False  # the delta shrank by more than the tied band across the window

    def as_numbers(self) -> dict[str, float | int | str | None]:
        return {
            "state": self.state.value,
            "delta": self.delta,
            "slope": self.slope,
            "common_points": self.common_points,
            "closing": self.closing,
        }


def _increasing(a: IntArray) -> bool:
    return len(a) < 2 or bool((a[1:] > a[:-1]).all())


def common_deltas(
    steps: IntArray, bpb: FloatArray, lead_steps: IntArray, lead_bpb: FloatArray
) -> tuple[IntArray, FloatArray]:
    """The steps both curves have, and trial minus leader at each of them.

    Cleaned curves (strictly increasing steps, what ``decide`` passes) take a fast path: the
    trial's steps are usually a prefix of the leader's, else a binary search finds the
    common ones; anything else goes through ``np.intersect1d``, with the same result.
    """
    n = len(steps)
    if n <= len(lead_steps) and bool((lead_steps[:n] == steps).all()) and _increasing(lead_steps):
        # A prefix of an increasing curve: every step is common, in order.
        return steps.astype(np.int64, copy=False), (bpb[:n] - lead_bpb[:n]).astype(
            np.float64, copy=False
        )
    if _increasing(steps) and _increasing(lead_steps):
        if len(lead_steps) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        pos = np.searchsorted(lead_steps, steps)
        hit = pos < len(lead_steps)
        hit[hit] = lead_steps[pos[hit]] == steps[hit]
        ia = np.flatnonzero(hit)
        ib = pos[ia]
        return steps[ia].astype(np.int64, copy=False), (bpb[ia] - lead_bpb[ib]).astype(
            np.float64, copy=False
        )
    common, ia, ib = np.intersect1d(steps, lead_steps, assume_unique=True, return_indices=True)
    return common.astype(np.int64), (bpb[ia] - lead_bpb[ib]).astype(np.float64)


def trend(x: IntArray, y: FloatArray) -> float | None:
    """Least-squares slope of y against x, or None with fewer than 2 distinct x."""
    n = len(x)
    if n < 2:
        return None
    xf = x.astype(np.float64)
    # np.add.reduce(a) / n is ndarray.mean() bit for bit, without its per-call overhead.
    xc = xf - np.add.reduce(xf) / n
    denom = float(np.dot(xc, xc))
    if denom == 0.0:
        return None
    ym = np.add.reduce(y) / n if y.dtype == np.float64 else y.mean()
    return float(np.dot(xc, y - ym) / denom)


@dataclass(frozen=True)
class Comparison:
    """A trial against the leader at their common steps, before any threshold: what the
    state rule reads (so it can be kept while the two curves are unchanged)."""

    delta: float | None  # trial minus leader at the last common step (None: no common step)
    slope: float | None  # trend of the delta over the last ``window`` common points, per step
    common_points: int
    span: float  # steps covered by those points


def compare(
    steps: IntArray, bpb: FloatArray, lead_steps: IntArray, lead_bpb: FloatArray, window: int
) -> Comparison:
    """The trial's delta to the leader and its trend (curves sorted by step, cleaned)."""
    common, deltas = common_deltas(steps, bpb, lead_steps, lead_bpb)
    n = len(common)
    if n == 0:
        return Comparison(None, None, 0, 0.0)
    tail = common[-window:]
    return Comparison(
        float(deltas[-1]), trend(tail, deltas[-window:]), n, float(tail[-1] - tail[0])
    )


def may_diverge(cmp: Comparison, config: DecisionConfig) -> bool:
    """Whether ``state_of`` can say DIVERGING: behind by more than the tie band and the gap
    growing faster than the limit over a full window (a cheap test before the reading)."""
    return (
        cmp.delta is not None
        and cmp.delta > config.tied_band
        and cmp.slope is not None
        and cmp.common_points >= config.slope_window
        and cmp.slope > config.diverging_slope
    )


def state_of(cmp: Comparison, config: DecisionConfig) -> StateReading:
    """The plan's table on a comparison, with the config's thresholds."""
    if cmp.delta is None:
        return StateReading(SeedState.UNKNOWN, None, None, 0)
    delta, slope, n = cmp.delta, cmp.slope, cmp.common_points
    band = config.tied_band
    closing = slope is not None and slope * cmp.span < -band
    if delta < -band:
        state = SeedState.LEADING
    elif delta <= band:
        state = SeedState.TIED
    elif slope is not None and n >= config.slope_window and slope > config.diverging_slope:
        state = SeedState.DIVERGING
    else:
        if delta <= config.parallel_losing_delta or closing:
            state = SeedState.CATCHING_UP
        else:
            state = SeedState.PARALLEL_LOSING
    return StateReading(state, delta, slope, n, closing)


def classify(
    steps: IntArray,
    bpb: FloatArray,
    lead_steps: IntArray,
    lead_bpb: FloatArray,
    config: DecisionConfig,
    *,
    is_leader: bool = False,
) -> StateReading:
    """The seed state of one trial against the leader (curves sorted by step, cleaned)."""
    if is_leader:
        return StateReading(SeedState.LEADING, 0.0, 0.0, len(steps))
    return state_of(compare(steps, bpb, lead_steps, lead_bpb, config.slope_window), config)
