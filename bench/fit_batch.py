"""Speed of the batched fit, and its agreement with the single-curve fit. Prints JSON.

Synthetic noisy power-law curves (seeded): ``N`` curves of ``M`` points each. The batched
fit runs ``REPEATS`` times (the best and median are reported) with and without calibration;
then ``CHECK`` curves are refitted one by one with ``fit_power_law`` and compared.
Usage: python bench/fit_batch.py [N] [M]
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import numpy as np

from gardener.core.fit import fit_many, fit_power_law

REPEATS = 5
CHECK = 200


def make_curves(n: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Curves like real BPB curves: random asymptote, amplitude, exponent and noise level."""
    rng = np.random.default_rng(seed)
    steps = np.linspace(100, 10_000, m)
    inf = rng.uniform(1.5, 3.0, n)
    a = rng.uniform(2.0, 30.0, n)
    p = rng.uniform(0.2, 1.0, n)
    noise = rng.uniform(0.002, 0.05, n)
    values = inf[:, None] + a[:, None] * steps[None, :] ** -p[:, None]
    values = values + noise[:, None] * rng.standard_normal((n, m))
    return np.broadcast_to(steps, (n, m)).copy(), values


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds of each run (CPU time is less disturbed by other load)."""
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    m = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    steps, values = make_curves(n, m)
    load_before = os.getloadavg()[0]
    cal, cal_cpu = timed(lambda: fit_many(steps, values), REPEATS)
    plain, plain_cpu = timed(lambda: fit_many(steps, values, calibrate=False), REPEATS)
    batch = fit_many(steps, values)
    target = 2 * steps[0, -1]
    bp = batch.predict(target)
    d_inf, d_p, d_pred, d_pi = [], [], [], []
    agree_ok = 0
    t0 = time.perf_counter()
    for i in range(min(CHECK, n)):
        single = fit_power_law(steps[i], values[i])
        agree_ok += single.ok == bool(batch.ok[i])
        if single.ok and batch.ok[i]:
            pr = single.predict(target)
            d_inf.append(abs(single.bpb_inf - batch.bpb_inf[i]))
            d_p.append(abs(single.p - batch.p[i]))
            d_pred.append(abs(pr.mean - bp.mean[i]))
            d_pi.append(abs((pr.pi.high - pr.pi.low) - (bp.pi_high[i] - bp.pi_low[i])))
    single_s = (time.perf_counter() - t0) / min(CHECK, n)
    best = min(cal)
    print(json.dumps({
        "curves": n,
        "points": m,
        "seconds": best,
        "seconds_median": float(np.median(cal)),
        "curves_per_second": n / best,
        "cpu_seconds": min(cal_cpu),
        "seconds_plain_delta": min(plain),
        "cpu_seconds_plain_delta": min(plain_cpu),
        "ok_share": float(batch.ok.mean()),
        "single_fit_seconds_each": single_s,
        "agreement": {
            "checked": min(CHECK, n),
            "same_ok": agree_ok,
            "max_abs_diff_bpb_inf": max(d_inf, default=None),
            "max_abs_diff_p": max(d_p, default=None),
            "max_abs_diff_pred_2x_horizon": max(d_pred, default=None),
            "max_abs_diff_pi_width_2x_horizon": max(d_pi, default=None),
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
