"""Number-format rounding: bit-exact against ml_dtypes where it has the format, GF16 by hand."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gardener.core.formats import (
    FORMATS,
    GF16_MAX,
    gf16_decode,
    gf16_encode,
    round_to,
)

REFERENCE = {
    "BF16": ml_dtypes.bfloat16,
    "FP8E4M3": ml_dtypes.float8_e4m3fn,
    "FP8E5M2": ml_dtypes.float8_e5m2,
}


def _edge_values(name: str) -> np.ndarray:
    """Ties, boundaries, overflow and subnormals of one format, both signs, as float32."""
    f = FORMATS[name]
    m = f.mantissa_bits
    vals: list[float] = [0.0, 1.0, f.max_finite, f.min_normal, math.inf, math.nan]
    for k in range(-2, 4):  # values around the max: just below/at/above the overflow tie
        vals.append(f.max_finite + k * math.ldexp(1.0, math.frexp(f.max_finite)[1] - m - 3))
    for e in (f.min_exponent - m - 1, f.min_exponent - 1, f.min_exponent, 0, 3):
        q = math.ldexp(1.0, e - m)
        base = math.ldexp(1.0, e)
        for j in range(0, 8):  # exact ties between neighbours (odd and even), and near-ties
            vals += [base + (j + 0.5) * q, base + (j + 0.5) * q * (1 + 2**-20)]
    vals += [math.ldexp(1.0, f.min_exponent - m) * t for t in (0.25, 0.5, 0.75, 1.0, 1.5, 2.5)]
    arr = np.array(vals, dtype=np.float32)
    return np.concatenate([arr, -arr])


def _random_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random float32 bit patterns (all exponents) plus a log-uniform spread."""
    bits = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    spread = (rng.choice([-1.0, 1.0], n) * np.exp2(rng.uniform(-30, 20, n))).astype(np.float32)
    return np.concatenate([bits, spread])


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b))
                and np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32)))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_matches_ml_dtypes_bit_for_bit(name: str):
    rng = np.random.default_rng(7)
    x = np.concatenate([_edge_values(name), _random_values(rng, 200_000)])
    ours = round_to(x, name)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = x.astype(REFERENCE[name]).astype(np.float32)
    assert ours.dtype == np.float32
    bad = ~((ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref)))
    assert not bad.any(), list(zip(x[bad][:5], ours[bad][:5], ref[bad][:5], strict=False))


def test_fp8_e4m3_is_finite_only():
    x = np.array([448.0, 463.9, 464.0, 480.0, 1e6, np.inf, -np.inf], dtype=np.float32)
    y = round_to(x, "FP8E4M3")
    assert y[0] == 448.0 and y[1] == 448.0
    assert not np.isinf(y).any()
    assert np.isnan(y[3:]).all()


def test_gf16_hand_computed():
    lo = 2.0**-30
    ulp_max = 2.0**22  # spacing in the top binade [2^31, 2^32)
    cases = [
        (1.0, 1.0),
        (GF16_MAX, 1023 * 2.0**22),
        (GF16_MAX + 0.49 * ulp_max, GF16_MAX),
        (GF16_MAX + 0.5 * ulp_max, math.inf),  # tie between odd max and 2^32: even wins, inf
        (lo, lo),  # min normal
        (lo * (1 - 2**-12), 0.0),  # below the min normal flushes, even if it would round up
        (2.0**-31, 0.0),
        (1.0 + 2**-10, 1.0),  # tie: 1.0 has even mantissa 0
        (1.0 + 3 * 2**-10, 1.0 + 2 * 2**-9),  # tie between m=1 and m=2: even m=2
        (1.0 + 2**-10 + 2**-20, 1.0 + 2**-9),  # just above the tie rounds up
        (3.0, 3.0),
        (-2.5, -2.5),
        (math.inf, math.inf),
        (-math.inf, -math.inf),
    ]
    x = np.array([c[0] for c in cases], dtype=np.float64)
    want = np.array([c[1] for c in cases], dtype=np.float64)
    np.testing.assert_array_equal(round_to(x, "GF16"), want)
    assert np.isnan(round_to(np.array([np.nan]), "GF16")).all()
    neg_zero = round_to(np.array([-(2.0**-33)]), "GF16")
    assert neg_zero[0] == 0.0 and np.signbit(neg_zero[0])


