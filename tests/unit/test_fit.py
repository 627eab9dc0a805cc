"""The power-law fit: parameter recovery, interval coverage, no-fit reasons, batch agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gardener.core.fit import (
    P_MAX,
    P_MIN,
    BatchFit,
    PowerLawFit,
    fit_many,
    fit_power_law,
    insane_prediction,
)

STEPS = np.arange(500.0, 12_001.0, 500.0)


def power_law(t: np.ndarray, inf: float, a: float, p: float) -> np.ndarray:
    return inf + a * t ** (-p)


def noisy_curve(
    rng: np.random.Generator, inf: float = 2.0, a: float = 20.0, p: float = 0.5,
    noise: float = 0.01, steps: np.ndarray = STEPS,
) -> np.ndarray:
    return power_law(steps, inf, a, p) + noise * rng.standard_normal(steps.size)


# -- parameter recovery --------------------------------------------------------------------------


@pytest.mark.parametrize("inf,a,p", [(2.0, 20.0, 0.5), (1.2, 5.0, 0.3), (3.0, 200.0, 1.0)])
def test_recovers_exact_parameters_without_noise(inf: float, a: float, p: float) -> None:
    fit = fit_power_law(STEPS, power_law(STEPS, inf, a, p))
    assert fit.ok, fit.reason
    assert fit.bpb_inf == pytest.approx(inf, abs=1e-6)
    assert fit.a == pytest.approx(a, rel=1e-5)
    assert fit.p == pytest.approx(p, rel=1e-5)
    assert fit.sigma < 1e-8


def test_recovers_parameters_within_interval_on_noisy_curve() -> None:
    rng = np.random.default_rng(1)
    steps = np.linspace(100, 50_000, 60)
    fit = fit_power_law(steps, noisy_curve(rng, 2.0, 20.0, 0.5, 0.005, steps))
    assert fit.ok, fit.reason
    assert fit.bpb_inf_ci.contains(2.0)
    assert abs(fit.bpb_inf - 2.0) < 0.05
    assert abs(fit.p - 0.5) < 0.1
    assert fit.sigma == pytest.approx(0.005, rel=0.3)
    assert fit.n == 60
    pred = fit.predict(100_000)
    assert pred.ci.low < pred.mean < pred.ci.high
    # The prediction interval holds the observation noise, so it is wider than the CI.
    assert pred.pi.low < pred.ci.low and pred.pi.high > pred.ci.high
    assert pred.pi.contains(float(power_law(np.array(100_000.0), 2.0, 20.0, 0.5)))


def test_unsorted_and_duplicate_steps_give_the_same_fit() -> None:
    rng = np.random.default_rng(2)
    y = noisy_curve(rng)
    perm = rng.permutation(STEPS.size)
    a = fit_power_law(STEPS, y)
    b = fit_power_law(STEPS[perm], y[perm])
    assert a.ok and b.ok
    assert b.bpb_inf == pytest.approx(a.bpb_inf, abs=1e-9)
    dup = fit_power_law(np.concatenate([STEPS, STEPS[:3]]), np.concatenate([y, y[:3]]))
    assert dup.ok and dup.n == STEPS.size + 3


def test_step_zero_is_dropped_and_counted() -> None:
    rng = np.random.default_rng(3)
    y = noisy_curve(rng)
    fit = fit_power_law(np.concatenate([[0.0], STEPS]), np.concatenate([[9.9], y]))
    plain = fit_power_law(STEPS, y)
    assert fit.ok and fit.dropped == 1 and fit.n == STEPS.size
    assert fit.bpb_inf == pytest.approx(plain.bpb_inf, abs=1e-9)


# -- interval coverage on synthetic curves with known truth --------------------------------------


def _coverage(rho: float, n_curves: int, seed: int, calibrate: bool) -> tuple[float, float]:
    """Share of curves whose true mean (CI) and new observation (PI) at 2x the horizon are in."""
    rng = np.random.default_rng(seed)
    steps = np.linspace(200, 8000, 30)
    target = 16_000.0
    inf = rng.uniform(1.5, 3.0, n_curves)
    a = rng.uniform(5.0, 50.0, n_curves)
    p = rng.uniform(0.3, 0.8, n_curves)
    noise = rng.uniform(0.005, 0.03, n_curves)
    eps = rng.standard_normal((n_curves, steps.size))
    for j in range(1, steps.size):  # AR(1) noise with the stationary variance noise**2
        eps[:, j] = rho * eps[:, j - 1] + math.sqrt(1 - rho**2) * eps[:, j]
    values = power_law(steps[None, :], inf[:, None], a[:, None], p[:, None])
    values = values + noise[:, None] * eps
    truth = power_law(np.array(target), inf, a, p)
    new_obs = truth + noise * rng.standard_normal(n_curves)
    batch = fit_many(steps, values, calibrate=calibrate)
    pred = batch.predict(target)
    ok = batch.ok
    ci = (pred.ci_low <= truth) & (truth <= pred.ci_high)
    pi = (pred.pi_low <= new_obs) & (new_obs <= pred.pi_high)
    return float(ci[ok].mean()), float(pi[ok].mean())


def test_interval_coverage_is_near_nominal_on_iid_noise() -> None:
    ci, pi = _coverage(rho=0.0, n_curves=400, seed=10, calibrate=True)
    assert 0.90 <= ci <= 0.99
    assert 0.90 <= pi <= 0.99


def test_plain_delta_method_is_near_nominal_when_its_assumptions_hold() -> None:
    ci, pi = _coverage(rho=0.0, n_curves=400, seed=11, calibrate=False)
    assert 0.90 <= ci <= 0.985
    assert 0.90 <= pi <= 0.985


def test_autocorrelated_noise_is_covered_only_with_the_correction() -> None:
    ci_plain, _ = _coverage(rho=0.7, n_curves=400, seed=12, calibrate=False)
    ci_cal, pi_cal = _coverage(rho=0.7, n_curves=400, seed=12, calibrate=True)
    assert ci_plain < 0.85  # the naive interval under-covers correlated residuals
    assert ci_cal > ci_plain + 0.05
    assert 0.85 <= ci_cal <= 0.995
    assert 0.85 <= pi_cal <= 0.995


def test_bpb_inf_interval_covers_the_truth() -> None:
    rng = np.random.default_rng(13)
    steps = np.geomspace(100, 100_000, 40)
    hits = []
    for _ in range(150):
        inf, a, p = rng.uniform(1.5, 3), rng.uniform(5, 50), rng.uniform(0.3, 0.8)
        fit = fit_power_law(steps, noisy_curve(rng, inf, a, p, 0.01, steps))
        if fit.ok:
            hits.append(fit.bpb_inf_ci.contains(inf))
    assert len(hits) >= 140
    assert 0.88 <= np.mean(hits) <= 0.995


def test_discrepancy_term_widens_intervals_for_a_misspecified_curve() -> None:
    # A curve that keeps falling linearly in log t (no asymptote) plus a late acceleration:
    # the power law cannot follow it, and the held-out check inside the curve notices.
    steps = np.linspace(500, 12_000, 24)
    y = 4.0 - 0.25 * np.log(steps) - 0.2 * (steps / 12_000) ** 4
    fit = fit_power_law(steps, y)
    assert fit.ok, fit.reason
    assert fit.kappa > 0 and fit.n_holdout > 0
    plain = fit_power_law(steps, y, calibrate=False)
    wide = fit.predict(48_000).pi
    narrow = plain.predict(48_000).pi
    assert wide.high - wide.low > narrow.high - narrow.low
    # No extrapolation, no discrepancy: at the last observed step the two CIs agree more.
    assert fit.predict(12_000).ci.high - fit.predict(12_000).ci.low < wide.high - wide.low


def test_interval_widens_on_the_side_the_curve_leaves() -> None:
    # Falling linearly in t, i.e. faster than any decelerating power law: p sits at its lower
    # bound, every held-out tail lands below its head's fit, and only the low side widens.
    rng = np.random.default_rng(31)
    steps = np.linspace(250, 10_000, 40)
    y = 3.8 - 8e-5 * steps + 0.01 * rng.standard_normal(steps.size)
    fit = fit_power_law(steps, y)
    assert fit.ok, fit.reason
    assert fit.p_at_bound and fit.drift < 0
    pred = fit.predict(14_000)
    assert pred.mean - pred.pi.low > pred.pi.high - pred.mean
    assert pred.mean - pred.ci.low > pred.ci.high - pred.mean
    truth = 3.8 - 8e-5 * 14_000
    assert truth < pred.mean and pred.pi.contains(truth)
    # Inside the observed range nothing is extrapolated, so nothing is moved.
    inside = fit.predict(10_000)
    assert inside.pi.high - inside.mean == pytest.approx(inside.mean - inside.pi.low)


def _cosine_decay_curves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Power law minus a cosine learning-rate decay effect, AR(1) noise; 40 points to 4000."""
    rng = np.random.default_rng(seed)
    steps = np.linspace(100, 4000, 40)
    inf, a, p = rng.uniform(2, 3, n), rng.uniform(3, 30, n), rng.uniform(0.2, 0.8, n)
    depth, noise = rng.uniform(0.05, 0.3, n), rng.uniform(0.005, 0.04, n)
    eps = rng.standard_normal((n, steps.size))
    for j in range(1, steps.size):
        eps[:, j] = 0.3 * eps[:, j - 1] + np.sqrt(1 - 0.09) * eps[:, j]
    shape = (1 - np.cos(np.pi * steps / steps[-1])) / 2
    values = (inf[:, None] + a[:, None] * steps[None] ** -p[:, None]
              - depth[:, None] * shape[None] + noise[:, None] * eps)
    return steps, values


