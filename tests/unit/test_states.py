"""Seed states against the leader, one test per state."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from gardener.core import states
from gardener.core.config import DecisionConfig
from gardener.core.states import Comparison, classify, may_diverge, trend
from gardener.core.types import SeedState

CFG = DecisionConfig()
STEPS = np.arange(100, 1100, 100, dtype=np.int64)  # 10 points
LEAD = 3.0 + 50.0 / STEPS


def state_of(delta: np.ndarray) -> SeedState:
    return classify(STEPS, LEAD + delta, STEPS, LEAD, CFG).state


def test_the_leader_is_leading() -> None:
    assert classify(STEPS, LEAD, STEPS, LEAD, CFG, is_leader=True).state is SeedState.LEADING


def test_ahead_of_the_leader_is_leading() -> None:
    assert state_of(np.full(10, -0.02)) is SeedState.LEADING


def test_within_the_band_is_tied() -> None:
    assert state_of(np.full(10, 0.004)) is SeedState.TIED
    assert state_of(np.full(10, -0.004)) is SeedState.TIED


def test_a_small_gap_is_catching_up() -> None:
    assert state_of(np.full(10, 0.03)) is SeedState.CATCHING_UP


def test_a_large_gap_that_closes_is_catching_up() -> None:
    assert state_of(np.linspace(0.3, 0.1, 10)) is SeedState.CATCHING_UP


def test_a_large_flat_gap_is_parallel_losing() -> None:
    r = classify(STEPS, LEAD + 0.08, STEPS, LEAD, CFG)
    assert r.state is SeedState.PARALLEL_LOSING
    assert r.delta is not None and abs(r.delta - 0.08) < 1e-12
    assert r.slope is not None and abs(r.slope) < 1e-12


def test_a_gap_growing_faster_than_the_limit_is_diverging() -> None:
    r = classify(STEPS, LEAD + 0.002 * (STEPS - 50), STEPS, LEAD, CFG)
    assert r.state is SeedState.DIVERGING
    assert r.slope is not None and abs(r.slope - 0.002) < 1e-9


def test_a_gap_growing_slower_than_the_limit_is_not_diverging() -> None:
    r = classify(STEPS, LEAD + 0.0005 * STEPS, STEPS, LEAD, CFG)
    assert r.state is SeedState.PARALLEL_LOSING


def test_diverging_needs_a_full_slope_window() -> None:
    short = STEPS[:5]
    r = classify(short, LEAD[:5] + 0.002 * short, STEPS, LEAD, CFG)
    assert r.state is not SeedState.DIVERGING
    assert r.common_points == 5


def test_only_common_steps_count() -> None:
    odd = STEPS + 50
    assert classify(odd, 3.0 + 50.0 / odd, STEPS, LEAD, CFG).state is SeedState.UNKNOWN


def test_trend_is_the_least_squares_slope() -> None:
    x = np.array([0, 1, 2, 3], dtype=np.int64)
    assert trend(x, np.array([1.0, 3.0, 5.0, 7.0])) == 2.0
    assert trend(x[:1], np.array([1.0])) is None


@given(
    st.one_of(st.none(), st.floats(-1, 1)),
    st.one_of(st.none(), st.floats(-0.01, 0.01)),
    st.integers(0, 12),
    st.floats(0, 1000),
)
def test_may_diverge_is_exactly_when_the_state_is_diverging(
    delta: float | None, slope: float | None, n: int, span: float
) -> None:
    """The DIVERGING pass skips a trial on ``may_diverge`` alone: it must agree with the
    table."""
    cmp = Comparison(delta, slope, n if delta is not None else 0, span)
    cfg = DecisionConfig(tied_band=0.005, diverging_slope=0.001, slope_window=8)
    assert may_diverge(cmp, cfg) == (states.state_of(cmp, cfg).state is SeedState.DIVERGING)
