"""Rung arithmetic: which rung a trial has reached, what it looked like there, and the quotas.

A trial is compared with its cohort at the *same* step: the samples up to and including its
first sample at or past the rung boundary. Comparing at one step lets the noise every run
shares (the same evaluation batches, the same schedule) cancel out of the ranking.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

from gardener.core.config import DecisionConfig, RungRule
from gardener.core.types import FloatArray, IntArray


def rung_reached(config: DecisionConfig, last_step: int) -> int:
    """The highest rung index whose boundary ``last_step`` has reached, or -1."""
    return bisect.bisect_right(config.rungs, last_step) - 1  # rungs strictly increase


def prefix_at(steps: IntArray, bpb: FloatArray, boundary: int) -> tuple[IntArray, FloatArray]:
    """The samples up to and including the first one at or past ``boundary``."""
    cut = int(np.searchsorted(steps, boundary, side="left"))
    end = min(cut + 1, len(steps))
    return steps[:end], bpb[:end]


def keep_count(rule: RungRule, n: int) -> int:
    """How many of a cohort of ``n`` a rung keeps; the rest is its prune quota."""
    if rule is RungRule.HALVE:
        return math.ceil(n / 2)
    if rule is RungRule.TOP3:
        return min(n, 3)
    if rule is RungRule.TOP1:
        return min(n, 2)  # the leader and its top-1 challenger
    return n


def prune_quota(rule: RungRule, n: int) -> int:
    """The most trials of a cohort of ``n`` that a rung may prune (its rule, never more)."""
    return max(0, n - keep_count(rule, n))