def test_late_decay_final_value_is_covered_from_half_the_horizon() -> None:
    # The schedule bends the curve down in a way no power law follows; from half the horizon
    # on, the held-out drift has seen enough of the bend for the 95% PI to hold the final value.
    steps, values = _cosine_decay_curves(400, seed=41)
    final = values[:, -1]
    for frac, floor in ((0.5, 0.85), (0.7, 0.93)):
        k = int(np.sum(steps <= frac * steps[-1]))
        cal = fit_many(steps[:k], values[:, :k])
        plain = fit_many(steps[:k], values[:, :k], calibrate=False)
        hit = {}
        for name, fit in (("cal", cal), ("plain", plain)):
            pr = fit.predict(steps[-1])
            hit[name] = float(((pr.pi_low <= final) & (final <= pr.pi_high))[fit.ok].mean())
        assert cal.ok.sum() >= 390
        assert floor <= hit["cal"] <= 0.995, (frac, hit)
        assert hit["plain"] < hit["cal"] - 0.04, (frac, hit)
        assert np.mean(cal.drift[cal.ok] < 0) > 0.8  # the held-out tails fall below their fits


# -- no-fit reasons ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps,values,fragment",
    [
        ([1.0, 2.0, 3.0], [3.0, 2.0, 1.5], "fewer than 4"),
        ([], [], "fewer than 4"),
        ([0.0, 1.0, 2.0, 3.0], [4.0, 3.0, 2.0, 1.5], "step 0 dropped"),
        ([1.0, 2.0, 3.0, 4.0], [3.0, float("nan"), 2.0, 1.9], "non-finite"),
        ([1.0, 2.0, float("inf"), 4.0], [3.0, 2.5, 2.0, 1.9], "non-finite"),
        ([1.0, 2.0, 3.0, 4.0], [3.0, 2.5, float("-inf"), 1.9], "non-finite"),
        ([-1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 2.5, 2.0, 1.9, 1.8], "steps below 0"),
        ([1.0, 2.0, 3.0, 9e307], [3.0, 2.5, 2.0, 1.9], "steps below 0 or above"),
        (list(STEPS), [2.5] * STEPS.size, "constant curve"),
        (list(STEPS), list(1.0 + STEPS / 1e4), "no decreasing trend"),
        ([5.0, 5.0, 7.0, 7.0, 7.0], [3.0, 2.9, 2.0, 2.1, 2.05], "distinct steps"),
        ([1.0, 2.0, 3.0], [3.0, 2.0], "differ in length"),
    ],
)
def test_no_fit_reasons(steps: list[float], values: list[float], fragment: str) -> None:
    fit = fit_power_law(steps, values)
    assert not fit.ok
    assert fit.reason is not None and fragment in fit.reason
    assert math.isnan(fit.bpb_inf) and math.isnan(fit.bpb_inf_ci.low)
    pred = fit.predict(1000.0)
    assert math.isnan(pred.mean) and math.isnan(pred.pi.low) and math.isnan(pred.ci.high)


