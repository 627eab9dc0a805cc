"""The vectorised ``clean_curve`` and the cheap ``classify`` against their loop originals.

The originals are kept here, verbatim in behaviour, as the reference: any curve (bad values,
steps going backwards, repeats with equal or different values, in any order) must give the
same kept arrays and the same evidence, in the same order; any pair of curves the same seed
state and numbers.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gardener.core.config import DecisionConfig
from gardener.core.states import StateReading, classify, common_deltas
from gardener.core.tripwires import CleanCurve, check_sample, clean_curve
from gardener.core.types import FloatArray, IntArray, SeedState


def reference_clean_curve(steps: IntArray, bpb: FloatArray) -> CleanCurve:
    """The original per-sample loop."""
    out_s: list[int] = []
    out_v: list[float] = []
    seen: dict[int, float] = {}
    bad: list[tuple[int, float, str]] = []
    back: list[tuple[int, int]] = []
    conf: list[tuple[int, float, float]] = []
    for s_raw, v_raw in zip(steps.tolist(), bpb.tolist(), strict=True):
        s, v = int(s_raw), float(v_raw)
        why = check_sample(s, v)
        if why is not None:
            bad.append((s, v, why))
            continue
        if s in seen:
            if seen[s] != v:
                conf.append((s, seen[s], v))
            continue
        if out_s and s < out_s[-1]:
            back.append((out_s[-1], s))
            continue
        seen[s] = v
        out_s.append(s)
        out_v.append(v)
    return CleanCurve(
        np.asarray(out_s, dtype=np.int64),
        np.asarray(out_v, dtype=np.float64),
        tuple(bad),
        tuple(back),
        tuple(conf),
    )


def assert_same_curve(got: CleanCurve, want: CleanCurve) -> None:
    assert got.steps.dtype == np.int64 and got.bpb.dtype == np.float64
    assert got.steps.tolist() == want.steps.tolist()
    assert got.bpb.tobytes() == want.bpb.tobytes()  # bit for bit (duplicates compare bytes)
    assert repr(got.bad) == repr(want.bad)  # NaN != NaN: compare the printed evidence
    assert got.backwards == want.backwards
    assert got.conflicts == want.conflicts


VALUES = st.one_of(
    st.sampled_from([2.5, 2.5, 2.25, 0.0, -0.0, -1.0, math.nan, math.inf, -math.inf]),
    st.floats(min_value=-1.0, max_value=5.0, allow_nan=False),
)
SAMPLES = st.lists(st.tuples(st.integers(-3, 40), VALUES), max_size=60)


@settings(max_examples=600, deadline=None)
@given(SAMPLES)
def test_clean_curve_matches_the_loop(samples: list[tuple[int, float]]) -> None:
    steps = np.asarray([s for s, _ in samples], dtype=np.int64)
    bpb = np.asarray([v for _, v in samples], dtype=np.float64)
    assert_same_curve(clean_curve(steps, bpb), reference_clean_curve(steps, bpb))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10_000), max_size=80, unique=True), st.integers(0, 2**32))
def test_clean_curve_matches_the_loop_on_nearly_sorted_curves(steps: list[int], seed: int) -> None:
    """Real curves: mostly increasing, a few late or repeated samples."""
    rng = np.random.default_rng(seed)
    s = np.sort(np.asarray(steps, dtype=np.int64))
    if len(s) > 3:
        i, j = sorted(rng.choice(len(s), 2, replace=False))
        s = np.concatenate([s, s[i : j + 1][::-1]])  # a re-sent stretch, backwards
    v = np.round(2.0 + rng.random(len(s)), 4)
    assert_same_curve(clean_curve(s, v), reference_clean_curve(s, v))


def test_clean_curve_examples() -> None:
    steps = np.asarray([10, 20, 20, 15, -1, 30, 20, 40], dtype=np.int64)
    bpb = np.asarray([2.5, 2.4, 2.3, 2.45, 2.4, math.nan, 2.4, 2.2])
    c = clean_curve(steps, bpb)
    assert c.steps.tolist() == [10, 20, 40]
    assert c.backwards == ((20, 15),)
    assert c.conflicts == ((20, 2.4, 2.3),)
    assert [b[2] for b in c.bad] == ["negative step -1", "BPB is NaN"]
    assert_same_curve(c, reference_clean_curve(steps, bpb))


def reference_classify(
    steps: IntArray,
    bpb: FloatArray,
    lead_steps: IntArray,
    lead_bpb: FloatArray,
    config: DecisionConfig,
    *,
    is_leader: bool = False,
) -> StateReading:
    """The original classify, on ``np.intersect1d`` and ``ndarray.mean``."""
    if is_leader:
        return StateReading(SeedState.LEADING, 0.0, 0.0, len(steps))
    common, ia, ib = np.intersect1d(steps, lead_steps, assume_unique=True, return_indices=True)
    deltas = (bpb[ia] - lead_bpb[ib]).astype(np.float64)
    n = len(common)
    if n == 0:
        return StateReading(SeedState.UNKNOWN, None, None, 0)
    delta = float(deltas[-1])
    w = config.slope_window
    x, y = common[-w:], deltas[-w:]
    slope = None
    if len(x) >= 2:
        xf = x.astype(np.float64)
        xc = xf - xf.mean()
        denom = float(np.dot(xc, xc))
        if denom != 0.0:
            slope = float(np.dot(xc, y - y.mean()) / denom)
    band = config.tied_band
    span = float(common[-w:][-1] - common[-w:][0])
    closing = slope is not None and slope * span < -band
    if delta < -band:
        state = SeedState.LEADING
    elif delta <= band:
        state = SeedState.TIED
    elif slope is not None and n >= w and slope > config.diverging_slope:
        state = SeedState.DIVERGING
    else:
        if delta <= config.parallel_losing_delta or closing:
            state = SeedState.CATCHING_UP
        else:
            state = SeedState.PARALLEL_LOSING
    return StateReading(state, delta, slope, n, closing)


CURVE = st.lists(st.integers(0, 300), max_size=40, unique=True)


@settings(max_examples=400, deadline=None)
@given(CURVE, CURVE, st.integers(0, 2**32), st.booleans(), st.booleans())
def test_classify_matches_the_original(
    a: list[int], b: list[int], seed: int, sort_a: bool, prefix: bool
) -> None:
    """Sorted curves (what decide passes), the trial a prefix of the leader or not, and
    unsorted ones (the general path)."""
    rng = np.random.default_rng(seed)
    lead_s = np.sort(np.asarray(b, dtype=np.int64))
    s = lead_s[: len(a) % (len(lead_s) + 1)] if prefix else np.asarray(a, dtype=np.int64)
    if sort_a:
        s = np.sort(s)
    lead_v = 2.0 + rng.normal(0, 0.05, len(lead_s))
    v = 2.0 + rng.normal(0, 0.05, len(s)) + rng.choice([-0.1, 0.0, 0.1]) + 1e-4 * s
    for cfg in (DecisionConfig(), DecisionConfig(slope_window=3, tied_band=0.0)):
        got = classify(s, v, lead_s, lead_v, cfg)
        want = reference_classify(s, v, lead_s, lead_v, cfg)
        assert got == want
        c1, d1 = common_deltas(s, v, lead_s, lead_v)
        c0, ia, ib = np.intersect1d(s, lead_s, assume_unique=True, return_indices=True)
        assert c1.tolist() == c0.tolist()
        assert d1.tobytes() == (v[ia] - lead_v[ib]).astype(np.float64).tobytes()
