"""The gardener's rung rule: keep about ``1/eta`` of a cohort, prune only the clearly worse.

At a rung, every trial that reached it has a smoothed level with a standard error from its own
jitter (``levels``). Like successive halving (ASHA when trials arrive at different times) the
rung keeps the best ``ceil(n / eta)``: ``n`` counts the trials that reached the rung and the
live ones one rung behind, and the rung waits for those, so an early arrival is never judged
against a half-empty cohort. Unlike successive halving, a trial below that cut is pruned only
when its gap to the cut is clear: larger than ``z`` standard deviations of what the gap may
still become by the horizon,

    sd^2 = se^2 (the two levels, or their difference where they share steps)
           + 2 * RESHUFFLE_PRIOR * (1 - rung step / horizon)^2 * spread^2,

``spread`` the robust standard deviation of the cohort's levels at the rung. The second term
is the reshuffling still to come: on public curves (AlgoPerf config races, IGLA seed races)
a trial's level, centred on its cohort, moves by about ``1.3 * (1 - f)^2`` spreads squared
(variance) between the share ``f`` of the horizon and the end (bench/backtest_all.py measures
it per data set and per half; docs/backtest.md). ``z`` is the normal quantile of
``prune_level``, the one risk knob.

A trial below the cut also goes when keeping it is not worth its compute: the most it can
still be expected to gain over the cut by the horizon (``expected_gain``: the mean of how far
it may end below the cut, over the same ``sd``) is less than the price of its remaining share
of the horizon, ``PRICE_PER_RISK * (1 - prune_level) * (1 - f)`` times the cohort's gap from
its mean level to its best (the scale on which a pick is judged: 0 the best, the mean a random
one). Near ties late in a race go this way (there is little left to gain between them), while
early, with the reshuffling still ahead, the expected gain stays large.

So a seed race (levels within the noise) keeps nearly everyone; a config race prunes the
trials that stand clear of the pack at once, and cuts deeper as the horizon nears. Everything
is in the race's own units (spread, jitter, the cohort's own levels), so it carries from BPB
to any loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
from scipy import special

from gardener.core.levels import MAD_TO_SD, Level

# How far a trial's centred level moves from a rung to the horizon, as a variance over the
# cohort's spread squared, at the start (it falls as (1 - f)^2). The median over AlgoPerf config
# races is 1.15 at f = 0.1 and 0.73 at 0.2 (IGLA seed races: 2.4 and 1.3); measured per data set
# and per half by bench/backtest_all.py ("reshuffle"), docs/backtest.md.
RESHUFFLE_PRIOR = 1.3
# The price of a trial's remaining compute (its share of the horizon still to run), in the
# cohort's mean-to-best gap, per unit of risk ``1 - prune_level``: at the default 0.90 a trial
# halfway through the horizon must still be expected to gain 2% of that gap over the cut.
# Checked on each half of the AlgoPerf and IGLA races apart (docs/backtest.md).
PRICE_PER_RISK = 0.4
MIN_MEMBERS = 3  # trials with a level at both ends before the cohort's own estimate counts


@dataclass(frozen=True)
class Reshuffle:
    """How far the cohort's trials may still move against each other by the horizon."""

    rate: float  # variance of one trial's centred level from the rung to the horizon
    measured: float | None  # the cohort's movement over the octave before (None: too few)
    members: int
    spread: float  # robust standard deviation of the cohort's levels at the rung
    prior: float  # the prior rate in the cohort's units (RESHUFFLE_PRIOR * spread^2)


FloatLike = list[float] | np.ndarray


def robust_sd(x: FloatLike) -> float:
    """Standard deviation from the median absolute deviation (0 for fewer than 2 values)."""
    a = np.asarray(x, dtype=np.float64)
    if len(a) < 2:
        return 0.0
    return float(MAD_TO_SD * np.median(np.abs(a - np.median(a))))




def reshuffle(
    now: Mapping[str, Level],
    then: Mapping[str, Level],
    log_span: float,
    prior_ratio: float,
    done: float = 0.0,
) -> Reshuffle:
    """How far a trial's centred level may still move by the horizon (its variance):
    ``prior_ratio * (1 - done)^2`` times the cohort's spread squared, ``done`` the share of
    the horizon the rung stands at. The cohort's own movement over the octave before the
    rung (``then`` to ``now``, less what the jitter explains) is reported beside it: scaling
    the prior by it did not help on held-out races (docs/backtest.md)."""
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
    gain: float | None = None  # expected_gain(gap, sd): what keeping it may still win
    worth: float | None = None  # the least gain that pays for its remaining compute

    def as_numbers(self) -> dict[str, float | int | bool | None]:
        return {
            "rank": self.rank,
            "below_cut": self.below_cut,
            "gap": self.gap,
            "sd_final": self.sd,
            "bound": self.bound,
            "expected_gain": self.gain,
            "worth": self.worth,
        }

    @property
    def clearly_worse(self) -> bool:
        return self.bound is not None and self.bound > 0