def test_predict_at_invalid_step_is_nan() -> None:
    fit = fit_power_law(STEPS, noisy_curve(np.random.default_rng(4)))
    assert fit.ok
    for bad in (0.0, -5.0, float("nan"), float("inf")):
        assert math.isnan(fit.predict(bad).mean)


# -- never raises --------------------------------------------------------------------------------

_floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
_steps = st.one_of(
    st.floats(min_value=-10, max_value=1e6),
    st.sampled_from([0.0, 1.0, 500.0, 1000.0, float("nan"), float("inf"), -1.0]),
    _floats,
)


def _check_fit(fit: PowerLawFit) -> None:
    if fit.ok:
        assert fit.reason is None
        nums = [fit.bpb_inf, fit.a, fit.p, fit.sigma, fit.bpb_inf_ci.low, fit.bpb_inf_ci.high]
        assert all(math.isfinite(v) for v in nums)
        assert fit.bpb_inf_ci.low <= fit.bpb_inf <= fit.bpb_inf_ci.high
        assert fit.a >= 0 and P_MIN <= fit.p <= P_MAX and fit.n >= 4
        for step in (fit.last_step, 2 * fit.last_step):
            pr = fit.predict(step)
            assert pr.pi.low <= pr.ci.low <= pr.mean <= pr.ci.high <= pr.pi.high
    else:
        assert isinstance(fit.reason, str) and fit.reason
        assert math.isnan(fit.predict(1000.0).mean)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_steps, _floats), min_size=0, max_size=30))
