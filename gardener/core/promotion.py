"""The gardener's rung rule: keep about ``1/eta`` of a cohort, prune only the clearly worse.

At a rung, every trial that reached it has a smoothed level with a standard error from its own
jitter (``levels``). Like successive halving (ASHA when trials arrive at different times) the
rung keeps the best ``ceil(n / eta)``: ``n`` counts the trials that reached the rung and the
live ones still on their way, so an early arrival is never judged against a half-empty cohort.
Unlike successive halving, a trial below that cut is pruned only when its gap to the cut is
clear: larger than ``z`` standard deviations of what the gap may still become by the horizon,

    sd^2 = se_trial^2 + se_cut^2 + 2 * reshuffle * log(horizon / rung step),

where ``reshuffle`` is how fast this cohort's trials move against each other per unit of
log-step (a random walk in log time): measured on the cohort itself between half the rung step
and the rung step, from levels centred on the cohort's median (what every run shares cancels),
less what the jitter alone explains; pooled with a prior for a cold start. ``z`` is the normal
quantile of ``prune_level``, the one risk knob.

So a seed race (spread comparable to the noise and the reshuffling) keeps nearly everyone,
and a config race (variants far apart early) prunes down to the cut at once. Everything is in
the race's own units: the prior is a ratio (reshuffling per log-step over the cohort's spread
squared), so it carries from BPB to any loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import special

from gardener.core.levels import MAD_TO_SD, Level

# Reshuffling per unit of log-step over the cohort's spread squared, for a cold start. Measured
# on public curves (bench/backtest_all.py, "reshuffle_prior"): the median over races of the
# cohort's own estimate at the 20-50% rungs; leave-one-race-out and across data sets in
# docs/backtest.md. Blended with the cohort's own estimate as PRIOR_WEIGHT pseudo-trials.
RESHUFFLE_PRIOR = 1.3
OCTAVE_PRIOR = 0.3  # typical movement over the octave before a rung, over the spread squared
PRIOR_WEIGHT = 3.0
MIN_MEMBERS = 3  # trials with a level at both ends before the cohort's own estimate counts


@dataclass(frozen=True)
class Reshuffle:
    """How fast the cohort's trials move against each other, per unit of log-step."""

    rate: float  # variance of one trial's centred level from the rung to the horizon
    measured: float | None  # the cohort's movement over the last octave (None: too few)
    members: int
    spread: float  # robust standard deviation of the cohort's levels at the rung
    prior: float  # the prior rate in the cohort's units (RESHUFFLE_PRIOR * spread^2)


def robust_sd(x: FloatLike) -> float:
    """Standard deviation from the median absolute deviation (0 for fewer than 2 values)."""
    a = np.asarray(x, dtype=np.float64)
    if len(a) < 2:
        return 0.0
    return float(MAD_TO_SD * np.median(np.abs(a - np.median(a))))


FloatLike = list[float] | np.ndarray


def reshuffle(
    now: Mapping[str, Level],
    then: Mapping[str, Level],
    log_span: float,
    prior_ratio: float,
    done: float = 0.0,
    gain: float = 0.0,
) -> Reshuffle:
    """How far a trial's centred level may still move by the horizon (its variance).

    The prior: ``prior_ratio * (1 - done)^2`` times the cohort's spread squared, ``done`` the
    share of the horizon the rung stands at. With ``gain`` > 0 the cohort's own movement over
    the last octave (``then`` to ``now``) scales it, relative to the movement the prior implies
    for that octave (shrunk towards 1 with PRIOR_WEIGHT pseudo-trials)."""
    spread = robust_sd([lv.value for lv in now.values()])
    prior = prior_ratio * (1.0 - min(max(done, 0.0), 1.0)) ** 2 * spread**2
    both = sorted(set(now) & set(then))
    measured: float | None = None
    rate = prior
    if len(both) >= MIN_MEMBERS and log_span > 0:
        a = np.array([now[n].value for n in both])
        b = np.array([then[n].value for n in both])
        ch = (a - np.median(a)) - (b - np.median(b))
        var = robust_sd(ch) ** 2
        noise = float(np.mean([now[n].se ** 2 + then[n].se ** 2 for n in both]))
        measured = max(0.0, var - noise)
        if gain > 0 and spread > 0:
            m = len(both)
            ratio = measured / (OCTAVE_PRIOR * spread**2)
            factor = (m * ratio + PRIOR_WEIGHT) / (m + PRIOR_WEIGHT)
            rate = prior * float(np.clip(factor, 0.25, 4.0)) ** gain
    return Reshuffle(rate, measured, len(both), spread, prior)


@dataclass(frozen=True)
class Verdict:
    """One trial at a rung: its rank, whether it is below the cut, and how clearly."""

    name: str
    rank: int  # 1 is best
    below_cut: bool
    prune: bool
    gap: float | None  # level minus the cut's level (None for the cut itself and above)
    sd: float | None  # standard deviation of that gap at the horizon
    bound: float | None  # gap - z * sd: positive means clearly worse

    def as_numbers(self) -> dict[str, float | int | bool | None]:
        return {
            "rank": self.rank,
            "below_cut": self.below_cut,
            "gap": self.gap,
            "sd_final": self.sd,
            "bound": self.bound,
        }


@dataclass(frozen=True)
class CutResult:
    keep: int  # how many the rung keeps at least
    expected: int  # trials counted for the cut: reached plus still on their way
    cut_name: str | None  # the trial at the cut (None when fewer than ``keep`` reached)
    z: float
    remaining_log_steps: float
    reshuffle: Reshuffle
    verdicts: dict[str, Verdict]


def cut(
    levels: Mapping[str, Level],
    earlier: Mapping[str, Level],
    *,
    boundary: int,
    past: int,
    horizon: int,
    coming: int,
    eta: float,
    prune_level: float,
    prior_ratio: float,
    protected: frozenset[str] = frozenset(),
    gain: float = 0.0,
) -> CutResult:
    """Verdicts for every trial with a level at the rung (sorted by level, then name)."""
    ranked = sorted(levels, key=lambda n: (levels[n].value, n))
    expected = len(ranked) + max(0, coming)
    keep = max(1, math.ceil(expected / eta))
    span = math.log(boundary / past) if 0 < past < boundary else 0.0
    rs = reshuffle(levels, earlier, span, prior_ratio, boundary / max(horizon, 1), gain)
    remaining = max(0.0, math.log(max(horizon, boundary) / boundary))
    z = float(special.ndtri(prune_level))
    cut_name = ranked[keep - 1] if len(ranked) >= keep else None
    verdicts: dict[str, Verdict] = {}
    for i, name in enumerate(ranked):
        below = cut_name is not None and i >= keep
        if not below or cut_name is None:
            verdicts[name] = Verdict(name, i + 1, False, False, None, None, None)
            continue
        me, ref = levels[name], levels[cut_name]
        gap = me.value - ref.value
        sd = math.sqrt(me.se**2 + ref.se**2 + 2.0 * rs.rate)
        bound = gap - z * sd
        prune = bound > 0 and name not in protected
        verdicts[name] = Verdict(name, i + 1, True, prune, gap, sd, bound)
    return CutResult(keep, expected, cut_name, z, remaining, rs, verdicts)
