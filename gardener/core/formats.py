"""Number-format emulation: round float arrays to what a narrower format can hold.

The trainer emulates low-precision training by rounding weights and activations to the race's
format after every operation that produces them (values stay in float32 storage). Rounding is
to nearest (ties to even; DLFLOAT ties away from zero), computed exactly: for a value with
binary exponent e (clamped at the format's smallest normal exponent, which yields subnormals
where a format has them) the quantum is ``2**(e - mantissa_bits)`` and rounding the value in
quanta to an integer is exact in float64.

Formats (sign:exponent:mantissa):
  BF16     1:8:7,  IEEE-like, subnormals, overflow to inf
  FP8E4M3  1:4:3,  OCP E4M3FN: finite only, max 448, subnormals, overflow (and inf) to NaN
  FP8E5M2  1:5:2,  OCP E5M2: IEEE-like, max 57344, subnormals, overflow to inf
  GF16     1:6:9,  bias 31, value (-1)^s 2^(e-31) (1 + m/512); e = 63 is inf (m = 0) or NaN,
           e = 0 is zero; no subnormals: magnitudes below 2^-30 flush to (signed) zero
  DLFLOAT  1:6:9,  bias 31, IBM's DLFloat: no subnormals, one all-ones code for NaN/inf, so
           exponent field 63 holds finite numbers (max 2^32 (1 + 510/512)), and its single
           simplified rounding mode, round-nearest-up (ties away from zero); the bottom is
           taken to be as in GF16 (flush below 2^-30)
Flushing looks at the magnitude before rounding: ``|x| < min_normal`` gives zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True)
class NumberFormat:
    """The parameters that decide rounding: precision, exponent range and special values."""

    name: str
    mantissa_bits: int
    min_exponent: int  # unbiased exponent of the smallest normal number
    max_finite: float
    subnormals: bool
    overflow: Literal["inf", "nan"]
    ties: Literal["even", "away"] = "even"

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.min_exponent)


FORMATS: dict[str, NumberFormat] = {
    "BF16": NumberFormat("BF16", 7, -126, math.ldexp(255.0, 127 - 7), True, "inf"),
    "FP8E4M3": NumberFormat("FP8E4M3", 3, -6, 448.0, True, "nan"),
    "FP8E5M2": NumberFormat("FP8E5M2", 2, -14, 57344.0, True, "inf"),
    "GF16": NumberFormat("GF16", 9, -30, math.ldexp(1023.0, 31 - 9), False, "inf"),
    "DLFLOAT": NumberFormat("DLFLOAT", 9, -30, math.ldexp(1022.0, 32 - 9), False, "inf", "away"),
}
FORMAT_NAMES: tuple[str, ...] = ("FP32", *FORMATS)

GF16_BIAS = 31
GF16_MAX = FORMATS["GF16"].max_finite  # 2^31 * 1023/512
GF16_MIN_NORMAL = FORMATS["GF16"].min_normal  # 2^-30
_GF16_INF = 0x7E00
_GF16_NAN = 0x7F00


def round_to(x: npt.ArrayLike, fmt: str | NumberFormat) -> FloatArray:
    """Round every element of ``x`` to the nearest value of ``fmt`` (ties as the format says).

    Returns an array of the input's float dtype (float64 for non-float input); "FP32" rounds
    to float32. Every format here is exactly representable in float32.
    """
    arr = np.asarray(x)
    out_dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    if isinstance(fmt, str):
        if fmt == "FP32":
            return arr.astype(np.float32).astype(out_dtype, copy=False)
        try:
            fmt = FORMATS[fmt]
        except KeyError:
            raise ValueError(f"unknown number format {fmt!r} (known: {FORMAT_NAMES})") from None
    if arr.dtype == np.float32:
        return _round_f32(arr, fmt)
    with np.errstate(invalid="ignore", over="ignore"):  # signalling NaN bit patterns, inf
        v = arr.astype(np.float64)
        mag = np.abs(v)
        _, e = np.frexp(mag)
        e = np.maximum(e - 1, fmt.min_exponent) - fmt.mantissa_bits
        scaled = np.ldexp(v, -e)
        if fmt.ties == "even":
            whole = np.rint(scaled)
        else:  # |scaled| < 2^(mantissa_bits + 2): adding a half is exact in float64
            whole = np.copysign(np.floor(np.abs(scaled) + 0.5), scaled)
        y = np.ldexp(whole, e)
        too_big = np.abs(y) > fmt.max_finite
        if fmt.overflow == "nan":
            y = np.where(too_big | np.isinf(v), np.nan, y)
        else:
            y = np.where(too_big, np.copysign(np.inf, v), y)
        if not fmt.subnormals:
            y = np.where(mag < fmt.min_normal, np.copysign(0.0, v), y)
        return y.astype(out_dtype, copy=False)


def _round_f32(x: npt.NDArray[np.float32], fmt: NumberFormat) -> npt.NDArray[np.float32]:
    """The same rounding on float32 bit patterns, many times faster (the trainer's hot path).

    Normal range: add half a quantum minus one plus the kept LSB to the bit pattern and mask
    (ties to even, carries into the exponent as they should). Below the format's smallest
    normal, adding and subtracting 1.5 * 2^(min_exponent - mantissa_bits + 23) rounds to the
    fixed subnormal quantum in float32 arithmetic, ties to even. Overflow and NaN are rare:
    one max() over the magnitudes decides whether they need handling at all.
    """
    shift = 23 - fmt.mantissa_bits
    bits = np.ascontiguousarray(x).view(np.uint32)
    mag = bits & np.uint32(0x7FFFFFFF)
    if fmt.ties == "even":
        r = bits >> np.uint32(shift)
        r &= np.uint32(1)
        r += np.uint32((1 << (shift - 1)) - 1)
        r += bits  # wraps only for NaN patterns, which are replaced below
    else:  # sign-magnitude: half a quantum added to the magnitude rounds ties away from zero
        r = bits + np.uint32(1 << (shift - 1))
    r &= np.uint32(~((1 << shift) - 1) & 0xFFFFFFFF)
    tiny = mag < _bits_of(fmt.min_normal)
    # all-ones where tiny: branch-free blends are several times faster than np.where here
    mask = np.uint32(0) - tiny.astype(np.uint32)
    if fmt.subnormals:
        if tiny.any():
            magic = np.float32(1.5 * math.ldexp(1.0, fmt.min_exponent - fmt.mantissa_bits + 23))
            with np.errstate(invalid="ignore", over="ignore"):
                sub = np.abs(x) + magic
                sub -= magic
            alt = sub.view(np.uint32) | (bits & np.uint32(0x80000000))
            alt ^= r
            alt &= mask
            r ^= alt
    else:
        mask = ~mask
        mask |= np.uint32(0x80000000)
        r &= mask  # flush to zero, keeping the sign
    max_bits = _bits_of(fmt.max_finite)
    if mag.size and max(int(mag.max()), int((r & np.uint32(0x7FFFFFFF)).max())) > max_bits:
        nan_in = mag > np.uint32(0x7F800000)
        over = ((r & np.uint32(0x7FFFFFFF)) > max_bits) & ~nan_in  # includes inf input
        if fmt.overflow == "nan":
            r[over | nan_in] = np.uint32(0x7FC00000)
        else:
            r[over] = (bits[over] & np.uint32(0x80000000)) | np.uint32(0x7F800000)
            r[nan_in] = np.uint32(0x7FC00000)
    return r.view(np.float32)


def _bits_of(value: float) -> np.uint32:
    return np.uint32(int(np.array([value], dtype=np.float32).view(np.uint32)[0]))


def gf16_encode(x: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """Round to GF16 and pack as 16-bit codes: sign bit 15, exponent bits 14-9, mantissa 8-0."""
    y = round_to(np.asarray(x, dtype=np.float64), "GF16").astype(np.float64)
    sign = np.signbit(y).astype(np.uint16) << 15
    mag = np.abs(y)
    frac, e = np.frexp(mag)  # mag = frac * 2^e, frac in [0.5, 1)
    normal = np.isfinite(mag) & (mag > 0)
    exp_field = np.where(normal, e - 1 + GF16_BIAS, 0).astype(np.uint16)
    mant = np.where(normal, np.rint((frac * 2.0 - 1.0) * 512.0), 0).astype(np.uint16)
    code = sign | (exp_field << 9) | mant
    code = np.where(np.isinf(mag), sign | _GF16_INF, code)
    code = np.where(np.isnan(mag), _GF16_NAN, code)
    return code.astype(np.uint16)


def gf16_decode(code: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Unpack 16-bit GF16 codes to float32; exponent field 0 decodes to (signed) zero."""
    c = np.asarray(code).astype(np.uint32)
    sign = np.where(c & 0x8000, -1.0, 1.0)
    exp_field = ((c >> 9) & 0x3F).astype(np.int64)
    mant = (c & 0x1FF).astype(np.float64)
    val = np.ldexp(1.0 + mant / 512.0, exp_field - GF16_BIAS)
    val = np.where(exp_field == 0, 0.0, val)
    val = np.where(exp_field == 63, np.where(mant == 0, np.inf, np.nan), val)
    return (sign * val).astype(np.float32)