@example([(1.0, 0.0), (1.0, 0.0), (2.0, 1.0), (8.98846567431158e307, 0.0)])  # 2 * step overflows
def test_fit_never_raises_on_arbitrary_points(points: list[tuple[float, float]]) -> None:
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    _check_fit(fit_power_law(steps, values))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(np.float64, st.integers(0, 40), elements=st.floats(0.5, 5.0)),
    st.floats(1e-6, 1.0),
    st.integers(0, 2**32 - 1),
)
def test_fit_never_raises_on_plausible_noisy_curves(
    base: np.ndarray, noise: float, seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    steps = np.cumsum(rng.integers(0, 700, base.size)).astype(float)
    values = np.sort(base)[::-1] + noise * rng.standard_normal(base.size)
    _check_fit(fit_power_law(steps, values))


# -- batched fit ---------------------------------------------------------------------------------


def _random_curves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    steps = np.linspace(100, 10_000, 30)
    inf = rng.uniform(1.5, 3.0, n)
    a = rng.uniform(2.0, 30.0, n)
    p = rng.uniform(0.2, 1.0, n)
    noise = rng.uniform(0.002, 0.05, n)
    values = power_law(steps[None, :], inf[:, None], a[:, None], p[:, None])
    values = values + noise[:, None] * rng.standard_normal((n, steps.size))
    return np.broadcast_to(steps, values.shape).copy(), values


def test_batched_fit_agrees_with_single_fit() -> None:
    steps, values = _random_curves(60, seed=20)
    batch = fit_many(steps, values)
    assert isinstance(batch, BatchFit) and len(batch) == 60
    target = 20_000.0
    bp = batch.predict(target)
    for i in range(60):
        single = fit_power_law(steps[i], values[i])
        assert single.ok == bool(batch.ok[i])
        if not single.ok:
            continue
        half = (single.bpb_inf_ci.high - single.bpb_inf_ci.low) / 2
        assert abs(single.bpb_inf - batch.bpb_inf[i]) <= 0.01 * half + 1e-9
        assert single.sigma == pytest.approx(batch.sigma[i], rel=1e-3)
        pr = single.predict(target)
        width = pr.pi.high - pr.pi.low
        assert abs(pr.mean - bp.mean[i]) <= 0.01 * width
        assert abs(pr.pi.low - bp.pi_low[i]) <= 0.02 * width
        assert abs(pr.ci.high - bp.ci_high[i]) <= 0.02 * width
        assert batch.fit(i).ok


def test_batched_fit_handles_ragged_and_bad_rows() -> None:
    steps, values = _random_curves(5, seed=21)
    values = values.copy()
    values[1, 10] = np.nan  # a NaN inside a curve: no fit for that row only
    values[2] = 2.0  # constant
    counts = np.array([30, 30, 30, 3, 12])
    batch = fit_many(steps, values, counts)
    assert list(batch.ok) == [True, False, False, False, True]
    assert "non-finite" in (batch.reason[1] or "")
    assert "constant" in (batch.reason[2] or "")
    assert "fewer than 4" in (batch.reason[3] or "")
    short = fit_power_law(steps[4, :12], values[4, :12])
    assert batch.bpb_inf[4] == pytest.approx(short.bpb_inf, abs=1e-3)
    pred = batch.predict(np.full(5, 20_000.0))
    assert np.isnan(pred.mean[1:4]).all() and np.isfinite(pred.mean[[0, 4]]).all()


def test_batched_fit_nan_padding_equals_counts() -> None:
    steps, values = _random_curves(4, seed=22)
    counts = np.array([30, 20, 8, 2])
    padded_t = steps.copy()
    padded_v = values.copy()
    for i, c in enumerate(counts):
        padded_t[i, c:] = np.nan
        padded_v[i, c:] = np.nan
    a = fit_many(padded_t, padded_v)
    b = fit_many(steps, values, counts)
    assert list(a.ok) == list(b.ok)
    np.testing.assert_allclose(a.bpb_inf[a.ok], b.bpb_inf[b.ok])
    np.testing.assert_array_equal(a.n, b.n)


def test_level_sets_the_interval_width() -> None:
    rng = np.random.default_rng(23)
    y = noisy_curve(rng, noise=0.02)
    fit = fit_power_law(STEPS, y)
    widths = [fit.predict(24_000, level=lv).pi for lv in (0.5, 0.95, 0.99)]
    spans = [w.high - w.low for w in widths]
    assert spans[0] < spans[1] < spans[2]
    narrow = fit_power_law(STEPS, y, level=0.8)
    assert (narrow.bpb_inf_ci.high - narrow.bpb_inf_ci.low) < (
        fit.bpb_inf_ci.high - fit.bpb_inf_ci.low
    )
    assert not fit_power_law(STEPS, y, level=1.5).ok


def test_batch_predicts_one_step_per_curve() -> None:
    steps, values = _random_curves(3, seed=24)
    batch = fit_many(steps, values)
    targets = np.array([5_000.0, 20_000.0, 40_000.0])
    pred = batch.predict(targets)
    for i, target in enumerate(targets):
        one = batch.fit(i).predict(float(target))
        assert pred.mean[i] == pytest.approx(one.mean, rel=1e-12)
        assert pred.pi_high[i] == pytest.approx(one.pi.high, rel=1e-12)


def test_plain_mode_has_no_corrections() -> None:
    rng = np.random.default_rng(25)
    fit = fit_power_law(STEPS, noisy_curve(rng, noise=0.02), calibrate=False)
    assert fit.ok and fit.rho == 0.0 and fit.kappa == 0.0 and fit.drift == 0.0
    assert fit.df == STEPS.size - 3


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 6).flatmap(
        lambda rows: st.integers(0, 12).flatmap(
            lambda cols: st.tuples(
                hnp.arrays(np.float64, (rows, cols), elements=_steps),
                hnp.arrays(np.float64, (rows, cols), elements=_floats),
                hnp.arrays(np.int64, (rows,), elements=st.integers(-2, cols + 2)),
            )
        )
    ),
    st.booleans(),
)
def test_batched_fit_never_raises_on_arbitrary_arrays(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], use_counts: bool,
) -> None:
    steps, values, counts = data
    batch = fit_many(steps, values, counts if use_counts else None)
    assert len(batch) == steps.shape[0]
    for i in range(len(batch)):
        _check_fit(batch.fit(i))
    pred = batch.predict(1000.0)
    assert np.isnan(pred.mean[~batch.ok]).all()