def test_gf16_codes_by_hand():
    x = np.array([1.0, -1.0, 2.0**-30, GF16_MAX, np.inf, -np.inf, 0.0, -0.0, 1.5, np.nan])
    codes = gf16_encode(x)
    assert codes.dtype == np.uint16
    assert [int(c) for c in codes[:9]] == [
        31 << 9, 0x8000 | (31 << 9), 1 << 9, (62 << 9) | 511, 63 << 9, 0x8000 | (63 << 9),
        0, 0x8000, (31 << 9) | 256,
    ]
    assert (int(codes[9]) >> 9) & 0x3F == 63 and int(codes[9]) & 0x1FF != 0
    back = gf16_decode(codes)
    np.testing.assert_array_equal(back[:9], x[:9].astype(np.float32))
    assert np.isnan(back[9])
    # exponent field 0 with a non-zero mantissa has no subnormal meaning: zero
    assert gf16_decode(np.array([5], dtype=np.uint16))[0] == 0.0


def test_gf16_all_codes_round_trip():
    codes = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    vals = gf16_decode(codes)
    finite = np.isfinite(vals) & (vals != 0)
    np.testing.assert_array_equal(gf16_encode(vals[finite]), codes[finite])
    np.testing.assert_array_equal(round_to(vals, "GF16")[finite], vals[finite])
    # decoded finite magnitudes are sorted by code within one sign
    pos = vals[: 0x7E00][(codes[: 0x7E00] >> 9) > 0]
    assert np.all(np.diff(pos) > 0)


def test_dlfloat_top_binade_is_finite_and_ties_go_away_from_zero():
    top = 2.0**32 * (1 + 510 / 512)
    y = round_to(np.array([2.0**32, top, top + 0.99 * 2.0**22, top + 2.0**22, 2.0**-31]),
                 "DLFLOAT")
    np.testing.assert_array_equal(y[:3], [2.0**32, top, top])
    assert np.isinf(y[3])  # the tie above the max goes away from zero: to the NaN/inf code
    assert y[4] == 0.0
    ties = np.array([1.0 + 2**-10, -(1.0 + 2**-10), 1.0 + 3 * 2**-10, 1.0 + 2**-11])
    for x in (ties, ties.astype(np.float32)):
        np.testing.assert_array_equal(round_to(x, "DLFLOAT"),
                                      [1.0 + 2**-9, -(1.0 + 2**-9), 1.0 + 2 * 2**-9, 1.0])
        np.testing.assert_array_equal(round_to(x, "GF16")[:2], [1.0, -1.0])  # GF16: to even


def test_fp32_and_unknown():
    x = np.array([1.0 + 2**-30], dtype=np.float64)
    assert round_to(x, "FP32")[0] == 1.0
    with pytest.raises(ValueError, match="unknown number format"):
        round_to(x, "FP4")


finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(FORMATS)), a=finite_floats, b=finite_floats)
def test_rounding_idempotent_and_monotone(name: str, a: float, b: float):
    x = np.array(sorted([a, b]), dtype=np.float32)
    y = round_to(x, name)
    z = round_to(y, name)
    assert _same_bits(y, z) or (np.isnan(y).any() and np.isnan(z).any())
    if not np.isnan(y).any():
        assert y[0] <= y[1]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_float32_fast_path_equals_exact_float64_path(name: str):
    rng = np.random.default_rng(11)
    x = np.concatenate([_edge_values(name), _random_values(rng, 100_000)])
    fast = round_to(x, name)
    with np.errstate(invalid="ignore"):
        exact = round_to(x.astype(np.float64), name).astype(np.float32)
    assert fast.dtype == np.float32
    assert _same_bits(fast, exact)