@dataclass(frozen=True)
class CutResult:
    keep: int  # how many the rung keeps at least
    expected: int  # trials counted for the cut: reached plus still on their way
    cut_name: str | None  # the trial at the cut (None when fewer than ``keep`` reached)
    z: float
    remaining_log_steps: float
    reshuffle: Reshuffle
    verdicts: dict[str, Verdict]


def expected_gain(gap: float, sd: float) -> float:
    """How far below the cut a trial may be expected to end, ``E[max(0, -(gap + e))]`` for
    ``e ~ N(0, sd^2)``: the most keeping it can win over the trial at the cut."""
    if not sd > 0:
        return max(0.0, -gap)
    u = gap / sd
    return float(sd * math.exp(-0.5 * u * u) / math.sqrt(2 * math.pi) - gap * special.ndtr(-u))


def _with_known_se(levels: Mapping[str, Level]) -> dict[str, Level]:
    """Levels whose curve was too short to read its own jitter take the cohort's median
    jitter; with none known, the cohort's typical change between its last two samples (trend
    and noise together: an upper bound of the noise), else the cohort's spread."""
    known = [lv.jitter for lv in levels.values() if math.isfinite(lv.jitter)]
    if len(known) == len(levels):
        return dict(levels)
    if known:
        fill = float(np.median(known))
    else:
        steps = [lv.step_change for lv in levels.values() if math.isfinite(lv.step_change)]
        fill = (
            float(np.median(steps)) if steps else robust_sd([lv.value for lv in levels.values()])
        )
    return {
        n: lv
        if math.isfinite(lv.jitter)
        else replace(lv, jitter=fill, se=fill / math.sqrt(lv.points))
        for n, lv in levels.items()
    }


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
    paired_se: Callable[[str, str], float | None] | None = None,
    wait: bool = False,
) -> CutResult:
    """Verdicts for every trial with a level at the rung (sorted by level, then name).
    ``wait``: while some of the cohort is still on its way (``coming``), rank only; nobody
    is below a cut yet (the separations would be thrown away at every early arrival)."""
    levels = _with_known_se(levels)
    earlier = _with_known_se(earlier)
    ranked = sorted(levels, key=lambda n: (levels[n].value, n))
    expected = len(ranked) + max(0, coming)
    keep = max(1, math.ceil(expected / eta))
    span = math.log(boundary / past) if 0 < past < boundary else 0.0
    done = min(max(boundary / max(horizon, 1), 0.0), 1.0)  # the share of the horizon run
    rs = reshuffle(levels, earlier, span, prior_ratio, done)
    remaining = max(0.0, math.log(max(horizon, boundary) / boundary))
    z = float(special.ndtri(prune_level))
    cut_name = ranked[keep - 1] if len(ranked) >= keep and not (wait and coming > 0) else None
    values = [lv.value for lv in levels.values()]
    scale = float(np.mean(values) - min(values)) if values else 0.0
    # The least gain that pays for a trial's remaining compute (module docstring).
    worth = PRICE_PER_RISK * (1.0 - prune_level) * (1.0 - done) * scale
    verdicts: dict[str, Verdict] = {}
    for i, name in enumerate(ranked):
        below = cut_name is not None and i >= keep
        if not below or cut_name is None:
            verdicts[name] = Verdict(name, i + 1, False, False, None, None, None)
            continue
        me, ref = levels[name], levels[cut_name]
        gap = me.value - ref.value
        pair = paired_se(name, cut_name) if paired_se is not None else None
        # Curves sampled at the same steps share their evaluation noise: the jitter of their
        # difference is then the one to use (it can only be smaller than the two together).
        se2 = me.se**2 + ref.se**2
        if pair is not None and math.isfinite(pair):
            se2 = min(se2, pair**2)
        sd = math.sqrt(se2 + 2.0 * rs.rate)
        bound = gap - z * sd
        gain = expected_gain(gap, sd)
        prune = (bound > 0 or gain < worth) and name not in protected
        verdicts[name] = Verdict(name, i + 1, True, prune, gap, sd, bound, gain, worth)
    return CutResult(keep, expected, cut_name, z, remaining, rs, verdicts)