def test_an_implausible_prediction_is_no_fit_with_the_reason() -> None:
    # A loss that fell from 0.30 to 0.10: below zero is the fit running off.
    v = np.array([0.30, 0.20, 0.15, 0.12, 0.10])
    assert "below zero" in (insane_prediction(v, -0.01) or "")
    assert insane_prediction(v, 0.05) is None and insane_prediction(v, 0.11) is None
    # Further below its best than its whole range (2.8 - 0.2) is too far; 2.65 is not.
    big = np.array([3.0, 2.9, 2.8])
    assert "far below" in (insane_prediction(big, 2.5) or "")
    assert insane_prediction(big, 2.65) is None
    assert "not finite" in (insane_prediction(big, float("nan")) or "")


@pytest.mark.parametrize("seed", range(4))
def test_the_grid_search_gives_the_same_bits_whatever_its_block(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exponents searched several at a time give, to the last bit, what one at a time gives
    (ragged curves, holes, held-out origins)."""
    from gardener.core import fit_solver
    from gardener.core.fit_intervals import _holdout_origins

    rng = np.random.default_rng(seed)
    rows, width = [1, 3, 40, 200][seed], [12, 60, 150, 400][seed]
    m = np.arange(width)[None, :] < rng.integers(0, width + 1, rows)[:, None]
    m &= rng.random((rows, width)) < 0.9
    t = np.cumsum(rng.integers(1, 50, (rows, width)), axis=1).astype(np.float64)
    log_s = np.where(m, np.log(t / t.max(axis=1, keepdims=True)), 0.0)
    y = 2 + 2 * t ** -rng.uniform(0.05, 1.5, (rows, 1)) + rng.normal(0, 1e-3, (rows, width))
    z = np.where(m, (y - y.mean(axis=1, keepdims=True)) / y.std(axis=1, keepdims=True), 0.0)
    n = m.sum(axis=1)
    ks = np.concatenate([n[:, None], _holdout_origins(n)], axis=1)
    with np.errstate(all="ignore"):
        blocked = fit_solver._profile_fit(log_s, z, m, ks)
        monkeypatch.setattr(fit_solver, "GRID_BLOCK", 1)
        single = fit_solver._profile_fit(log_s, z, m, ks)
    for a, b in zip(blocked, single, strict=True):
        assert a.tobytes() == b.tobytes()
