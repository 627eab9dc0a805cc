"""``decide`` over one race, one rung crossing at a time, in-process (no database).

A race of ``--trials`` live trials (samples every 10 steps to step 450, decided at rung 0, as
``decision_latency.py`` loads them) is decided once; then, ``--crossings`` times, one trial
gets its step-500 sample (a new ``TrialView``, the others unchanged, as the daemon's sample
cache hands them) and the race is decided again and the decisions applied to the snapshot.
Prints the CPU of those decides and a digest of every decision (action, trial, rung, reason,
numbers, spawns), so a change that must not change a decision can be checked by its digest.

    .venv/bin/python bench/decide_crossings.py --trials 1000 --crossings 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gardener.core.config import DecisionConfig
from gardener.core.decide import apply_to_snapshot, decide
from gardener.core.types import Snapshot, TrialView


def race(n: int) -> Snapshot:
    rng = np.random.default_rng(7)
    variant = "IGLA-HYBRID-FP32-WSD-R0"
    trials = []
    for i in range(n):
        offset = rng.uniform(0, 0.2)
        steps = np.arange(10, 451, 10, dtype=np.int64)
        bpb = np.round(2.0 + offset + 2.0 * steps**-0.4 + rng.normal(0, 0.002, steps.size), 4)
        trials.append(TrialView(f"{variant}-E{10 + i:04d}-seed{10_000 + i}", variant,
                                10_000 + i, steps, bpb, rung=0, last_sample_at=1000.0))
    used = {variant: frozenset(range(10_000, 10_000 + n))}
    return Snapshot("bench-0", 1010.0, tuple(trials), used_seeds=used, horizon=81000)


def main(args: argparse.Namespace) -> dict[str, object]:
    cfg = DecisionConfig()
    snap = race(args.trials)
    snap = apply_to_snapshot(snap, decide(snap, cfg))
    rng = np.random.default_rng(11)
    cpu: list[float] = []
    said: list[list[tuple[object, ...]]] = []
    for k in range(args.crossings):
        t = snap.trials[k]
        bpb = round(2.2 + rng.uniform(0, 0.1), 4)
        moved = replace(t, steps=np.append(t.steps, 500), bpb=np.append(t.bpb, bpb))
        snap = replace(snap, trials=tuple(moved if x is t else x for x in snap.trials))
        c0 = time.process_time()
        out = decide(snap, cfg)
        cpu.append(time.process_time() - c0)
        said.append([(d.action.value, d.canon_name, d.rung, d.reason, repr(d.numbers),
                      repr(d.spawn)) for d in out])
        snap = apply_to_snapshot(snap, out)
    ms = np.asarray(cpu) * 1000
    return {
        "trials": args.trials,
        "crossings": args.crossings,
        "decide_cpu_ms": {"median": round(float(np.median(ms)), 2),
                          "mean": round(float(ms.mean()), 2),
                          "min": round(float(ms.min()), 2), "max": round(float(ms.max()), 2)},
        "decisions": sum(len(s) for s in said),
        "digest": hashlib.sha256(json.dumps(said).encode()).hexdigest()[:16],
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--crossings", type=int, default=100)
    print(json.dumps(main(ap.parse_args()), indent=2))
