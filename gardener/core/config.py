"""The knobs of ``decide``: rungs, per-rung rules, thresholds and the policy, in one frozen value.

Every threshold is a named constant taken from the plan (BRIEF.md), so a reader can find where a
number comes from; ``DecisionConfig`` bundles them so the daemon and the backtest pass one value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

# The plan's rung ladder (factor about 4) and its per-rung rules.
DEFAULT_RUNGS: tuple[int, ...] = (100, 500, 2000, 8000, 32000, 81000)

# Seed-state thresholds (BRIEF.md, "Seed states").
TIED_BAND_BPB = 0.005  # |delta| within this is a tie with the leader
PARALLEL_LOSING_DELTA_BPB = 0.05  # delta above this with a flat slope is PARALLEL_LOSING
DIVERGING_SLOPE_PER_STEP = 0.001  # delta growing faster than this per step is DIVERGING
SLOPE_WINDOW_POINTS = 8  # the slope is fitted over the last 8 common points

# Tripwire thresholds.
ARCHITECTURAL_FLOOR_BPB = 1.89  # below it, unreviewed: the ledger is suspected corrupt
LEAK_BPB = 0.1  # below it: a leak, not a result
STALL_TIMEOUT_S = 30 * 60.0  # a running trial silent this long is stalled
DUPLICATE_MIN_POINTS = 5  # bit-identical curves shorter than this are not called duplicates
GF16_MIN_HIDDEN = 256  # L-R9

# The gardener policy's prune test: one-sided confidence that a trial ends worse than the
# rung's cut (the one risk knob), and the share of a cohort a rung keeps at least (1/eta).
PRUNE_LEVEL = 0.90
REDUCTION_FACTOR = 4.0

# What a race's values are: ``bpb`` turns on the BPB-only tripwires (architectural floor,
# leak, the GF16 format rule) and the plan's gate; ``loss`` is any lower-is-better metric.
METRICS = ("bpb", "loss")

# Spawning.
MIRROR_COUNT = 3  # sibling seeds started for a promoted leader
MIRROR_ROUNDS = 1  # how many leaders of one race may be mirrored

# Gates.
GATE2_BPB = 1.85
GATE2_SEEDS: tuple[int, ...] = (43, 44, 45)
GATE_FINAL_BPB = 1.50
GATE_QUORUM = 3


class Policy(StrEnum):
    SEED = "seed"  # the plan's literal rules: rank by power-law prediction, prune to quota
    GARDENER = "gardener"  # keep ~1/eta at each rung, prune only the clearly worse (noise-aware)


class RungRule(StrEnum):
    COLLECT = "collect"  # collect only, no kills
    HALVE = "halve"  # prune the bottom half
    TOP3 = "top3"  # keep the top 3
    PROMOTE = "promote"  # promote the leader and mirror it
    TOP1 = "top1"  # keep the leader and its top-1 challenger
    VERDICT = "verdict"  # the gate verdict


PLAN_RULES: tuple[RungRule, ...] = (
    RungRule.COLLECT,
    RungRule.HALVE,
    RungRule.TOP3,
    RungRule.PROMOTE,
    RungRule.TOP1,
    RungRule.VERDICT,
)


def rules_for(n_rungs: int) -> tuple[RungRule, ...]:
    """The plan's rules stretched or squeezed onto ``n_rungs`` rungs.

    Six rungs get the plan verbatim. Otherwise the first rung collects, the last gives the
    verdict, and the middle takes the plan's middle rules from the start (extra middle rungs
    halve), so a short ladder still prunes before it promotes.
    """
    if n_rungs <= 0:
        return ()
    if n_rungs == 1:
        return (RungRule.VERDICT,)
    middle_plan = PLAN_RULES[1:-1]
    k = n_rungs - 2
    if k <= len(middle_plan):
        middle = middle_plan[:k]
    else:
        middle = (RungRule.HALVE,) * (k - len(middle_plan)) + middle_plan
    return (RungRule.COLLECT, *middle, RungRule.VERDICT)


@dataclass(frozen=True)
class DecisionConfig:
    """Everything ``decide`` needs besides the snapshot. Frozen: one value per race."""

    policy: Policy = Policy.GARDENER
    rungs: tuple[int, ...] = DEFAULT_RUNGS
    rung_rules: tuple[RungRule, ...] = ()  # empty: ``rules_for(len(rungs))``
    tied_band: float = TIED_BAND_BPB
    parallel_losing_delta: float = PARALLEL_LOSING_DELTA_BPB
    diverging_slope: float = DIVERGING_SLOPE_PER_STEP
    slope_window: int = SLOPE_WINDOW_POINTS
    architectural_floor_bpb: float = ARCHITECTURAL_FLOOR_BPB
    leak_bpb: float = LEAK_BPB
    stall_timeout_s: float = STALL_TIMEOUT_S
    duplicate_min_points: int = DUPLICATE_MIN_POINTS
    gf16_min_hidden: int = GF16_MIN_HIDDEN
    mirror_count: int = MIRROR_COUNT
    mirror_rounds: int = MIRROR_ROUNDS
    gate2_bpb: float = GATE2_BPB
    gate2_seeds: tuple[int, ...] = GATE2_SEEDS
    gate_final_bpb: float = GATE_FINAL_BPB
    gate_quorum: int = GATE_QUORUM
    level: float = 0.95  # confidence level of the power-law fits' intervals
    # The gardener prunes a trial when its final difference from the rung's best is above
    # the tie band at this one-sided level. 0.90, not 0.95: chosen on half of the recorded
    # races and checked on the other half and on other curves (docs/backtest.md); 0.80 loses
    # the best run.
    prune_level: float = PRUNE_LEVEL
    reduction_factor: float = REDUCTION_FACTOR
    # None: the shipped prior of the cohort's reshuffling (core/promotion.py); a number
    # replaces it (the backtest's held-out checks measure it on other races).
    reshuffle_prior: float | None = None
    metric: str = "bpb"
    # Record each rung decision's power-law fit in its numbers (the ledger keeps them). The
    # gardener ranks on observed levels, so its decisions are the same either way; the
    # backtest turns it off for speed. Policy ``seed`` always fits (it ranks on the fit).
    record_fits: bool = True
    # The gardener's score: the mean of the samples in the last ``recent_fraction`` of the
    # steps seen at a rung (at least ``recent_min_points``), paired with the reference.
    recent_fraction: float = 0.25
    recent_min_points: int = 3

    def __post_init__(self) -> None:
        if not self.rungs or list(self.rungs) != sorted(set(self.rungs)) or self.rungs[0] <= 0:
            raise ValueError(f"rungs must be positive and strictly increasing: {self.rungs}")
        if not self.rung_rules:
            object.__setattr__(self, "rung_rules", rules_for(len(self.rungs)))
        if len(self.rung_rules) != len(self.rungs):
            raise ValueError("rung_rules must have one rule per rung")
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} not one of {METRICS}")
        if not self.reduction_factor > 1.0:
            raise ValueError(f"reduction_factor {self.reduction_factor} must be above 1")
        if self.reshuffle_prior is not None and not self.reshuffle_prior >= 0:
            raise ValueError(f"reshuffle_prior {self.reshuffle_prior} must be at least 0")
        for name in ("level", "prune_level"):
            value = getattr(self, name)
            if not 0.5 <= value < 1.0:
                raise ValueError(f"{name} {value} outside [0.5, 1)")

    @property
    def is_bpb(self) -> bool:
        """Whether the BPB-only rules apply (floor, leak, GF16 format, gate 2)."""
        return self.metric == "bpb"

    def with_rungs(self, rungs: tuple[int, ...]) -> DecisionConfig:
        """The same config on another ladder, with the plan's rules fitted to its length."""
        return replace(self, rungs=tuple(rungs), rung_rules=rules_for(len(rungs)))
